"""BCRTrainer with ``rollout_engine=vllm`` against a real vLLM: on policy after every sync, and a run
killed with SIGKILL and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bcr.models.tiny import tiny_model
from bcr.rl.config import BCRConfig
from bcr.rl.trainer import BCRTrainer
from bcr.task.synthetic import make_arithmetic_problems

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def reward(completion_ids, n_problems, **kw):
    """A reward with spread inside every group (so every step updates the weights)."""
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


SETTINGS = {"n_problems": {1: 1, 2: 1}, "num_generations": 2, "bundles_per_step": 2, "max_completion_length": 24,
            "temperature": 0.7, "learning_rate": 1e-3, "rollout_engine": "vllm", "vllm_max_model_length": 512,
            "vllm_kv_cache_gb": 0.5, "disable_progress_bar": True, "save_total_limit": None, "seed": 5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("model")
    model = tiny_model(tiny_tokenizer, arch="llama", hidden_size=128, num_heads=4, num_kv_heads=2, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[tiny_tokenizer.eos_token_id] *= 6.0  # completions of varied lengths
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _train(model_dir, out, **kw) -> BCRTrainer:
    cfg = BCRConfig(output_dir=str(out), max_steps=STEPS, **{**SETTINGS, **kw})
    trainer = BCRTrainer(str(model_dir), make_arithmetic_problems(16, seed=3), cfg, reward_fn=reward)
    try:
        trainer.train()
    finally:
        trainer.engine.close()
    return trainer


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_vllm_sampling_logprobs_equal_the_trainers_after_every_sync(tmp_path, model_dir):
    trainer = _train(model_dir, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # the rollout correction's ratio is 1 on policy: vLLM's sampling log-probs are the old log-probs
        assert r["sampling/sampling_logp_difference/max"] <= 1e-5, r
    # the engine started from the initial weights and got the weights of every update before it sampled
    assert trainer.engine.syncs == STEPS - 1 and trainer.weights_version == STEPS
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(start.parameters(), trainer.model.parameters()))
    assert moved > 1e-4  # the weights changed, so a stale engine would have shown in the difference


_KILLED_AFTER_SECOND_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from test_vllm_trainer import SETTINGS, STEPS, reward
from bcr.rl.config import BCRConfig
from bcr.rl.trainer import BCRTrainer
from bcr.task.synthetic import make_arithmetic_problems

cfg = BCRConfig(output_dir=sys.argv[2], max_steps=STEPS, save_steps=1, **SETTINGS)
trainer = BCRTrainer(sys.argv[1], make_arithmetic_problems(16, seed=3), cfg, reward_fn=reward)
save = trainer.save_checkpoint

def save_then_die():
    path = save()
    if trainer.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

trainer.save_checkpoint = save_then_die
trainer.train()
"""


def test_a_run_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path, model_dir):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_SECOND_CHECKPOINT, str(model_dir), str(killed),
                           str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(killed)] == [1, 2]
    resumed = _train(model_dir, killed, save_steps=1, resume_from="latest")
    whole = _train(model_dir, tmp_path / "whole", save_steps=1)
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3]
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert _metrics(killed)[-1]["reward"] == _metrics(tmp_path / "whole")[-1]["reward"]
