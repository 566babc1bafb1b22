"""Smoke test of benchmarks/bench_engines.py (HF vs vLLM rollouts side by side) in its quick mode."""

from __future__ import annotations

import json

from benchmarks import bench_engines


def test_quick_run_writes_a_report_with_both_engines(tmp_path):
    prefix = tmp_path / "engines"
    assert bench_engines.main(["--models", "demo", "--quick", "--out", str(prefix)]) == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    by_engine = {r["engine"]: r for r in report["results"]}
    assert set(by_engine) == {"hf", "vllm"} and all("error" not in r for r in report["results"])
    assert by_engine["vllm"]["probe_logprob_max_diff"] <= 1e-4
    assert by_engine["vllm"]["sampling_logprob_max_diff"] <= 1e-5
    assert all(x["tokens"] > 0 for r in report["results"] for x in r["rollout"])
    assert "| demo | vllm |" in prefix.with_suffix(".md").read_text()
