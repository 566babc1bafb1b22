"""Smoke test of ``benchmarks.solve_memory`` at its smallest: two input sizes, the smaller answered afresh,
the larger filled before its run as a killed run leaves it, each by a real ``bcr solve`` child whose peak
RSS is reported (the numbers themselves are not checked: this is not a timed test)."""

from __future__ import annotations

import json

import pytest

from benchmarks import solve_memory

pytestmark = pytest.mark.slow  # three bcr solve child processes


def test_solve_memory_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prefix = tmp_path / "memory"
    assert solve_memory.main(["sizes=[12,60]", "answered=12", "n=2", "batch_size=2", "per_problem_budget=2",
                              f"out={prefix}"]) == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    small, large = report["rows"]
    assert (small["size"], small["filled"], small["answered"]) == (12, 0, 12)  # a fresh run
    assert (large["size"], large["filled"], large["answered"]) == (60, 48, 12)  # filled: whole batches of 4
    assert all(row["peak_rss_mib"] > 50 and row["code"] == "this tree" for row in report["rows"])
    assert "| this tree | 60 | 12 |" in prefix.with_suffix(".md").read_text()
