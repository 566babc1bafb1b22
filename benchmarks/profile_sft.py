"""Time the demo's SFT steps side by side in one process: plain (padded) vs packed (the RL step's forward).

    python -m benchmarks.profile_sft                        # DemoConfig() defaults: 6000 problems, batch 8,
                                                            # N in 1..6, the 0.55M Llama (a few minutes)
    python -m benchmarks.profile_sft --rounds 1 --steps 2 --warmup 1 task.num_train_problems=200 \\
        model.hidden_size=32 model.num_layers=1                                    # seconds

A *step* is one :func:`bcr.demo.sft.sft_step` of the demo's stage 1: the loss of one batch, backward,
gradient-norm clipping, AdamW, the LR schedule. The two paths (``sft.packed``, see :mod:`bcr.demo.sft`):

- ``plain``: right-padded ``[B, L]`` batches and the model's own loss (``labels``; SDPA attention,
  full ``[B, L, V]`` logits);
- ``packed``: the batch in one padding-free row (``pack_row``), the decoder with varlen attention
  (``bcr_varlen``, set on the model once) and the fused LM head at the target tokens only.

Both start from the same model (two copies of the demo's seeded init) and each has its own batch
stream, so they see the same batches in the same order. ``--warmup`` untimed steps per path, then
``--rounds`` rounds of ``--steps`` timed steps per path, interleaved (the path that goes first
alternates between rounds), so load from other processes on the machine hits both alike. Timed per
step: the loss (collating or packing included) through the optimizer step; drawing the batch
(tokenisation) is not timed, being the same for both.

Claim: the ratio of median step times, plain / packed (> 1: packed is faster), with the ratios of
the rounds' medians as its spread. Also reported: each path's median, the real and padded tokens per
step, and the loss of each path at the first step (the same model on the same batch: they agree to
float32 rounding). Output: a table on stdout and ``<out>.json`` / ``<out>.md`` through
:mod:`benchmarks.harness` (default ``benchmarks/results/profile_sft_cpu``). Like every CPU script
here it times the PyTorch path a CPU user gets: ``TRITON_INTERPRET`` is unset while it measures.
Trailing ``key=value`` arguments override the ``DemoConfig`` as on ``bcr demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch

from bcr.demo.config import DemoConfig
from bcr.demo.sft import make_optimizer, sft_batches, sft_loss, sft_step
from bcr.demo.task import build_tokenizer_and_model, make_task
from bcr.runtime.dataclass_cli import load_dataclass

from . import harness

MODULE = "benchmarks.profile_sft"
PATHS = {"plain": False, "packed": True}  # path -> sft.packed


@dataclasses.dataclass
class PathRun:
    """One path's model, optimizer, schedule, loss and batch stream, and its step times."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: object
    batches: Iterator
    times: list[list[float]] = dataclasses.field(default_factory=list)  # one list per round
    losses: list[float] = dataclasses.field(default_factory=list)
    tokens: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (real, padded) per timed step

    def step(self) -> float:
        """One SFT step on the next batch; returns its wall time (the batch is drawn before the clock)."""
        examples = next(self.batches)
        t0 = time.perf_counter()
        self.losses.append(sft_step(self.model, self.optimizer, self.scheduler, self.loss_fn, examples))
        elapsed = time.perf_counter() - t0
        lengths = [len(ids) for ids, _ in examples]
        self.tokens.append((sum(lengths), len(lengths) * max(lengths)))
        return elapsed


@contextlib.contextmanager
def without_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET`` unset while measuring (the CPU user's path is PyTorch's), restored after."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def build_paths(cfg: DemoConfig, stack: contextlib.ExitStack) -> tuple[dict[str, PathRun], int]:
    """Both paths on two copies of the demo's seeded model; and the model's parameter count."""
    train, _ = make_task(cfg)
    tokenizer, model = build_tokenizer_and_model(cfg, train)
    paths = {}
    for name, packed in PATHS.items():
        m = copy.deepcopy(model).train()
        sft = dataclasses.replace(cfg.sft, packed=packed)
        optimizer, scheduler = make_optimizer(m, sft)
        loss_fn = stack.enter_context(sft_loss(m, sft, tokenizer.pad_token_id))
        paths[name] = PathRun(name, m, optimizer, scheduler, loss_fn, sft_batches(train, tokenizer, cfg))
    return paths, sum(p.numel() for p in model.parameters())


def measure(paths: dict[str, PathRun], rounds: int, steps: int, warmup: int) -> None:
    """``warmup`` untimed steps per path, then ``rounds`` interleaved rounds of ``steps`` timed steps."""
    for p in paths.values():
        for _ in range(warmup):
            p.step()
        p.tokens.clear()
    order = list(paths.values())
    for r in range(rounds):
        for p in order if r % 2 == 0 else order[::-1]:
            p.times.append([p.step() for _ in range(steps)])
            print(f"  round {r + 1}: {p.name:6s} median step {1e3 * statistics.median(p.times[-1]):7.1f} ms",
                  flush=True)


def summarize(paths: dict[str, PathRun]) -> dict:
    """Per-path medians, and the plain / packed ratio of medians with the per-round ratios as its spread."""
    out: dict = {"paths": {}}
    for name, p in paths.items():
        every = [t for rnd in p.times for t in rnd]
        out["paths"][name] = {
            "median_step_s": statistics.median(every),
            "round_medians_s": [statistics.median(rnd) for rnd in p.times],
            "min_step_s": min(every),
            "max_step_s": max(every),
            "first_loss": p.losses[0],
            "last_loss": p.losses[-1],
            "real_tokens_per_step": statistics.mean(t[0] for t in p.tokens),
            "padded_positions_per_step": statistics.mean(t[1] for t in p.tokens),
        }
    plain, packed = out["paths"]["plain"], out["paths"]["packed"]
    rounds = [a / b for a, b in zip(plain["round_medians_s"], packed["round_medians_s"])]
    out["ratio_plain_over_packed"] = {"median": plain["median_step_s"] / packed["median_step_s"],
                                      "min": min(rounds), "max": max(rounds), "rounds": rounds}
    out["first_loss_rel_diff"] = abs(plain["first_loss"] - packed["first_loss"]) / abs(plain["first_loss"])
    return out


def markdown(report: dict) -> str:
    s, r = report["summary"], report["summary"]["ratio_plain_over_packed"]
    lines = [
        f"**profile_sft** on {report['device_name']} (torch {report['versions']['torch']}, "
        f"{report['torch_threads']} threads), {report['date']}",
        "",
        f"The demo's SFT stage: {report['num_train_problems']} problems, batch {report['batch_size']}, N in "
        f"{report['n_values']}, a {report['parameters'] / 1e6:.2f}M-parameter {report['arch']} model; "
        f"{report['warmup']} warm-up steps per path, then {report['rounds']} interleaved rounds of "
        f"{report['steps']} steps per path, in one process, on the same batches.",
        "",
        "| path | median step ms (min-max) | round medians ms | real tokens / step | padded positions / step |",
        "|---|---|---|---|---|",
    ]
    for name, p in s["paths"].items():
        lines.append(
            f"| {name} | {1e3 * p['median_step_s']:.1f} ({1e3 * p['min_step_s']:.1f}-{1e3 * p['max_step_s']:.1f}) "
            f"| {', '.join(f'{1e3 * x:.1f}' for x in p['round_medians_s'])} | {p['real_tokens_per_step']:,.0f} "
            f"| {p['padded_positions_per_step']:,.0f} |")
    lines += [
        "",
        f"Step time plain / packed: **{r['median']:.2f}x** (ratio of medians; per-round "
        f"{r['min']:.2f}-{r['max']:.2f}x). First-step losses: plain {s['paths']['plain']['first_loss']:.6f}, "
        f"packed {s['paths']['packed']['first_loss']:.6f} (relative difference {s['first_loss_rel_diff']:.1e}).",
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=40, help="timed steps per path per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per path first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's, else torch's)")
    p.add_argument("--out", default=str(harness.RESULTS / "profile_sft_cpu"), help="output prefix")
    p.add_argument("overrides", nargs="*", help="DemoConfig key=value overrides, as on bcr demo")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_dataclass(DemoConfig, overrides=args.overrides)
    threads = args.threads or cfg.threads
    if threads:
        torch.set_num_threads(threads)
    with without_interpreter(), contextlib.ExitStack() as stack:
        paths, n_params = build_paths(cfg, stack)
        print(f"profile_sft: {len(PATHS)} paths, {cfg.model.arch} model of {n_params / 1e6:.2f}M parameters, "
              f"batch {cfg.sft.batch_size}, N in {cfg.sft.n_values}, {torch.get_num_threads()} threads", flush=True)
        measure(paths, args.rounds, args.steps, args.warmup)
    report = {
        "benchmark": "profile_sft",
        "device_name": harness.device_name("cpu"),
        "date": harness.now(),
        "command": harness.command(MODULE, argv),
        "versions": harness.versions(),
        "git": harness.git_state(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "arch": cfg.model.arch,
        "parameters": n_params,
        "num_train_problems": cfg.task.num_train_problems,
        "batch_size": cfg.sft.batch_size,
        "n_values": cfg.sft.n_values,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "overrides": args.overrides,
        "times_s": {name: p.times for name, p in paths.items()},
        "summary": summarize(paths),
    }
    md = markdown(report)
    written = harness.write_report(args.out, report, md)
    print()
    print(md)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
