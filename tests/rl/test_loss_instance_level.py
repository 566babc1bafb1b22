"""BCR's instance level (one ratio, and one rollout weight, per problem segment) through the trainer,
against the loss written as a plain loop.

Three completions of a bundle of three problems, with a shared preamble and tail, different rewards
per problem (so the advantages differ inside a completion in ``advantage_mode=instance``), segment ids
from the real parser. The trainer's gradient of one update (``samples`` -> ``microbatches`` -> its
fused one-pass or two-pass loss) must equal the gradient of ``_loop_loss``: dapo's clipped objective
token by token, each token's ratio the mean log-ratio over its unit (itself, its completion, or its
problem segment with shared text taking the completion's), times the rollout weight of its unit,
over the token count, on log-probs from materialised logits. The levels give different gradients
here (asserted), so a trainer that loses the segment ids fails.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bcr.models.rollout import Generation
from bcr.rl.config import BCRConfig
from bcr.rl.trainer import BCRTrainer, attention_implementation
from bcr.runtime.metrics import StepStats
from bcr.task.parsing import completion_segment_ids, parse_completion
from bcr.task.synthetic import make_arithmetic_problems

TEMPERATURE = 0.7
PROMPT = "Problem 1: 2+3\nProblem 2: 4+4\nProblem 3: 7+1\n"
TEXTS = [
    "Let me see.\nProblem 1: 2+3=5\nAnswer 1: 5\nProblem 2: 4+4=8\nAnswer 2: 8\nProblem 3: 7+1=8\nAnswer 3: 8\nDone.",
    "Problem 1: 2+3=6\nAnswer 1: 6\nProblem 2: 4+4=8, check 8\nAnswer 2: 8\nProblem 3: 7+1\nAnswer 3: 9",
    "Quick.\nProblem 1: 5\nAnswer 1: 5\nProblem 2: 4+4=9\nAnswer 2: 9\nProblem 3: 8\nAnswer 3: 7",
]
REWARDS = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # [G, N]: every column varies
# The log of each problem segment's rollout weight exp(sum over the segment of (old - sampling)), per
# completion: inside (0.5, 2), above and below it, so instance_mask keeps some segments and drops others.
SEGMENT_LOG_WEIGHTS = [[0.3, 1.2, -0.2], [-0.9, 0.1, 0.4], [0.2, -0.3, 0.95]]
CLIP = {"vllm_importance_sampling_clip_min": 0.5, "vllm_importance_sampling_clip_max": 2.0}


def _logps(model, prompt_ids, completion_ids):
    """Log-probs of one completion from the model's full logits (no packing, no fused head)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with attention_implementation(model, "eager"):
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


class Bundle:
    """The three completions, their segment ids (from the parser) and, per token, the engine's
    log-probs: the initial model's shifted by ``SEGMENT_LOG_WEIGHTS`` spread over each segment."""

    def __init__(self, tokenizer, model):
        self.model = model
        self.prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
        self.completions, self.segments, self.old, self.sampling = [], [], [], []
        for text, log_w in zip(TEXTS, SEGMENT_LOG_WEIGHTS):
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            seg = torch.tensor(completion_segment_ids(tokenizer, ids, parse_completion(text, 3)))
            assert set(seg.tolist()) == {-1, 0, 1, 2}, seg  # shared text and three segments
            with torch.no_grad():
                old = _logps(model, self.prompt_ids, ids)
            shift = torch.zeros(len(ids))
            for k, w in enumerate(log_w):
                shift[seg == k] = w / int((seg == k).sum())
            self.completions.append(ids)
            self.segments.append(seg)
            self.old.append(old)
            self.sampling.append(old - shift)

    def generations(self) -> list[Generation]:
        return [Generation(self.prompt_ids, ids, text, False, s.tolist())
                for ids, text, s in zip(self.completions, TEXTS, self.sampling)]


@pytest.fixture(scope="module")
def bundle(tiny_tokenizer):
    from bcr.models.tiny import tiny_model

    return Bundle(tiny_tokenizer, tiny_model(tiny_tokenizer, seed=0))


def _unit(seg: torch.Tensor, t: int, level: str) -> torch.Tensor:
    """The tokens whose log-ratios make token ``t``'s ratio (or rollout weight) at ``level``."""
    if level == "token":
        return torch.tensor([t])
    if level == "instance" and seg[t] >= 0:
        return (seg == seg[t]).nonzero()[:, 0]
    return torch.arange(len(seg))


def _loop_loss(model, b: Bundle, adv: torch.Tensor, cfg: BCRConfig) -> torch.Tensor:
    """dapo at ``cfg.importance_sampling_level`` with ``cfg``'s rollout correction, token by token."""
    mode = cfg.vllm_importance_sampling_mode if cfg.rollout_correction else None
    lo, hi = 1 - cfg.epsilon, 1 + cfg.epsilon_high
    total, count = 0.0, sum(len(ids) for ids in b.completions)
    for i, (ids, seg) in enumerate(zip(b.completions, b.segments)):
        log_ratio = _logps(model, b.prompt_ids, ids) - b.old[i]
        for t in range(len(ids)):
            a = adv[i, seg[t]] if seg[t] >= 0 else adv[i].mean()  # shared text: the mean advantage
            ratio = log_ratio[_unit(seg, t, cfg.importance_sampling_level)].mean().exp()
            loss = -torch.minimum(ratio * a, ratio.clamp(lo, hi) * a)
            if mode is not None:
                w = float((b.old[i] - b.sampling[i])[_unit(seg, t, mode.split("_")[0])].sum().exp())
                w_lo, w_hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
                loss = loss * (min(max(w, w_lo), w_hi) if mode.endswith("truncate") else w * (w_lo <= w <= w_hi))
            total = total + loss
    return total / count


def _perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * p.std() * torch.randn(p.shape, generator=g))


def _trainer_vs_loop(tmp_path, tokenizer, b: Bundle, *, off_policy: bool, **kw) -> dict[str, torch.Tensor]:
    """The trainer's gradient of one update on the bundle; asserts it equals the loop's; returns it."""
    cfg = BCRConfig(output_dir=str(tmp_path / "run"), n_problems=3, num_generations=3, bundles_per_step=1,
                    max_completion_length=64, max_steps=1, temperature=TEMPERATURE, loss_type="dapo",
                    epsilon=0.1, epsilon_high=0.15, num_iterations=2 if off_policy else 1,
                    disable_progress_bar=True, **kw)
    model = copy.deepcopy(b.model)
    trainer = BCRTrainer(model, make_arithmetic_problems(3), cfg, tokenizer=tokenizer)
    groups = [b.generations()]
    parsed = [[parse_completion(text, 3) for text in TEXTS]]
    adv = trainer.advantages([REWARDS])
    batch = trainer.microbatches(trainer.samples(groups, parsed, adv))
    old = trainer.old_logprobs(batch)
    if off_policy:
        _perturb(model)
    trainer.optimizer.zero_grad(set_to_none=True)
    finite, _ = trainer._backward(batch, old, trainer.ref_logprobs(batch), StepStats())
    assert finite
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _loop_loss(model, b, adv[0], cfg).backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{n}: {kw}")
    return ours


def _differ(a: dict, b: dict) -> bool:
    """The two gradients differ by more than 1 % of their size."""
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    return diff > 0.01 * max(float(g.abs().max()) for g in a.values())


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")


@pytest.mark.parametrize("off_policy,advantage_mode", [(False, "instance"), (True, "instance"), (True, "sequence")],
                         ids=["fused-instance", "two_pass-instance", "two_pass-sequence"])
def test_each_level_matches_the_loop(tmp_path, tiny_tokenizer, bundle, torch_kernels, off_policy, advantage_mode):
    """Token, sequence and instance ratios, each equal to the loop and each different from the others
    (``advantage_mode=sequence`` too: its segment ids reach the loss). On-policy with one advantage per
    completion every level has the same gradient, so that case is not here."""
    grads = {level: _trainer_vs_loop(tmp_path / level, tiny_tokenizer, bundle, off_policy=off_policy,
                                     advantage_mode=advantage_mode, importance_sampling_level=level)
             for level in ("token", "sequence", "instance")}
    assert _differ(grads["token"], grads["sequence"])
    assert _differ(grads["instance"], grads["sequence"])
    assert _differ(grads["instance"], grads["token"])


@pytest.mark.parametrize("off_policy,advantage_mode", [(False, "instance"), (True, "sequence")],
                         ids=["fused-instance", "two_pass-sequence"])
def test_instance_rollout_correction_matches_the_loop(tmp_path, tiny_tokenizer, bundle, torch_kernels, off_policy,
                                                      advantage_mode):
    """instance_mask drops the segments whose weight leaves (0.5, 2) and keeps the others; instance_truncate
    clamps them; both differ from the sequence-level weights of the same tokens."""
    grads = {mode: _trainer_vs_loop(tmp_path / mode, tiny_tokenizer, bundle, off_policy=off_policy,
                                    advantage_mode=advantage_mode, vllm_importance_sampling_correction=True,
                                    vllm_importance_sampling_mode=mode, **CLIP)
             for mode in ("instance_mask", "instance_truncate", "sequence_mask")}
    assert _differ(grads["instance_mask"], grads["sequence_mask"])
    assert _differ(grads["instance_mask"], grads["instance_truncate"])


def test_the_segment_weights_are_neither_all_kept_nor_all_dropped(bundle):
    w = torch.tensor(SEGMENT_LOG_WEIGHTS).exp()
    inside = (w >= CLIP["vllm_importance_sampling_clip_min"]) & (w <= CLIP["vllm_importance_sampling_clip_max"])
    assert 0 < int(inside.sum()) < w.numel()
    for seg, old, sampling, log_w in zip(bundle.segments, bundle.old, bundle.sampling, SEGMENT_LOG_WEIGHTS):
        for k in range(3):
            assert float((old - sampling)[seg == k].sum()) == pytest.approx(log_w[k], abs=1e-5)
