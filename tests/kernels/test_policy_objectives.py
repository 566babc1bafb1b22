"""Every policy objective, importance-sampling level, rollout correction and off-policy mask:
``policy_loss`` (PyTorch path; Triton where it applies) and ``fused_linear_policy_loss`` (chunked
PyTorch and Triton-interpreted head) against ``reference.policy_loss``, values, metrics and gradients,
at awkward packed layouts (empty and one-token sequences, one-token and absent segments, shared text,
chunks that do not divide T)."""

from __future__ import annotations

import math

import pytest
import torch

import bcr_kernels
from bcr_kernels import Objective, fused_linear_policy_loss, reference
from bcr_kernels._fused_linear_policy_loss import _plan

LENGTHS = [5, 0, 1, 9, 4]  # an empty and a one-token sequence
# segment ids per sequence: shared text (-1), a one-token segment, a problem with no tokens (2 in seq 3)
SEGMENTS = [[-1, 0, 0, 1, 1], [], [0], [-1, 0, 0, 0, -1, 1, 3, 3, -1], [-1, -1, -1, -1]]

CASES = {
    "clip": {},
    "clip_delta": {"delta": 1.1},
    "clip_bias_kl": {"use_bias_correction_kl": True},
    "cispo": {"kind": "cispo", "epsilon_high": 1.05},
    "sapo": {"kind": "sapo"},
    "vespo": {"kind": "vespo"},
    "luspo": {"reduction": "seq_mean_token_sum"},
}
LEVELS = ["token", "sequence", "instance"]
IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "instance_truncate",
            "instance_mask"]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _tokens(seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    old = -torch.rand(T, generator=g) * 4
    logp = old + spread * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) < 0.85).float()
    ref = old + 0.3 * torch.randn(T, generator=g)
    sampling = old + 0.3 * torch.randn(T, generator=g)
    seg = torch.tensor([s for row in SEGMENTS for s in row], dtype=torch.long)
    return logp, old, adv, mask, ref, sampling, seg, _cu(LENGTHS)


def _kw(case, level, **extra):
    """The Objective of a case at a level (``extra``: more of its options)."""
    return Objective(**{"importance_sampling_level": level, "beta": 0.05, **CASES[case], **extra})


def _close(a, b, msg=""):
    scale = float(b.abs().max()) if b.numel() else 0.0  # fp32 sums over the vocabulary: relative to the largest
    torch.testing.assert_close(a, b, atol=2e-6 * max(scale, 1.0), rtol=2e-5, msg=msg)


def _check_policy_loss(o, seed=0, normalizer=None):
    logp, old, adv, mask, ref, sampling, seg, cu = _tokens(seed)
    kw = {"ref_logp": ref, "segment_ids": seg, "sampling_logp": sampling, "normalizer": normalizer}
    a = logp.clone().requires_grad_(True)
    want, want_m = reference.policy_loss(a, old, adv, mask, cu, o, **kw)
    want.backward()
    b = logp.clone().requires_grad_(True)
    got, got_m = bcr_kernels.policy_loss(b, old, adv, mask, cu, o, **kw)
    got.backward()
    _close(got.detach(), want.detach(), f"loss {o}")
    _close(b.grad, a.grad, f"grad {o}")
    assert set(got_m) == set(want_m)
    for k in want_m:
        _close(got_m[k], want_m[k], f"{k} {o}")
    assert a.grad.abs().sum() > 0  # the case exercises a gradient


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(CASES))
def test_policy_loss_objectives(backend, case, level):
    _check_policy_loss(_kw(case, level))


@pytest.mark.parametrize("mode", IS_MODES)
def test_policy_loss_rollout_correction_and_off_policy_mask(backend, mode):
    for case in ("clip", "sapo", "cispo"):
        _check_policy_loss(_kw(case, "instance", importance_sampling_mode=mode, importance_sampling_clip_min=0.8,
                               importance_sampling_clip_max=1.3, off_policy_mask_threshold=0.05))
    if mode.startswith("token"):
        _check_policy_loss(_kw("vespo", "token", importance_sampling_mode=mode, importance_sampling_clip_max=1.3))


@pytest.mark.parametrize("reduction", ["seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum"])
def test_policy_loss_reductions_with_new_objectives(backend, reduction):
    for case in ("sapo", "vespo", "clip_delta"):
        _check_policy_loss(_kw(case, "sequence", reduction=reduction), seed=3)


# ------------------------------------------------------------------------------------------------
# fused LM head: every objective, level, plan (upfront / chunk / two passes)
# ------------------------------------------------------------------------------------------------


def _head(seed=0, H=8, V=37):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(V, generator=g) * 0.3
    targets = torch.randint(0, V, (T,), generator=g)
    targets[3] = -100  # an ignored target inside a sequence
    return hidden, weight, bias, targets


def _check_fused(o, seed=0, chunk=4, temperature=0.8):
    _, _, adv, mask, ref, sampling, seg, cu = _tokens(seed)
    hidden, weight, bias, targets = _head(seed)
    kw = {"ref_logp": ref, "segment_ids": seg, "sampling_logp": sampling}
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    lp = reference.fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature).logp
    want, want_m = reference.policy_loss(lp, lp.detach(), adv, mask, cu, o, **kw)
    want.backward()
    mine = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fused_linear_policy_loss(mine[0], mine[1], targets, adv, mask, cu, o, bias=mine[2], chunk_tokens=chunk,
                                   temperature=temperature, **kw)
    out.loss.backward()
    _close(out.loss.detach(), want.detach(), f"loss {o}")
    _close(out.logp, lp.detach(), "logp")
    for x, y, name in zip(mine, leaves, ("hidden", "weight", "bias")):
        _close(x.grad, y.grad, f"grad {name} {o}")
    assert set(out.metrics) == set(want_m)
    for k in want_m:
        _close(out.metrics[k], want_m[k], f"{k} {o}")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_objectives(backend, case, level):
    _check_fused(_kw(case, level))  # with KL: chunk plan (token level) or two passes
    _check_fused(_kw(case, level, beta=0.0), seed=1, chunk=3)  # upfront plan


@pytest.mark.parametrize("mode", ["token_mask", "token_truncate", "sequence_truncate", "instance_mask"])
def test_fused_rollout_correction_and_off_policy_mask(backend, mode):
    for case in ("clip", "cispo"):
        _check_fused(_kw(case, "instance", importance_sampling_mode=mode, importance_sampling_clip_min=0.8,
                         importance_sampling_clip_max=1.3, off_policy_mask_threshold=0.05))
        # token weights alone (and the KL) at the token level: the one-pass chunk plan, chunk 4 of 19 tokens
        _check_fused(_kw(case, "token", importance_sampling_mode=mode, importance_sampling_clip_min=0.8,
                         importance_sampling_clip_max=1.3), seed=2)
    if mode.startswith("token"):
        _check_fused(_kw("vespo", "token", beta=0.0, importance_sampling_mode=mode, importance_sampling_clip_max=1.3))


def test_fused_plans():
    o = Objective
    assert _plan(o(importance_sampling_level="instance"), has_ref=False) == "upfront"
    assert _plan(o(), has_ref=True) == "chunk"
    assert _plan(o(importance_sampling_level="sequence"), has_ref=True) == "two_pass"
    assert _plan(o(importance_sampling_mode="token_mask"), has_ref=False) == "chunk"
    assert _plan(o(importance_sampling_mode="sequence_mask"), has_ref=False) == "two_pass"
    assert _plan(o(off_policy_mask_threshold=0.1), has_ref=False) == "two_pass"
    assert _plan(o(entropy_coef=0.01), has_ref=False) == "upfront"  # the bonus's tokens are the loss tokens
    assert _plan(o(top_entropy_quantile=0.5), has_ref=False) == "two_pass"  # the mask needs every entropy


def test_fused_two_pass_runs_the_head_twice(monkeypatch):
    """The two-pass plan computes log-probs once without gradients, then once with (4 head GEMMs per chunk
    instead of 3); the upfront plan runs one pass."""
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")
    from bcr_kernels import _fused_linear_policy_loss as mod

    calls = []
    real = mod._torch_pass
    monkeypatch.setattr(mod, "_torch_pass", lambda *a: calls.append(a[4].needs) or real(*a))
    _check_fused(_kw("clip", "sequence"))
    assert calls == [(False, False, False), (True, True, True)]
    calls.clear()
    _check_fused(_kw("clip", "sequence", beta=0.0))
    assert calls == [(True, True, True)]


# ------------------------------------------------------------------------------------------------
# the semantics themselves, on hand-sized cases
# ------------------------------------------------------------------------------------------------


def test_instance_ratio_by_hand():
    """One sequence [shared, p0, p0, p1, shared]: p0's tokens share exp(mean lr of p0), p1's its own,
    shared tokens the whole sequence's."""
    lr = torch.tensor([0.1, 0.2, 0.4, -0.3, 0.5])
    old = torch.zeros(5)
    seg = torch.tensor([-1, 0, 0, 1, -1])
    adv = torch.ones(5)
    cu = _cu([5])
    o = Objective(kind="sapo", importance_sampling_level="instance")
    out = reference.policy_loss(lr, old, adv, torch.ones(5), cu, o, segment_ids=seg)
    r_seq, r0, r1 = math.exp(0.18), math.exp(0.3), math.exp(-0.3)
    want = sum(-torch.sigmoid(torch.tensor(r - 1.0)) * 4 for r in (r_seq, r0, r0, r1, r_seq)) / 5
    _close(out.loss, want)
    _close(out.metrics["ratio_mean"], torch.tensor((2 * r_seq + 2 * r0 + r1) / 5))
    fast = bcr_kernels.policy_loss(lr, old, adv, torch.ones(5), cu, o, segment_ids=seg)
    _close(fast.loss, want)


def test_instance_level_equals_sequence_level_without_problem_segments(backend):
    logp, old, adv, mask, ref, _, seg, cu = _tokens(4)
    shared = torch.full_like(seg, -1)
    for case in ("clip", "sapo", "vespo"):
        a = bcr_kernels.policy_loss(logp, old, adv, mask, cu, _kw(case, "instance"), ref_logp=ref,
                                    segment_ids=shared).loss
        b = bcr_kernels.policy_loss(logp, old, adv, mask, cu, _kw(case, "sequence"), ref_logp=ref).loss
        _close(a, b)
    # and it differs from it when there are segments (the test can fail)
    a = bcr_kernels.policy_loss(logp, old, adv, mask, cu, _kw("clip", "instance"), segment_ids=seg).loss
    assert not torch.allclose(a, bcr_kernels.policy_loss(logp, old, adv, mask, cu, _kw("clip", "sequence")).loss)


def test_on_policy_rollout_correction_is_identity(backend):
    """Sampling log-probs equal to the trainer's: every mode's weights are 1, the loss is unchanged."""
    logp, old, adv, mask, _, _, seg, cu = _tokens(5)
    base = bcr_kernels.policy_loss(logp, old, adv, mask, cu, segment_ids=seg).loss
    for mode in IS_MODES:
        o = Objective(importance_sampling_mode=mode, importance_sampling_clip_min=0.5)
        got = bcr_kernels.policy_loss(logp, old, adv, mask, cu, o, segment_ids=seg, sampling_logp=old.clone()).loss
        _close(got, base, mode)


def test_instance_level_needs_segment_ids():
    logp, old, adv, mask, _, _, seg, cu = _tokens()
    with pytest.raises(ValueError, match="segment_ids"):
        bcr_kernels.policy_loss(logp, old, adv, mask, cu, Objective(importance_sampling_level="instance"))
