"""bcr.eval.scaling: the power-law fit, monotonicity flags, intervals and per-(model, N) statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bcr.eval.scaling import (
    fit_power_law,
    power_law_label,
    free_lunch,
    linear_fit,
    mean_ci,
    non_monotonic_points,
    paired_bootstrap,
    strip_timing,
    summarize_group,
    summarize_records,
)


@pytest.mark.parametrize("a,b", [(800.0, 0.45), (120.0, 0.1), (50.0, 1.2)])
def test_power_law_recovers_a_and_b_from_noisy_points(a, b):
    rng = np.random.default_rng(0)
    ns = np.array([1, 2, 3, 4, 5, 8, 16])
    y = a * ns ** -b * np.exp(rng.normal(0, 0.02, size=ns.size))  # 2 % multiplicative noise
    fit = fit_power_law(ns, y)
    assert fit.a == pytest.approx(a, rel=0.05)
    assert fit.b == pytest.approx(b, abs=0.03)
    assert 0.95 < fit.r2 <= 1.0
    assert fit.num_points == ns.size
    assert fit.predict(4) == pytest.approx(fit.a * 4 ** -fit.b)


def test_power_law_label_writes_the_exponent_sign_once():
    assert power_law_label({"a": 38.2, "b": 0.5}) == "38·N^-0.50"
    assert power_law_label({"a": 38.2, "b": -0.03}) == "38·N^+0.03"  # rising tokens: not "N^--0.03"
    assert power_law_label({"a": 38.24, "b": 0.1234}, a_digits=1, b_digits=3) == "38.2·N^-0.123"


def test_power_law_exact_and_degenerate_inputs():
    fit = fit_power_law([1, 2, 4], [100.0, 50.0, 25.0])
    assert fit.a == pytest.approx(100.0) and fit.b == pytest.approx(1.0) and fit.r2 == pytest.approx(1.0)
    assert fit_power_law([2], [10.0]) is None  # one N cannot fix a slope
    assert fit_power_law([1, 1], [3.0, 4.0]) is None
    # non-positive values cannot be logged: left out, the rest still fits
    fit = fit_power_law([1, 2, 3, 4], [0.0, 50.0, 100 / 3, 25.0])
    assert fit.num_points == 3 and fit.b == pytest.approx(1.0)
    # a bad fit has a low R^2
    noisy = fit_power_law([1, 2, 3, 4, 5], [10.0, 100.0, 5.0, 80.0, 7.0])
    assert noisy.r2 < 0.5


def test_linear_fit_slope():
    fit = linear_fit([1, 2, 3, 4], [0.8, 0.7, 0.6, 0.5])
    assert fit.slope == pytest.approx(-0.1) and fit.intercept == pytest.approx(0.9) and fit.r2 == pytest.approx(1.0)
    assert linear_fit([3], [0.5]) is None


def test_non_monotonic_points_are_flagged():
    assert non_monotonic_points([1, 2, 3, 4], [100, 80, 70, 60]) == []
    assert non_monotonic_points([1, 2, 3, 4, 8], [100, 80, 85, 60, 61]) == [3, 8]
    # order of the input does not matter: points are sorted by N first
    assert non_monotonic_points([4, 1, 3, 2], [60, 100, 85, 80]) == [3]
    # a tolerance ignores small rises
    assert non_monotonic_points([1, 2, 8], [100, 80, 81], rtol=0.05) == []


def test_mean_ci_bootstrap_and_normal():
    rng = np.random.default_rng(1)
    x = rng.binomial(1, 0.6, size=400).astype(float)
    m, lo, hi = mean_ci(x, method="bootstrap", seed=3)
    mn, lon, hin = mean_ci(x, method="normal")
    assert m == mn == pytest.approx(x.mean())
    assert lo < m < hi and lon < mn < hin
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert (hin - lon) / 2 == pytest.approx(half, rel=1e-3)
    assert (hi - lo) == pytest.approx(hin - lon, rel=0.2)  # both approximate the same interval
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)  # seeded: reproducible
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="bootstrap"):
        mean_ci(x, method="magic")


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, size=200)
    better = base + 0.1 + rng.normal(0, 0.01, size=200)  # shifted by 0.1, strongly paired
    d, lo, hi = paired_bootstrap(better, base, lambda x, y: x.mean() - y.mean(), seed=0)
    assert d == pytest.approx(0.1, abs=0.01)
    assert 0.09 < lo < d < hi < 0.11  # pairing keeps the interval tight
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0], [1.0, 2.0], lambda x, y: 0.0)


def _rec(model, n, bundle, sample, ids, correct, tokens, truncated=False, answered=None, seconds=1.0, batch=0):
    return {
        "model": model,
        "n_problems": n,
        "bundle_index": bundle,
        "sample_index": sample,
        "n_actual": len(ids),
        "problem_ids": ids,
        "completion_tokens": tokens,
        "truncated": truncated,
        "answered": answered if answered is not None else [True] * len(ids),
        "correct": correct,
        "timing": {"batch_index": batch, "generate_s": seconds},
    }


def test_summarize_group_statistics_by_hand():
    # N=2 over 3 problems (bundles [a, b], [c]), k = 2 samples.
    recs = [
        _rec("m", 2, 0, 0, ["a", "b"], [True, False], 40, answered=[True, False], batch=0, seconds=2.0),
        _rec("m", 2, 0, 1, ["a", "b"], [True, True], 60, truncated=True, batch=0, seconds=2.0),
        _rec("m", 2, 1, 0, ["c"], [False], 10, batch=1, seconds=1.0),
        _rec("m", 2, 1, 1, ["c"], [True], 30, batch=1, seconds=1.0),
    ]
    row = summarize_group(recs, ci_method="normal")
    # problem-level means: a = 1, b = 0.5, c = 0.5 -> accuracy 2/3
    assert row["accuracy"] == pytest.approx(2 / 3)
    assert row["num_problems"] == 3 and row["num_bundles"] == 2 and row["num_completions"] == 4
    # tokens per problem: (40 + 60 + 10 + 30) / (2 + 2 + 1 + 1)
    assert row["tokens_per_problem"] == pytest.approx(140 / 6)
    assert row["completion_tokens_mean"] == pytest.approx(35)
    assert row["answered_rate"] == pytest.approx(5 / 6)
    assert row["truncation_rate"] == pytest.approx(1 / 4)
    # position 0: a, a, c, c -> 3/4; position 1: b, b -> 1/2
    assert row["accuracy_by_position"] == pytest.approx([0.75, 0.5])
    # timing: each batch counted once -> 3 s for 6 problem instances and 140 tokens
    assert row["timing"]["generation_s"] == pytest.approx(3.0)
    assert row["timing"]["problems_per_s"] == pytest.approx(2.0)
    assert row["timing"]["tokens_per_s"] == pytest.approx(140 / 3)


def test_flexible_accuracy_beside_strict():
    recs = [
        _rec("m", 2, 0, 0, ["a", "b"], [True, False], 40, answered=[True, False]),
        _rec("m", 2, 1, 0, ["c", "d"], [False, False], 40, answered=[False, False]),
    ]
    recs[0].update(flexible_answers=["1", "2"], flexible_correct=[True, True])
    recs[1].update(flexible_answers=["3", None], flexible_correct=[False, False])
    row = summarize_group(recs, ci_method="normal")
    assert row["accuracy"] == pytest.approx(1 / 4)  # strict: unchanged
    assert row["flexible_accuracy"] == pytest.approx(2 / 4)
    assert row["flexible_accuracy_ci_low"] <= 0.5 <= row["flexible_accuracy_ci_high"]
    assert row["answered_rate"] == pytest.approx(1 / 4) and row["flexible_answered_rate"] == pytest.approx(3 / 4)
    # records from a sweep that did not record flexible answers: the fields exist, as None
    del recs[1]["flexible_correct"]
    row = summarize_group(recs, ci_method="normal")
    assert row["accuracy"] == pytest.approx(1 / 4)
    assert row["flexible_accuracy"] is None and row["flexible_answered_rate"] is None


def test_free_lunch_token_reduction_and_accuracy_difference():
    ids = [f"p{i}" for i in range(30)]
    base = [_rec("base", 1, i, 0, [pid], [i % 2 == 0], 100) for i, pid in enumerate(ids)]
    bcr = [_rec("bcr", 1, i, 0, [pid], [i % 3 != 0], 60) for i, pid in enumerate(ids)]
    out = free_lunch(bcr, base, seed=0)
    assert out["num_problems"] == 30
    assert out["token_reduction_pct"] == pytest.approx(40.0)
    assert out["baseline_accuracy"] == pytest.approx(0.5) and out["accuracy"] == pytest.approx(20 / 30)
    assert out["accuracy_diff"] == pytest.approx(20 / 30 - 0.5)
    assert out["accuracy_diff_ci_low"] < out["accuracy_diff"] < out["accuracy_diff_ci_high"]
    # constant token counts: the reduction interval collapses onto the point
    assert out["token_reduction_ci_low"] == pytest.approx(40.0) and out["token_reduction_ci_high"] == pytest.approx(40.0)


def test_summarize_records_rows_fits_and_free_lunch():
    ids = [f"p{i}" for i in range(12)]
    records = []
    for model, a in (("base", 200.0), ("bcr", 120.0)):
        for n in (1, 2, 3, 4):
            tokens_per_problem = a * n ** -0.5 if n != 3 else a  # N=3 rises: must be flagged
            for b in range(0, 12, n):
                chunk = ids[b : b + n]
                records.append(_rec(model, n, b // n, 0, chunk, [True] * len(chunk), round(tokens_per_problem * len(chunk))))
    summary = summarize_records(records, baseline="base")
    assert summary["models"] == ["base", "bcr"]
    assert [(r["model"], r["n_problems"]) for r in summary["rows"]] == [(m, n) for m in ("base", "bcr") for n in (1, 2, 3, 4)]
    for model in ("base", "bcr"):
        fit = summary["fits"][model]
        assert fit["non_monotonic_n"] == [3]
        assert fit["tokens_power_law"]["b"] > 0
        assert fit["accuracy_linear"]["slope"] == pytest.approx(0.0)
    lunch = summary["free_lunch"]
    assert lunch["baseline"] == "base" and [c["model"] for c in lunch["comparisons"]] == ["bcr"]
    assert lunch["comparisons"][0]["token_reduction_pct"] == pytest.approx(40.0)
    # the deterministic part is reproducible; timing is the only thing strip_timing removes
    again = summarize_records(records, baseline="base")
    assert strip_timing(again) == strip_timing(summary)
    assert "timing" in summary["rows"][0] and "timing" not in strip_timing(summary)["rows"][0]
    with pytest.raises(ValueError, match="baseline"):
        summarize_records(records, baseline="nope")


def test_ratio_ci_brackets_the_ratio_and_narrows_with_more_units():
    from bcr.eval.scaling import ratio_ci

    rng = np.random.default_rng(0)
    den = rng.integers(1, 6, size=400).astype(float)
    num = den * 30 + rng.normal(0, 8, size=400)
    for method in ("bootstrap", "normal"):
        r, lo, hi = ratio_ci(num, den, method=method, seed=1)
        assert r == pytest.approx(num.sum() / den.sum())
        assert lo < r < hi and hi - lo < 2.0
        _, lo40, hi40 = ratio_ci(num[:40], den[:40], method=method, seed=1)
        assert hi40 - lo40 > hi - lo
    assert ratio_ci([5.0], [2.0]) == (2.5, 2.5, 2.5)
    assert all(math.isnan(v) for v in ratio_ci([], []))
    with pytest.raises(ValueError):
        ratio_ci([1.0], [1.0, 2.0])


def test_clear_rises_need_non_overlapping_intervals():
    from bcr.eval.scaling import clear_rises

    def row(n, lo, hi):
        return {"n_problems": n, "tokens_per_problem": (lo + hi) / 2, "tokens_per_problem_ci_low": lo,
                "tokens_per_problem_ci_high": hi}

    rows = [row(3, 30, 34), row(1, 30, 32), row(2, 31, 33), row(4, 35, 36), row(5, 20, 22)]
    assert clear_rises(rows) == [4]  # 2 rises within noise, 3 overlaps 2, 4 lies above 3, 5 falls
    assert clear_rises([{"n_problems": 1, "tokens_per_problem": 1.0}, {"n_problems": 2, "tokens_per_problem": 9.0}]) == []
