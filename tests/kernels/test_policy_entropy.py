"""The entropy terms of the policy loss (TRL 1.16's ``top_entropy_quantile`` and entropy bonus):
the oracle by hand, ``policy_loss`` against it (values, d/d logp, d/d entropy, metrics), and
``fused_linear_policy_loss``, which computes the entropies per chunk, against the oracle on
materialised logits (``reference.fused_linear_logprobs``, whose entropy is differentiable) (values and the head's gradients, on the chunked PyTorch path and the
Triton-interpreted one), at awkward layouts (an empty and a one-token sequence, masked and ignored
tokens, tokens outside every sequence, chunks that do not divide T)."""

from __future__ import annotations

import pytest
import torch

import bcr_kernels
from bcr_kernels import Objective, fused_linear_policy_loss, reference
from bcr_kernels._token_logprobs import logprobs_bwd_inplace, logprobs_fwd

LENGTHS = [5, 0, 1, 9, 4]
SEGMENTS = [[-1, 0, 0, 1, 1], [], [0], [-1, 0, 0, 0, -1, 1, 3, 3, -1], [-1, -1, -1, -1]]
T_OUT = 2  # tokens after the last sequence (in no sequence)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _close(a, b, msg=""):
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, atol=2e-6 * max(scale, 1.0), rtol=2e-5, msg=msg)


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS) + T_OUT
    old = -torch.rand(T, generator=g) * 4
    logp = old + 0.4 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) < 0.8).float()
    mask[-T_OUT:] = 0.0  # (with mask 1 there the ops and the oracle differ: see the test at the end)
    ref = old + 0.3 * torch.randn(T, generator=g)
    entropy = torch.rand(T, generator=g) * 3
    seg = torch.tensor([s for row in SEGMENTS for s in row] + [-1] * T_OUT, dtype=torch.long)
    return logp, old, adv, mask, ref, entropy, seg, _cu(LENGTHS)


# ------------------------------------------------------------------------------------------------
# the semantics, by hand
# ------------------------------------------------------------------------------------------------


def test_oracle_by_hand():
    """One sequence of 5 loss tokens (+1 masked): rho = 0.5 keeps entropies >= their median (linear
    interpolation: 0.9 - 0.3 = 0.6 of the way from 1.0 to 2.0 is not it; the median of 5 is the 3rd),
    zeroes the objective of the others, and the bonus is -coef * mean entropy of the kept tokens."""
    entropy = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1, 9.0], requires_grad=True)
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0])
    lp = torch.zeros(6)
    adv = torch.ones(6)
    cu = _cu([6])
    o = Objective(kind="sapo", top_entropy_quantile=0.5, entropy_coef=0.1)
    out = reference.policy_loss(lp, lp, adv, mask, cu, o, entropy=entropy, entropy_weight=2.0)
    kept = torch.tensor([0.0, 1, 1, 1, 0, 0])  # median of (0.5, 2, 1, 3, 0.1) is 1.0; the 9.0 is masked
    sapo_at_1 = -torch.sigmoid(torch.tensor(0.0)) * 4  # ratio 1, A = 1: every kept token's objective
    want = sapo_at_1 * kept.sum() / mask.sum() - 0.1 * 2.0 * (2.0 + 1.0 + 3.0) / 3
    _close(out.loss, want)
    out.loss.backward()
    _close(entropy.grad, -0.1 * 2.0 * kept / 3)
    _close(out.metrics["entropy/kept_fraction"], torch.tensor(3 / 5))
    _close(out.metrics["entropy/kept_mean"], torch.tensor(2.0))
    fast = bcr_kernels.policy_loss(lp, lp, adv, mask, cu, o, entropy=entropy.detach(), entropy_weight=2.0)
    _close(fast.loss, want)


def test_quantile_ends_and_off():
    """rho = 0 keeps only the highest-entropy token(s); rho = 1 keeps all (no mask, no metric without a bonus)."""
    logp, old, adv, mask, _, entropy, _, cu = _tokens()
    out = reference.policy_loss(logp, old, adv, mask, cu, Objective(top_entropy_quantile=0.0), entropy=entropy)
    _close(out.metrics["entropy/kept_mean"], (entropy * mask).max())
    _close(out.metrics["entropy/kept_fraction"], 1.0 / mask.sum())
    plain = reference.policy_loss(logp, old, adv, mask, cu).loss
    _close(reference.policy_loss(logp, old, adv, mask, cu, Objective(top_entropy_quantile=1.0), entropy=entropy).loss,
           plain)
    assert "entropy/kept_mean" not in bcr_kernels.policy_loss(logp, old, adv, mask, cu, entropy=entropy).metrics


def test_the_entropy_is_required():
    logp, old, adv, mask, *_, cu = _tokens()
    for o in (Objective(top_entropy_quantile=0.5), Objective(entropy_coef=0.01)):
        for op in (bcr_kernels.policy_loss, reference.policy_loss):
            with pytest.raises(ValueError, match="entropy="):
                op(logp, old, adv, mask, cu, o)


# ------------------------------------------------------------------------------------------------
# policy_loss against the oracle
# ------------------------------------------------------------------------------------------------

CASES = {
    "clip": {},
    "clip_kl": {"beta": 0.05},  # the KL term is not masked by the entropy mask
    "sapo_instance": {"kind": "sapo", "importance_sampling_level": "instance"},
    "vespo_seq_mean": {"kind": "vespo", "reduction": "seq_mean_token_mean"},
    "cispo_is": {"kind": "cispo", "epsilon_high": 1.05, "importance_sampling_mode": "sequence_truncate"},
}
ENTROPY = [{"top_entropy_quantile": 0.3}, {"entropy_coef": 0.05}, {"top_entropy_quantile": 0.0, "entropy_coef": -0.02}]


@pytest.mark.parametrize("terms", ENTROPY, ids=["mask", "bonus", "both"])
@pytest.mark.parametrize("case", list(CASES))
def test_policy_loss_matches_the_oracle(backend, case, terms):
    logp, old, adv, mask, ref, entropy, seg, cu = _tokens(1)
    o = Objective(**CASES[case], **terms)
    kw = {"ref_logp": ref, "segment_ids": seg, "sampling_logp": old + 0.1, "entropy_weight": 0.7}
    leaves = []
    for op in (reference.policy_loss, bcr_kernels.policy_loss):
        lp, h = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
        out = op(lp, old, adv, mask, cu, o, entropy=h, **kw)
        out.loss.backward()
        leaves.append((out, lp.grad, h.grad))
    (want, want_lp, want_h), (got, got_lp, got_h) = leaves
    _close(got.loss, want.loss, f"{case} {terms}")
    _close(got_lp, want_lp, "d/d logp")
    assert (got_h is None) == (want_h is None) == (o.entropy_coef == 0.0)
    if want_h is not None:
        _close(got_h, want_h, "d/d entropy")
    assert set(got.metrics) == set(want.metrics)
    for k in want.metrics:
        _close(got.metrics[k], want.metrics[k], k)


def test_the_entropy_mask_changes_the_loss():
    """(The test above can fail: the mask zeroes a real share of the objective.)"""
    logp, old, adv, mask, _, entropy, _, cu = _tokens(2)
    masked = bcr_kernels.policy_loss(logp, old, adv, mask, cu, Objective(top_entropy_quantile=0.3), entropy=entropy)
    assert 0.2 < float(masked.metrics["entropy/kept_fraction"]) < 0.5
    assert not torch.allclose(masked.loss, bcr_kernels.policy_loss(logp, old, adv, mask, cu).loss)


# ------------------------------------------------------------------------------------------------
# fused_linear_policy_loss: entropies per chunk
# ------------------------------------------------------------------------------------------------


def _head(seed=0, H=8, V=37):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS) + T_OUT
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(V, generator=g) * 0.3
    targets = torch.randint(0, V, (T,), generator=g)
    targets[3] = -100  # an ignored target inside a sequence
    return hidden, weight, bias, targets


def _check_fused(o, seed=0, chunk=4, temperature=0.8, weight=0.6):
    _, _, adv, mask, ref, _, seg, cu = _tokens(seed)
    hidden, w, b, targets = _head(seed)
    kw = {"ref_logp": ref, "segment_ids": seg, "sampling_logp": None, "entropy_weight": weight}
    leaves = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    lp, ent = reference.fused_linear_logprobs(*leaves[:2], targets, bias=leaves[2], temperature=temperature,
                                              return_entropy=True)
    want = reference.policy_loss(lp, lp.detach(), adv, mask, cu, o, entropy=ent, **kw)
    want.loss.backward()
    mine = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    got = fused_linear_policy_loss(mine[0], mine[1], targets, adv, mask, cu, o, bias=mine[2], chunk_tokens=chunk,
                                   temperature=temperature, return_entropy=True, **kw)
    got.loss.backward()
    _close(got.loss.detach(), want.loss.detach(), f"loss {o}")
    _close(got.entropy, ent.detach(), "entropy")
    for x, y, name in zip(mine, leaves, ("hidden", "weight", "bias")):
        _close(x.grad, y.grad, f"grad {name} {o}")
    assert set(got.metrics) == set(want.metrics)
    for k in want.metrics:
        _close(got.metrics[k], want.metrics[k], f"{k} {o}")
    with torch.no_grad():  # without gradients: one pass, the same loss
        again = fused_linear_policy_loss(hidden, w, targets, adv, mask, cu, o, bias=b, chunk_tokens=chunk,
                                         temperature=temperature, **kw)
    _close(again.loss, want.loss.detach(), "no_grad")


@pytest.mark.parametrize("terms", ENTROPY, ids=["mask", "bonus", "both"])
@pytest.mark.parametrize("case", ["clip", "clip_kl", "sapo_instance", "vespo_seq_mean"])
def test_fused_matches_the_oracle(backend, case, terms):
    _check_fused(Objective(**CASES[case], **terms))


@pytest.mark.parametrize("chunk", [1, 3, 19, 100])
def test_fused_chunks_temperature_and_the_bonus_alone(backend, chunk):
    """The bonus alone (upfront plan) and with the KL term (chunk plan), at chunk sizes around T = 21."""
    _check_fused(Objective(entropy_coef=0.3), seed=3, chunk=chunk, temperature=1.3)
    _check_fused(Objective(entropy_coef=0.3, beta=0.1), seed=4, chunk=chunk, temperature=0.5, weight=1.0)


def test_fused_bonus_moves_the_head(backend):
    """(The fused checks can fail: the bonus's gradient is a real share of the head's.)"""
    _, _, adv, mask, _, _, _, cu = _tokens(5)
    hidden, w, b, targets = _head(5)
    grads = []
    for coef in (0.0, 0.3):
        leaf = w.clone().requires_grad_(True)
        fused_linear_policy_loss(hidden, leaf, targets, adv, mask, cu, Objective(entropy_coef=coef)).loss.backward()
        grads.append(leaf.grad)
    assert (grads[1] - grads[0]).norm() > 0.05 * grads[0].norm()


def test_loss_tokens_outside_every_sequence_are_not_entropy_tokens(backend):
    """Masked-in tokens after ``cu_seqlens[-1]`` take part in neither the quantile nor the bonus, in the
    ops as in the oracle. (The rest of the loss differs there, before this change too: the ops count
    such tokens in ``token_mean`` and in the metrics, the oracle does not; the trainer never has any.)"""
    logp, old, adv, mask, _, entropy, _, cu = _tokens(7)
    mask[-T_OUT:] = 1.0
    entropy[-T_OUT:] = 50.0  # would be the top entropies
    o = Objective(top_entropy_quantile=0.5, entropy_coef=0.1)
    grads = []
    for op in (reference.policy_loss, bcr_kernels.policy_loss):
        h = entropy.clone().requires_grad_(True)
        out = op(logp, old, adv, mask, cu, o, entropy=h)
        out.loss.backward()
        grads.append(h.grad)
        assert float(out.metrics["entropy/kept_mean"]) < 3.0
    _close(grads[1], grads[0])
    assert grads[1][-T_OUT:].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# the Triton backward's entropy gradient, alone
# ------------------------------------------------------------------------------------------------


def test_triton_backward_entropy_gradient(backend):
    if backend != "triton":
        pytest.skip("the Triton kernel itself")
    g = torch.Generator().manual_seed(6)
    T, V, temperature = 7, 50, 0.7
    logits = torch.randn(T, V, generator=g) * 3
    logits[2, :10] = float("-inf")  # probability 0: no 0 * inf
    targets = torch.randint(10, V, (T,), generator=g)
    targets[4] = -100
    g_lp, g_h = torch.randn(T, generator=g), torch.randn(T, generator=g)
    x = logits.clamp(min=-1e4).requires_grad_(True)  # autograd: exp(-1e4) is 0 too, without 0 * inf = NaN
    lp, ent = reference.token_logprobs(x, targets, temperature=temperature, return_entropy=True)
    ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
    buf = logits.clone()
    _, lse, h = logprobs_fwd(buf, targets, temperature, -100, True)
    logprobs_bwd_inplace(buf, targets, lse, g_lp, temperature, -100, grad_entropy=g_h, entropy=h)
    _close(buf, x.grad)
    assert torch.isfinite(buf).all() and buf[4].abs().sum() == 0 and buf[2, :10].abs().sum() == 0
