"""The capacity curve: how large a model must be to keep its accuracy inside bundles (issue 35).

``run`` trains one model size with the demo's SFT recipe on the steps-only task (worked solutions
alone, bundles of 1-6, ``sft.steps`` AdamW steps of ``sft.batch_size`` bundles; stopping rule: that
fixed number of steps for every size, so every size sees the same tokens) and measures its held-out
accuracy at N = 1..6 with the demo's sweep (per-problem budget of 100 tokens: no worked solution of
this task is cut off), ``--samples`` samples per bundle. The peak learning rate is the demo's
``4e-3`` scaled by ``128 / hidden_size`` (Adam's step in a wider matrix moves its output more; the
rule was fixed before the runs). Writes ``<run>/capacity.json`` (size, parameters, wall and CPU
seconds, tokens trained, accuracy per N) next to the demo's ``sft/`` and the sweep's files. The SFT
saves its state every ``--checkpoint-every`` steps: a run that is killed continues when the same
command runs again, and its recorded seconds add the work its checkpoints kept (steps redone after
the kill count again).

    python -m benchmarks.capacity run runs/capacity/h320L5-s0 --hidden 320 --layers 5 --heads 10 --kv-heads 2

``report`` reads every ``<dir>/<run>/capacity.json`` and ``capacity_eval/results.jsonl`` and writes the
curve: per run the parameters, the tokens trained (recounted from the run's own batch stream), the
training compute (6 x parameters x tokens), the measured SFT wall and CPU time, the accuracy per N
with 95 % CIs, the ratio acc(N = 4) / acc(N = 1) with a paired-bootstrap CI and the verdict (>= 0.8),
and the errors per N by class (:mod:`bcr.task.error_classes`, with a placebo for the chance rate of
``other_problem``); then an *extrapolation* of the ratio against log parameters to 0.8
(:func:`extrapolate`). Files: ``capacity.json``, ``capacity.md`` and ``capacity_curve.png`` in
``--out`` (default ``benchmarks/results/capacity``), the figure also at ``--figure``
(default ``docs/capacity_curve.png``).

    python -m benchmarks.capacity report runs/capacity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

#: the demo's SFT peak learning rate at its width (hidden size 128)
BASE_LEARNING_RATE = 4e-3
BASE_HIDDEN = 128
STEPS_ONLY = "task.styles={steps: 1}"


def learning_rate(hidden: int) -> float:
    """The peak SFT learning rate of a model of width ``hidden`` (the demo's, scaled by 128 / hidden)."""
    return BASE_LEARNING_RATE * BASE_HIDDEN / hidden


def overrides(args) -> list[str]:
    """The demo settings of one size: the steps-only task, the model shape, the scaled learning rate."""
    return [f"output_dir={args.run}", f"seed={args.seed}", "stop_after=sft", "progress=false", "train_sft=true",
            f"threads={args.threads}", STEPS_ONLY, f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"model.num_kv_heads={args.kv_heads}", f"sft.learning_rate={learning_rate(args.hidden):.6g}",
            f"sft.steps={args.steps}", f"sft.checkpoint_every={args.checkpoint_every}", *args.overrides]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(args) -> dict:
    import torch

    from bcr.demo.config import DemoConfig
    from bcr.demo.pipeline import run_demo
    from bcr.demo.sft import checkpoint_seconds
    from bcr.demo.stages import eval_config, read_stage
    from bcr.demo.task import make_task
    from bcr.eval.sweep import evaluate_scaling
    from bcr.runtime.dataclass_cli import load_dataclass

    cfg = load_dataclass(DemoConfig, overrides=overrides(args))
    folder = Path(args.run) / "sft-checkpoints"  # a killed attempt's kept work (bcr.demo.stages.sft_checkpoints)
    before = checkpoint_seconds(folder) if folder.exists() else {"wall": 0.0, "cpu": 0.0}
    t0, c0 = time.perf_counter() - before["wall"], cpu_seconds() - before["cpu"]
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


# ----------------------------------------------------------------------------------------------
# report: the curve, the error classes and the extrapolation
# ----------------------------------------------------------------------------------------------
#: the issue's bar: a size keeps its accuracy inside bundles when acc(N = 4) >= 0.8 x acc(N = 1)
KEEP_RATIO = 0.8
RATIO_N = 4
N_BOOTSTRAP = 2000


def run_config(result: dict):
    """The demo settings a run trained and measured with (its recorded overrides)."""
    from bcr.demo.config import DemoConfig
    from bcr.runtime.dataclass_cli import load_dataclass

    return load_dataclass(DemoConfig, overrides=result["overrides"])


def tokens_trained(cfg, tokenizer, steps: int) -> int:
    """Tokens (prompt + target + EOS) of the first ``steps`` SFT batches of ``cfg`` (the stream
    :func:`bcr.demo.sft.sft_batches` trains on, recounted in large tokenizer calls)."""
    import itertools

    from bcr.demo.sft import sft_bundle_batches
    from bcr.demo.task import make_task, worked_only
    from bcr.task.prompts import bundle_solution, render_prompt

    train, _ = make_task(worked_only(cfg))
    bundles = [b for batch in itertools.islice(sft_bundle_batches(train, cfg), steps) for b in batch]
    texts = [render_prompt(b, tokenizer, cfg.template) for b in bundles]
    texts += [bundle_solution(b, cfg.template) for b in bundles]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(i) for i in ids) + len(bundles)  # + one EOS per example


_TOKEN_COUNTS: dict = {}


def _tokens_of_run(cfg, model_dir: Path, steps: int) -> int:
    """:func:`tokens_trained` of a run, counted once per batch stream: the stream depends on the seed,
    the task, the SFT settings and the tokenizer (trained on the task's text), not on the model's
    shape, so the sizes of one seed share one count."""
    import hashlib

    from bcr.models.loading import load_tokenizer

    key = (hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest(), cfg.seed, steps,
           repr(cfg.task), repr(dataclasses.replace(cfg.sft, learning_rate=0.0)))
    if key not in _TOKEN_COUNTS:
        _TOKEN_COUNTS[key] = tokens_trained(cfg, load_tokenizer(model_dir), steps)
    return _TOKEN_COUNTS[key]


def per_problem_accuracy(records, n: int) -> dict[str, float]:
    """Per problem id, its mean correctness over the samples at N = ``n``."""
    from bcr.eval.scaling import problem_level

    return {pid: v["accuracy"] for pid, v in problem_level([r for r in records if r["n_problems"] == n]).items()}


def ratio_draws(records, n_top: int = RATIO_N, seed: int = 0, n_bootstrap: int = N_BOOTSTRAP):
    """acc(N = ``n_top``) / acc(N = 1) and its paired-bootstrap draws (problems resampled, each keeping
    its accuracy at both N); ``(nan, [])`` when a side is missing or N = 1 has no right answer."""
    top, one = per_problem_accuracy(records, n_top), per_problem_accuracy(records, 1)
    shared = sorted(set(top) & set(one))
    a, b = np.array([top[p] for p in shared]), np.array([one[p] for p in shared])
    if not shared or b.sum() == 0:
        return float("nan"), np.array([])
    idx = np.random.default_rng(seed).integers(0, len(shared), size=(n_bootstrap, len(shared)))
    den = b[idx].mean(axis=1)
    draws = np.where(den > 0, a[idx].mean(axis=1) / np.maximum(den, 1e-12), np.nan)
    return float(a.mean() / b.mean()), draws[np.isfinite(draws)]


def error_counts(records, problems: dict, *, placebo: bool = False) -> dict[int, dict[str, int]]:
    """Per N, how many problems fell in each class of :data:`bcr.task.error_classes.ERROR_CLASSES`.
    ``placebo``: ``other_problem`` is matched against the problems of the next bundle of the same N
    instead of the bundle's own (its rate then is the chance rate)."""
    from bcr.task.error_classes import ERROR_CLASSES, classify_completion

    bundles = {(r["n_problems"], r["bundle_index"]): r["problem_ids"] for r in records}
    count = {n: max(i for m, i in bundles if m == n) + 1 for n, _ in bundles}
    out: dict[int, dict[str, int]] = {}
    for r in records:
        n = r["n_problems"]
        others = None
        if placebo:
            others = [problems[p] for p in bundles[(n, (r["bundle_index"] + 1) % count[n])]
                      if p not in r["problem_ids"]]
        labels = classify_completion(r["completion"], [problems[p] for p in r["problem_ids"]],
                                     truncated=r["truncated"], correct=r["correct"], others=others)
        per = out.setdefault(n, dict.fromkeys(ERROR_CLASSES, 0))
        for label in labels:
            per[label] += 1
    return dict(sorted(out.items()))


def summarize_run(run_dir: Path, *, count_tokens: bool = True) -> dict:
    """One row of the curve from ``run_dir/capacity.json`` and its sweep's records (see ``report``)."""
    from bcr.demo.task import make_task
    from bcr.eval.scaling import mean_ci
    from bcr.eval.sweep import read_results

    result = json.loads((run_dir / "capacity.json").read_text())
    records = read_results(run_dir / "capacity_eval" / "results.jsonl")
    cfg = run_config(result)
    _, evals = make_task(cfg)
    problems = {p.id: p for p in evals}
    tokens = result.get("tokens_trained")
    if tokens is None and count_tokens:
        tokens = _tokens_of_run(cfg, run_dir / "sft" / "model", result["steps"])
    accuracy = {}
    for n in sorted({r["n_problems"] for r in records}):
        values = list(per_problem_accuracy(records, n).values())
        accuracy[n] = list(mean_ci(values, n_bootstrap=N_BOOTSTRAP, seed=n))
    ratio, draws = ratio_draws(records)
    lo, hi = (float(q) for q in np.quantile(draws, [0.025, 0.975])) if len(draws) else (None, None)
    return {
        "run": run_dir.name, "size": result["size"], "seed": result["seed"], "parameters": result["parameters"],
        "steps": result["steps"], "tokens_trained": tokens,
        "compute_flops": None if tokens is None else 6.0 * result["parameters"] * tokens,
        "sft_wall_seconds": result.get("sft_wall_seconds"), "sft_cpu_seconds": result.get("sft_cpu_seconds"),
        "threads": result.get("threads"), "samples_per_bundle": result.get("samples_per_bundle"),
        "accuracy": accuracy, "ratio": ratio, "ratio_ci": [lo, hi],
        "keeps_accuracy": bool(ratio >= KEEP_RATIO) if ratio == ratio else None,
        "errors": error_counts(records, problems), "errors_placebo": error_counts(records, problems, placebo=True),
        "_ratio_draws": draws,
    }


def extrapolate(rows: list[dict], *, target: float = KEEP_RATIO, seed: int = 0, n_bootstrap: int = N_BOOTSTRAP) -> dict:
    """An **extrapolation**, not a measurement: a least-squares line of the ratio against log10(parameters)
    through every run, solved for ``ratio = target``; the size there and its training compute at the
    runs' tokens (6 x parameters x tokens). Uncertainty: the line refitted to bootstrap draws of every
    run's ratio (problems resampled); ``no_crossing_share`` is the share of draws whose line does not
    rise (no size reaches the target). Seed-to-seed spread beyond the runs given and the line's form
    itself are not in the interval."""
    usable = [r for r in rows if r["ratio"] == r["ratio"] and len(r["_ratio_draws"])]
    x = np.log10([r["parameters"] for r in usable])
    out = {"target": target, "runs": [r["run"] for r in usable], "label": "extrapolation (a fitted line, not a measurement)"}
    if len(set(x.round(6))) < 2:
        return {**out, "reason": "fewer than two sizes with a ratio"}
    slope, intercept = np.polyfit(x, [r["ratio"] for r in usable], 1)
    rng = np.random.default_rng(seed)
    crossings = []
    for _ in range(n_bootstrap):
        y = [r["_ratio_draws"][rng.integers(len(r["_ratio_draws"]))] for r in usable]
        s, i = np.polyfit(x, y, 1)
        crossings.append((target - i) / s if s > 0 else np.inf)
    crossings = np.array(crossings)
    tokens = [r["tokens_trained"] for r in usable if r["tokens_trained"]]
    flops_per_param = 6.0 * float(np.median(tokens)) if tokens else None
    lo, hi = np.quantile(crossings, [0.025, 0.975], method="inverted_cdf")  # no interpolation with inf
    log_p = (target - intercept) / slope if slope > 0 else None
    out.update({
        "slope_per_decade": float(slope), "intercept": float(intercept),
        "parameters": None if log_p is None else float(10 ** log_p),
        "parameters_ci": [float(10 ** lo) if np.isfinite(lo) else None, float(10 ** hi) if np.isfinite(hi) else None],
        "no_crossing_share": float(np.mean(~np.isfinite(crossings))),
        "tokens_trained": None if flops_per_param is None else flops_per_param / 6.0,
    })
    if flops_per_param is not None:
        out["compute_flops"] = None if log_p is None else flops_per_param * 10 ** log_p
        out["compute_flops_ci"] = [None if p is None else flops_per_param * p for p in out["parameters_ci"]]
        timed = [r for r in usable if r["sft_cpu_seconds"] and r["compute_flops"]]
        if timed and out["compute_flops"]:
            # at the FLOPs per CPU second of the largest timed run (larger models run at a higher rate)
            largest = max(timed, key=lambda r: r["parameters"])
            out["cpu_hours_at_measured_rate"] = (out["compute_flops"] * largest["sft_cpu_seconds"]
                                                 / largest["compute_flops"] / 3600)
    return out


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def _sci(v) -> str:
    return "-" if v is None else f"{v:.2g}"


def _size_label(row: dict) -> str:
    s = row["size"]
    return f"h{s['hidden']} L{s['layers']} ({row['parameters'] / 1e6:.2f}M) s{row['seed']}"


def error_shares(counts: dict[str, int]) -> dict[str, float]:
    """Each wrong class's share of the wrong answers (``{}`` when none is wrong)."""
    from bcr.task.error_classes import WRONG_CLASSES

    wrong = sum(counts[c] for c in WRONG_CLASSES)
    return {c: counts[c] / wrong for c in WRONG_CLASSES} if wrong else {}


def render_markdown(rows: list[dict], fit: dict) -> str:
    """The curve's tables: one row per run; then the errors per run and N; then the extrapolation."""
    from bcr.task.error_classes import WRONG_CLASSES

    ns = sorted({n for r in rows for n in r["accuracy"]})
    lines = ["| run | parameters | tokens trained | compute (FLOPs) | SFT wall / CPU min | "
             + " | ".join(f"acc N = {n} % [95 % CI]" for n in ns) + f" | acc(N = {RATIO_N}) / acc(N = 1) [95 % CI] | >= {KEEP_RATIO} |",
             "|" + "---|" * (7 + len(ns))]
    for r in rows:
        acc = [f"{_pct(a)} [{_pct(lo)}, {_pct(hi)}]" for a, lo, hi in (r["accuracy"].get(n, (None,) * 3) for n in ns)]
        wall, cpu = r["sft_wall_seconds"], r["sft_cpu_seconds"]
        ci = r["ratio_ci"]
        lines.append(f"| {_size_label(r)} | {r['parameters']:,} | {_sci(r['tokens_trained'])} | {_sci(r['compute_flops'])} | "
                     + ("-" if wall is None else f"{wall / 60:.1f} / {cpu / 60:.1f}") + " | " + " | ".join(acc)
                     + (" | -" if r["ratio"] != r["ratio"] else f" | {r['ratio']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]") + " | "
                     + {True: "yes", False: "no", None: "-"}[r["keeps_accuracy"]] + " |")
    lines += ["", "Wrong answers per N by class (% of the wrong answers; `other_problem` placebo: the same "
              "rule against the next bundle's problems, i.e. its chance rate):", "",
              "| run | N | wrong | " + " | ".join(WRONG_CLASSES) + " | other_problem placebo |", "|" + "---|" * (4 + len(WRONG_CLASSES))]
    for r in rows:
        for n, counts in r["errors"].items():
            shares, placebo = error_shares(counts), error_shares(r["errors_placebo"][n])
            wrong = sum(counts[c] for c in WRONG_CLASSES)
            lines.append(f"| {r['run']} | {n} | {wrong} | " + " | ".join(_pct(shares.get(c)) for c in WRONG_CLASSES)
                         + f" | {_pct(placebo.get('other_problem'))} |")
    lines += ["", f"**{fit['label']}**: " + describe_fit(fit)]
    return "\n".join(lines) + "\n"


def describe_fit(fit: dict) -> str:
    """One paragraph on :func:`extrapolate`'s result."""
    if "reason" in fit:
        return f"none ({fit['reason']})."
    text = (f"ratio = {fit['intercept']:.2f} + {fit['slope_per_decade']:.2f} x log10(parameters) over the runs "
            f"{', '.join(fit['runs'])}. ")
    if fit["parameters"] is None:
        return text + f"The fitted line does not rise, so it reaches {fit['target']} at no size."
    lo, hi = fit["parameters_ci"]
    text += (f"It reaches {fit['target']} at {fit['parameters'] / 1e6:.3g}M parameters (95 % interval "
             f"{'-' if lo is None else f'{lo / 1e6:.3g}M'} to {'no size' if hi is None else f'{hi / 1e6:.3g}M'}; "
             f"in {100 * fit['no_crossing_share']:.0f} % of the bootstrap fits the line does not rise)")
    if fit.get("compute_flops"):
        text += (f", i.e. {fit['compute_flops']:.2g} FLOPs of training at {fit['tokens_trained']:.3g} tokens")
    if fit.get("cpu_hours_at_measured_rate"):
        text += f", about {fit['cpu_hours_at_measured_rate']:.3g} CPU hours at the largest run's measured FLOPs per CPU second"
    return text + ". The interval holds the sampling of problems only, not the spread between seeds or the line's form."


def write_figure(rows: list[dict], fit: dict, path: Path) -> None:
    """Accuracy vs N per run; the wrong answers' classes vs N for the smallest and largest size; the
    ratio vs parameters with the fitted line (the extrapolation)."""
    from matplotlib.figure import Figure

    from bcr.eval.report import save_png
    from bcr.task.error_classes import WRONG_CLASSES

    fig = Figure(figsize=(16, 4.8))
    ax_acc, ax_err, ax_fit = fig.subplots(1, 3)
    for i, r in enumerate(rows):
        ns = sorted(r["accuracy"])
        acc = [r["accuracy"][n] for n in ns]
        ax_acc.errorbar(ns, [100 * a for a, _, _ in acc], yerr=[[100 * (a - lo) for a, lo, _ in acc],
                        [100 * (hi - a) for a, _, hi in acc]], marker="o", capsize=3, color=f"C{i % 10}", label=_size_label(r))
    ax_acc.set(xlabel="N (problems per prompt)", ylabel="accuracy % (95 % CI)", title="held-out accuracy vs N", ylim=(0, 100))
    ax_acc.legend(fontsize=7)
    by_size: dict[int, list[dict]] = {}
    for r in rows:
        by_size.setdefault(r["parameters"], []).append(r)
    ends = [min(by_size), max(by_size)] if len(by_size) > 1 else list(by_size)
    for style, params in zip(("--", "-"), ends):
        pooled = {}
        for r in by_size[params]:  # the seeds of one size pooled
            for n, counts in r["errors"].items():
                pooled.setdefault(n, dict.fromkeys(counts, 0))
                for c, k in counts.items():
                    pooled[n][c] += k
        for j, c in enumerate(WRONG_CLASSES):
            ns = sorted(pooled)
            ax_err.plot(ns, [100 * error_shares(pooled[n]).get(c, float("nan")) for n in ns], style, marker="o",
                        color=f"C{j}", label=f"{c}, {params / 1e6:.2f}M")
    ax_err.set(xlabel="N", ylabel="% of the wrong answers", title="errors by class (dashed: smallest, solid: largest)")
    ax_err.legend(fontsize=6, ncol=2)
    for i, r in enumerate(rows):
        if r["ratio"] == r["ratio"]:
            ci = r["ratio_ci"]
            ax_fit.errorbar([r["parameters"]], [r["ratio"]], yerr=[[r["ratio"] - ci[0]], [ci[1] - r["ratio"]]],
                            marker="o", capsize=3, color=f"C{i % 10}")
    ax_fit.axhline(KEEP_RATIO, color="grey", linestyle=":", label=f"the bar ({KEEP_RATIO})")
    if "slope_per_decade" in fit:
        xs = [min(r["parameters"] for r in rows), max([r["parameters"] for r in rows] + [fit["parameters"] or 0])]
        ax_fit.plot(xs, [fit["intercept"] + fit["slope_per_decade"] * np.log10(x) for x in xs], "k--",
                    label="fitted line: an extrapolation")
    ax_fit.set(xscale="log", xlabel="parameters", ylabel=f"acc(N = {RATIO_N}) / acc(N = 1) (95 % CI)",
               title="keeping accuracy inside bundles")
    ax_fit.legend(fontsize=7)
    save_png(fig, path)


def report(args) -> dict:
    """Every finished run under ``args.runs`` -> ``capacity.json`` / ``.md`` / ``_curve.png`` in ``args.out``."""
    from bcr.runtime.io import atomic_write_json, atomic_write_text

    found = sorted(p.parent for p in Path(args.runs).glob("*/capacity.json"))
    if not found:
        raise SystemExit(f"no <run>/capacity.json under {args.runs}: run `python -m benchmarks.capacity run` first")
    rows = sorted((summarize_run(p, count_tokens=not args.no_token_count) for p in found),
                  key=lambda r: (r["parameters"], r["seed"]))
    fit = extrapolate(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "capacity.json", {"runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                                              "extrapolation": fit, "keep_ratio": KEEP_RATIO, "ratio_n": RATIO_N})
    atomic_write_text(out / "capacity.md", render_markdown(rows, fit))
    write_figure(rows, fit, out / "capacity_curve.png")
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "capacity_curve.png", args.figure)
    return {"rows": rows, "extrapolation": fit}


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
    r.add_argument("--checkpoint-every", type=int, default=200,
                   help="SFT checkpoint interval: a killed run started again continues (sft.checkpoint_every)")
    r.add_argument("--measure-only", action="store_true", help="measure an already trained sft stage")
    r.add_argument("overrides", nargs="*", help="further demo settings (key=value)")
    p = sub.add_parser("report", help="the curve of every finished run: tables, figure, error classes, extrapolation")
    p.add_argument("runs", help="the directory holding one folder per run (each with capacity.json)")
    p.add_argument("--out", default="benchmarks/results/capacity", help="where capacity.json/.md/_curve.png go")
    p.add_argument("--figure", default="docs/capacity_curve.png", help="a copy of the figure ('' for none)")
    p.add_argument("--no-token-count", action="store_true",
                   help="skip recounting the tokens trained (compute then unknown unless capacity.json has tokens_trained)")
    args = ap.parse_args(argv)
    if args.command == "report":
        fit = report(args)["extrapolation"]
        print(f"wrote {args.out}/capacity.md; {fit['label']}: {describe_fit(fit)}")
        return 0
    result = run(args)
    print(json.dumps({k: result[k] for k in ("parameters", "sft_wall_seconds", "accuracy")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
