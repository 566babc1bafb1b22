"""The SFT gate of a demo task: how right each solution style is on each difficulty, before any RL.

A shared budget can only teach a model to answer some problems without work where its work-free
answer is right often enough to be worth the tokens it saves. This script measures that on a demo's
SFT model: the held-out problems at N = 1 (or any N), ``samples`` samples per problem at the demo's
temperature, each problem grouped by the style the model chose (``steps`` = worked, ``direct`` = the
answer line alone) and by its difficulty (number of operations). Writes ``sft_gate.json`` next to the
sweep's files and prints the table; the demo's settings (``task.*`` etc.) are passed as for ``bcr demo``.

    python -m benchmarks.sft_gate runs/demo task.problem_steps=[1,2] task.held_out_every=2 --samples 8
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from bcr.demo.config import DemoConfig
from bcr.demo.stages import eval_config, read_stage
from bcr.demo.summary import difficulty_label, style_mix
from bcr.demo.task import make_task
from bcr.eval.sweep import evaluate_scaling, read_results
from bcr.runtime.dataclass_cli import load_dataclass
from bcr.runtime.io import atomic_write_json


def measure(cfg: DemoConfig, samples: int, n_values: list[int], out: Path) -> dict:
    """``{N: {difficulty: {style: [share, accuracy, count]}}}`` of the sft stage's model."""
    _, evals = make_task(cfg)
    config = dataclasses.replace(eval_config(cfg, out), n_values=n_values, samples_per_bundle=samples, baseline=None)
    evaluate_scaling({"sft": read_stage(cfg, "sft")["model"]}, evals, config=config)
    records = read_results(out / "results.jsonl")
    difficulty = {p.id: difficulty_label(p) for p in evals}
    counts = {label: sum(1 for v in difficulty.values() if v == label) for label in set(difficulty.values())}
    mix = style_mix(records, difficulty)
    result = {n: {label: {style: [share, acc, round(share * counts[label] * samples)]
                          for style, (share, acc) in mix[("sft", n, label)].items()}
                  for label in sorted(counts)} for n in n_values}
    atomic_write_json(out / "sft_gate.json", {"samples": samples, "problems": counts, "by_n": result})
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output_dir", help="the demo run directory whose sft stage is measured")
    ap.add_argument("overrides", nargs="*", help="the demo's key=value settings of that run (task.* ...)")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem")
    ap.add_argument("--n", type=int, nargs="+", default=[1], help="problems per prompt")
    args = ap.parse_args(argv)
    cfg = load_dataclass(DemoConfig, overrides=[f"output_dir={args.output_dir}", "progress=false", *args.overrides])
    out = Path(args.output_dir) / "sft_gate"
    if out.exists():
        shutil.rmtree(out)  # a re-run measures afresh
    result = measure(cfg, args.samples, args.n, out)
    for n, per in result.items():
        for label, styles in per.items():
            cells = ", ".join(f"{s} {100 * share:.0f}% of answers, {100 * acc:.1f}% right (n={k})"
                              for s, (share, acc, k) in styles.items())
            print(f"N = {n}, {label}: {cells}")
    print(f"written: {out / 'sft_gate.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
