"""Peak memory of ``bcr solve`` against the size of its input, two sizes side by side: does it stay flat?

    python -m benchmarks.solve_memory                                   # 1,000 and 1,000,000 problems
    python -m benchmarks.solve_memory baseline=14b61f4                  # and the code of a git revision
    python -m benchmarks.solve_memory sizes=[1000,100000] answered=200  # quicker

Every (code, size) is one ``bcr solve`` child process (one torch thread) whose peak resident memory is
its ``ru_maxrss`` from ``os.wait4``, with its wall time. The model is a tiny random one
(:mod:`bcr.models.tiny`); the input of size S repeats ``answered`` synthetic arithmetic problems under
ids ``q0`` ... ``q<S-1>``, with their reference answers.

Answering a million problems with any model takes hours here, so at every size a child answers about
the same number of problems, the last ``answered`` ones (rounded up to whole batches): before it runs,
its output is filled with answers to all the problems before them, as a run killed there would have
left it. The first ``answered`` of those are a real run's (the code under test, ``limit=answered``, with
its settings record); the rest repeat them with the ids, bundle indices and references of their
problems. The measured child then does at full size everything that could grow with the file (reads
and checks the whole input, reads and checks the whole output against it, skips to where it stopped)
and answers the rest exactly as a fresh run would. At the smallest size nothing is filled: it is a
fresh run.

``baseline=<rev>`` also runs the ``bcr`` of that git revision (``git archive`` into a temporary
directory) the same way, for comparison. Output: a table on stdout and
``benchmarks/results/solve_memory.{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bcr.runtime.dataclass_cli import ConfigError, parse_cli

from . import harness


@dataclass
class SolveMemoryConfig:
    """Options of ``python -m benchmarks.solve_memory`` (``key=value``)."""

    sizes: list[int] = field(default_factory=lambda: [1000, 1_000_000], metadata={"help": "problems in the input"})
    answered: int = field(default=1000, metadata={"help": "problems each child answers (the last ones)"})
    n: int = field(default=8, metadata={"help": "problems per prompt"})
    batch_size: int = field(default=16, metadata={"help": "bundles per generate call"})
    per_problem_budget: int = field(default=4, metadata={"help": "new tokens per problem"})
    baseline: str | None = field(default=None, metadata={"help": "also measure the bcr of this git revision"})
    timeout: float = field(default=3600.0, metadata={"help": "seconds one child may take"})
    out: str | None = field(default=None, metadata={"help": "report prefix (default: benchmarks/results/solve_memory)"})


def _write_inputs(folder: Path, cfg: SolveMemoryConfig) -> dict[int, Path]:
    from bcr.task.synthetic import make_arithmetic_problems

    base = make_arithmetic_problems(cfg.answered, seed=0)
    rows = [json.dumps({"problem": p.problem, "answer": p.answer}, ensure_ascii=False)[1:] for p in base]
    paths = {}
    for size in cfg.sizes:
        paths[size] = folder / f"problems_{size}.jsonl"
        with open(paths[size], "w", encoding="utf-8") as f:
            f.writelines(f'{{"id": "q{i}", {rows[i % len(rows)]}\n' for i in range(size))
    return paths


def _tree(rev: str | None, folder: Path) -> Path:
    """The repository root whose ``bcr`` a child runs: this one, or ``rev`` unpacked into ``folder``."""
    if rev is None:
        return harness.REPO
    folder.mkdir()
    archive = subprocess.run(["git", "archive", rev, "bcr", "bcr_kernels"], cwd=harness.REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _solve(tree: Path, args: list[str], timeout: float) -> dict:
    """Run ``bcr solve`` with the ``bcr`` of ``tree``; its peak RSS (``ru_maxrss``), wall time and status."""
    env = harness.child_env({"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bcr", "solve", *args], cwd=tree, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            proc.returncode = 0  # reaped here; Popen must not wait for it again
        seconds = time.perf_counter() - started
        log.seek(0)
        tail = log.read().decode("utf-8", "replace")[-2000:]
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or seconds > timeout:
        raise RuntimeError(f"bcr solve {' '.join(args)} failed (exit {code}):\n{tail}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds, "log_tail": tail[-600:]}


def _prefill(output: Path, template_lines: list[str], upto: int, n: int) -> None:
    """Append answers for problems ``len(template_lines)`` .. ``upto - 1``: copies of the template's lines with
    their problem's id and bundle index (problem i repeats problem i % answered, so its reference is the same)."""
    templates = [json.loads(line) for line in template_lines]
    with open(output, "a", encoding="utf-8") as f:
        for i in range(len(templates), upto):
            record = dict(templates[i % len(templates)])
            record["id"], record["bundle_index"] = f"q{i}", i // n
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _measure(tree: Path, data: Path, size: int, folder: Path, cfg: SolveMemoryConfig) -> dict:
    output = folder / f"answers_{size}.jsonl"
    common = [f"model={folder / 'model'}", f"input={data}", f"output={output}", f"n={cfg.n}",
              f"batch_size={cfg.batch_size}", f"per_problem_budget={cfg.per_problem_budget}", "temperature=1.0",
              "top_p=1.0", "progress=false"]
    chunk = cfg.n * cfg.batch_size
    filled = max(size - cfg.answered, 0) // chunk * chunk
    if filled:
        _solve(tree, [*common, f"limit={min(cfg.answered, filled)}"], cfg.timeout)  # the real answers to copy
        lines = output.read_text().splitlines(keepends=True)
        _prefill(output, lines, filled, cfg.n)
    result = _solve(tree, common, cfg.timeout)
    total = sum(1 for _ in open(output, "rb"))
    if total != size:
        raise RuntimeError(f"{output} has {total} lines, not {size}")
    return {"size": size, "filled": filled, "answered": size - filled, **result}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def run(cfg: SolveMemoryConfig) -> dict:
    from bcr.models.tiny import build_tokenizer, tiny_model

    rows = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tok = build_tokenizer()
        tiny_model(tok, seed=0).save_pretrained(folder / "model")
        tok.save_pretrained(folder / "model")
        inputs = _write_inputs(folder, cfg)
        for name, rev in [("this tree", None), *([(f"baseline {cfg.baseline}", cfg.baseline)] if cfg.baseline else [])]:
            tree = _tree(rev, folder / "baseline")
            for size in cfg.sizes:
                row = _measure(tree, inputs[size], size, folder, cfg)
                rows.append({"code": name, **row})
                print(f"{name}: {size} problems: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['seconds']:.0f} s",
                      flush=True)
                for path in folder.glob(f"answers_{size}.jsonl*"):
                    path.unlink()
        load.append(os.getloadavg()[0])
    return {"benchmark": "solve_memory", "date": harness.now(), "device_name": _cpu_model(),
            "cpu_count": os.cpu_count(), "load_average_start_end": load,
            "command": harness.command("benchmarks.solve_memory", None), "git": harness.git_state(),
            "versions": harness.versions(("torch", "transformers")),
            "settings": {k: v for k, v in vars(cfg).items() if k != "out"}, "rows": rows}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"**bcr solve, peak RSS against input size** ({report['date']}, {report['device_name']}, "
             f"{report['cpu_count']} cores, load average {report['load_average_start_end'][0]:.1f} at the start, "
             f"{report['load_average_start_end'][1]:.1f} at the end); tiny random model, n={s['n']}, "
             f"batch_size={s['batch_size']}, {s['per_problem_budget']} tokens per problem, one torch thread",
             "", f"`{report['command']}`", "",
             "| code | problems in the input | answered by the run (the rest filled before) | peak RSS MiB | wall s |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['code']} | {r['size']:,} | {r['answered']:,} | {r['peak_rss_mib']:.0f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    try:
        cfg = parse_cli(SolveMemoryConfig, sys.argv[1:] if argv is None else argv,
                        prog="python -m benchmarks.solve_memory")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg is None:
        return 0
    report = run(cfg)
    prefix = Path(cfg.out) if cfg.out else harness.RESULTS / "solve_memory"
    text = markdown(report)
    harness.write_report(prefix, report, text)
    print(text)
    print(f"wrote {prefix}.json and {prefix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
