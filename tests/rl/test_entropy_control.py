"""The entropy bonus in the trainer: the coefficient over updates (``bcr.rl.entropy_control``), each row's
share of the bonus (the batch's bonus is its mean entropy, however it is split into rows), its
gradient on both loss paths, ``entropy_coef`` logged under TRL's name, and the controller's state in
checkpoints. (Parity of the semantics with TRL: ``test_trl_parity_entropy.py``.)"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bcr.rl.config import BCRConfig
from bcr.rl.checkpoint import find_checkpoint
from bcr.rl.entropy_control import EntropyControl
from bcr.rl.packing import Sample
from bcr.rl.trainer import BCRTrainer
from bcr.runtime.metrics import StepStats
from bcr.task.synthetic import make_arithmetic_problems


def test_control_by_hand():
    constant = EntropyControl(0.1)
    constant.update(5.0, 1.0)
    assert constant.applied() == 0.1 and constant.coef == 0.1  # constant: never moves, always applies
    c = EntropyControl(0.1, adaptive=True, coef_min=0.05, coef_max=0.2, delta=0.1, target=1.0)
    assert c.applied() == 0.0  # nothing measured yet: no bonus
    c.update(3.0, 2.0)  # 1.5 nats > target: down, to the floor
    assert (c.coef, c.last_entropy, c.applied()) == (0.05, 1.5, 0.0)
    c.update(1.0, 1.0)  # at the target: up, and the bonus applies
    assert c.coef == pytest.approx(0.15) and c.applied() == pytest.approx(0.15)
    c.update(0.0, 0.0)  # no token: entropy 0 (the count is clamped to 1), up to the cap
    assert c.coef == 0.2
    fresh = EntropyControl(0.1, adaptive=True)
    assert fresh.state() == {"entropy_coef": 0.1, "last_entropy": None}  # JSON has no inf
    fresh.load(c.state())
    assert (fresh.coef, fresh.last_entropy) == (0.2, 0.0)
    fresh.load({"entropy_coef": 0.3, "last_entropy": None})
    assert math.isinf(fresh.last_entropy)
    assert EntropyControl.from_config(BCRConfig()) is None  # no bonus: no control
    assert EntropyControl.from_config(BCRConfig(use_adaptive_entropy=True)).adaptive


def _cfg(tmp_path, **kw) -> BCRConfig:
    base = {"output_dir": str(tmp_path / "run"), "n_problems": 1, "num_generations": 2, "max_completion_length": 16,
            "bundles_per_step": 2, "max_steps": 2, "learning_rate": 1e-3, "disable_progress_bar": True,
            "save_total_limit": 1, "seed": 0}
    return BCRConfig(**{**base, **kw})


def _samples(tokenizer):
    """Six completions of different lengths, every advantage 0: the policy loss is 0, the bonus is all."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    draw = (lambda n: torch.randint(3, vocab, (n,), generator=g).tolist())  # noqa: E731
    return [Sample(draw(4), draw(n), [0.0]) for n in (3, 9, 5, 12, 1, 7)]


@pytest.mark.parametrize("num_iterations", [1, 2])  # the fused loss, and the two-pass path with old log-probs
def test_the_batch_bonus_is_its_mean_entropy_whatever_the_rows(tmp_path, tiny_tokenizer, tiny_qwen2,
                                                                  num_iterations):
    """Split into rows of at most 24 tokens and 2 accumulation groups, the summed loss of the rows is
    -coef x (the batch's summed entropy / its loss tokens); with the bonus at 0 there is no gradient, and
    the trainer's own update (which applies the configured coefficient) moves the weights."""
    cfg = _cfg(tmp_path, entropy_coef=0.3, num_iterations=num_iterations, max_tokens_per_microbatch=24,
               gradient_accumulation_steps=2)
    trainer = BCRTrainer(tiny_qwen2, make_arithmetic_problems(4, seed=0), cfg, tokenizer=tiny_tokenizer)
    batch = trainer.microbatches(_samples(tiny_tokenizer))
    assert batch.real >= 3 and batch.loss_tokens == 3 + 9 + 5 + 12 + 1 + 7
    old, ref = trainer.old_logprobs(batch), trainer.ref_logprobs(batch)
    norms = {}
    for coef in (0.3, 0.0):
        trainer.optimizer.zero_grad(set_to_none=True)
        window = [0.0, 0.0]
        objective = dataclasses.replace(trainer.objective, entropy_coef=coef)
        _, total = trainer._backward(batch, old, ref, StepStats(), objective, window)
        if coef:
            assert window[1] == batch.loss_tokens
            assert total == pytest.approx(-coef * window[0] / window[1], rel=1e-5)
        norms[coef] = sum(float(p.grad.norm()) for p in trainer.params if p.grad is not None)
    assert norms[0.0] == 0.0 and norms[0.3] > 0.0
    before = [p.detach().clone() for p in trainer.params]
    trainer.update(_samples(tiny_tokenizer))  # the update itself applies the bonus: the weights move
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))


def test_adaptive_control_in_training_and_checkpoints(tmp_path, tiny_tokenizer, tiny_qwen2):
    """Two steps of two updates (the two-pass path) with a target above any entropy of the tiny model:
    the coefficient rises by delta per update, entropy_coef is logged each step (the mean over its
    updates), and a resumed trainer continues from the saved coefficient and entropy."""
    cfg = _cfg(tmp_path, num_iterations=2, use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.01,
               entropy_target=50.0, save_steps=1)
    problems = make_arithmetic_problems(4, seed=0)
    trainer = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer)
    trainer.train()
    with open(f"{cfg.output_dir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["entropy_coef"] for r in rows] == pytest.approx([0.025, 0.045])  # (0.02 + 0.03) / 2, (0.04 + 0.05) / 2
    control = trainer.entropy_control
    assert control.coef == pytest.approx(0.05) and 0.0 < control.last_entropy <= 50.0
    again = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer)
    assert again.entropy_control.coef == 0.01 and math.isinf(again.entropy_control.last_entropy)
    again._resume(find_checkpoint(cfg.output_dir, "latest"))
    assert again.entropy_control.state() == control.state()
