"""The capacity curve: how large a model must be to keep its accuracy inside bundles (issue 35).

``run`` trains one model size with the demo's SFT recipe on the steps-only task (worked solutions
alone, bundles of 1-6, ``sft.steps`` AdamW steps of ``sft.batch_size`` bundles; stopping rule: that
fixed number of steps for every size, so every size sees the same tokens) and measures its held-out
accuracy at N = 1..6 with the demo's sweep (per-problem budget of 100 tokens: no worked solution of
this task is cut off), ``--samples`` samples per bundle. The peak learning rate is the demo's
``4e-3`` scaled by ``128 / hidden_size`` (Adam's step in a wider matrix moves its output more; the
rule was fixed before the runs). Writes ``<run>/capacity.json`` (size, parameters, wall and CPU
seconds, tokens trained, accuracy per N) next to the demo's ``sft/`` and the sweep's files.

    python -m benchmarks.capacity run runs/capacity/h320L5-s0 --hidden 320 --layers 5 --heads 10 --kv-heads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import time
from pathlib import Path

#: the demo's SFT peak learning rate at its width (hidden size 128)
BASE_LEARNING_RATE = 4e-3
BASE_HIDDEN = 128
STEPS_ONLY = "task.styles={steps: 1}"


def learning_rate(hidden: int) -> float:
    """The peak SFT learning rate of a model of width ``hidden`` (the demo's, scaled by 128 / hidden)."""
    return BASE_LEARNING_RATE * BASE_HIDDEN / hidden


def overrides(args) -> list[str]:
    """The demo settings of one size: the steps-only task, the model shape, the scaled learning rate."""
    return [f"output_dir={args.run}", f"seed={args.seed}", "stop_after=sft", "progress=false",
            f"threads={args.threads}", STEPS_ONLY, f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"model.num_kv_heads={args.kv_heads}", f"sft.learning_rate={learning_rate(args.hidden):.6g}",
            f"sft.steps={args.steps}", *args.overrides]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(args) -> dict:
    import torch

    from bcr.demo.config import DemoConfig
    from bcr.demo.pipeline import run_demo
    from bcr.demo.stages import eval_config, read_stage
    from bcr.demo.task import make_task
    from bcr.eval.sweep import evaluate_scaling
    from bcr.runtime.dataclass_cli import load_dataclass

    cfg = load_dataclass(DemoConfig, overrides=overrides(args))
    t0, c0 = time.perf_counter(), cpu_seconds()
    if args.measure_only:
        sft = read_stage(cfg, "sft")
    else:
        sft = run_demo(cfg)["sft"]
    t1, c1 = time.perf_counter(), cpu_seconds()
    _, evals = make_task(cfg)
    out = Path(args.run) / "capacity_eval"
    if out.exists():
        shutil.rmtree(out)
    config = dataclasses.replace(eval_config(cfg, out), n_values=list(range(1, 7)),
                                 samples_per_bundle=args.samples, baseline=None)
    summary = evaluate_scaling({"sft": sft["model"]}, evals, config=config)
    t2, c2 = time.perf_counter(), cpu_seconds()
    rows = {r["n_problems"]: r for r in summary["rows"]}
    metrics = [json.loads(line) for line in (Path(args.run) / "sft" / "metrics.jsonl").read_text().splitlines()]
    result = {
        "size": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads},
        "parameters": sft["parameters"], "seed": args.seed, "steps": args.steps,
        "learning_rate": learning_rate(args.hidden), "threads": args.threads or torch.get_num_threads(),
        "sft_wall_seconds": None if args.measure_only else round(t1 - t0, 1),
        "sft_cpu_seconds": None if args.measure_only else round(c1 - c0, 1),
        "eval_wall_seconds": round(t2 - t1, 1), "eval_cpu_seconds": round(c2 - c1, 1),
        "final_loss": sft["final_loss"], "loss_curve": [m["loss"] for m in metrics[::50]],
        "samples_per_bundle": args.samples, "eval_problems": len(evals),
        "accuracy": {n: rows[n]["accuracy"] for n in sorted(rows)},
        "tokens_per_problem": {n: rows[n]["tokens_per_problem"] for n in sorted(rows)},
        "truncation_rate": {n: rows[n].get("truncation_rate") for n in sorted(rows)},
        "overrides": overrides(args),
    }
    (Path(args.run) / "capacity.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one size (the demo's SFT recipe, steps-only task) and measure N = 1..6")
    r.add_argument("run", help="the run directory")
    r.add_argument("--hidden", type=int, required=True)
    r.add_argument("--layers", type=int, required=True)
    r.add_argument("--heads", type=int, required=True)
    r.add_argument("--kv-heads", type=int, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=3000, help="SFT steps (the stopping rule: this many for every size)")
    r.add_argument("--samples", type=int, default=4, help="samples per bundle in the measurement")
    r.add_argument("--threads", type=int, default=1, help="torch threads (1: two sizes can train side by side)")
    r.add_argument("--measure-only", action="store_true", help="measure an already trained sft stage")
    r.add_argument("overrides", nargs="*", help="further demo settings (key=value)")
    args = ap.parse_args(argv)
    result = run(args)
    print(json.dumps({k: result[k] for k in ("parameters", "sft_wall_seconds", "accuracy")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
