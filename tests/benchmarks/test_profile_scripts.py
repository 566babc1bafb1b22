"""Smoke tests of the profiling scripts: their smallest configurations really run, end to end.

They keep ``benchmarks.profile_step``, ``benchmarks.profile_rollout``, ``benchmarks.profile_sft`` and
``benchmarks.gpu_check`` from
rotting when the library changes under them (the scripts are modules of the ``benchmarks`` package,
imported from the repository root: ``python -m pytest`` puts it on ``sys.path``). Numbers are not checked (these are not timed tests); what is checked is
that every variant runs, that the variants optimise the same objective on the same tokens, that the
reports are written and parse, and that the rollout speed-up modes produce the engine's tokens.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bcr.models.rollout import HFEngine
from bcr.models.tiny import tiny_model
from benchmarks import gpu_check
from benchmarks import profile_rollout as pr
from benchmarks import profile_sft as psft
from benchmarks import profile_step as ps

pytestmark = pytest.mark.slow  # end to end: a whole pipeline, a process group or a child script


@pytest.fixture
def no_interpreter(monkeypatch):
    # the scripts measure the CPU user's path (PyTorch), not the Triton interpreter the suite may enable
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_batch_spec_is_seeded_and_shaped():
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
    out = tmp_path / "step"
    rc = ps.main(
        [
            "--preset",
            "tiny",
            "--variants",
            ",".join(ps.VARIANTS),
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
    assert {"packed", "packed-two-pass", "padded-eager"} <= set(ran)
    assert ran["packed"]["attn_implementation"] == "bcr_varlen"
    # the packed variant is the trainer's own update, timed by hooks: every phase but "loss" (fused) ran
    assert all(ran["packed"]["runs"][0]["phases_s"][ph] > 0 for ph in ("prepare", "forward", "logprobs", "backward", "optimizer"))
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


def test_profile_step_objective_rows(tmp_path, no_interpreter):
    """``--objectives`` rows run the trainer's step with their options, ratios against packed (dapo)."""
    out = tmp_path / "obj"
    rows = ["packed", "packed-sapo", "packed-instance", "packed-is-instance_mask"]
    assert set(rows[1:]) <= set(ps.OBJECTIVES)
    rc = ps.main(["--preset", "tiny", "--variants", ",".join(rows), "--repeats", "1", "--warmup", "0",
                  "--in-process", "--num-completions", "2", "--budget", "24", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    ran = {r["variant"]: r for r in report["results"] if "runs" in r}
    assert set(ran) == set(rows)
    losses = {v: r["runs"][0]["loss"] for v, r in ran.items()}
    assert losses["packed-sapo"] != losses["packed"]  # another objective: another loss value (2/tau vs 1)
    assert ps.parse_args(["--objectives"]).variant_list == ["packed", *ps.OBJECTIVES]
    assert ps.parse_args(["--objectives"]).baseline == "packed"


def test_profile_step_subprocess_child(no_interpreter):
    """The default path: each variant in a fresh process, JSON back through a file."""
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


def test_harness_child_failure_comes_back_as_an_error():
    """A child that cannot run reports an error (with its output's tail) instead of raising."""
    from benchmarks import harness

    bad = harness.run_child("benchmarks.no_such_module", {"variant": "x"}, timeout=60)
    assert set(bad) == {"error"} and "No module named" in bad["error"]


def test_profile_sft_tiny(tmp_path, no_interpreter):
    """The demo's SFT steps, plain vs packed, interleaved in one process, on a tiny demo config."""
    out = tmp_path / "sft"
    tiny = ["task.num_train_problems=200", "task.num_eval_problems=8", "model.vocab_size=400", "model.hidden_size=32",
            "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "sft.batch_size=3",
            "sft.n_values=[1, 2]"]
    rc = psft.main(["--rounds", "2", "--steps", "2", "--warmup", "1", "--out", str(out), *tiny])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    summ = report["summary"]
    assert set(summ["paths"]) == set(psft.PATHS) and report["batch_size"] == 3
    for name, p in summ["paths"].items():
        assert [len(r) for r in report["times_s"][name]] == [2, 2] and p["median_step_s"] > 0
    plain, packed = summ["paths"]["plain"], summ["paths"]["packed"]
    # the same batches on both paths, and the same model at the first step: the same loss
    assert plain["real_tokens_per_step"] == packed["real_tokens_per_step"]
    assert plain["padded_positions_per_step"] >= plain["real_tokens_per_step"]
    assert summ["first_loss_rel_diff"] < 1e-5
    assert summ["ratio_plain_over_packed"]["median"] > 0 and len(summ["ratio_plain_over_packed"]["rounds"]) == 2
    assert "Step time plain / packed" in out.with_suffix(".md").read_text()


def test_profile_rollout_quick(tmp_path):
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
    with pytest.raises(SystemExit):
        pr.main(["--num-problems", "6", "--n-values", "1", "4", "--out", str(tmp_path / "x")])


def test_profile_step_names_a_renamed_variant(capsys):
    with pytest.raises(SystemExit):
        ps.main(["--preset", "tiny", "--variants", "packed-fused-loss"])
    assert "renamed" in capsys.readouterr().err


def test_static_cache_mode_is_scoped_to_the_model(tiny_tokenizer):
    """hf-static reaches generate through the model's own generation_config, and only while it runs."""
    from transformers import Cache, DynamicCache, StaticCache

    model = tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    other = tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    caches = []
    model.register_forward_pre_hook(  # the cache object generate hands to each forward, whatever its name
        lambda m, args, kwargs: caches.extend(type(v) for v in kwargs.values() if isinstance(v, Cache)),
        with_kwargs=True,
    )
    engine = HFEngine(model, tiny_tokenizer, decode="generate")
    kw = {"num_generations": 1, "max_new_tokens": 2, "seed": 0}
    with pr.mode_settings(model, pr.MODES["hf-static"]):
        assert other.generation_config.cache_implementation is None  # no global change
        static = engine.generate(["1 + 1 ="], **kw)
    assert caches and all(c is StaticCache for c in caches)
    assert model.generation_config.cache_implementation is None  # restored
    caches.clear()
    dynamic = engine.generate(["1 + 1 ="], **kw)
    assert caches and all(c is DynamicCache for c in caches)
    assert static[0][0].completion_ids == dynamic[0][0].completion_ids


def test_compile_mode_restores_the_forward(tiny_tokenizer, monkeypatch):
    model = tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1, seed=0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the wrapping, not the compiler, is under test
    with pr.mode_settings(model, pr.MODES["hf-compile"]):
        assert "forward" in vars(model)
    assert "forward" not in vars(model) and model.generation_config.cache_implementation is None


def test_gpu_check_smoke(tmp_path, no_interpreter):
    """The prepared GPU check at tiny sizes on the CPU: every part runs or says why it was skipped."""
    rc = gpu_check.main([str(tmp_path), "--smoke"])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["parts"]) == set(gpu_check.PARTS) and report["smoke"]
    rows = report["rows"]
    assert not [r for r in rows if r["measure"] == "error"], rows
    assert all(r["met"] is None for r in rows)  # smoke sizes judge no target
    by_part = {name: [r for r in rows if r["part"].startswith(prefix)] for name, prefix in
               (("tests", "tests"), ("logprobs", "token_logprobs"), ("head", "LM head"),
                ("step", "training step"), ("attention", "varlen attention"))}
    assert all(by_part.values()), by_part
    assert by_part["tests"][0]["value"].startswith("skipped: ")
    assert "tests/kernels/test_varlen_attention.py" in gpu_check.gpu_test_files()  # what the GPU run collects
    if not torch.cuda.is_available():
        assert all("needs CUDA" in r["value"] for r in by_part["logprobs"])
        assert {r["measure"] for r in by_part["attention"] if "needs CUDA" in r["value"]} == {"flash_attn", "torch_varlen"}
    data = report["parts"]
    assert data["token_logprobs"]["forward_s"] > 0 and data["token_logprobs"]["bytes_backward"] > 0
    assert data["head"]["fused"]["time_s"] > 0 and "fused_time_ratio" in data["head"]
    assert data["step"]["packed_vs_padded_tokens_per_s"] > 0
    assert data["attention"]["sdpa"]["forward_backward_s"] > 0
    # which attention path ran is said for every row that ran (on the CPU: SDPA everywhere)
    assert data["attention"]["sdpa"]["ran"] == "sdpa" and data["step"]["bcr_varlen_backend"] == "sdpa"
    ran = [r for r in by_part["step"] if ": tokens/s" in r["measure"]]
    assert ran and all("(attention " in r["measure"] for r in ran)
    assert "| part | measurement | value | target | met |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_hbm_peaks_by_device_name():
    assert gpu_check.hbm_peak("NVIDIA H100 80GB HBM3", None)[0] == 3.35
    assert gpu_check.hbm_peak("NVIDIA H100 PCIe", None)[0] == 2.0
    assert gpu_check.hbm_peak("NVIDIA H200", None)[0] == 4.8
    assert gpu_check.hbm_peak("NVIDIA GH200 480GB", None)[0] == 4.0
    assert gpu_check.hbm_peak("NVIDIA A100-SXM4-80GB", None)[0] == 2.039
    assert gpu_check.hbm_peak("Some GPU", None)[0] is None
    assert gpu_check.hbm_peak("Some GPU", 1.5) == (1.5, "--hbm-peak")


def test_gpu_check_shell_script_parses():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
