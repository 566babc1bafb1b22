"""The trainer with TRL 1.16's objectives on a tiny random Qwen2: each loss type's normaliser under
micro-batching, the rollout correction (the HF engine's own log-probs, and engine log-probs that
differ from the trainer's by known amounts, which change the step's gradient by known amounts), the
off-policy mask, and mask_truncated_completions. Parity with TRL's loss on the trainer's paths is
``test_trl_parity.py``'s; the instance level against a loop is ``test_loss_instance_level.py``'s."""

from __future__ import annotations

import math

import pytest
import torch

from bcr.models.rollout import Generation
from bcr.rl.config import BCRConfig
from bcr.rl.trainer import BCRTrainer, truncation_mask
from bcr.runtime.metrics import StepStats
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


def test_rollout_correction_runs_end_to_end_and_is_identity_on_hf(tmp_path, tiny_tokenizer, problems):
    """A training step with the correction and the off-policy mask on, from the HF engine's log-probs:
    its update equals the one without them, as it must (ratio 1 up to float noise, and no completion's
    KL near the threshold). A dropped correction would pass this too; the known-amount tests below are
    the ones that catch it."""
    off, m_off, _ = _update(tmp_path / "off", tiny_tokenizer, problems, vllm_importance_sampling_correction=False)
    on, m_on, trainer = _update(tmp_path / "on", tiny_tokenizer, problems, vllm_importance_sampling_correction=True,
                                vllm_importance_sampling_mode="instance_mask", off_policy_mask_threshold=0.5)
    assert trainer.config.rollout_correction
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-3, atol=1e-6, msg=k)
    assert abs(m_on["loss"] - m_off["loss"]) <= 1e-5 * max(1.0, abs(m_off["loss"]))


# ------------------------------------------------------------------------------------------------
# The rollout correction and the off-policy mask change the step by known amounts
# ------------------------------------------------------------------------------------------------
TEXTS = ["Problem 1: 2+3=5\nAnswer 1: 5\nProblem 2: 4+4=8\nAnswer 2: 8",
         "Problem 1: 2+3=6\nAnswer 1: 6\nProblem 2: 4+4\nAnswer 2: 9",
         "So.\nProblem 1: 5\nAnswer 1: 5\nProblem 2: 4+4=9, check\nAnswer 2: 9",
         "Problem 1: 2+3=5, 5\nAnswer 1: 5\nProblem 2: 8\nAnswer 2: 8"]
ADVANTAGES = torch.tensor([[0.8, 0.4], [-0.9, -0.5], [0.3, -0.6], [-0.2, 0.7]])  # [G, N]


class Step:
    """One bundle's four completions and a trainer whose step gradient can be taken on them, with the
    engine's log-probs set to the trainer's own shifted by given amounts."""

    def __init__(self, tmp_path, tokenizer, problems, **kw):
        from bcr.models.tiny import tiny_model

        cfg = _cfg(tmp_path, n_problems=2, num_generations=4, bundles_per_step=1, max_completion_length=64,
                   loss_type="dapo", **kw)
        self.trainer = BCRTrainer(tiny_model(tokenizer, seed=0), problems, cfg, tokenizer=tokenizer)
        prompt = tokenizer.encode("Problem 1: 2+3\nProblem 2: 4+4\n", add_special_tokens=False)
        self.groups = [[Generation(prompt, tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id],
                                   t, False) for t in TEXTS]]
        self.parsed = [[parse_completion(t, 2) for t in TEXTS]]
        batch = self.trainer.microbatches(self.trainer.samples(self.groups, self.parsed, [ADVANTAGES]))
        with torch.no_grad():
            logp = torch.cat([self.trainer._logprobs(self.trainer.policy, row).logp for row in batch.rows])
        self.logp = logp.split([len(g.completion_ids) for g in self.groups[0]])

    def gradient(self, log_weights=(0.0, 0.0, 0.0, 0.0), advantages=ADVANTAGES) -> torch.Tensor:
        """The flat gradient of the step when completion s's engine log-probs are the trainer's minus
        ``log_weights[s]`` spread over its tokens (so exp(sum(trainer - engine)) = exp(log_weights[s]))."""
        for g, lp, log_w in zip(self.groups[0], self.logp, log_weights):
            g.sampling_logprobs = (lp - log_w / len(lp)).tolist()
        t = self.trainer
        batch = t.microbatches(t.samples(self.groups, self.parsed, [advantages]))
        old, ref = t.old_logprobs(batch), t.ref_logprobs(batch)
        t.optimizer.zero_grad(set_to_none=True)
        finite, _ = t._backward(batch, old, ref, StepStats())
        assert finite
        return torch.cat([p.grad.flatten() for p in t.params])

    def alone(self, s: int) -> torch.Tensor:
        """The step gradient with only completion s's advantages (the others 0): its share of the step."""
        adv = torch.zeros_like(ADVANTAGES)
        adv[s] = ADVANTAGES[s]
        return self.gradient(advantages=adv)


@pytest.fixture
def torch_kernels(monkeypatch):
    """The kernels' PyTorch paths: the Triton interpreter would take seconds per gradient here (the Triton
    paths of the same step are compared with TRL in test_trl_parity.py)."""
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["fused", "two_pass"])
def test_token_weights_scale_the_step(tmp_path, tiny_tokenizer, problems, torch_kernels, num_iterations):
    """Every token's engine log-prob log(2) below the trainer's: token_truncate weights are all 2, inside
    [0.5, 3], so the step's gradient is twice the uncorrected one."""
    step = Step(tmp_path, tiny_tokenizer, problems, num_iterations=num_iterations,
                vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
                vllm_importance_sampling_clip_min=0.5)
    lengths = [len(lp) for lp in step.logp]
    corrected = step.gradient(log_weights=[math.log(2) * n for n in lengths])
    step.trainer.config.vllm_importance_sampling_correction = False
    _close(corrected, 2 * step.gradient())


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["fused", "two_pass"])
def test_sequence_weights_reweight_each_completion(tmp_path, tiny_tokenizer, problems, torch_kernels,
                                                  num_iterations):
    """sequence_mask with completion weights 1.5, 5, 0.8 and 2.5 (clip_max 3): the step is the sum of the
    completions' shares weighted 1.5, 0 (masked), 0.8 and 2.5; neither all clamped nor all masked."""
    step = Step(tmp_path, tiny_tokenizer, problems, num_iterations=num_iterations,
                vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask")
    weights = [1.5, 5.0, 0.8, 2.5]
    corrected = step.gradient(log_weights=[math.log(w) for w in weights])
    step.trainer.config.vllm_importance_sampling_correction = False
    kept = [w if w <= 3.0 else 0.0 for w in weights]
    _close(corrected, sum(w * step.alone(s) for s, w in enumerate(kept)))


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["fused", "two_pass"])
def test_off_policy_mask_drops_what_it_should(tmp_path, tiny_tokenizer, problems, torch_kernels, num_iterations):
    """Completions 0 (advantages > 0) and 1 (advantages < 0) sampled with log-probs 1 nat above the
    trainer's per token (mean KL 1 > threshold 0.5): the mask drops completion 1's share of the step and
    keeps completion 0's; the others (KL 0) are kept. No rollout correction: the engine's log-probs reach
    the mask on their own."""
    step = Step(tmp_path, tiny_tokenizer, problems, num_iterations=num_iterations, off_policy_mask_threshold=0.5)
    lengths = [len(lp) for lp in step.logp]
    masked = step.gradient(log_weights=[-1.0 * lengths[0], -1.0 * lengths[1], 0.0, 0.0])
    _close(masked, step.gradient() - step.alone(1))
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
    """The masks land on the right packed tokens (padding included), the token normaliser counts only
    kept tokens, and the trainer's fused loss equals the plain reference's with the masked tail at
    weight 0."""
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
