"""Checkpoints: layout, atomic writes, rotation, NaN refusal, exact resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from bcr.rl.checkpoint import (
    NonFiniteCheckpointError,
    checkpoint_dirs,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model,
    save_trainer_checkpoint,
)
from bcr.rl.config import BCRConfig
from bcr.task.synthetic import make_arithmetic_problems
from bcr.models.tiny import tiny_model
from bcr.rl.trainer import BCRTrainer
from bcr.runtime.interrupts import raise_if_interrupted, remember_interrupts


def reward(completion_ids, n_problems, **kw):
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


def _cfg(out, **kw) -> BCRConfig:
    base = {"output_dir": str(out), "n_problems": 2, "num_generations": 3, "max_completion_length": 16,
            "bundles_per_step": 2, "max_steps": 4, "learning_rate": 3e-3, "lr_scheduler_type": "cosine",
            "warmup_steps": 1, "disable_progress_bar": True, "save_total_limit": None}
    base.update(kw)
    return BCRConfig(**base)


@pytest.fixture(scope="module")
def problems():
    return make_arithmetic_problems(16, seed=1)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_layout_rotation_and_reload(tmp_path, tiny_tokenizer, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    opt = torch.optim.AdamW(tiny_qwen2.parameters(), lr=1e-3)
    tiny_qwen2(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, step, model=tiny_qwen2, optimizer=opt, tokenizer=tiny_tokenizer,
                               state={"epoch": 0.5}, save_total_limit=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt",
                 "rng_state.pt"):
        assert (path / name).is_file(), name
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 3, "epoch": 0.5}
    assert find_checkpoint(tmp_path, "latest") == path
    reopened = AutoModelForCausalLM.from_pretrained(path)
    for k, v in reopened.state_dict().items():
        assert torch.equal(v, tiny_qwen2.state_dict()[k]), k

    other = tiny_model(tiny_tokenizer, seed=5)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_checkpoint(path, model=other, optimizer=opt2)["step"] == 3
    for k, v in other.state_dict().items():
        assert torch.equal(v, tiny_qwen2.state_dict()[k]), k
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_rewriting_a_step_replaces_it(tmp_path, tiny_qwen2):
    save_checkpoint(tmp_path, 1, model=tiny_qwen2, state={"tag": "a"})
    save_checkpoint(tmp_path, 1, model=tiny_qwen2, state={"tag": "b"})
    assert json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["tag"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_never_writes_nan(tmp_path, tiny_qwen2):
    with torch.no_grad():
        next(tiny_qwen2.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match="NaN"):
        save_checkpoint(tmp_path, 1, model=tiny_qwen2)
    assert list(tmp_path.iterdir()) == []


def test_save_model_writes_next_to_what_is_there_and_never_nan(tmp_path, tiny_tokenizer, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_trainer_checkpoint(tmp_path, 1, model=tiny_qwen2, optimizer=None, tokenizer=tiny_tokenizer)
    assert save_model(tmp_path, tiny_qwen2, tiny_tokenizer) == tmp_path
    names = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.jsonl", "checkpoint-1", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    reopened = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, v in reopened.state_dict().items():
        assert torch.equal(v, tiny_qwen2.state_dict()[k]), k
    with torch.no_grad():
        next(tiny_qwen2.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match="NaN"):
        save_model(tmp_path / "final", tiny_qwen2)
    assert not (tmp_path / "final").exists()


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path))


def test_resume_continues_exactly_and_ctrl_c_writes_a_checkpoint(tmp_path, tiny_tokenizer, problems):
    # The uninterrupted run: 4 steps.
    full = tiny_model(tiny_tokenizer, seed=0)
    BCRTrainer(full, problems, _cfg(tmp_path / "full"), tokenizer=tiny_tokenizer, reward_fn=reward).train()

    # The same run, interrupted by Ctrl-C while rolling out step 3 ...
    calls = {"n": 0}

    def interrupting(**kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return reward(**kw)

    part = tiny_model(tiny_tokenizer, seed=0)
    with pytest.raises(KeyboardInterrupt):
        BCRTrainer(part, problems, _cfg(tmp_path / "part"), tokenizer=tiny_tokenizer, reward_fn=interrupting).train()
    assert [p.name for p in checkpoint_dirs(tmp_path / "part")] == ["checkpoint-2"]

    # ... then resumed from the latest checkpoint by a fresh process (a fresh model from the same init).
    resumed = tiny_model(tiny_tokenizer, seed=0)
    trainer = BCRTrainer(resumed, problems, _cfg(tmp_path / "part", resume_from="latest"), tokenizer=tiny_tokenizer,
                         reward_fn=reward)
    trainer.train()
    assert trainer.step == 4

    a, b = _params(full), _params(resumed)
    assert any(not torch.equal(a[k], _params(tiny_model(tiny_tokenizer, seed=0))[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    # the batches after resume are the ones the uninterrupted run drew
    full_rows, part_rows = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert [r["step"] for r in part_rows] == [1, 2, 3, 4]
    for x, y in zip(full_rows, part_rows):
        for key in ("reward", "completions/mean_length", "learning_rate"):
            assert x[key] == pytest.approx(y[key], rel=1e-6), (x["step"], key)
    state = json.loads((tmp_path / "part" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["bundle_position"] == 8 and state["config"]["n_problems"] == 2


def test_a_swallowed_ctrl_c_still_stops_the_run_between_steps(tmp_path, tiny_tokenizer, problems):
    """Under ``bcr``'s command line (:func:`remember_interrupts`), a Ctrl-C whose KeyboardInterrupt a
    reward function swallows (a bare ``except``) stops the run after that step, with a resumable
    checkpoint; it used to train on (tests/cli/test_cli_plumbing.py saw 2,500 more steps)."""
    calls = {"n": 0}

    def swallowing(**kw):
        calls["n"] += 1
        if calls["n"] == 2:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the KeyboardInterrupt lands here ...
            except:  # noqa: E722  # ... and a careless reward function drops it
                pass
        return reward(**kw)

    model = tiny_model(tiny_tokenizer, seed=0)
    before = signal.getsignal(signal.SIGINT)  # (pytest-xdist's workers ignore SIGINT)
    with remember_interrupts(), pytest.raises(KeyboardInterrupt):
        BCRTrainer(model, problems, _cfg(tmp_path), tokenizer=tiny_tokenizer, reward_fn=swallowing).train()
    assert calls["n"] == 2
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back
    raise_if_interrupted()  # and nothing is left pending outside the block


def test_resume_from_an_explicit_path(tmp_path, tiny_tokenizer, problems):
    first = tiny_model(tiny_tokenizer, seed=0)
    BCRTrainer(first, problems, _cfg(tmp_path / "a", max_steps=2, save_steps=1), tokenizer=tiny_tokenizer,
               reward_fn=reward).train()
    model = tiny_model(tiny_tokenizer, seed=0)
    trainer = BCRTrainer(model, problems, _cfg(tmp_path / "b", max_steps=2,
                                               resume_from=str(tmp_path / "a" / "checkpoint-1")),
                         tokenizer=tiny_tokenizer, reward_fn=reward)
    trainer.train()
    for k, v in _params(first).items():
        torch.testing.assert_close(_params(model)[k], v, rtol=1e-5, atol=1e-7)
    assert [r["step"] for r in _rows(tmp_path / "b")] == [2]
