"""Smoke tests of the profiling scripts: their smallest configurations really run, end to end.

They keep ``benchmarks/profile_step.py`` and ``benchmarks/profile_rollout.py`` from rotting when the
library changes under them. Numbers are not checked (these are not timed tests); what is checked is
that every variant runs, that the variants optimise the same objective on the same tokens, that the
reports are written and parse, and that the rollout speed-up modes produce the engine's tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def no_interpreter(monkeypatch):
    # the scripts measure the CPU user's path (PyTorch), not the Triton interpreter the suite may enable
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_batch_spec_is_seeded_and_shaped():
    ps = _load("profile_step")
    kw = {
        "num_completions": 8,
        "budget": 64,
        "min_completion": 8,
        "prompt_len": (4, 9),
        "truncated_frac": 0.25,
        "length_dist": "uniform",
        "n_problems": 3,
        "vocab_size": 100,
        "seed": 1,
    }
    a, b = ps.make_batch_spec(**kw), ps.make_batch_spec(**kw)
    assert a == b
    assert sorted(a["completion_lengths"]).count(64) >= 2  # a quarter at the budget
    assert all(8 <= c <= 64 for c in a["completion_lengths"])
    assert all(4 <= p <= 9 for p in a["prompt_lengths"])
    for s in a["samples"]:
        assert len(s["segment_ids"]) == len(s["completion_ids"])
        assert set(s["segment_ids"]) <= {-1, 0, 1, 2} and len(s["advantages"]) == 3
    assert ps.make_batch_spec(**{**kw, "seed": 2}) != a
    st = ps.batch_stats(a)
    assert st["real_tokens"] == sum(a["completion_lengths"]) + sum(a["prompt_lengths"])
    assert 0 <= st["padding_fraction"] < 1


def test_profile_step_tiny_in_process(tmp_path, no_interpreter):
    ps = _load("profile_step")
    out = tmp_path / "step"
    rc = ps.main(
        [
            "--preset",
            "tiny",
            "--variants",
            "packed,packed-fused-loss,padded-eager,packed-liger,trl,trl-selective",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--in-process",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    ran = {r["variant"]: r for r in report["results"] if "runs" in r}
    assert {"packed", "packed-fused-loss", "padded-eager"} <= set(ran)
    assert ran["packed"]["attn_implementation"] == "bcr_varlen"
    for r in report["results"]:
        assert "error" not in r, r
        assert "runs" in r or r["skipped"]  # optional variants say why they did not run
    # every variant optimises the same objective on the same tokens: at ratio 1 (pi_old = pi) the
    # clipped token-mean loss is -mean(per-token advantage), so the losses must agree exactly
    losses = {v: r["runs"][0]["loss"] for v, r in ran.items()}
    for loss in losses.values():
        assert math.isclose(loss, losses["padded-eager"], rel_tol=1e-4, abs_tol=1e-5), losses
    for r in ran.values():
        run = r["runs"][0]
        assert run["time_s"] > 0 and run["peak_bytes"] > 0
        assert set(run["phases_s"]) >= {"forward", "backward", "optimizer"}
    summ = report["summary"]["packed"]
    assert summ["tokens_per_s_ratio"]["median"] > 0
    # In-process a step may grow the RSS by 0 bytes (it reuses pages that earlier tests or variants freed
    # but the allocator kept; the baseline too, and then there is no memory ratio): only the script's
    # fresh-process runs carry memory claims. Here the numbers must merely exist and be sane.
    assert summ["step_mem_bytes"]["median"] >= 0 and summ["peak_bytes"]["median"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| packed | bcr_varlen |" in md and "tokens/s vs padded-eager" in md
    assert out.with_suffix(".png").stat().st_size > 0


def test_profile_step_subprocess_child(no_interpreter):
    """The default path: each variant in a fresh process, JSON back through a file."""
    ps = _load("profile_step")
    batch = {
        "num_completions": 2,
        "budget": 12,
        "min_completion": 4,
        "prompt_len": (3, 5),
        "truncated_frac": 0.5,
        "length_dist": "uniform",
        "n_problems": 2,
        "vocab_size": 4096,
        "seed": 0,
    }
    spec = {
        "variant": "packed",
        "preset": "tiny",
        "device": "cpu",
        "dtype": "float32",
        "batch": batch,
        "seed": 0,
        "repeats": 1,
        "warmup": 0,
        "threads": 1,
        "chunk_tokens": None,
        "max_tokens_per_row": None,
    }
    r = ps.run_child(spec, timeout=120)
    assert "error" not in r, r.get("error")
    assert r["runs"][0]["growth_bytes"] >= 0 and r["memory_method"]
    assert math.isfinite(r["runs"][0]["loss"])
    bad = ps.run_child({**spec, "variant": "no-such-variant"}, timeout=120)
    assert "error" in bad


def test_profile_rollout_quick(tmp_path):
    pr = _load("profile_rollout")
    out = tmp_path / "rollout"
    rc = pr.main(["--quick", "--modes", "hf,loop", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert {(r["mode"], r["n"]) for r in rows} == {(m, n) for m in ("hf", "loop") for n in (1, 2)}
    for r in rows:
        assert r["problems_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["rows"] == (4 // r["n"]) * report["num_generations"]
        assert 0 < r["tokens_per_problem"] <= report["per_problem_budget"]
    # the custom decode loop must sample exactly the engine's tokens (same sampler, same seeds)
    assert all(r["same_as_hf"] == 1.0 for r in rows if r["mode"] == "loop")
    assert "| loop | 2 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_profile_rollout_rejects_uneven_bundles(tmp_path):
    pr = _load("profile_rollout")
    with pytest.raises(SystemExit):
        pr.main(["--num-problems", "6", "--n-values", "1", "4", "--out", str(tmp_path / "x")])
