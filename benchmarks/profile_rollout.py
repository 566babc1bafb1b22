"""Rollout throughput against N (problems per context) with the ``hf`` engine's decoding paths.

    python -m benchmarks.profile_rollout                                # tiny random Qwen2, N = 1, 2, 4, 8
    python -m benchmarks.profile_rollout --model runs/demo/sft          # a local model dir (the demo's SFT model)
    python -m benchmarks.profile_rollout --data /path/test.jsonl        # problems from a file / benchmark name
    python -m benchmarks.profile_rollout --quick                        # seconds; what the smoke test runs

The same ``--num-problems`` problems (synthetic arithmetic from ``bcr.task.synthetic``, or ``--data``) are
bundled N at a time (``bcr.data.bundling.bundle_sequential``), rendered with ``bcr.task.prompts.render_prompt``
and sampled ``--num-generations`` times each with a shared budget of ``--per-problem-budget x N`` new
tokens (KV cache on, temperature ``--temperature``). For every mode and N one untimed warm-up call
runs, then ``--repeats`` timed calls; the table shows medians and min-max spreads.

- problems/s = problems answered (N per completion, ``G`` completions per prompt) / wall time;
- tokens/s = generated tokens (up to and including EOS) / wall time.

A random model almost never emits EOS, so every completion runs to its budget and tokens per
problem stay constant in N; that is reported (``truncated`` column), not hidden. A trained model
(``--model``) stops by itself, and BCR's claim is that it needs fewer tokens per problem as N grows.
``--ignore-eos`` forces the random-model behaviour on any model (every completion runs to budget).

Modes (``--modes``), all producing completions for the same prompts, seeds and budgets:

- ``hf``: ``bcr.models.rollout.HFEngine(decode="generate")``: one ``model.generate`` call for all prompts of
  the step (prompts x G rows, left padding), the seeded sampler as its logits processor. The baseline
  (the engine's only path before ``decode="loop"``).
- ``hf-sequential``: the same with ``batch_size=G``: one bundle per ``generate`` call (what a caller
  looping over prompts gets).
- ``hf-static``: ``hf`` with ``cache_implementation="static"`` (a pre-allocated KV cache), set on the
  model's own ``generation_config`` while the mode runs (``generate`` fills the settings the engine
  leaves unset from it) and restored afterwards.
- ``hf-compile``: ``hf-static`` with the model's forward under ``torch.compile`` (slow first call; the
  warm-up absorbs it, but each new shape recompiles); the plain forward is restored afterwards.
- ``loop``: ``bcr.models.rollout.make_engine("hf", model, tokenizer)`` exactly as the trainer uses it: the
  engine's own decode loop (``decode="loop"``: the same left-padded prefill, ``DynamicCache``, the same
  seeded sampler, no generation-utils machinery per token) with finished rows dropped from the batch
  (``compact_finished=True``).
- ``loop-nocompact``: ``loop`` with ``compact_finished=False`` (finished rows stay in the batch, as in
  ``generate``).

Every mode's completions are compared token by token with ``hf`` (``same_as_hf`` column).

Output: a table on stdout, ``<out>.json`` (raw timings, versions, command), ``<out>.md`` (markdown
snippet) and ``<out>.png`` (problems/s and tokens/s vs N, one line per mode), written through
``benchmarks.harness``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bcr.data.bundling import bundle_sequential
from bcr.models.loading import ModelLoadError, load_tokenizer, resolve_model_source
from bcr.models.loading import load_model as load_checkpoint
from bcr.data.problems import load_problems
from bcr.task.prompts import render_prompt
from bcr.models.rollout import HFEngine, make_engine
from bcr.task.synthetic import make_arithmetic_problems
from bcr.models.tiny import build_tokenizer, tiny_model

from . import harness

MODULE = "benchmarks.profile_rollout"


# --------------------------------------------------------------------------------------------------
# model, tokenizer, problems


def load_model(
    name: str,
    *,
    tokenizer_path: str | None,
    hidden: int,
    layers: int,
    vocab: int,
    seed: int,
    problems,
    device,
    dtype,
):

    if name == "tiny-random":
        corpus = [p.problem for p in problems] + [p.meta.get("solution", "") for p in problems]
        tok = build_tokenizer(corpus, vocab_size=vocab)
        model = tiny_model(tok, arch="qwen2", hidden_size=hidden, num_layers=layers, seed=seed, dtype=dtype)
        return (
            model.to(device).eval(),
            tok,
            f"tiny-random Qwen2 (hidden {hidden}, {layers} layers, vocab {len(tok)})",
        )
    path = Path(name)
    try:
        resolve_model_source(name)
    except ModelLoadError as err:
        raise SystemExit(f"--model: {err} (or use tiny-random)") from None
    candidates = [tokenizer_path] if tokenizer_path else [str(path), str(path.parent / "tokenizer")]
    tok, errors = None, []
    for c in candidates:
        try:
            tok = load_tokenizer(c)
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{c}: {type(exc).__name__}")
    if tok is None:
        raise SystemExit(f"no tokenizer found ({'; '.join(errors)}); pass --tokenizer DIR")
    model, _ = load_checkpoint(name, dtype=dtype, device=device, with_tokenizer=False)
    return model, tok, f"{path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"


def load_problem_set(data: str | None, num: int, seed: int):
    if data:
        probs = load_problems(data, split="test" if not Path(data).exists() else None, limit=num)
        if len(probs) < num:
            raise SystemExit(f"--data {data}: only {len(probs)} problems, need --num-problems {num}")
        return probs, str(data)
    return make_arithmetic_problems(num, seed=seed), f"bcr.task.synthetic arithmetic (seed {seed})"


# --------------------------------------------------------------------------------------------------
# engines


def generate_engine(model, tok, num_generations: int) -> HFEngine:
    """The engine on ``model.generate``: all rows of a step in one call."""
    return HFEngine(model, tok, decode="generate")


def sequential_engine(model, tok, num_generations: int) -> HFEngine:
    """``model.generate`` once per bundle (``batch_size=G``)."""
    return HFEngine(model, tok, batch_size=num_generations, decode="generate")


def trainer_engine(model, tok, num_generations: int) -> HFEngine:
    """Exactly what the trainer builds: ``make_engine("hf", ...)`` (its own decode loop, compacting)."""
    engine = make_engine("hf", model, tok)
    assert engine.decode == "loop" and engine.compact_finished
    return engine


def loop_nocompact_engine(model, tok, num_generations: int) -> HFEngine:
    return HFEngine(model, tok, decode="loop", compact_finished=False)


@dataclass(frozen=True)
class Mode:
    engine: Callable[..., HFEngine]  # (model, tokenizer, G) -> engine
    generation: dict = field(default_factory=dict)  # defaults on model.generation_config while it runs
    compile: bool = False  # the model's forward under torch.compile while it runs


STATIC = {"cache_implementation": "static"}
MODES: dict[str, Mode] = {
    "hf": Mode(generate_engine),
    "hf-sequential": Mode(sequential_engine),
    "hf-static": Mode(generate_engine, STATIC),
    "hf-compile": Mode(generate_engine, STATIC, compile=True),
    "loop": Mode(trainer_engine),
    "loop-nocompact": Mode(loop_nocompact_engine),
}


@contextlib.contextmanager
def mode_settings(model, mode: Mode) -> Iterator[None]:
    """Apply ``mode``'s generation defaults and compiled forward to ``model``; restore both after."""
    config = model.generation_config
    saved = {key: getattr(config, key, None) for key in mode.generation}
    own_forward = vars(model).get("forward")  # None: the class's forward (the usual case)
    for key, value in mode.generation.items():
        setattr(config, key, value)
    if mode.compile:
        model.forward = torch.compile(model.forward, dynamic=False)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)
        if mode.compile:
            if own_forward is None:
                del model.forward
            else:
                model.forward = own_forward


# --------------------------------------------------------------------------------------------------
# measurement


def run_mode(mode: str, model, tok, problems, args) -> list[dict]:
    engine = MODES[mode].engine(model, tok, args.num_generations)
    if args.ignore_eos:
        engine.eos_ids = [-1]  # an id no token has: every completion runs to its budget
    with mode_settings(model, MODES[mode]):
        return [run_point(mode, engine, tok, problems, n, args) for n in args.n_values]


def run_point(mode: str, engine: HFEngine, tok, problems, n: int, args) -> dict:
    """One (mode, N) point: warm-up calls, then ``args.repeats`` timed calls of ``engine.generate``."""
    bundles = bundle_sequential(problems, n)
    prompts = [render_prompt(b, tok) for b in bundles]
    kw = {
        "num_generations": args.num_generations,
        "max_new_tokens": args.per_problem_budget * n,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    for _ in range(args.warmup):
        engine.generate(prompts, seed=10_000 + args.seed, **kw)
    times, outs = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = engine.generate(prompts, seed=args.seed, **kw)
        times.append(time.perf_counter() - t0)
    gens = [g for group in outs for g in group]
    answered = sum(len(b) for b in bundles) * args.num_generations
    tokens = sum(len(g.completion_ids) for g in gens)
    prompt_tokens = sum(len(g.prompt_ids) for g in gens)
    med = statistics.median(times)
    row = {
        "mode": mode,
        "n": n,
        "prompts": len(prompts),
        "rows": len(gens),
        "max_new_tokens": args.per_problem_budget * n,
        "times_s": times,
        "time_s": med,
        "problems_per_s": answered / med,
        "problems_per_s_min": answered / max(times),
        "problems_per_s_max": answered / min(times),
        "tokens_per_s": tokens / med,
        "generated_tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "tokens_per_problem": tokens / answered,
        "truncated_frac": sum(g.truncated for g in gens) / len(gens),
        "completions": [g.completion_ids for g in gens],
    }
    print(
        f"  {mode:13s} N={n}: {med:7.2f} s  {answered / med:7.2f} problems/s  {tokens / med:8.1f} tokens/s  "
        f"({tokens / answered:.1f} tokens/problem, {100 * row['truncated_frac']:.0f} % truncated)",
        flush=True,
    )
    return row


def compare_to_hf(rows: list[dict]) -> None:
    ref = {r["n"]: r["completions"] for r in rows if r["mode"] == "hf"}
    for r in rows:
        if r["n"] in ref and r["mode"] != "hf":
            a, b = r["completions"], ref[r["n"]]
            r["same_as_hf"] = sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


# --------------------------------------------------------------------------------------------------
# report


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [
        (
            f"**profile_rollout** {report['model']} on {report['device_name']} "
            f"(torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
            f"{report['torch_threads']} threads), {report['date']}"
        ),
        "",
        f"{report['num_problems']} problems ({report['problems']}), G = {report['num_generations']}, "
        f"budget {report['per_problem_budget']} tokens/problem x N, temperature {report['temperature']}, "
        f"{report['repeats']} timed repeats after {report['warmup']} warm-up per point"
        + (", EOS ignored" if report["ignore_eos"] else "")
        + ".",
        "",
        (
            "| mode | N | prompts x G | s (median, min-max) | problems/s | tokens/s | tokens/problem | truncated | "
            "vs hf (same N) | same tokens as hf |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["n"]: r for r in rows if r["mode"] == "hf"}
    for r in rows:
        b = base.get(r["n"])
        speed = f"{b['time_s'] / r['time_s']:.2f}x" if b and r["mode"] != "hf" else "-"
        same = f"{100 * r['same_as_hf']:.0f} %" if "same_as_hf" in r else "-"
        lines.append(
            f"| {r['mode']} | {r['n']} | {r['prompts']} x {report['num_generations']} | {r['time_s']:.2f} "
            f"({min(r['times_s']):.2f}-{max(r['times_s']):.2f}) | {r['problems_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['tokens_per_problem']:.1f} | {100 * r['truncated_frac']:.0f} % | {speed} | {same} |"
        )
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in report["rows"]):
        rs = [r for r in report["rows"] if r["mode"] == mode]
        ns = [r["n"] for r in rs]
        y = [r["problems_per_s"] for r in rs]
        err = [
            [r["problems_per_s"] - r["problems_per_s_min"] for r in rs],
            [r["problems_per_s_max"] - r["problems_per_s"] for r in rs],
        ]
        ax1.errorbar(ns, y, yerr=err, marker="o", capsize=3, label=mode)
        ax2.plot(ns, [r["tokens_per_s"] for r in rs], marker="o", label=mode)
    for ax, name in ((ax1, "problems/s"), (ax2, "generated tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["n_values"], [str(n) for n in report["n_values"]])
        ax.set_xlabel("N (problems per context)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    fig.suptitle(
        f"rollout throughput vs N: {report['model']}, {report['device_name']}\n"
        f"G={report['num_generations']}, budget {report['per_problem_budget']} tokens/problem x N",
        fontsize=9,
    )
    fig.tight_layout()
    harness.save_figure(fig, path)
    plt.close(fig)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny-random", help="tiny-random, or a local HF model directory")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir (default: the model dir, then its ../tokenizer)"
    )
    p.add_argument("--hidden", type=int, default=128, help="tiny-random width (the demo's default)")
    p.add_argument("--layers", type=int, default=3, help="tiny-random blocks (the demo's default)")
    p.add_argument("--vocab", type=int, default=1024, help="tiny-random BPE vocabulary")
    p.add_argument(
        "--data", default=None, help="problems file or benchmark name (default: synthetic arithmetic)"
    )
    p.add_argument(
        "--num-problems", type=int, default=16, help="the same problems at every N (a multiple of max N)"
    )
    p.add_argument("--n-values", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--num-generations", type=int, default=4, help="G, samples per prompt")
    p.add_argument("--per-problem-budget", type=int, default=40, help="max_new_tokens = this x N")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--ignore-eos", action="store_true", help="never stop at EOS: every completion runs to budget"
    )
    p.add_argument(
        "--modes", default="hf,hf-sequential,hf-static,loop", help=f"comma-separated subset of {MODES}"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--quick", action="store_true", help="smoke-test size: 4 problems, N in {1, 2}, budget 4, 1 repeat"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output prefix (default benchmarks/results/profile_rollout_<model>_<device>)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.num_problems, args.n_values, args.per_problem_budget = 4, [1, 2], 4
        args.repeats, args.warmup, args.num_generations = 1, 0, 2
        args.hidden, args.layers, args.vocab = 32, 1, 300
    if args.num_problems % max(args.n_values):
        p.error(
            f"--num-problems {args.num_problems} must be a multiple of max N = {max(args.n_values)} "
            "(every N must see the same problems in full bundles)"
        )
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {tuple(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = getattr(torch, args.dtype)
    problems, problems_name = load_problem_set(args.data, args.num_problems, args.seed)
    model, tok, model_name = load_model(
        args.model,
        tokenizer_path=args.tokenizer,
        hidden=args.hidden,
        layers=args.layers,
        vocab=args.vocab,
        seed=args.seed,
        problems=problems,
        device=device,
        dtype=dtype,
    )
    device_name = harness.device_name(device.type)
    print(
        f"profile_rollout: {model_name} on {device_name}; {len(problems)} problems, N in {args.n_values}, "
        f"G={args.num_generations}, {args.per_problem_budget} tokens/problem",
        flush=True,
    )
    rows = [row for mode in args.mode_list for row in run_mode(mode, model, tok, problems, args)]
    compare_to_hf(rows)
    slug = "tiny-random" if args.model == "tiny-random" else Path(args.model).name
    out = Path(args.out) if args.out else harness.RESULTS / f"profile_rollout_{slug}_{device.type}"
    report = {
        "benchmark": "profile_rollout",
        "model": model_name,
        "device": device.type,
        "device_name": device_name,
        "date": harness.now(),
        "command": harness.command(MODULE, argv),
        "versions": harness.versions(("torch", "transformers", "triton")),
        "git_commit": harness.git_state()["commit"],
        "torch_threads": torch.get_num_threads(),
        "problems": problems_name,
        "num_problems": len(problems),
        "n_values": args.n_values,
        "num_generations": args.num_generations,
        "per_problem_budget": args.per_problem_budget,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": [{k: v for k, v in r.items() if k != "completions"} for r in rows],
    }
    md = markdown(report)
    harness.write_report(out, report, md, plot)
    print()
    print(md)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
