"""Smoke test of ``benchmarks.bench_solve``: its smallest configuration runs end to end on a tiny random
model (numbers are not checked: this is not a timed test) and writes a report whose rows agree with the
answers files ``bcr solve`` wrote."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_solve

pytestmark = pytest.mark.slow  # a whole pipeline: problems, model, four solve runs


def test_bench_solve_runs_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU user's path, not the interpreter
    prefix = tmp_path / "bench"
    assert bench_solve.main(["model=tiny-random", "num_problems=7", "n_values=[1,2,4,6]", "per_problem_budget=6",
                             "batch_size=4", "threads=1", f"out={prefix}"]) == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert [r["n"] for r in report["rows"]] == [1, 2, 4, 6]
    for row in report["rows"]:
        assert row["problems"] == 7 and row["problems_per_s"] > 0
        assert 0 < row["bundle_tokens_per_problem"] <= row["tokens_per_problem"] <= 6 * (1 + (row["n"] > 1))
        assert row["accuracy"] is not None and row["strict"] + row["flexible"] + row["unanswered"] == 7
        assert row["retried"] == 0 if row["n"] == 1 else row["retried"] >= row["answered_by_retry"]
    assert report["problems"].startswith("7 held-out problems of the demo's task")
    table = prefix.with_suffix(".md").read_text()
    assert "| 6 |" in table and "tokens/problem" in table and "| 6 |" in capsys.readouterr().out
