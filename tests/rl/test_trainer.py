"""The trainer end to end on a tiny random Qwen2: steps, learning, accumulation, bad input, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bcr.rl.config import BCRConfig
from bcr.task.synthetic import make_arithmetic_problems
from bcr.rl.trainer import BCRTrainer


def _cfg(tmp_path, **kw) -> BCRConfig:
    base = {"output_dir": str(tmp_path / "run"), "n_problems": 1, "num_generations": 2, "max_completion_length": 16,
            "bundles_per_step": 2, "max_steps": 3, "learning_rate": 1e-3, "disable_progress_bar": True,
            "save_total_limit": 1}
    base.update(kw)
    return BCRConfig(**base)


def _rows(cfg) -> list[dict]:
    with open(f"{cfg.output_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def instance_token_reward(completion_ids, n_problems, **kw):
    """A dense per-instance reward: instance k likes tokens with id % (N + 1) == k."""
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


def even_token_reward(completion_ids, **kw):
    """Trivially learnable: the fraction of completion tokens with an even id (about 0.5 at init)."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


@pytest.fixture(scope="module")
def problems():
    return make_arithmetic_problems(24, seed=0)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("advantage_mode", ["instance", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_three_steps_end_to_end(tmp_path, tiny_tokenizer, tiny_qwen2, problems, n, advantage_mode, beta):
    cfg = _cfg(tmp_path, n_problems=n, advantage_mode=advantage_mode, beta=beta, num_iterations=2 if beta else 1,
               max_completion_length=8 * n)
    before = {k: v.clone() for k, v in tiny_qwen2.state_dict().items()}
    trainer = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer, reward_fn=instance_token_reward)
    assert (trainer.ref_model is not None) == (beta > 0)
    last = trainer.train()
    rows = _rows(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "reward_std", "accuracy", "accuracy/pos_1", f"accuracy/pos_{n}", "answered_rate",
                "completions/mean_length", "completions/truncated_ratio", "tokens_per_problem", "entropy",
                "grad_norm", "learning_rate", "kl", "clip_ratio/region_mean", "time/rollout", "time/update",
                "tokens_per_second", "loss"):
        assert key in last and last[key] is not None and math.isfinite(last[key]), key
    assert last["skipped_updates"] == 0
    assert 0 < last["completions/mean_length"] <= cfg.max_completion_length
    assert last["tokens_per_problem"] == pytest.approx(last["completions/mean_length"] / n)
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert changed
    if beta:  # after the first update the policy has moved away from the reference
        assert rows[-1]["kl"] > 0
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and (tmp_path / "run" / "model.safetensors").is_file()


def test_a_tiny_model_learns_a_trivial_behaviour(tmp_path, tiny_tokenizer, tiny_qwen2, problems):
    cfg = _cfg(tmp_path, num_generations=8, max_completion_length=8, max_steps=12, learning_rate=2e-2)
    BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer, reward_fn=even_token_reward).train()
    rewards = [r["reward"] for r in _rows(cfg)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 0.8 and last > first + 0.2, rewards


def test_numbered_single_reaches_the_rollout_prompts(tmp_path, tiny_tokenizer, tiny_qwen2, problems):
    seen = []

    def record_prompts(prompts, completions, **kw):
        seen.extend(prompts)
        return [0.0] * len(completions)

    for numbered in (False, True):
        seen.clear()
        cfg = _cfg(tmp_path / str(numbered), numbered_single=numbered, max_steps=1)
        BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer, reward_fn=record_prompts).train()
        assert seen and all(("Problem 1:" in p) == numbered for p in seen), seen[0]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batching_does_not_change_the_update(tmp_path, tiny_tokenizer, problems, loss_type):
    """Accumulation, the per-row token cap and gradient checkpointing change memory, never the update.

    adam_epsilon=1 with lr=1 makes the first AdamW update -g / (|g| + 1), i.e. smooth in the gradient
    (with a small epsilon it would be sign(g), which amplifies rounding noise of near-zero gradients).
    """
    from bcr.models.tiny import tiny_model

    deltas = []
    for accum, cap, ckpt in [(1, None, False), (2, None, False), (1, 40, False), (1, None, True)]:
        model = tiny_model(tiny_tokenizer, seed=0)
        before = _params(model)
        cfg = _cfg(tmp_path / f"{accum}-{cap}-{ckpt}", n_problems=2, max_steps=1, num_generations=3,
                   loss_type=loss_type, gradient_accumulation_steps=accum, max_tokens_per_microbatch=cap,
                   gradient_checkpointing=ckpt, max_grad_norm=0.0, learning_rate=1.0, adam_epsilon=1.0)
        BCRTrainer(model, problems, cfg, tokenizer=tiny_tokenizer, reward_fn=instance_token_reward).train()
        deltas.append({k: v - before[k] for k, v in _params(model).items()})
    assert max(float(d.abs().max()) for d in deltas[0].values()) > 1e-4  # the update is not trivially zero
    for other in deltas[1:]:
        for k in deltas[0]:
            torch.testing.assert_close(other[k], deltas[0][k], rtol=1e-3, atol=1e-7, msg=k)


def test_learning_rate_schedules():
    from bcr.rl.trainer import lr_lambda

    const, lin, cos = (lr_lambda(k, warmup=2, total=10) for k in ("constant", "linear", "cosine"))
    assert [round(const(u), 3) for u in range(4)] == [0.333, 0.667, 1.0, 1.0]
    assert lin(2) == 1.0 and lin(6) == pytest.approx(0.5) and lin(10) == 0.0
    assert cos(2) == 1.0 and cos(6) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)


def test_non_finite_loss_skips_the_update_and_writes_no_nan(tmp_path, tiny_tokenizer, tiny_qwen2, problems,
                                                            monkeypatch):
    import bcr.rl.trainer as trainer_module

    real = trainer_module.policy_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(trainer_module, "policy_loss", nan_loss)
    real_fused = trainer_module.fused_linear_policy_loss  # the num_iterations == 1 path

    def nan_fused(*args, **kwargs):
        out = real_fused(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(trainer_module, "fused_linear_policy_loss", nan_fused)
    cfg = _cfg(tmp_path, max_steps=2)
    before = _params(tiny_qwen2)
    trainer = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer, reward_fn=instance_token_reward)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.train()
    assert [r["skipped_updates"] for r in _rows(cfg)] == [1, 1]
    for k, v in _params(trainer.model).items():
        assert torch.equal(v, before[k]), k
    assert not any(s.get("exp_avg") is not None for s in trainer.optimizer.state.values())


def test_bad_input_gives_clear_errors(tmp_path, tiny_tokenizer, tiny_qwen2, problems):
    with pytest.raises(FileNotFoundError, match="model="):
        BCRTrainer(str(tmp_path / "nope"), problems, _cfg(tmp_path), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="n_problems"):
        BCRTrainer(tiny_qwen2, problems[:2], _cfg(tmp_path, n_problems=3), tokenizer=tiny_tokenizer)
    with pytest.warns(UserWarning, match="max_completion_length"):
        BCRTrainer(tiny_qwen2, problems, _cfg(tmp_path, n_problems=4, max_completion_length=8), tokenizer=tiny_tokenizer)


@pytest.mark.filterwarnings("ignore:max_completion_length")
def test_steps_draw_every_bundle_once_per_epoch(tmp_path, tiny_tokenizer, tiny_qwen2, problems):
    cfg = _cfg(tmp_path, n_problems=3, bundles_per_step=3, max_steps=-1, num_train_epochs=2)
    trainer = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer)
    assert trainer.total_steps == 2 * (24 // 3) // 3  # 8 bundles per epoch, 3 per step
    seen = [tuple(p.id for p in b) for s in range(2) for _, b in trainer.bundles.step_bundles(s)]
    assert len(seen) == 6 and len(set(seen)) == 6
    assert trainer.bundles.step_bundles(1) == trainer.bundles.step_bundles(1)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_trains_from_a_yaml_file(tmp_path, tiny_tokenizer, tiny_qwen2, capsys):
    from bcr.cli import main

    model_dir = tmp_path / "tiny"
    tiny_qwen2.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {model_dir}\noutput_dir: {tmp_path / 'out'}\ntrain_data: synthetic\nlimit: 12\n"
        "n_problems: {1: 0.5, 2: 0.5}\nnum_generations: 2\nmax_completion_length: 16\nbundles_per_step: 1\n"
        "disable_progress_bar: true\n"
    )
    assert main(["train", "--config", str(cfg), "max_steps=2", "learning_rate=1e-4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("num_generations = 4", "max_completion_length = 1024", "loss_type = 'dapo'", "beta = 0.0",
                 "n_problems = 3", "bundles_per_step = 8", "resume_from = None"):
        assert name in out

    assert main(["train", f"model={tmp_path / 'missing'}", "train_data=synthetic"]) == 2
    assert "model=" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "loss_type=ppo"]) == 2
    assert "loss_type" in capsys.readouterr().err


def test_eval_metrics_and_the_progress_bar(tmp_path, tiny_tokenizer, tiny_qwen2, problems, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)  # take the rich path
    cfg = _cfg(tmp_path, n_problems={1: 1, 2: 1}, max_steps=2, eval_steps=2, disable_progress_bar=False)
    trainer = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer, eval_problems=problems[:4],
                         reward_fn=instance_token_reward)
    last = trainer.train()
    for key in ("eval/accuracy/n1", "eval/accuracy/n2", "eval/tokens_per_problem/n1", "eval/tokens_per_problem/n2"):
        assert key in last
    assert 0 < last["eval/tokens_per_problem/n2"] <= cfg.max_completion_length / 2
    assert "eval/accuracy/n1" not in _rows(cfg)[0]


def test_periodic_evaluation_is_the_evaluators(tmp_path, tiny_tokenizer, tiny_qwen2, problems):
    """``trainer.evaluate`` generates and scores with ``bcr.eval.sweep``'s code and seeds: a sweep of
    the same engine by ``evaluate_scaling`` gives the same numbers."""
    from bcr.eval.sweep import RESULTS_FILE, evaluate_scaling, read_results

    cfg = _cfg(tmp_path, n_problems={1: 1, 2: 1}, max_completion_length=16, temperature=1.0, top_p=1.0, seed=3)
    evals = problems[:5]
    trainer = BCRTrainer(tiny_qwen2, problems, cfg, tokenizer=tiny_tokenizer, eval_problems=evals)
    got = trainer.evaluate()
    out = tmp_path / "sweep"
    evaluate_scaling({"policy": trainer.engine}, evals, tokenizer=tiny_tokenizer, n_values=[1, 2], samples_per_bundle=1,
                     max_completion_length=16, temperature=1.0, top_p=1.0, seed=3, output_dir=str(out), plots=False,
                     progress=False, n_bootstrap=10)
    records = read_results(out / RESULTS_FILE)
    for n in (1, 2):
        mine = [r for r in records if r["n_problems"] == n]
        assert len(mine) == -(-len(evals) // n)
        assert got[f"eval/accuracy/n{n}"] == sum(sum(r["correct"]) for r in mine) / len(evals)
        assert got[f"eval/tokens_per_problem/n{n}"] == sum(r["completion_tokens"] for r in mine) / len(evals)
