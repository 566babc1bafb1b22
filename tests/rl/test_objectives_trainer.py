"""The trainer with TRL 1.16's objectives, BCR's instance-level ratio, the rollout correction from the
HF engine's own log-probs, and mask_truncated_completions, on a tiny random Qwen2."""

from __future__ import annotations

import pytest
import torch

from bcr.models.rollout import Generation
from bcr.rl.config import BCRConfig
from bcr.rl.trainer import BCRTrainer, truncation_mask
from bcr.task.parsing import completion_segment_ids, parse_completion
from bcr.task.synthetic import make_arithmetic_problems

CUT = "Problem 1: 2+3=5\nAnswer 1: 5\nProblem 2: 4+4=8\nAnswer 2: 8\nProblem 3: 7+"


def _cfg(tmp_path, **kw) -> BCRConfig:
    base = {"output_dir": str(tmp_path / "run"), "n_problems": 2, "num_generations": 3, "max_completion_length": 16,
            "bundles_per_step": 2, "max_steps": 1, "learning_rate": 1.0, "adam_epsilon": 1.0, "max_grad_norm": 0.0,
            "disable_progress_bar": True, "save_total_limit": 1}
    base.update(kw)
    return BCRConfig(**base)


def instance_token_reward(completion_ids, n_problems, **kw):
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


@pytest.fixture(scope="module")
def problems():
    return make_arithmetic_problems(12, seed=0)


def _update(tmp_path, tokenizer, problems, **kw):
    from bcr.models.tiny import tiny_model

    model = tiny_model(tokenizer, seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = BCRTrainer(model, problems, _cfg(tmp_path, **kw), tokenizer=tokenizer, reward_fn=instance_token_reward)
    metrics = trainer.train()
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}, metrics, trainer


@pytest.mark.parametrize("loss_type,level", [("sapo", "sequence"), ("luspo", "sequence"), ("cispo", "instance"),
                                             ("vespo", "token"), ("dapo", "instance")])
def test_objectives_keep_the_update_under_micro_batching(tmp_path, tiny_tokenizer, problems, loss_type, level):
    """Each loss type's normaliser is global: accumulation and a per-row token cap leave the update as is."""
    kw = {"loss_type": loss_type, "importance_sampling_level": level, "delta": 1.5 if loss_type == "dapo" else None}
    one, _, _ = _update(tmp_path / "a", tiny_tokenizer, problems, **kw)
    split, _, _ = _update(tmp_path / "b", tiny_tokenizer, problems, gradient_accumulation_steps=2,
                          max_tokens_per_microbatch=40, **kw)
    assert max(float(d.abs().max()) for d in one.values()) > 1e-4
    for k in one:
        torch.testing.assert_close(split[k], one[k], rtol=1e-3, atol=1e-7, msg=k)


def test_hf_engine_log_probs_are_the_trainers(tmp_path, tiny_tokenizer, problems):
    """The HF engine's sampling log-probs equal the trainer's recomputed ones up to float noise, so the
    rollout-correction ratio is 1 on this path."""
    from bcr.models.tiny import tiny_model

    cfg = _cfg(tmp_path, vllm_importance_sampling_correction=True, temperature=0.7)
    trainer = BCRTrainer(tiny_model(tiny_tokenizer, seed=0), problems, cfg, tokenizer=tiny_tokenizer,
                         reward_fn=instance_token_reward)
    prompts = ["Problem 1: 1+1\nProblem 2: 2+2\n", "Problem 1: 3+4\n"]
    groups = trainer.engine.generate(prompts, num_generations=3, max_new_tokens=12, temperature=0.7, seed=[1, 2])
    for g in (g for group in groups for g in group):
        assert g.sampling_logprobs is not None and len(g.sampling_logprobs) == len(g.completion_ids)
    parsed = [[parse_completion(g.text, 2) for g in group] for group in groups]
    adv = [torch.zeros(3, 2) for _ in groups]
    batch = trainer.microbatches(trainer.samples(groups, parsed, adv))
    with torch.no_grad():
        for row, sampling in zip(batch.rows, batch.sampling):
            logp = trainer._logprobs(trainer.policy, row).logp
            assert sampling is not None and sampling.shape == logp.shape
            torch.testing.assert_close(sampling, logp, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["sequence_mask", "instance_mask"])
def test_rollout_correction_runs_end_to_end_and_is_identity_on_hf(tmp_path, tiny_tokenizer, problems, mode):
    off, m_off, _ = _update(tmp_path / "off", tiny_tokenizer, problems, vllm_importance_sampling_correction=False)
    on, m_on, trainer = _update(tmp_path / "on", tiny_tokenizer, problems, vllm_importance_sampling_correction=True,
                                vllm_importance_sampling_mode=mode, off_policy_mask_threshold=0.5)
    assert trainer.config.rollout_correction
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-3, atol=1e-6, msg=k)
    assert abs(m_on["loss"] - m_off["loss"]) <= 1e-5 * max(1.0, abs(m_off["loss"]))


def test_rollout_correction_defaults_follow_the_engine():
    assert not BCRConfig().rollout_correction  # hf: nothing to correct by default
    assert BCRConfig(vllm_importance_sampling_correction=True).rollout_correction
    assert BCRConfig(rollout_engine="vllm").rollout_correction  # TRL's default for vLLM rollouts
    with pytest.warns(FutureWarning, match="clip_max"):
        assert BCRConfig(vllm_importance_sampling_cap=2.0).vllm_importance_sampling_clip_max == 2.0


# ------------------------------------------------------------------------------------------------
# mask_truncated_completions
# ------------------------------------------------------------------------------------------------


def _cut_generation(tokenizer, text=CUT, truncated=True):
    ids = tokenizer.encode(text, add_special_tokens=False)
    parsed = parse_completion(text, 3, truncated=truncated)
    return Generation([1, 2], ids, text, truncated), parsed, completion_segment_ids(tokenizer, ids, parsed)


def test_truncation_mask_scopes(tiny_tokenizer):
    g, parsed, seg = _cut_generation(tiny_tokenizer)
    assert parsed.answers == ["5", "8", None]
    last = max(t for t, k in enumerate(seg) if k == 1)  # the end of problem 2's section (its answer)
    mask = truncation_mask(g, parsed, seg, "unanswered")
    assert mask == [1.0] * (last + 1) + [0.0] * (len(seg) - last - 1)
    assert 0 < last < len(seg) - 1 and all(seg[t] in (-1, 2) for t in range(last + 1, len(seg)))
    assert truncation_mask(g, parsed, seg, "completion") == [0.0] * len(seg)
    # nothing answered: masked whole; not truncated: nothing masked
    g2, p2, s2 = _cut_generation(tiny_tokenizer, "Problem 1: 2+")
    assert truncation_mask(g2, p2, s2, "unanswered") == [0.0] * len(s2)
    g3, p3, s3 = _cut_generation(tiny_tokenizer, truncated=False)
    assert truncation_mask(g3, p3, s3, "unanswered") is None


@pytest.mark.parametrize("scope", ["unanswered", "completion"])
def test_mask_truncated_completions_reaches_the_loss(tmp_path, tiny_tokenizer, problems, scope):
    """The masks land on the right packed tokens, the token normaliser counts only kept tokens, and
    masked tokens get no gradient: the loss equals the one of a batch without the masked tail."""
    from bcr.models.tiny import tiny_model

    cfg = _cfg(tmp_path, n_problems=3, max_completion_length=40, loss_type="dapo", mask_truncated_completions=True,
               mask_truncated_scope=scope)
    trainer = BCRTrainer(tiny_model(tiny_tokenizer, seed=0), problems, cfg, tokenizer=tiny_tokenizer)
    trainer.completion_multiple = 16  # padded as on CUDA: the masks must be padded with the completion fields
    cut, parsed, seg = _cut_generation(tiny_tokenizer)
    done_text = "Problem 1: 1+1=2\nAnswer 1: 2\n"
    done, pdone, _ = _cut_generation(tiny_tokenizer, done_text, truncated=False)
    adv = [torch.tensor([[0.5, -1.0, 2.0], [-0.5, 1.0, -2.0]])]
    samples = trainer.samples([[cut, done]], [[parsed, pdone]], adv)
    batch = trainer.microbatches(samples)
    want = truncation_mask(cut, parsed, seg, scope) + [1.0] * len(done.completion_ids)
    pad = batch.rows[0].completion_padding  # the completion fields are padded to a multiple of 16: masked out
    assert pad > 0 and (len(want) + pad) % 16 == 0
    assert batch.masks[0].tolist() == want + [0.0] * pad
    assert batch.normalizer == sum(want)
    trainer.model.train()
    loss, _, _ = trainer._loss(batch.rows[0], batch.advantages[0], None, None, batch.normalizer, batch.masks[0])
    # the same loss from the plain reference on the masked tokens
    from bcr_kernels import reference

    with torch.no_grad():
        logp = trainer._logprobs(trainer.policy, batch.rows[0]).logp
    want_loss, _ = reference.policy_loss(logp, logp, batch.advantages[0], torch.tensor(want),
                                         batch.rows[0].completion_cu_seqlens, normalizer=sum(want))
    torch.testing.assert_close(loss.detach(), want_loss, atol=1e-6, rtol=1e-5)
