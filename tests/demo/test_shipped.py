"""The SFT model shipped with bcr (``bcr/demo/sft_model``): it is stage 1 of the default settings
(settings, file hashes and this code's tokenizer agree with it), it is a trained model, the stage
copies it only at its settings and not with ``train_sft=true``, and a packaged tiny run goes through
the same path (:mod:`bcr.demo.shipped`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bcr.demo.shipped as shipped
from bcr.demo.config import DemoConfig
from bcr.demo.pipeline import run_demo
import bcr.demo.stages as stages
from bcr.demo.stages import run_sft
from bcr.demo.task import build_tokenizer_and_model, make_task, worked_only
from bcr.models.rollout import make_engine
from bcr.runtime.dataclass_cli import load_dataclass
from bcr.task.prompts import render_prompt
from bcr.task.scoring import score_completion
from bcr.task.parsing import parse_completion

TINY = ["task.num_train_problems=96", "task.num_eval_problems=8", "model.vocab_size=400", "model.hidden_size=32",
        "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "sft.steps=4", "sft.style_steps=3",
        "sft.batch_size=8", "progress=false", "stop_after=sft", "threads=1"]


def _tiny(out, *more: str) -> DemoConfig:
    return load_dataclass(DemoConfig, overrides=[*TINY, f"output_dir={out}", *more])


# ----------------------------------------------------------------------------------------------
# The model bcr ships
# ----------------------------------------------------------------------------------------------
def test_the_shipped_model_is_stage_one_of_the_default_settings():
    """Changing a default that decides the SFT model (task, model, sft, seed) without shipping the
    model it trains fails here, as does a changed or missing file."""
    assert shipped.why_not_shipped(DemoConfig()) is None
    record = shipped.provenance()
    assert record["settings"] == shipped.sft_settings(DemoConfig())
    assert set(record["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json", shipped.LOG}


@pytest.fixture(scope="module")
def built():
    """The tokenizer and the untrained model this code builds for the default settings."""
    cfg = DemoConfig()
    train, _ = make_task(worked_only(cfg))
    return build_tokenizer_and_model(cfg, train)


def test_the_tokenizer_this_code_builds_is_the_shipped_one(built):
    tokenizer, _ = built
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(shipped.SHIPPED_DIR).get_vocab()


def test_the_shipped_model_is_trained(built):
    """Greedy answers to 24 held-out problems, one per prompt: a trained model gets most right (the
    README: 97 % of its worked solutions are right at N = 1); the random init of the same shape
    gets none (checked below, so the bar can fail)."""
    cfg = DemoConfig()
    _, evals = make_task(cfg)
    problems = evals[:24]
    tokenizer = AutoTokenizer.from_pretrained(shipped.SHIPPED_DIR)
    prompts = [render_prompt([p], tokenizer, cfg.template) for p in problems]

    def correct(model) -> int:
        engine = make_engine("hf", model, tokenizer)
        out = engine.generate(prompts, num_generations=1, max_new_tokens=100, temperature=1e-4, seed=0)
        parsed = [parse_completion(g[0].text, 1) for g in out]
        return sum(score_completion(p, [prob.answer]).correct[0] for p, prob in zip(parsed, problems))

    model = AutoModelForCausalLM.from_pretrained(shipped.SHIPPED_DIR)
    assert sum(p.numel() for p in model.parameters()) == shipped.provenance()["parameters"]
    assert correct(model) >= 18
    assert correct(built[1]) <= 2


def _no_training(*args, **kwargs):
    raise AssertionError("stage sft trained instead of copying the shipped model")


def test_the_default_sft_stage_copies_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "train_sft", _no_training)  # fail at once, not after 12 minutes of training
    record = run_sft(DemoConfig(output_dir=str(tmp_path), progress=False))
    model = tmp_path / "sft" / "model"
    assert record["shipped"]["seconds"] == shipped.provenance()["seconds"]
    assert shipped.sha256(model / "model.safetensors") == shipped.provenance()["sha256"]["model.safetensors"]
    log = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == DemoConfig().sft.steps + DemoConfig().sft.style_steps
    assert json.loads((tmp_path / "sft" / "stage.json").read_text())["shipped"]["note"]


def test_other_settings_name_what_differs():
    reason = shipped.why_not_shipped(load_dataclass(DemoConfig, overrides=["sft.steps=10", "seed=3"]))
    assert "seed" in reason and "sft.steps" in reason
    assert shipped.why_not_shipped(load_dataclass(DemoConfig, overrides=["sft.checkpoint_every=100"])) is None


# ----------------------------------------------------------------------------------------------
# The same path on a packaged tiny run
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A tiny run that trained stage sft, packaged as a shipped model in its own folder."""
    run = tmp_path_factory.mktemp("trained")
    run_demo(_tiny(run))
    folder = tmp_path_factory.mktemp("ship") / "sft_model"
    record = shipped.package(run, "a tiny test run", folder)
    return run, folder, record


def test_package_records_the_run(packaged):
    run, folder, record = packaged
    assert record["settings"] == shipped.sft_settings(_tiny(run))
    assert record["note"] == "a tiny test run"
    assert record["seconds"] == json.loads((run / "sft" / "stage.json").read_text())["seconds"]
    assert record["sha256"]["model.safetensors"] == shipped.sha256(run / "sft" / "model" / "model.safetensors")
    assert shipped.provenance(folder) == record


def test_the_stage_copies_a_shipped_model_only_at_its_settings(packaged, tmp_path, monkeypatch):
    run, folder, _ = packaged
    monkeypatch.setattr(shipped, "SHIPPED_DIR", folder)
    record = run_sft(_tiny(tmp_path / "copy"))
    assert record["shipped"]["note"] == "a tiny test run"
    assert shipped.sha256(tmp_path / "copy" / "sft" / "model" / "model.safetensors") == \
        shipped.sha256(run / "sft" / "model" / "model.safetensors")
    assert (tmp_path / "copy" / "sft" / "metrics.jsonl").read_text() == (run / "sft" / "metrics.jsonl").read_text()
    trained = run_sft(_tiny(tmp_path / "trained", "train_sft=true"))
    assert "shipped" not in trained
    other = run_sft(_tiny(tmp_path / "other", "sft.steps=3"))
    assert "shipped" not in other
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "trained" / "sft" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run / "sft" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # training again gives the packaged model, bit for bit


def test_a_changed_file_or_another_tokenizer_is_not_used(packaged, tmp_path):
    run, folder, _ = packaged
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in folder.iterdir():
        changed.joinpath(path.name).write_bytes(path.read_bytes())
    weights = changed / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert "sha256" in shipped.why_not_shipped(_tiny(run), changed)
    other = AutoTokenizer.from_pretrained(shipped.SHIPPED_DIR)  # the default task's vocabulary, not the tiny one's
    assert shipped.install(tmp_path / "out", other, folder) is None
    assert not (tmp_path / "out").exists()


def test_packaging_a_copied_stage_is_refused(packaged, tmp_path, monkeypatch):
    _, folder, _ = packaged
    monkeypatch.setattr(shipped, "SHIPPED_DIR", folder)
    run_demo(_tiny(tmp_path / "copy"))
    with pytest.raises(ValueError, match="shipped copy"):
        shipped.package(tmp_path / "copy", "again", tmp_path / "again")
