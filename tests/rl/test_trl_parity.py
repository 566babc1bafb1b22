"""Parity with TRL 1.16's own ``GRPOTrainer._compute_loss``, loss and gradient, on two levels.

The loss alone, for every loss type and importance-sampling level TRL has, with its loss options
(delta, the KL bias correction, the off-policy mask, the vLLM importance-sampling correction): TRL's
method runs on a stub trainer holding only the attributes it reads, in TRL's padded ``[B, L]`` layout
with one advantage per sequence and given log-probs; ours runs ``bcr_kernels.policy_loss`` on the
packed tokens with the ``Objective`` that ``BCRConfig.policy_objective`` maps the same TRL names to, and the
normaliser of a real one-process ``BCRTrainer`` (its own ``_normalizer``).

The trainer's own paths (the second half): one update of ``BCRTrainer`` on a tiny Qwen2 (its
packing, old and reference log-probs, micro-batches, and its fused one-pass or two-pass loss) gives
the loss and parameter gradients of TRL's ``_compute_loss`` run on the same weights, with log-probs
from materialised ``[B, L, V]`` logits (TRL's ``selective_log_softmax``), one call per micro-batch.

TRL computes the vLLM correction weights inside its generation step (not callable alone), so
``_trl_is_ratio`` writes that step's formula out here; ours computes them inside the loss from the
same sampling log-probs.

trl is a dev dependency (``make test`` installs ``trl==1.16.0``): without it the module skips; with
another version, or one that cannot be driven this way, it fails.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import types

import pytest
import torch

import bcr_kernels
from bcr.rl.config import LOSS_TYPES, BCRConfig
from bcr.rl.trainer import RolloutSample, attention_implementation

trl = pytest.importorskip("trl", reason="trl is a dev dependency: pip install -e '.[dev]'")
from trl import GRPOTrainer  # noqa: E402

LENGTHS = [5, 3, 7, 1]  # TRL rows are never empty; a one-token completion
TRL_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.fixture(params=["torch", "auto"])
def backend(request, monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", request.param)
    return request.param


def _pad(x, fill=0.0):
    out = torch.full((len(LENGTHS), max(LENGTHS)), fill, dtype=x.dtype)
    start = 0
    for i, n in enumerate(LENGTHS):
        out[i, :n] = x[start : start + n]
        start += n
    return out


def _unpad(x):
    return torch.cat([x[i, :n] for i, n in enumerate(LENGTHS)])


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    old = -torch.rand(T, generator=g) * 3
    logp = old + 0.3 * torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.85
    mask[LENGTHS[0] + LENGTHS[1] + LENGTHS[2]] = True  # the one-token completion counts
    ref = old + 0.2 * torch.randn(T, generator=g)
    sampling = old + 0.15 * torch.randn(T, generator=g)
    seq_adv = torch.randn(len(LENGTHS), generator=g)
    return logp, old, mask, ref, sampling, seq_adv


def _trl_is_ratio(old, sampling, mask, cfg: BCRConfig):
    """TRL 1.16's vLLM importance-sampling weights (its generation step), on padded tensors."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    mode = cfg.vllm_importance_sampling_mode
    log_w = diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff
    w = torch.exp(log_w)
    lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    if mode.endswith("truncate"):
        return torch.clamp(w, min=lo, max=hi)
    bad = (w < (-math.inf if lo is None else lo)) | (w > (math.inf if hi is None else hi))
    return w.masked_fill(bad, 0.0)


def _stub(cfg: BCRConfig, logps, use_vllm: bool, accumulation: int = 1):
    """The attributes of a GRPOTrainer that ``_compute_loss`` reads; ``logps`` is its
    ``_get_per_token_logps_and_entropies``; ``accumulation`` micro-batches per generation batch."""
    args = types.SimpleNamespace(
        delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl, steps_per_generation=accumulation,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
    )
    identity = lambda x, **k: x  # noqa: E731  (one process: gather / reduce are the identity)
    return types.SimpleNamespace(
        args=args, beta=cfg.beta, epsilon_low=cfg.epsilon,
        epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
        max_completion_length=cfg.max_completion_length, top_entropy_quantile=1.0,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold, use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm, current_gradient_accumulation_steps=accumulation,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, reduce=identity,
                                          num_processes=1, sync_gradients=True),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=logps,
    )


@pytest.fixture(scope="module")
def normalizer(tiny_tokenizer, tmp_path_factory):
    """``normalizer(cfg, mask)``: ``BCRTrainer._normalizer`` of a real one-process trainer run with
    ``cfg``, for completions of ``LENGTHS`` tokens with loss mask ``mask``."""
    from bcr.models.tiny import tiny_model
    from bcr.rl.trainer import BCRTrainer
    from bcr.task.synthetic import make_arithmetic_problems

    out = str(tmp_path_factory.mktemp("normalizer"))
    trainer = BCRTrainer(tiny_model(tiny_tokenizer, seed=0), make_arithmetic_problems(2),
                         BCRConfig(output_dir=out, n_problems=1, num_generations=2), tokenizer=tiny_tokenizer)

    def of(cfg: BCRConfig, mask: torch.Tensor) -> float:
        trainer.config = cfg
        ends = torch.tensor(LENGTHS).cumsum(0).tolist()
        samples = [RolloutSample([1], [1] * n, [0.0], loss_mask=mask[end - n : end].float().tolist())
                   for n, end in zip(LENGTHS, ends)]
        return trainer._normalizer(samples)

    return of


def _compare(normalizer, cfg: BCRConfig, seed=0, on_policy=False):
    assert trl.__version__ == "1.16.0", f"parity is pinned to TRL 1.16.0, found {trl.__version__}"
    logp, old, mask, ref, sampling, seq_adv = _data(seed)
    if on_policy:
        old = logp.clone()
    use_vllm = cfg.rollout_correction
    B, L = len(LENGTHS), max(LENGTHS)
    lp_pad = _pad(logp).requires_grad_(True)
    m_pad = _pad(mask, False).long()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, L, dtype=torch.long), "completion_mask": m_pad,
        "advantages": seq_adv, "num_items_in_batch": mask.sum().float(),
        "ref_per_token_logps": _pad(ref), "sampling_per_token_logps": _pad(sampling),
    }
    if not on_policy:  # TRL then uses per_token_logps.detach()
        inputs["old_per_token_logps"] = _pad(old)
    if use_vllm:
        inputs["importance_sampling_ratio"] = _trl_is_ratio(_pad(old), _pad(sampling), m_pad.float(), cfg)
    logps = lambda *a, **k: (lp_pad, torch.zeros_like(lp_pad), None)  # noqa: E731
    theirs = GRPOTrainer._compute_loss(_stub(cfg, logps, use_vllm), None, inputs)
    theirs.backward()

    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    adv_tok = torch.repeat_interleave(seq_adv, torch.tensor(LENGTHS))
    lp = logp.clone().requires_grad_(True)
    ours, _ = bcr_kernels.policy_loss(lp, old, adv_tok, mask, cu, cfg.policy_objective(), ref_logp=ref,
                                      sampling_logp=sampling, normalizer=normalizer(cfg, mask))
    ours.backward()
    what = f"{cfg.loss_type} level={cfg.importance_sampling_level} delta={cfg.delta} beta={cfg.beta} " \
           f"is={use_vllm and cfg.vllm_importance_sampling_mode} opm={cfg.off_policy_mask_threshold}"
    torch.testing.assert_close(ours.detach(), theirs.detach().float(), atol=1e-6, rtol=1e-5, msg=what)
    torch.testing.assert_close(_pad(lp.grad), lp_pad.grad, atol=1e-6, rtol=1e-5, msg=what)
    assert lp.grad.abs().sum() > 0, what


def _cfg(**kw):
    return BCRConfig(max_completion_length=8, epsilon=0.2, epsilon_high=0.28, **kw)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_and_level(backend, normalizer, loss_type, level):
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # CISPO's epsilon_high caps the IS weight itself
    for on_policy in (False, True):
        _compare(normalizer, BCRConfig(max_completion_length=8, loss_type=loss_type, importance_sampling_level=level,
                           epsilon_high=eps_high), on_policy=on_policy)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_kl_with_and_without_bias_correction(backend, normalizer, loss_type):
    for level in ("token", "sequence"):
        for bias in (True, False):
            _compare(normalizer, _cfg(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                          use_bias_correction_kl=bias), seed=1)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "luspo"])
def test_two_sided_clipping(backend, normalizer, loss_type):
    for level in ("token", "sequence"):
        _compare(normalizer, _cfg(loss_type=loss_type, importance_sampling_level=level, delta=1.05), seed=2)


# TRL refuses VESPO with a sequence-level correction (so does BCRConfig)
@pytest.mark.parametrize("loss_type,mode", [(t, m) for t in LOSS_TYPES for m in TRL_MODES
                                            if t != "vespo" or m.startswith("token")])
def test_vllm_importance_sampling_correction(backend, normalizer, loss_type, mode):
    _compare(normalizer, _cfg(loss_type=loss_type, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
                  vllm_importance_sampling_clip_min=0.7, vllm_importance_sampling_clip_max=1.4), seed=3)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_off_policy_mask(backend, normalizer, loss_type):
    for level in ("token", "sequence"):
        _compare(normalizer, _cfg(loss_type=loss_type, importance_sampling_level=level, off_policy_mask_threshold=0.02), seed=4)


def test_config_defaults_are_trls():
    """The loss options BCRConfig shares with TRL's GRPOConfig have TRL's defaults, but the one documented
    difference: vllm_importance_sampling_correction is None (on for vLLM rollouts, as TRL's True is).
    (num_generations is 4 here, 8 in TRL: a smaller default group for CPU runs, unchanged by this test.)"""
    from trl import GRPOConfig

    theirs = {f.name: f.default for f in GRPOConfig.__dataclass_fields__.values()}
    ours = BCRConfig()
    names = ["beta", "epsilon", "epsilon_high", "delta", "loss_type", "importance_sampling_level", "scale_rewards",
             "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
             "vespo_lambda_neg", "use_bias_correction_kl", "off_policy_mask_threshold", "mask_truncated_completions",
             "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
             "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap", "temperature", "top_p",
             "num_iterations"]
    for name in names:
        assert name in theirs, f"TRL 1.16 has no {name}"
        assert getattr(ours, name) == theirs[name], name
    assert theirs["vllm_importance_sampling_correction"] is True and ours.vllm_importance_sampling_correction is None
    assert set(LOSS_TYPES) == {"dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"}


# ================================================================================================
# The trainer's own paths: BCRTrainer's gradient against TRL's _compute_loss on materialised logits
# ================================================================================================
# Two prompts of PROMPT_LENGTH tokens, three completions each (TRL's layout: one row per completion,
# right-padded). Sample 0's last MASKED_TAIL tokens are left out of the loss (a truncated tail).
PROMPT_LENGTH, TEMPERATURE, MASKED_TAIL = 6, 0.7, 3
COMPLETION_LENGTHS = [7, 4, 9, 5, 8, 3]
SEQ_ADVANTAGES = [0.9, -1.1, 0.2, -0.6, 1.3, -0.7]
# The log of each completion's rollout weight exp(sum_t(old - sampling)): four inside (0.5, 2), one
# above, one below, so a sequence_mask mode zeroes two completions and a *_truncate mode clamps them.
SEQ_LOG_WEIGHTS = [0.3, -0.45, 1.6, 0.1, -1.9, 0.5]
IS_CLIP = {"vllm_importance_sampling_clip_min": 0.5, "vllm_importance_sampling_clip_max": 2.0}


@dataclasses.dataclass
class Rollouts:
    """One step's rollouts in TRL's padded layout and as the trainer's samples."""

    model: torch.nn.Module  # the policy that sampled them (the "old" policy)
    prompt_ids: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, L], right-padded
    mask: torch.Tensor  # [B, L] long, 1 = in the loss
    old: torch.Tensor  # [B, L] the sampling policy's log-probs, from materialised logits
    sampling: torch.Tensor  # [B, L] the rollout engine's log-probs (old shifted by known amounts)
    samples: list


def _padded(rows, fill=0, dtype=torch.long):
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=dtype)


def _materialised_logps(model, input_ids, attention_mask, logits_to_keep, **_):
    """TRL's per-token log-probs and entropies from the full ``[B, L, V]`` logits (divided by the
    temperature), with TRL's own ``selective_log_softmax`` and ``entropy_from_logits``."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    with attention_implementation(model, "eager"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -logits_to_keep - 1 : -1] / TEMPERATURE
    return selective_log_softmax(logits, input_ids[:, -logits_to_keep:]), entropy_from_logits(logits), None


@pytest.fixture(scope="module")
def rollouts(tiny_tokenizer):
    from bcr.models.tiny import tiny_model

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 500, (PROMPT_LENGTH,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(10, 500, (n,), generator=g).tolist() for n in COMPLETION_LENGTHS]
    B = len(completions)
    prompt_ids = torch.tensor([prompts[i // 3] for i in range(B)])
    completion_ids = _padded(completions)
    mask = _padded([[1] * n for n in COMPLETION_LENGTHS])
    mask[0, COMPLETION_LENGTHS[0] - MASKED_TAIL : COMPLETION_LENGTHS[0]] = 0
    model = tiny_model(tiny_tokenizer, seed=0)
    with torch.no_grad():
        old = _materialised_logps(model, torch.cat([prompt_ids, completion_ids], 1),
                                  torch.cat([torch.ones_like(prompt_ids), mask], 1), completion_ids.shape[1])[0]
    # per token: old - sampling = the sequence's log-weight spread evenly, plus a zero-sum jitter
    jitter = 0.3 * torch.randn(completion_ids.shape, generator=g) * mask
    jitter = (jitter - jitter.sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask
    shift = torch.tensor(SEQ_LOG_WEIGHTS)[:, None] / mask.sum(1, keepdim=True) * mask + jitter
    sampling = (old - shift) * mask
    samples = [RolloutSample(prompts[i // 3], completions[i], [SEQ_ADVANTAGES[i]], None,
                             sampling[i, :n].tolist(), mask[i, :n].float().tolist())
               for i, n in enumerate(COMPLETION_LENGTHS)]
    return Rollouts(model, prompt_ids, completion_ids, mask, old, sampling, samples)


def _perturb(model, scale=0.15):
    """Move the weights as an update would (seeded), so that ratios to the old policy differ from 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))


def _trl_update(model, cfg: BCRConfig, r: Rollouts, needs_old: bool) -> float:
    """TRL 1.16's loss of the generation batch ``r``, ``gradient_accumulation_steps`` micro-batches of
    consecutive completions (``steps_per_generation`` = accumulation, as TRL's default), backward once each."""
    steps = cfg.gradient_accumulation_steps
    stub = _stub(cfg, _materialised_logps, cfg.rollout_correction, accumulation=steps)
    per = len(r.samples) // steps
    total = 0.0
    for i in range(0, len(r.samples), per):
        rows = slice(i, i + per)
        inputs = {
            "prompt_ids": r.prompt_ids[rows], "prompt_mask": torch.ones_like(r.prompt_ids[rows]),
            "completion_ids": r.completion_ids[rows], "completion_mask": r.mask[rows],
            "advantages": torch.tensor(SEQ_ADVANTAGES[rows]), "num_items_in_batch": r.mask.sum().float(),
            # the trainer's reference is a copy of the initial model, the one that gave r.old
            "ref_per_token_logps": r.old[rows], "sampling_per_token_logps": r.sampling[rows],
        }
        if needs_old:
            inputs["old_per_token_logps"] = r.old[rows]
        if cfg.rollout_correction:
            inputs["importance_sampling_ratio"] = _trl_is_ratio(r.old[rows], r.sampling[rows], r.mask[rows].float(),
                                                                cfg)
        loss = GRPOTrainer._compute_loss(stub, model, inputs)
        loss.backward()
        total += float(loss.detach())
    return total


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _trainer_vs_trl(tmp_path, tokenizer, r: Rollouts, *, off_policy: bool, completion_multiple=1, **kw):
    """The trainer's loss and gradient of one update on ``r`` (its own packing, old and reference
    log-probs, micro-batches and loss path) against TRL's on the same weights."""
    from bcr.rl.trainer import BCRTrainer
    from bcr.runtime.metrics import StepStats
    from bcr.task.synthetic import make_arithmetic_problems

    base = {"output_dir": str(tmp_path / "run"), "n_problems": 1, "num_generations": 3, "bundles_per_step": 2,
            "max_completion_length": 12, "max_steps": 1, "temperature": TEMPERATURE, "epsilon": 0.1,
            "epsilon_high": 0.15, "num_iterations": 2 if off_policy else 1, "disable_progress_bar": True}
    cfg = BCRConfig(**{**base, **kw})
    model = copy.deepcopy(r.model)
    trainer = BCRTrainer(model, make_arithmetic_problems(4), cfg, tokenizer=tokenizer)
    trainer.completion_multiple = completion_multiple
    batch = trainer.microbatches(r.samples)
    old, ref = trainer.old_logprobs(batch), trainer.ref_logprobs(batch)
    if off_policy:
        _perturb(model)
    trainer.optimizer.zero_grad(set_to_none=True)
    finite, ours = trainer._backward(batch, old, ref, StepStats())
    assert finite
    mine = _gradients(model)
    model.zero_grad(set_to_none=True)
    theirs = _trl_update(model, cfg, r, needs_old=off_policy or cfg.rollout_correction)
    what = f"{kw} off_policy={off_policy} rows={len(batch.rows)}"
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (ours, theirs, what)
    trl_grads = _gradients(model)
    assert mine.keys() == trl_grads.keys()
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    assert scale > 1e-3, what
    for name, g in trl_grads.items():
        torch.testing.assert_close(mine[name], g, rtol=1e-4, atol=1e-5 * scale, msg=f"{name}: {what}")
    return trainer, batch



@pytest.fixture
def torch_kernels(monkeypatch):
    """The kernels' PyTorch paths (the Triton interpreter would take seconds per update here; the
    Triton kernels get the same cases in ``test_trainer_update_with_triton_kernels``)."""
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")


def _options(loss_type: str, level: str = "token") -> dict:
    """Clip ranges that clip some of the moved ratios (``_perturb``) and leave most inside."""
    if loss_type == "cispo":  # epsilon_high caps the IS weight itself
        return {"epsilon_high": 1.05}
    return {"epsilon": 0.02, "epsilon_high": 0.03} if level == "sequence" else {}


def _accumulation(loss_type: str) -> int:
    """Two micro-batches, but one for bnpo: TRL normalises each micro-batch by its own token count, bcr
    by the token count of the rank's batch (the same with one micro-batch)."""
    return 1 if loss_type == "bnpo" else 2


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_trainer_fused_update(tmp_path, tiny_tokenizer, rollouts, torch_kernels, loss_type):
    """num_iterations=1: the loss fused into the LM head (ratio 1), logits temperature 0.7, two
    micro-batches, shared prompts, the completion fields padded to a multiple of 16 as on CUDA."""
    _trainer_vs_trl(tmp_path, tiny_tokenizer, rollouts, off_policy=False, completion_multiple=16,
                    loss_type=loss_type, gradient_accumulation_steps=_accumulation(loss_type), **_options(loss_type))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_trainer_off_policy_update(tmp_path, tiny_tokenizer, rollouts, torch_kernels, loss_type, level):
    """num_iterations=2 after the weights moved: old log-probs from before, most ratios inside the clip
    range, some clipped; rows cut at 40 tokens (token level) or one completion per prompt copy
    (sequence level, shared_prompt=false)."""
    layout = {"max_tokens_per_microbatch": 40} if level == "token" else {"shared_prompt": "false"}
    _trainer_vs_trl(tmp_path, tiny_tokenizer, rollouts, off_policy=True, loss_type=loss_type,
                    importance_sampling_level=level, gradient_accumulation_steps=_accumulation(loss_type),
                    **layout, **_options(loss_type, level))


CORRECTIONS = [("dapo", "sequence_mask", 0.1), ("grpo", "sequence_truncate", None), ("sapo", "token_mask", 0.1),
               ("vespo", "token_truncate", None), ("luspo", "sequence_mask", None), ("dr_grpo", None, 0.1)]


@pytest.mark.parametrize("off_policy", [False, True], ids=["fused", "two_pass"])
@pytest.mark.parametrize("loss_type,mode,threshold", CORRECTIONS)
def test_trainer_rollout_correction_and_off_policy_mask(tmp_path, tiny_tokenizer, rollouts, torch_kernels, loss_type,
                                                        mode, threshold, off_policy):
    """The engine's log-probs differ from the trainer's by known amounts (``SEQ_LOG_WEIGHTS``): the
    sequence weights are neither all clamped nor all masked, and the off-policy mask (threshold 0.1)
    drops one of the three negative-advantage completions."""
    kw = {"off_policy_mask_threshold": threshold}
    if mode is not None:
        kw.update(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode, **IS_CLIP)
    _trainer_vs_trl(tmp_path, tiny_tokenizer, rollouts, off_policy=off_policy, loss_type=loss_type,
                    gradient_accumulation_steps=_accumulation(loss_type), **kw, **_options(loss_type))


def test_the_rollouts_exercise_every_branch(rollouts):
    """The data above is what the docstrings say: rollout weights inside and outside the clip range,
    the off-policy mask dropping some negative-advantage completions but not all of them, and moved
    weights whose ratios fall mostly, not all, inside the clip ranges of ``_options``."""
    m = rollouts.mask.bool()
    log_w = (rollouts.old - rollouts.sampling) * rollouts.mask
    seq_w = log_w.sum(1).exp()
    lo, hi = IS_CLIP["vllm_importance_sampling_clip_min"], IS_CLIP["vllm_importance_sampling_clip_max"]
    inside = (seq_w > lo) & (seq_w < hi)
    assert 0 < int(inside.sum()) < len(seq_w)
    token_inside = ((log_w.exp() > lo) & (log_w.exp() < hi))[m].float().mean()
    assert 0.8 < token_inside < 1.0
    model = copy.deepcopy(rollouts.model)
    _perturb(model)
    with torch.no_grad():
        logp = _materialised_logps(model, torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1),
                                   torch.cat([torch.ones_like(rollouts.prompt_ids), rollouts.mask], 1),
                                   rollouts.completion_ids.shape[1])[0]
    ratio = (logp - rollouts.old).exp()
    assert 0.8 < float(((ratio > 0.9) & (ratio < 1.15))[m].float().mean()) < 1.0  # token level: (1 - 0.1, 1 + 0.15)
    seq_ratio = (((logp - rollouts.old) * rollouts.mask).sum(1) / rollouts.mask.sum(1)).exp()
    assert 0 < int(((seq_ratio > 0.98) & (seq_ratio < 1.03)).sum()) < len(seq_ratio)  # sequence: (1 - 0.02, 1 + 0.03)
    kept = GRPOTrainer.get_off_policy_mask(torch.tensor(SEQ_ADVANTAGES)[:, None], logp, rollouts.sampling,
                                           rollouts.mask, 0.1)
    negative = torch.tensor(SEQ_ADVANTAGES) < 0
    assert 0 < int((kept[:, 0] == 0).sum()) < int(negative.sum())


@pytest.mark.parametrize("level,bias", [("token", True), ("sequence", False)])
def test_trainer_kl_update(tmp_path, tiny_tokenizer, rollouts, torch_kernels, level, bias):
    """beta > 0: the reference is the initial model (a copy the trainer keeps), the policy moved."""
    _trainer_vs_trl(tmp_path, tiny_tokenizer, rollouts, off_policy=True, loss_type="grpo", beta=0.04,
                    use_bias_correction_kl=bias, importance_sampling_level=level, gradient_accumulation_steps=2,
                    **_options("grpo", level))


@pytest.mark.parametrize("off_policy", [False, True], ids=["fused", "two_pass"])
def test_trainer_update_with_triton_kernels(tmp_path, tiny_tokenizer, rollouts, monkeypatch, off_policy):
    """The same on the Triton kernels (CUDA, or the interpreter on CPU with TRITON_INTERPRET=1):
    temperature, padding to 16, the sequence-level correction and the off-policy mask."""
    from bcr_kernels._dispatch import interpreting, triton_available

    if not (triton_available() and (torch.cuda.is_available() or interpreting())):
        pytest.skip("the Triton kernels need triton with CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "auto")
    _trainer_vs_trl(tmp_path, tiny_tokenizer, rollouts, off_policy=off_policy, completion_multiple=16,
                    gradient_accumulation_steps=2, vllm_importance_sampling_correction=True,
                    vllm_importance_sampling_mode="sequence_mask", off_policy_mask_threshold=0.1, **IS_CLIP)
