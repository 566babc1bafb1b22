"""The demo's headline numbers and verdicts, from the sweep's summary, and the closing console table.

:func:`demo_summary` turns an ``evaluate_scaling`` summary into ``demo_summary.json``: per model the
tokens per problem and accuracy for each N and whether tokens fall monotonically, and the N = 1
"free lunch" of every model against the verbose SFT baseline with the demo's acceptance thresholds
(at least 15 % fewer tokens, accuracy within 3 points), and the task-scaling-law verdict of
:func:`law_check`. :func:`pool_seeds` adds, to the summary of several RL seeds' sweeps pooled, each
seed's numbers and their range and the :func:`collapse` of every RL run. :func:`print_summary`
prints it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from bcr.task.synthetic import section_styles


def check_lines(records) -> dict:
    """Redundant ``Check:`` lines per problem, per (model, N), counted in the sweep's completions."""
    out: dict = {}
    for r in records:
        key = (r["model"], r["n_problems"])
        c, n = out.get(key, (0, 0))
        out[key] = (c + r["completion"].count("Check:"), n + r["n_actual"])
    return {k: c / max(n, 1) for k, (c, n) in out.items()}


def style_mix(records, difficulty: dict | None = None) -> dict:
    """Per (model, N): for each work style of :func:`bcr.task.synthetic.section_styles` (plus
    ``"missing"`` for a problem with no section) the fraction of problems written in it and their
    accuracy, as ``{style: [fraction, accuracy]}``. With ``difficulty`` (problem id -> a label such as
    ``"1 op"``) the keys are (model, N, label): the style mix of each difficulty apart."""
    counts: dict = {}
    for r in records:
        found = section_styles(r["completion"])
        styles = [found[k] if k < len(found) else "missing" for k in range(r["n_actual"])]
        for k, (style, correct) in enumerate(zip(styles, r["correct"])):
            key = (r["model"], r["n_problems"])
            if difficulty is not None:
                key += (difficulty[r["problem_ids"][k]],)
            n, c = counts.setdefault(key, {}).get(style, (0, 0))
            counts[key][style] = (n + 1, c + bool(correct))
    out = {}
    for key, per in counts.items():
        total = sum(n for n, _ in per.values())
        out[key] = {style: [n / total, c / n] for style, (n, c) in sorted(per.items())}
    return out


def difficulty_label(problem) -> str:
    """A synthetic problem's difficulty: its number of operations (``"1 op"``, ``"2 ops"``)."""
    k = len(problem.meta["operations"])
    return f"{k} op" + ("s" if k != 1 else "")


def budget_use(records) -> dict:
    """Mean of ``completion_tokens / max_new_tokens`` per (model, N): how much of its ceiling a point uses."""
    out: dict = {}
    for r in records:
        key = (r["model"], r["n_problems"])
        u, n = out.get(key, (0.0, 0))
        out[key] = (u + r["completion_tokens"] / max(1, r["max_new_tokens"]), n + 1)
    return {k: u / max(n, 1) for k, (u, n) in out.items()}


# The pass rule of the task-scaling law (fixed before the runs; see the README): no point may be
# bound by its budget, tokens per problem must fall with disjoint 95% CIs at all but one step
# N -> N + 1, and accuracy may fall less from the first to the last N than the baseline's, starting
# from an N = 1 accuracy at least the baseline's minus the free-lunch margin (3 points; added
# 2026-12-07, before any run it judges: without it a collapsed model, with nothing left to lose, passed).
MAX_BUDGET_USE = 0.85
MAX_TRUNCATION = 0.10
STEPS_ALLOWED_TO_FAIL = 1
ACCURACY_FLOOR_POINTS = 3.0


def law_check(model: dict, baseline: dict | None) -> dict:
    """The task-scaling-law verdict of one model of :func:`demo_summary` (``baseline``: the SFT model's)."""
    ns, ci = model["n"], model["tokens_per_problem_ci"]
    clear = [ns[i + 1] for i in range(len(ns) - 1)
             if None not in (ci[i][0], ci[i + 1][1]) and ci[i + 1][1] < ci[i][0]]
    bound = [n for n, use, trunc in zip(ns, model["budget_use"], model["truncation_rate"])
             if (use is not None and use > MAX_BUDGET_USE) or (trunc is not None and trunc > MAX_TRUNCATION)]
    loss = model["accuracy"][0] - model["accuracy"][-1]
    base_loss = None if baseline is None else baseline["accuracy"][0] - baseline["accuracy"][-1]
    floor = None if baseline is None else baseline["accuracy"][0] - ACCURACY_FLOOR_POINTS / 100
    steps = len(ns) - 1
    out = {
        "falls_with_disjoint_ci_at_n": clear,
        "steps": steps,
        "budget_bound_at_n": bound,
        "accuracy_loss_first_to_last_n": loss,
        "baseline_accuracy_loss_first_to_last_n": base_loss,
        "tokens_pass": steps > 0 and len(clear) >= steps - STEPS_ALLOWED_TO_FAIL,
        "budget_not_binding": not bound,
        "first_n_accuracy_floor": floor,
        "first_n_accuracy_kept": floor is not None and model["accuracy"][0] >= floor - 1e-12,
        "accuracy_pass": base_loss is not None and loss < base_loss,
    }
    out["accuracy_pass"] = out["accuracy_pass"] and out["first_n_accuracy_kept"]
    out["passes"] = out["tokens_pass"] and out["budget_not_binding"] and out["accuracy_pass"]
    return out


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing means over every full window of ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def collapse(accuracy: Sequence[float]) -> dict:
    """Did an RL run collapse? Its training accuracy, as a moving average over ``max(1, steps // 10)``
    steps, fell below half of its peak moving average and is still below half of it at the last
    step. A run that never rises above 0 has no peak to fall from and does not collapse."""
    values = [float(a) for a in accuracy if isinstance(a, (int, float)) and a == a]
    window = max(1, len(values) // 10)
    smooth = moving_average(values, window)
    peak = max(smooth, default=0.0)
    final = smooth[-1] if smooth else 0.0
    return {"collapsed": peak > 0 and final < peak / 2, "peak": peak, "final": final, "window": window}


def _spread(per_seed: list[list[float]]) -> list[list[float]]:
    """Per position, ``[min, max]`` over the seeds' lists."""
    return [[min(v), max(v)] for v in zip(*per_seed)]


def pool_seeds(pooled: dict, per_seed: dict[int, dict], collapses: dict | None = None) -> dict:
    """``pooled`` (the :func:`demo_summary` of every RL seed's sweep records together) with the seeds'
    own numbers added: per model ``per_seed`` (tokens per problem, accuracy and law verdict of each
    seed) and, per N, ``tokens_per_problem_range`` / ``accuracy_range`` (``[min, max]`` over the
    seeds); per free-lunch comparison its ``per_seed`` token reduction and accuracy difference; per RL
    model ``collapse`` (``collapses[model][seed]``, of :func:`collapse`); and ``rl_seeds``."""
    out = copy.deepcopy(pooled)
    for name, m in out["models"].items():
        seeds = {s: r["models"][name] for s, r in sorted(per_seed.items()) if name in r["models"]}
        if any(sm["n"] != m["n"] for sm in seeds.values()):
            raise ValueError(f"the seeds' sweeps of {name!r} cover other N than the pooled one ({m['n']})")
        m["per_seed"] = {s: {"tokens_per_problem": sm["tokens_per_problem"], "accuracy": sm["accuracy"],
                             "law_passes": sm.get("law", {}).get("passes")} for s, sm in seeds.items()}
        m["tokens_per_problem_range"] = _spread([sm["tokens_per_problem"] for sm in seeds.values()])
        m["accuracy_range"] = _spread([sm["accuracy"] for sm in seeds.values()])
        if collapses and name in collapses:
            m["collapse"] = dict(sorted(collapses[name].items()))
    for c in out["free_lunch_n1"]:
        c["per_seed"] = {s: {"token_reduction_pct": lunch["token_reduction_pct"],
                             "accuracy_diff_points": lunch["accuracy_diff_points"]}
                         for s, r in sorted(per_seed.items()) for lunch in r["free_lunch_n1"]
                         if lunch["model"] == c["model"]}
    out["rl_seeds"] = sorted(per_seed)
    return out


def _per_model(rows: list[dict], checks: dict, use: dict, styles: dict, by_difficulty: dict) -> dict:
    models: dict = {}
    for row in rows:
        m = models.setdefault(row["model"], {"n": [], "tokens_per_problem": [], "tokens_per_problem_ci": [],
                                             "accuracy": [], "checks_per_problem": [], "truncation_rate": [],
                                             "budget_use": [], "styles": []})
        m["n"].append(row["n_problems"])
        m["tokens_per_problem"].append(row["tokens_per_problem"])
        m["tokens_per_problem_ci"].append([row.get("tokens_per_problem_ci_low"), row.get("tokens_per_problem_ci_high")])
        m["accuracy"].append(row["accuracy"])
        m["checks_per_problem"].append(checks.get((row["model"], row["n_problems"])))
        m["truncation_rate"].append(row.get("truncation_rate"))
        m["budget_use"].append(use.get((row["model"], row["n_problems"])))
        m["styles"].append(styles.get((row["model"], row["n_problems"])))
        if by_difficulty:
            labels = sorted({key[2] for key in by_difficulty})
            m.setdefault("styles_by_difficulty", []).append(
                {label: by_difficulty.get((row["model"], row["n_problems"], label)) for label in labels})
    return models


def _free_lunch(c: dict) -> dict:
    """One N = 1 comparison against the baseline, judged by the demo's thresholds."""
    return {
        "model": c["model"],
        "tokens_per_problem": c["tokens_per_problem"],
        "baseline_tokens_per_problem": c["baseline_tokens_per_problem"],
        "token_reduction_pct": c["token_reduction_pct"],
        "token_reduction_ci": [c["token_reduction_ci_low"], c["token_reduction_ci_high"]],
        "accuracy": c["accuracy"],
        "baseline_accuracy": c["baseline_accuracy"],
        "accuracy_diff_points": 100 * c["accuracy_diff"],
        "accuracy_diff_ci_points": [100 * c["accuracy_diff_ci_low"], 100 * c["accuracy_diff_ci_high"]],
        "meets_15pct_fewer_tokens": bool(c["token_reduction_pct"] >= 15.0),
        "meets_accuracy_within_3_points": bool(abs(100 * c["accuracy_diff"]) <= 3.0),
    }


def demo_summary(summary: dict, checks: dict | None = None, use: dict | None = None,
                 styles: dict | None = None, styles_by_difficulty: dict | None = None) -> dict:
    """The demo's headline numbers from an ``evaluate_scaling`` summary (see the module docstring);
    ``checks`` maps (model, N) to the ``Check:`` lines per problem of :func:`check_lines`, ``use`` to
    the budget use of :func:`budget_use`, ``styles`` to the work styles of :func:`style_mix` and
    ``styles_by_difficulty`` to those of ``style_mix(records, difficulty)`` (the adaptive-reasoning
    table: which problems a model answers directly, per difficulty and N)."""
    models = _per_model(summary["rows"], checks or {}, use or {}, styles or {}, styles_by_difficulty or {})
    fits = summary.get("fits") or {}
    for name, m in models.items():
        tok = m["tokens_per_problem"]
        m["rises_at_n"] = [m["n"][i + 1] for i in range(len(tok) - 1) if tok[i + 1] >= tok[i]]
        m["tokens_fall_monotonically"] = not m["rises_at_n"]
        # a rise whose CI lies wholly above the previous N's CI: one that noise alone rarely explains
        m["clear_rises_at_n"] = fits.get(name, {}).get("clear_rises_n", [])
    lunch = summary.get("free_lunch") or {}
    baseline = models.get(lunch.get("baseline"))
    for m in models.values():
        m["law"] = law_check(m, baseline)
    return {"models": models, "free_lunch_n1": [_free_lunch(c) for c in lunch.get("comparisons", [])],
            "baseline": lunch.get("baseline")}


def _styles_cell(styles: dict | None) -> str:
    """`` 60/30/10%`` (the steps / merged / direct shares of the problems)."""
    return " " + "/".join(f"{100 * (styles or {}).get(s, [0.0])[0]:.0f}" for s in ("steps", "merged", "direct")) + "%"


def _several_styles(result: dict) -> bool:
    """Whether any point of any model wrote a style other than steps (else the table leaves the shares out)."""
    return any(set(styles or {}) - {"steps", "missing"}
               for m in result["models"].values() for styles in m.get("styles", []))


def _scaling_table(result: dict, prefix: str = "") -> Table:
    """Tokens per problem (accuracy %) [Check lines per problem] and the steps/merged/direct shares
    of the work, one row per N, one column per model."""
    names = list(result["models"])
    ns = result["models"][names[0]]["n"] if names else []
    show_styles = _several_styles(result)
    table = Table(title=prefix + "task-scaling law: tokens per problem (accuracy %) [Check lines per problem]"
                        + (" steps/merged/direct %" if show_styles else ""))
    table.add_column("N", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i, n in enumerate(ns):
        cells = []
        for name in names:
            m = result["models"][name]
            if i < len(m["n"]):
                chk = m["checks_per_problem"][i]
                chk = f" [{chk:.2f}]" if chk is not None else ""
                styles = _styles_cell(m.get("styles", [None] * len(m["n"]))[i]) if show_styles else ""
                cells.append(f"{m['tokens_per_problem'][i]:.1f} ({100 * m['accuracy'][i]:.1f}){chk}{styles}")
            else:
                cells.append("-")
        table.add_row(str(n), *cells)
    return table


def _range_table(result: dict) -> Table:
    """Per N and model, the range over the RL seeds: tokens per problem min-max (accuracy % min-max)."""
    names = [name for name, m in result["models"].items() if m.get("tokens_per_problem_range")]
    table = Table(title=f"range over the RL seeds {result['rl_seeds']}: tokens per problem min-max (accuracy % min-max)")
    table.add_column("N", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i, n in enumerate(result["models"][names[0]]["n"] if names else []):
        cells = []
        for name in names:
            (tlo, thi), (alo, ahi) = (result["models"][name][k][i] for k in ("tokens_per_problem_range", "accuracy_range"))
            cells.append(f"{tlo:.1f}-{thi:.1f} ({100 * alo:.1f}-{100 * ahi:.1f})")
        table.add_row(str(n), *cells)
    return table


def _seed_notes(m: dict) -> list[str]:
    """The per-seed parts of a model's lines: its law verdicts and the collapses of its RL runs."""
    notes = []
    verdicts = [("PASS" if v["law_passes"] else "FAIL") for v in m.get("per_seed", {}).values()]
    if len(verdicts) > 1:
        notes.append("law per seed: " + ", ".join(verdicts))
    if m.get("collapse"):
        hit = [s for s, c in m["collapse"].items() if c["collapsed"]]
        notes.append(f"training collapsed in {len(hit)} of {len(m['collapse'])} RL runs"
                     + (f" (seed {', '.join(map(str, hit))})" if hit else ""))
    return notes


def _adaptive_cell(mix: dict | None) -> str:
    """``12% direct (83/97)``: the share answered direct, and the accuracy of direct / worked answers."""
    if not mix:
        return "-"
    share = mix.get("direct", [0.0, None])[0]
    acc = [mix.get(style, [0, None])[1] for style in ("direct", "steps")]
    return f"{100 * share:.0f}% direct (" + "/".join("-" if a is None else f"{100 * a:.0f}" for a in acc) + ")"


def adaptive_table(result: dict) -> Table | None:
    """Per N, per model and difficulty: the share of problems answered direct (no work) and the
    accuracy of the direct and the worked (steps) answers; None without ``styles_by_difficulty``."""
    models = {name: m for name, m in result["models"].items() if m.get("styles_by_difficulty")}
    if not models:
        return None
    table = Table(title="adaptive reasoning: share answered direct (accuracy % direct/worked), per difficulty")
    table.add_column("N", justify="right")
    columns = [(name, label) for name, m in models.items() for label in m["styles_by_difficulty"][0]]
    for name, label in columns:
        table.add_column(f"{name} {label}", justify="right")
    ns = next(iter(models.values()))["n"]
    for i, n in enumerate(ns):
        table.add_row(str(n), *[_adaptive_cell(models[name]["styles_by_difficulty"][i].get(label))
                                if i < len(models[name]["n"]) else "-" for name, label in columns])
    return table


def monotonic_verdict(m: dict) -> str:
    """``yes``, or ``no (...)`` naming the Ns with a clear rise and those with a rise within the CIs."""
    if m["tokens_fall_monotonically"]:
        return "yes"
    clear = m.get("clear_rises_at_n", [])
    noise = [n for n in m["rises_at_n"] if n not in clear]
    parts = (f"clear rise at N = {clear}" if clear else "", f"rise within the 95% CIs at N = {noise}" if noise else "")
    return "no (" + "; ".join(part for part in parts if part) + ")"


def law_verdict(law: dict) -> str:
    """One line: pass or fail, and the three parts of :func:`law_check`."""
    clear, steps = law["falls_with_disjoint_ci_at_n"], law["steps"]
    base = law["baseline_accuracy_loss_first_to_last_n"]
    parts = [f"falls with disjoint 95% CIs at {len(clear)} of {steps} steps (N = {clear})",
             "no point budget-bound" if law["budget_not_binding"] else f"budget-bound at N = {law['budget_bound_at_n']}",
             f"accuracy loss {100 * law['accuracy_loss_first_to_last_n']:.1f} points"
             + (f" vs the baseline's {100 * base:.1f}" if base is not None else "")]
    floor = law.get("first_n_accuracy_floor")
    if floor is not None and not law["first_n_accuracy_kept"]:
        parts.append(f"first-N accuracy below the baseline's minus {ACCURACY_FLOOR_POINTS:.0f} points "
                     f"({100 * floor:.1f} %)")
    return ("PASS" if law["passes"] else "FAIL") + ": " + "; ".join(parts)


def _lunch_seeds(c: dict) -> str:
    """`` (per seed: 5.1..9.3% fewer, +18.3..+25.0 points)`` over a comparison's seeds (empty for one)."""
    seeds = list(c.get("per_seed", {}).values())
    if len(seeds) < 2:
        return ""
    cut = [v["token_reduction_pct"] for v in seeds]
    diff = [v["accuracy_diff_points"] for v in seeds]
    return f" (per seed: {min(cut):.1f}..{max(cut):.1f}% fewer, {min(diff):+.1f}..{max(diff):+.1f} points)"


def print_summary(result: dict, stage_seconds: dict | None = None, console: Console | None = None,
                  wall_seconds: float | None = None) -> None:
    """The demo's closing table: tokens/problem and accuracy per N per model, then the free lunch;
    with several RL seeds the pooled numbers, then their range over the seeds, and per-seed notes."""
    console = console or Console()
    seeds = result.get("rl_seeds") or []
    console.print(_scaling_table(result, f"pooled over the RL seeds {seeds}: " if len(seeds) > 1 else ""))
    if len(seeds) > 1:
        console.print(_range_table(result))
    adaptive = adaptive_table(result)
    if adaptive is not None:
        console.print(adaptive)
    for name, m in result["models"].items():
        console.print(f"  {name}: tokens per problem fall monotonically with N: {monotonic_verdict(m)}")
        if "law" in m:
            notes = _seed_notes(m)
            console.print(f"  {name}: task-scaling law: {law_verdict(m['law'])}" + (f" ({'; '.join(notes)})" if notes else ""))
    for c in result["free_lunch_n1"]:
        console.print(
            f"  free lunch at N = 1, {c['model']} vs {result['baseline']}: {c['tokens_per_problem']:.1f} vs "
            f"{c['baseline_tokens_per_problem']:.1f} tokens/problem = {c['token_reduction_pct']:.1f}% fewer "
            f"(95% CI {c['token_reduction_ci'][0]:.1f}..{c['token_reduction_ci'][1]:.1f}); accuracy "
            f"{100 * c['accuracy']:.1f}% vs {100 * c['baseline_accuracy']:.1f}% "
            f"({c['accuracy_diff_points']:+.1f} points)" + _lunch_seeds(c))
    if result.get("machine"):
        mach = result["machine"]
        console.print(f"  machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} "
                      f"({mach['cpu_capability']} kernels)")
    if stage_seconds:
        total = sum(stage_seconds.values())
        console.print("  stage times: " + ", ".join(f"{s} {t:.0f} s" for s, t in stage_seconds.items())
                      + f" (sum {total:.0f} s" + (f", wall {wall_seconds:.0f} s)" if wall_seconds else ")"))
