"""Writers for an evaluation run directory: ``summary.json``, ``summary.csv``, ``report.md`` and PNG
plots (tokens per problem vs N, accuracy vs N, accuracy vs tokens frontier).

Input is the dict returned by :func:`bcr.eval.scaling.summarize_records`. Every file is written to a
temporary file next to its target and renamed into place, so a crash never leaves a half-written
summary. Plots use matplotlib's non-interactive Agg backend and no timestamps, so the same summary
gives the same PNG bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

from bcr.runtime.io import atomic_write_bytes, atomic_write_text
from bcr.eval.scaling import TIMING_KEY, power_law_label

PLOT_FILES = {
    "tokens": "tokens_per_problem_vs_n.png",
    "accuracy": "accuracy_vs_n.png",
    "frontier": "accuracy_vs_tokens.png",
}

CSV_COLUMNS = [
    "model",
    "n_problems",
    "num_problems",
    "num_bundles",
    "num_completions",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "flexible_accuracy",
    "flexible_accuracy_ci_low",
    "flexible_accuracy_ci_high",
    "tokens_per_problem",
    "tokens_per_problem_ci_low",
    "tokens_per_problem_ci_high",
    "completion_tokens_mean",
    "answered_rate",
    "flexible_answered_rate",
    "truncation_rate",
    "accuracy_by_position",
    f"{TIMING_KEY}.generation_s",
    f"{TIMING_KEY}.problems_per_s",
    f"{TIMING_KEY}.tokens_per_s",
]


def _json_safe(obj):
    """NaN/inf become None so the JSON is standard (and diff-able)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- summary files


def write_summary_json(path: str | Path, summary: Mapping) -> None:
    atomic_write_text(path, json.dumps(_json_safe(summary), indent=2) + "\n")


def write_summary_csv(path: str | Path, summary: Mapping) -> None:
    """One row per (model, N). Timing columns are prefixed ``timing.``; position accuracies are
    joined with ``;`` (position 1 first)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary["rows"]:
        flat = dict(row)
        for key, value in (row.get(TIMING_KEY) or {}).items():
            flat[f"{TIMING_KEY}.{key}"] = value
        flat["accuracy_by_position"] = ";".join(_num(v) for v in row["accuracy_by_position"])
        writer.writerow([_num(flat.get(c)) if c != "accuracy_by_position" else flat[c] for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(round(v, 6))
    return str(v)


# ----------------------------------------------------------------------------- report.md


def _pct(v, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}"


def _f(v, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_report(summary: Mapping, *, plots: Mapping[str, str] | None = None, title: str = "Task-scaling evaluation") -> str:
    """Markdown report: per-(model, N) table, the scaling fit, the free-lunch comparison, plot links."""
    conf = round(100 * summary.get("confidence", 0.95))
    out = [f"# {title}", ""]
    config = summary.get("config") or {}
    if config:
        keys = ["benchmark", "n_values", "samples_per_bundle", "budget_mode", "max_completion_length",
                "per_problem_budget", "temperature", "top_p", "seed", "engine"]
        unused = "per_problem_budget" if config.get("budget_mode") == "per_prompt" else "max_completion_length"
        out += ["Settings: " + ", ".join(f"`{k}={config[k]}`" for k in keys if k in config and k != unused), ""]

    out += ["## Accuracy, tokens and throughput per N", ""]
    out += [
        (f"Accuracy is pass@1 averaged over the samples of each bundle, with a {conf}% CI "
        f"({summary.get('ci_method', 'bootstrap')} over problems). *Strict* reads the BCR answer format "
        "(`Answer k: \\boxed{..}`); *flexible* also accepts, per section, the last `\\boxed{}`, "
        "\"answer is ...\" or the last number (for models that ignore the format). Tokens/problem = "
        "completion tokens / problems in the bundle. Throughput is measured over generation wall time only."),
        "",
    ]
    header = ["model", "N", "problems", "bundles", "accuracy % (strict)", f"{conf}% CI", "flexible %",
              f"{conf}% CI", "tokens/problem", f"{conf}% CI", "answered % (strict / flexible)", "truncated %",
              "accuracy by position %", "problems/s", "tokens/s"]
    rows = []
    for r in summary["rows"]:
        t = r.get(TIMING_KEY) or {}
        rows.append([
            str(r["model"]), str(r["n_problems"]), str(r["num_problems"]), str(r["num_bundles"]),
            _pct(r["accuracy"]), f"[{_pct(r['accuracy_ci_low'])}, {_pct(r['accuracy_ci_high'])}]",
            _pct(r.get("flexible_accuracy")),
            f"[{_pct(r.get('flexible_accuracy_ci_low'))}, {_pct(r.get('flexible_accuracy_ci_high'))}]",
            _f(r["tokens_per_problem"], 1),
            f"[{_f(r.get('tokens_per_problem_ci_low'), 1)}, {_f(r.get('tokens_per_problem_ci_high'), 1)}]",
            f"{_pct(r['answered_rate'])} / {_pct(r.get('flexible_answered_rate'))}", _pct(r["truncation_rate"]),
            " / ".join(_pct(v, 0) for v in r["accuracy_by_position"]),
            _f(t.get("problems_per_s")), _f(t.get("tokens_per_s"), 1),
        ])
    out += _table(header, rows) + [""]

    out += ["## Task-scaling fit", "",
            ("Tokens per problem fitted as `a * N^-b` (least squares in log-log; R² in log space); "
            "accuracy slope is the linear fit of accuracy against N (points per added problem). "
            "Non-monotonic N: tokens/problem rose compared with the previous N; clear rise: the rise's "
            "CI lies wholly above the previous N's CI."), ""]
    fit_rows = []
    for model, fit in (summary.get("fits") or {}).items():
        p, s = fit.get("tokens_power_law"), fit.get("accuracy_linear")
        fit_rows.append([
            str(model),
            _f(p["a"], 1) if p else "–", _f(p["b"], 3) if p else "–", _f(p["r2"], 3) if p else "–",
            _f(100 * s["slope"], 2) if s else "–",
            ", ".join(str(n) for n in fit.get("non_monotonic_n", [])) or "none",
            ", ".join(str(n) for n in fit.get("clear_rises_n", [])) or "none",
        ])
    out += _table(["model", "a", "b", "R²", "accuracy slope (pts/N)", "non-monotonic N", "clear rises"],
                  fit_rows) + [""]

    lunch = summary.get("free_lunch")
    if lunch and lunch.get("comparisons"):
        out += [f"## Free lunch at N = {lunch['n_problems']} (baseline: {lunch['baseline']})", "",
                f"Token reduction = 1 − tokens(model)/tokens(baseline); {conf}% CIs by paired bootstrap over problems.", ""]
        lrows = []
        for c in lunch["comparisons"]:
            lrows.append([
                str(c["model"]), str(c["num_problems"]),
                _f(c["baseline_tokens_per_problem"], 1), _f(c["tokens_per_problem"], 1),
                f"{_f(c['token_reduction_pct'], 1)} [{_f(c['token_reduction_ci_low'], 1)}, {_f(c['token_reduction_ci_high'], 1)}]",
                _pct(c["baseline_accuracy"]), _pct(c["accuracy"]),
                f"{_pct(c['accuracy_diff'])} [{_pct(c['accuracy_diff_ci_low'])}, {_pct(c['accuracy_diff_ci_high'])}]",
            ])
        out += _table(["model", "problems", "baseline tokens", "tokens", "token reduction %",
                       "baseline acc %", "acc %", "acc diff (pts)"], lrows) + [""]

    if plots:
        out += ["## Plots", ""]
        for name, file in plots.items():
            out += [f"![{name}]({file})", ""]
    return "\n".join(out)


def write_report_md(path: str | Path, summary: Mapping, *, plots: Mapping[str, str] | None = None) -> None:
    atomic_write_text(path, render_report(summary, plots=plots))


# ----------------------------------------------------------------------------- plots


def save_png(fig, path: Path) -> None:
    """A matplotlib figure as a PNG file, written atomically (no timestamp in it: same plot, same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def write_plots(output_dir: str | Path, summary: Mapping) -> dict[str, str]:
    """Write the three PNG plots into ``output_dir``; returns {plot name: file name}."""
    # The Figure API without pyplot: no global state and no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure

    output_dir = Path(output_dir)
    by_model: dict[str, list[Mapping]] = {}
    for r in summary["rows"]:
        by_model.setdefault(r["model"], []).append(r)
    for rows in by_model.values():
        rows.sort(key=lambda r: r["n_problems"])
    fits = summary.get("fits") or {}

    # Tokens per problem vs N (log-log) with the fitted power law.
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for i, (model, rows) in enumerate(by_model.items()):
        color = f"C{i % 10}"
        ns = [r["n_problems"] for r in rows]
        ax.plot(ns, [r["tokens_per_problem"] for r in rows], "o-", color=color, label=model)
        if all(r.get("tokens_per_problem_ci_low") is not None for r in rows):  # summaries before the CI: none
            ax.errorbar(ns, [r["tokens_per_problem"] for r in rows], fmt="none", ecolor=color, capsize=3,
                        yerr=[[max(0.0, r["tokens_per_problem"] - r["tokens_per_problem_ci_low"]) for r in rows],
                              [max(0.0, r["tokens_per_problem_ci_high"] - r["tokens_per_problem"]) for r in rows]])
        p = (fits.get(model) or {}).get("tokens_power_law")
        if p:
            lo, hi = min(ns), max(ns)
            grid = [lo + (hi - lo) * j / 50 for j in range(51)]
            ax.plot(grid, [p["a"] * g ** -p["b"] for g in grid], "--", color=color, alpha=0.6,
                    label=f"{model}: {power_law_label(p)} (R²={p['r2']:.2f})")
    _log_axes(ax, by_model)
    _budget_cap(ax, summary, by_model)
    ax.set_xlabel("problems per context N")
    ax.set_ylabel("completion tokens per problem")
    ax.set_title("Task-scaling law: tokens per problem")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    save_png(fig, output_dir / PLOT_FILES["tokens"])

    # Accuracy vs N with CI error bars.
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    spread = 0.06 * (len(by_model) > 1)  # dodge models sideways so their error bars do not overlap
    for i, (model, rows) in enumerate(by_model.items()):
        ns = [r["n_problems"] + spread * (i - (len(by_model) - 1) / 2) for r in rows]
        acc = [100 * r["accuracy"] for r in rows]
        err = [[100 * (r["accuracy"] - r["accuracy_ci_low"]) for r in rows],
               [100 * (r["accuracy_ci_high"] - r["accuracy"]) for r in rows]]
        ax.errorbar(ns, acc, yerr=err, fmt="o-", capsize=3, color=f"C{i % 10}", label=model)
    ax.set_xlabel("problems per context N")
    ax.set_ylabel("accuracy % (pass@1)")
    ax.set_title("Accuracy vs N")
    ax.set_xticks(sorted({r["n_problems"] for r in summary["rows"]}))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, output_dir / PLOT_FILES["accuracy"])

    # Accuracy vs tokens per problem: the cost/accuracy frontier, each point labelled with its N.
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for i, (model, rows) in enumerate(by_model.items()):
        x = [r["tokens_per_problem"] for r in rows]
        y = [100 * r["accuracy"] for r in rows]
        ax.plot(x, y, "o-", color=f"C{i % 10}", label=model)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"N={r['n_problems']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("completion tokens per problem")
    ax.set_ylabel("accuracy % (pass@1)")
    ax.set_title("Accuracy vs token cost")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, output_dir / PLOT_FILES["frontier"])

    return dict(PLOT_FILES)


def _budget_cap(ax, summary: Mapping, by_model) -> None:
    """With one shared budget B per prompt, no model can exceed B / N tokens per problem: draw that
    ceiling (clipped to the data's range) so budget-bound points can be told from compression."""
    config = summary.get("config") or {}
    budget = config.get("max_completion_length")
    values = [r["tokens_per_problem"] for rows in by_model.values() for r in rows]
    ns = sorted({r["n_problems"] for rows in by_model.values() for r in rows})
    if config.get("budget_mode") != "per_prompt" or not budget or not values or min(values) <= 0:
        return
    lo, hi = ax.get_ylim()
    ax.plot(ns, [budget / n for n in ns], ":", color="grey", label=f"ceiling: shared budget {budget} / N")
    ax.set_ylim(lo, hi)


def _log_axes(ax, by_model) -> None:
    """Log-log when every value is positive; otherwise keep linear axes (log would drop points)."""
    values = [r["tokens_per_problem"] for rows in by_model.values() for r in rows]
    ns = [r["n_problems"] for rows in by_model.values() for r in rows]
    if values and min(values) > 0:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(set(ns)))
        ax.set_xticklabels([str(n) for n in sorted(set(ns))])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def write_run_outputs(output_dir: str | Path, summary: Mapping, *, plots: bool = True) -> dict[str, Path]:
    """Write summary.json, summary.csv, report.md and (optionally) the plots; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(output_dir, summary) if plots else {}
    write_summary_json(output_dir / "summary.json", summary)
    write_summary_csv(output_dir / "summary.csv", summary)
    write_report_md(output_dir / "report.md", summary, plots=plot_files)
    paths = {"summary.json": output_dir / "summary.json", "summary.csv": output_dir / "summary.csv",
             "report.md": output_dir / "report.md"}
    paths.update({name: output_dir / f for name, f in plot_files.items()})
    return paths
