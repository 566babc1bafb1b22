"""Parity with TRL 1.16's own GRPOTrainer._compute_loss, loss and gradient, for every loss type and
importance-sampling level TRL has, with its loss options (delta, the KL bias correction, the off-policy
mask, the vLLM importance-sampling correction).

TRL's method runs on a stub trainer holding only the attributes it reads, in TRL's padded ``[B, L]``
layout with one advantage per sequence; ours runs ``bcr_kernels.policy_loss`` on the packed tokens
with the options ``BCRConfig.policy_loss_kwargs`` maps the same TRL names to, and the normaliser the
trainer gives each loss type (``BCRTrainer._normalizer`` on one process). TRL computes the vLLM
correction weights inside its generation step (not callable alone), so ``_trl_is_ratio`` writes that
step's formula out here; ours computes them inside the loss from the same sampling log-probs.

trl is a dev dependency (``make test`` installs ``trl==1.16.0``); the test fails, not skips, if the
installed TRL cannot be driven this way.
"""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

import bcr_kernels
from bcr.rl.config import LOSS_TYPES, BCRConfig

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


def _stub(cfg: BCRConfig, lp_pad, use_vllm: bool):
    args = types.SimpleNamespace(
        delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl, steps_per_generation=1,
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
        vllm_importance_sampling_correction=use_vllm, current_gradient_accumulation_steps=1,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, reduce=identity,
                                          num_processes=1, sync_gradients=True),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp_pad, torch.zeros_like(lp_pad), None),
    )


def _compare(cfg: BCRConfig, seed=0, on_policy=False):
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
    theirs = GRPOTrainer._compute_loss(_stub(cfg, lp_pad, use_vllm), None, inputs)
    theirs.backward()

    kw = cfg.policy_loss_kwargs()
    if cfg.loss_type in ("dapo", "cispo", "vespo"):  # the trainer's global token normaliser
        kw["normalizer"] = float(mask.sum())
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    adv_tok = torch.repeat_interleave(seq_adv, torch.tensor(LENGTHS))
    lp = logp.clone().requires_grad_(True)
    ours, _ = bcr_kernels.policy_loss(lp, old, adv_tok, mask, cu, ref_logp=ref, sampling_logp=sampling,
                                      max_completion_length=cfg.max_completion_length, **kw)
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
def test_every_loss_type_and_level(backend, loss_type, level):
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # CISPO's epsilon_high caps the IS weight itself
    for on_policy in (False, True):
        _compare(BCRConfig(max_completion_length=8, loss_type=loss_type, importance_sampling_level=level,
                           epsilon_high=eps_high), on_policy=on_policy)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_kl_with_and_without_bias_correction(backend, loss_type):
    for level in ("token", "sequence"):
        for bias in (True, False):
            _compare(_cfg(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                          use_bias_correction_kl=bias), seed=1)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "luspo"])
def test_two_sided_clipping(backend, loss_type):
    for level in ("token", "sequence"):
        _compare(_cfg(loss_type=loss_type, importance_sampling_level=level, delta=1.05), seed=2)


# TRL refuses VESPO with a sequence-level correction (so does BCRConfig)
@pytest.mark.parametrize("loss_type,mode", [(t, m) for t in LOSS_TYPES for m in TRL_MODES
                                            if t != "vespo" or m.startswith("token")])
def test_vllm_importance_sampling_correction(backend, loss_type, mode):
    _compare(_cfg(loss_type=loss_type, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
                  vllm_importance_sampling_clip_min=0.7, vllm_importance_sampling_clip_max=1.4), seed=3)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_off_policy_mask(backend, loss_type):
    for level in ("token", "sequence"):
        _compare(_cfg(loss_type=loss_type, importance_sampling_level=level, off_policy_mask_threshold=0.02), seed=4)


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
