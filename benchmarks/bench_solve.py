"""``bcr solve`` at N = 1, 2, 4, 6 side by side: problems/s, tokens per problem and accuracy, retries counted.

    python -m benchmarks.bench_solve model=runs/demo/bcr        # the demo's BCR model, its sweep's problems
    python -m benchmarks.bench_solve model=runs/demo/bcr num_problems=240
    python -m benchmarks.bench_solve model=<dir> n_values=[1,2,4,6] repeats=3 out=benchmarks/results/bench_solve_x
    python -m benchmarks.bench_solve model=tiny-random num_problems=12 per_problem_budget=8   # seconds: the smoke test

The problems are the held-out problems of the demo's synthetic task (:func:`bcr.demo.task.make_task`), drawn
with the settings of the ``demo_config.yaml`` found in a parent directory of ``model`` (the demo's defaults
when there is none), ``task.num_eval_problems`` of them (the demo sweep's problems) or ``num_problems``: the
same problems at every N. Decoding
settings (budget per problem, temperature, top-p, numbered N = 1 format) are the demo sweep's unless given.

The model is loaded once; each N is one :func:`bcr.solve` call on that model (``repeats`` times, in the order
N = 1, 2, 4, 6, 1, 2, ... so that a slower stretch of a shared machine does not fall on one N), each into a
fresh answers file. Per N the report gives:

- problems/s: problems answered / wall time of the call after the model is loaded (generation, parsing,
  scoring, retries, writing), the median of the repeats with min-max;
- tokens per problem: generated tokens (every bundle's completion plus every retry) / problems, and the
  bundles' share alone (what the task-scaling law is about; the rest is the retries' cost);
- accuracy: the final answers (the retry's where it was better), over all problems; the strict share; how
  many problems were retried alone and how many of them the retry answered.

Output: a table on stdout and ``<out>.json`` / ``<out>.md`` through ``benchmarks.harness``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bcr.runtime.dataclass_cli import ConfigError, load_dataclass, parse_cli

from . import harness


@dataclass
class BenchSolveConfig:
    """Options of ``python -m benchmarks.bench_solve`` (``key=value``)."""

    model: str = field(default="tiny-random", metadata={"help": "an HF model directory, or tiny-random"})
    n_values: list[int] = field(default_factory=lambda: [1, 2, 4, 6], metadata={"help": "the Ns, side by side"})
    num_problems: int | None = field(default=None, metadata={"help": "held-out problems of the demo's task "
                                                                      "(default: its sweep's, task.num_eval_problems)"})
    demo_config: str | None = field(default=None, metadata={"help": "the demo's demo_config.yaml (default: found "
                                                                     "above model, else the demo's defaults)"})
    per_problem_budget: int | None = field(default=None, metadata={"help": "new tokens per problem (default: the "
                                                                            "demo sweep's)"})
    temperature: float | None = field(default=None, metadata={"help": "default: the demo sweep's"})
    top_p: float | None = field(default=None, metadata={"help": "default: the demo sweep's"})
    batch_size: int = field(default=32, metadata={"help": "bundles per generate call"})
    retry: bool = field(default=True, metadata={"help": "retry missing or cut-off answers alone"})
    repeats: int = field(default=1, metadata={"help": "timed solve calls per N"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str | None = field(default=None, metadata={"help": "report prefix (default: "
                                                             "benchmarks/results/bench_solve_<model>)"})


def _demo_config(cfg: BenchSolveConfig):
    from bcr.demo.config import DemoConfig

    path = Path(cfg.demo_config) if cfg.demo_config else None
    if path is None and cfg.model != "tiny-random":
        path = next((p / "demo_config.yaml" for p in Path(cfg.model).resolve().parents
                     if (p / "demo_config.yaml").is_file()), None)
    demo = load_dataclass(DemoConfig, path) if path else DemoConfig()
    if cfg.num_problems:
        demo = dataclasses.replace(demo, task=dataclasses.replace(demo.task, num_eval_problems=cfg.num_problems))
    return demo, path


def _model(cfg: BenchSolveConfig):
    if cfg.model == "tiny-random":
        from bcr.models.tiny import build_tokenizer, tiny_model

        tok = build_tokenizer()
        return tiny_model(tok, seed=0), tok, "tiny random Qwen2 (untrained)"
    from bcr.models.loading import load_model

    model, tok = load_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    return model, tok, f"{cfg.model} ({params / 1e6:.2f}M params)"


def run(cfg: BenchSolveConfig) -> dict:
    from bcr import solve
    from bcr.demo.task import make_task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    demo, demo_path = _demo_config(cfg)
    try:
        problems = make_task(demo)[1]
    except RuntimeError as err:  # the task's held-out texts are fewer than asked for
        raise ConfigError(f"num_problems={demo.task.num_eval_problems}: {err}") from None
    model, tok, described = _model(cfg)
    settings = dict(budget_mode="per_problem",
                    per_problem_budget=cfg.per_problem_budget or demo.eval.per_problem_budget,
                    temperature=cfg.temperature if cfg.temperature is not None else demo.eval.temperature,
                    top_p=cfg.top_p if cfg.top_p is not None else demo.eval.top_p,
                    numbered_single=demo.task.numbered_single, batch_size=cfg.batch_size, retry=cfg.retry,
                    seed=cfg.seed, engine="hf", progress=False)
    runs: dict[int, list[dict]] = {n: [] for n in cfg.n_values}
    bundle_tokens: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        solve(model, problems[: max(cfg.n_values)], output=Path(tmp) / "warm.jsonl", tokenizer=tok,
              n=max(cfg.n_values), **settings)  # untimed: first-call costs (allocator, math-verify import)
        for r in range(cfg.repeats):
            for n in cfg.n_values:
                runs[n].append(solve(model, problems, output=Path(tmp) / f"n{n}-{r}.jsonl", tokenizer=tok, n=n,
                                     **settings))
                answers = [json.loads(line) for line in Path(runs[n][-1]["output"]).read_text().splitlines()]
                bundle_tokens[n] = sum(a["bundle_tokens"] / a["bundle_size"] for a in answers) / len(answers)
    rows = []
    for n, results in runs.items():
        rates = [res["problems_per_s"] for res in results]
        first = results[0]  # the answers do not depend on the repeat (same seeds)
        rows.append({
            "n": n, "problems": first["problems"], "problems_per_s": statistics.median(rates),
            "problems_per_s_min": min(rates), "problems_per_s_max": max(rates),
            "tokens_per_problem": first["tokens_per_problem"], "bundle_tokens_per_problem": bundle_tokens[n],
            "accuracy": first["accuracy"],
            "strict": first["strict"], "flexible": first["flexible"], "unanswered": first["unanswered"],
            "retried": first["retried"], "answered_by_retry": first["answered_by_retry"],
            "seconds": [res["seconds"] for res in results],
        })
    return {
        "benchmark": "bench_solve", "model": described, "device": "cpu", "device_name": harness.device_name("cpu"),
        "date": harness.now(), "command": harness.command("benchmarks.bench_solve", None),
        "versions": harness.versions(("torch", "transformers")), "git": harness.git_state(),
        "torch_threads": torch.get_num_threads(), "demo_config": str(demo_path) if demo_path else "the demo's defaults",
        "problems": f"{len(problems)} held-out problems of the demo's task (seed {demo.seed})",
        "settings": {k: v for k, v in settings.items() if k != "progress"}, "repeats": cfg.repeats, "rows": rows,
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"**bcr solve** on {report['problems']}, model {report['model']}; {report['device_name']}, "
        f"{report['torch_threads']} torch threads, {report['date']}; budget {s['per_problem_budget']} tokens per "
        f"problem, temperature {s['temperature']}, top-p {s['top_p']}, retry {s['retry']}, "
        f"median of {report['repeats']} run(s)",
        "",
        f"`{report['command']}`",
        "",
        "| N | problems/s (min-max) | tokens/problem | of which bundles | accuracy % | strict | retried alone "
        "(answered by retry) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        acc = f"{100 * r['accuracy']:.1f}" if r["accuracy"] is not None else "-"
        lines.append(f"| {r['n']} | {r['problems_per_s']:.2f} ({r['problems_per_s_min']:.2f}-"
                     f"{r['problems_per_s_max']:.2f}) | {r['tokens_per_problem']:.1f} | {r['bundle_tokens_per_problem']:.1f} | {acc} | "
                     f"{r['strict']}/{r['problems']} | {r['retried']} ({r['answered_by_retry']}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    try:
        cfg = parse_cli(BenchSolveConfig, sys.argv[1:] if argv is None else argv, prog="python -m benchmarks.bench_solve")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg is None:
        return 0
    try:
        report = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = "tiny-random" if cfg.model == "tiny-random" else "-".join(Path(cfg.model).resolve().parts[-2:])
    prefix = Path(cfg.out) if cfg.out else harness.RESULTS / f"bench_solve_{name}"
    text = markdown(report)
    harness.write_report(prefix, report, text)
    print(text)
    print(f"wrote {prefix}.json and {prefix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
