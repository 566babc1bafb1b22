"""Statistics for task-scaling sweeps: per-(model, N) summaries, the power-law fit, confidence
intervals and the N = 1 "free lunch" comparison.

Everything here is pure Python + numpy and works on plain *records*: the dicts that
:mod:`bcr.eval.sweep` writes to ``results.jsonl``, one per (model, N, bundle, sample). A record
carries at least::

    model, n_problems, bundle_index, sample_index, n_actual, problem_ids,
    completion_tokens, truncated, answered [bool per instance], correct [bool per instance],
    timing {"batch_index", "generate_s"}

and, from sweeps that record it, flexible_answers / flexible_correct [per instance]

so every number in a summary can be recomputed from ``results.jsonl`` alone.

Definitions (one place, used by the report too):

- **accuracy**: pass@1 averaged over the k samples of each bundle. Each problem gets the mean of its
  k correctness values (its *problem-level mean*); accuracy is the mean over problems.
- **95 % CI of accuracy**: ``ci_method="bootstrap"`` (default) resamples problems with replacement
  (percentile interval of the resampled means, ``n_bootstrap`` draws, seeded so the summary is
  reproducible); ``ci_method="normal"`` uses mean ± z·sd/√n over the problem-level means.
- **tokens per problem**: total completion tokens / total problem instances
  (Σ completion_tokens / Σ N_actual over all completions), so a partial last bundle counts with the
  number of problems it really holds. Its CI resamples completions (bundles) with replacement and
  recomputes the ratio (``ci_method="normal"``: the delta-method interval of the ratio).
- **non-monotonic N**: the N at which tokens per problem rises over the previous N; *clear rises*
  are those whose CI lies wholly above the previous N's CI (a rise noise alone rarely explains).
- **strict and flexible accuracy**: ``accuracy`` (and ``answered_rate``) use the BCR answer format
  (``correct``); ``flexible_accuracy`` (its CI, ``flexible_answered_rate``) the same definitions on
  ``flexible_correct`` / ``flexible_answers`` (see :mod:`bcr.task.scoring`), or None when a record lacks
  them (a sweep recorded before they existed).
- **answered rate**: fraction of instances with a parsed answer; **truncation rate**: fraction of
  completions that hit the token budget.
- **accuracy by position**: mean correctness of the instances at position p (0-based) in their bundle.
- **throughput**: problems/s and completion tokens/s over the summed wall time of the generate calls.
  These are the only non-deterministic numbers and live under a ``"timing"`` key.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

TIMING_KEY = "timing"


# ----------------------------------------------------------------------------- fits


@dataclass
class PowerLawFit:
    """``y ≈ a · N^(-b)``, fitted by least squares on ``log y = log a - b log N``.

    ``r2`` is the coefficient of determination in log-log space.
    """

    a: float
    b: float
    r2: float
    num_points: int

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(n, -self.b)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LinearFit:
    """``y ≈ intercept + slope · x`` by ordinary least squares."""

    slope: float
    intercept: float
    r2: float
    num_points: int

    def to_dict(self) -> dict:
        return asdict(self)


def _r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def linear_fit(x: Sequence[float], y: Sequence[float]) -> LinearFit | None:
    """Least-squares line through (x, y); None when fewer than two distinct x values."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if len(np.unique(xs)) < 2:
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    r2 = _r_squared(ys, intercept + slope * xs)
    return LinearFit(float(slope), float(intercept), float(r2), len(xs))


def fit_power_law(n_values: Sequence[float], y: Sequence[float]) -> PowerLawFit | None:
    """Fit ``y = a · N^(-b)`` in log-log space.

    Points with ``y <= 0`` (log undefined) are left out. Returns None when fewer than two points
    with distinct N remain. ``b > 0`` means y falls as N grows (the task-scaling law).
    """
    ns = np.asarray(n_values, dtype=float)
    ys = np.asarray(y, dtype=float)
    keep = np.isfinite(ns) & np.isfinite(ys) & (ns > 0) & (ys > 0)
    ns, ys = ns[keep], ys[keep]
    if len(np.unique(ns)) < 2:
        return None
    log_n, log_y = np.log(ns), np.log(ys)
    slope, intercept = np.polyfit(log_n, log_y, 1)
    r2 = _r_squared(log_y, intercept + slope * log_n)
    return PowerLawFit(a=float(math.exp(intercept)), b=float(-slope), r2=float(r2), num_points=len(ns))


def power_law_label(fit: Mapping, *, a_digits: int = 0, b_digits: int = 2) -> str:
    """A fit of :func:`fit_power_law` as text, ``a·N^-b`` with the exponent's sign written once:
    ``38·N^-0.50`` when y falls, ``38·N^+0.03`` when it rises (``b < 0``)."""
    return f"{fit['a']:.{a_digits}f}·N^{-fit['b']:+.{b_digits}f}"


def non_monotonic_points(n_values: Sequence[float], y: Sequence[float], *, rtol: float = 0.0) -> list:
    """The N values at which ``y`` (tokens per problem) *rises* compared with the previous N.

    Points are sorted by N first. ``rtol`` tolerates small rises: a point is flagged when
    ``y[i] > y[i-1] * (1 + rtol)``.
    """
    pairs = sorted((n, v) for n, v in zip(n_values, y) if v is not None and math.isfinite(v))
    flagged = []
    for (_, prev), (n, cur) in itertools.pairwise(pairs):
        if cur > prev * (1.0 + rtol):
            flagged.append(n)
    return flagged


# ----------------------------------------------------------------------------- intervals


def stable_seed(*parts) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


def mean_ci(
    values: Sequence[float],
    *,
    method: str = "bootstrap",
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` with a ``confidence`` interval.

    ``method="bootstrap"``: percentile interval of ``n_bootstrap`` resampled means.
    ``method="normal"``: mean ± z·sd/√n (sample sd, ddof=1). With one value the interval is the point.
    """
    x = np.asarray(values, dtype=float)
    # the mean is the ratio of sums with unit denominators (same intervals, same bootstrap draws)
    return ratio_ci(x, np.ones_like(x), method=method, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)


def ratio_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    method: str = "bootstrap",
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(Σnum / Σden, low, high): a ratio of sums with a ``confidence`` interval over the units.

    ``method="bootstrap"``: units resampled with replacement, percentile interval of the ratios.
    ``method="normal"``: delta method, ratio ± z·sd(num − ratio·den)/(mean(den)·√n).
    """
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"numerators and denominators differ in length: {num.size} vs {den.size}")
    if num.size == 0 or den.sum() <= 0:
        return (float("nan"), float("nan"), float("nan"))
    ratio = float(num.sum() / den.sum())
    if num.size == 1:
        return (ratio, ratio, ratio)
    if method == "normal":
        z = _normal_quantile(0.5 + confidence / 2.0)
        half = z * float((num - ratio * den).std(ddof=1)) / (float(den.mean()) * math.sqrt(num.size))
        return (ratio, ratio - half, ratio + half)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, num.size, size=(n_bootstrap, num.size))
        ratios = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
        lo, hi = np.quantile(ratios, [(1 - confidence) / 2, (1 + confidence) / 2])
        return (ratio, float(lo), float(hi))
    raise ValueError(f"ci method must be 'bootstrap' or 'normal', got {method!r}")


def _normal_quantile(p: float) -> float:
    """Inverse standard-normal CDF by bisection on erf (no scipy needed)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired_bootstrap(
    model_values: Sequence[float],
    base_values: Sequence[float],
    statistic,
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high) of ``statistic(model_sample, base_sample)`` under a paired bootstrap.

    The two arrays are aligned by problem; each draw resamples *problems* and keeps the pairs
    together, so per-problem difficulty cancels out of the interval.
    """
    m = np.asarray(model_values, dtype=float)
    b = np.asarray(base_values, dtype=float)
    if m.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {m.shape} and {b.shape}")
    if m.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    point = float(statistic(m, b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m.size, size=(n_bootstrap, m.size))
    draws = np.array([statistic(m[i], b[i]) for i in idx], dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return (point, float("nan"), float("nan"))
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (point, float(lo), float(hi))


# ----------------------------------------------------------------------------- per-(model, N) summary


def problem_level(records: Iterable[Mapping], correct_key: str = "correct") -> dict[str, dict[str, float]]:
    """Per problem id: mean correctness and mean completion tokens attributed to it over samples.

    A problem's token share in one completion is ``completion_tokens / n_actual`` (the completion
    budget is shared, so tokens are split evenly over the instances of the bundle). ``correct_key``
    names the correctness field (``"flexible_correct"`` for flexible extraction).
    """
    acc: dict[str, list[float]] = defaultdict(list)
    tok: dict[str, list[float]] = defaultdict(list)
    for r in records:
        share = r["completion_tokens"] / r["n_actual"]
        for pid, ok in zip(r["problem_ids"], r[correct_key]):
            acc[pid].append(float(ok))
            tok[pid].append(share)
    return {pid: {"accuracy": float(np.mean(acc[pid])), "tokens": float(np.mean(tok[pid]))} for pid in acc}


def _flexible_accuracy(records: Sequence[Mapping], instances: int, *, seed: int, **ci) -> dict:
    """``flexible_accuracy`` (+ CI) and ``flexible_answered_rate``; None where a record lacks them."""
    if not all("flexible_correct" in r and "flexible_answers" in r for r in records):
        keys = ("flexible_accuracy", "flexible_accuracy_ci_low", "flexible_accuracy_ci_high", "flexible_answered_rate")
        return dict.fromkeys(keys)
    per_problem = problem_level(records, correct_key="flexible_correct")
    mean, lo, hi = mean_ci([per_problem[p]["accuracy"] for p in sorted(per_problem)], seed=seed, **ci)
    answered = sum(sum(a is not None for a in r["flexible_answers"]) for r in records)
    return {
        "flexible_accuracy": mean,
        "flexible_accuracy_ci_low": lo,
        "flexible_accuracy_ci_high": hi,
        "flexible_answered_rate": answered / instances,
    }


def summarize_group(
    records: Sequence[Mapping],
    *,
    ci_method: str = "bootstrap",
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Summary statistics of the records of one (model, N); see the module docstring."""
    if not records:
        raise ValueError("summarize_group needs at least one record")
    model, n = records[0]["model"], records[0]["n_problems"]
    per_problem = problem_level(records)
    pids = sorted(per_problem)
    mean, lo, hi = mean_ci(
        [per_problem[p]["accuracy"] for p in pids],
        method=ci_method,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        seed=stable_seed(seed, model, n, "accuracy"),
    )
    instances = sum(r["n_actual"] for r in records)
    tokens = sum(r["completion_tokens"] for r in records)
    _, tok_lo, tok_hi = ratio_ci(
        [r["completion_tokens"] for r in records],
        [r["n_actual"] for r in records],
        method=ci_method,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        seed=stable_seed(seed, model, n, "tokens"),
    )
    answered = sum(sum(bool(a) for a in r["answered"]) for r in records)
    flexible = _flexible_accuracy(
        records, instances, method=ci_method, confidence=confidence, n_bootstrap=n_bootstrap,
        seed=stable_seed(seed, model, n, "flexible_accuracy"),
    )

    by_position: dict[int, list[float]] = defaultdict(list)
    for r in records:
        for pos, ok in enumerate(r["correct"]):
            by_position[pos].append(float(ok))

    # Generation wall time: each generate call (batch) is counted once, whatever its record count.
    batch_seconds: dict = {}
    for r in records:
        t = r.get(TIMING_KEY) or {}
        if "generate_s" in t:
            batch_seconds[t.get("batch_index")] = t["generate_s"]
    seconds = float(sum(batch_seconds.values()))

    return {
        "model": model,
        "n_problems": n,
        "num_problems": len(pids),
        "num_bundles": len({r["bundle_index"] for r in records}),
        "num_completions": len(records),
        "accuracy": mean,
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        **flexible,
        "tokens_per_problem": tokens / instances,
        "tokens_per_problem_ci_low": tok_lo,
        "tokens_per_problem_ci_high": tok_hi,
        "completion_tokens_mean": tokens / len(records),
        "answered_rate": answered / instances,
        "truncation_rate": sum(bool(r["truncated"]) for r in records) / len(records),
        "accuracy_by_position": [float(np.mean(by_position[p])) for p in sorted(by_position)],
        TIMING_KEY: {
            "generation_s": seconds,
            "problems_per_s": instances / seconds if seconds > 0 else None,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
        },
    }


def group_records(records: Iterable[Mapping]) -> dict[tuple[str, int], list[Mapping]]:
    """Records grouped by (model, n_problems), in first-seen order."""
    groups: dict[tuple[str, int], list[Mapping]] = {}
    for r in records:
        groups.setdefault((r["model"], r["n_problems"]), []).append(r)
    return groups


def fit_model(rows: Sequence[Mapping]) -> dict:
    """Task-scaling fit for one model from its summary rows (one per N)."""
    rows = sorted(rows, key=lambda r: r["n_problems"])
    ns = [r["n_problems"] for r in rows]
    tokens = [r["tokens_per_problem"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    power = fit_power_law(ns, tokens)
    slope = linear_fit(ns, acc)
    return {
        "tokens_power_law": power.to_dict() if power else None,
        "accuracy_linear": slope.to_dict() if slope else None,
        "non_monotonic_n": non_monotonic_points(ns, tokens),
        "clear_rises_n": clear_rises(rows),
    }


def clear_rises(rows: Sequence[Mapping]) -> list:
    """The N at which tokens per problem rises with its whole CI above the previous N's CI
    (rows of one model; rows without CI fields are never flagged)."""
    rows = sorted(rows, key=lambda r: r["n_problems"])
    flagged = []
    for prev, cur in itertools.pairwise(rows):
        lo, hi = cur.get("tokens_per_problem_ci_low"), prev.get("tokens_per_problem_ci_high")
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi) and lo > hi:
            flagged.append(cur["n_problems"])
    return flagged


def free_lunch(
    model_records: Sequence[Mapping],
    base_records: Sequence[Mapping],
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Compare a model with the baseline on the same problems at one N (normally N = 1).

    - ``token_reduction_pct`` = 100 · (1 − tokens_per_problem(model) / tokens_per_problem(base));
      positive means the model is shorter.
    - ``accuracy_diff`` = accuracy(model) − accuracy(base), in [−1, 1].
    Both come with a paired-bootstrap CI over the problems the two runs share.
    """
    m = problem_level(model_records)
    b = problem_level(base_records)
    shared = sorted(set(m) & set(b))
    m_acc = [m[p]["accuracy"] for p in shared]
    b_acc = [b[p]["accuracy"] for p in shared]
    m_tok = [m[p]["tokens"] for p in shared]
    b_tok = [b[p]["tokens"] for p in shared]

    def acc_diff(x, y):
        return x.mean() - y.mean()

    def reduction(x, y):
        base = y.mean()
        return 100.0 * (1.0 - x.mean() / base) if base > 0 else float("nan")

    tok_pair = np.stack([m_tok, b_tok]) if shared else np.zeros((2, 0))
    d, d_lo, d_hi = paired_bootstrap(
        m_acc, b_acc, acc_diff, confidence=confidence, n_bootstrap=n_bootstrap, seed=stable_seed(seed, "acc")
    )
    r, r_lo, r_hi = paired_bootstrap(
        tok_pair[0], tok_pair[1], reduction, confidence=confidence, n_bootstrap=n_bootstrap, seed=stable_seed(seed, "tok")
    )
    return {
        "num_problems": len(shared),
        "tokens_per_problem": float(np.mean(m_tok)) if shared else float("nan"),
        "baseline_tokens_per_problem": float(np.mean(b_tok)) if shared else float("nan"),
        "token_reduction_pct": r,
        "token_reduction_ci_low": r_lo,
        "token_reduction_ci_high": r_hi,
        "accuracy": float(np.mean(m_acc)) if shared else float("nan"),
        "baseline_accuracy": float(np.mean(b_acc)) if shared else float("nan"),
        "accuracy_diff": d,
        "accuracy_diff_ci_low": d_lo,
        "accuracy_diff_ci_high": d_hi,
    }


def summarize_records(
    records: Sequence[Mapping],
    *,
    models: Sequence[str] | None = None,
    baseline: str | None = None,
    free_lunch_n: int = 1,
    ci_method: str = "bootstrap",
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Everything the report shows, from records alone: rows, fits and the free-lunch comparison.

    ``models`` fixes the model order (default: first-seen order); ``baseline`` defaults to the first
    model. The result holds only JSON types; non-deterministic numbers sit under ``"timing"`` keys.
    """
    groups = group_records(records)
    order = list(models) if models is not None else list(dict.fromkeys(m for m, _ in groups))
    rows = []
    for model in order:
        for n in sorted(n for (m, n) in groups if m == model):
            rows.append(
                summarize_group(
                    groups[(model, n)], ci_method=ci_method, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed
                )
            )
    fits = {model: fit_model([r for r in rows if r["model"] == model]) for model in order}

    lunch = None
    if order:
        base = baseline if baseline is not None else order[0]
        if base not in order:
            raise ValueError(f"baseline {base!r} is not one of the evaluated models {order}")
        comparisons = []
        for model in order:
            if model == base or (model, free_lunch_n) not in groups or (base, free_lunch_n) not in groups:
                continue
            comparisons.append(
                {
                    "model": model,
                    **free_lunch(
                        groups[(model, free_lunch_n)],
                        groups[(base, free_lunch_n)],
                        confidence=confidence,
                        n_bootstrap=n_bootstrap,
                        seed=stable_seed(seed, model, base, free_lunch_n),
                    ),
                }
            )
        lunch = {"baseline": base, "n_problems": free_lunch_n, "comparisons": comparisons}

    return {
        "models": order,
        "ci_method": ci_method,
        "confidence": confidence,
        "rows": rows,
        "fits": fits,
        "free_lunch": lunch,
    }


def strip_timing(obj):
    """A copy of ``obj`` (nested dicts/lists) without any ``"timing"`` entry: the deterministic part."""
    if isinstance(obj, Mapping):
        return {k: strip_timing(v) for k, v in obj.items() if k != TIMING_KEY}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj
