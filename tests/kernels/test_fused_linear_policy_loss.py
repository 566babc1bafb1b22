"""fused_linear_policy_loss against the reference composition, values, metrics and gradients:

    logp = reference.fused_linear_logprobs(hidden, weight, targets, bias=..., temperature=...).logp
    loss, metrics = reference.policy_loss(logp, logp.detach(), advantages, mask, cu_seqlens, Objective(...))

Every test runs on the chunked PyTorch path (``BCR_KERNEL_BACKEND=torch``) and on the Triton path
(``auto`` dispatch under ``TRITON_INTERPRET=1`` or on CUDA; skipped where dispatch would not pick it).
"""

from __future__ import annotations

import pytest
import torch

from bcr_kernels import FusedPolicyLossOutput, Objective, fused_linear_policy_loss, reference
from bcr_kernels import _token_logprobs as tlp_mod
from kernel_checks import GemmRecorder, LaunchRecorder, with_objective

IGN = -100
REDUCTIONS = reference.REDUCTIONS


def _make(lengths, H=16, V=40, *, bias=False, seed=0, mask_p=0.8, ignore=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    for i in ignore:
        targets[i] = IGN
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) < mask_p).float()
    ref = torch.randn(T, generator=g) * 0.3 - 3.0
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return leaves, targets, adv, mask, ref, cu


def _grads(leaves):
    out = [None if t is None or t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        if t is not None:
            t.grad = None
    return out


def _reference(leaves, targets, adv, mask, cu, *, ref=None, beta=0.0, temperature=1.0, upstream=1.0, **kw):
    hidden, weight, bias = leaves
    logp, ent = reference.fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                                return_entropy=True)
    loss, metrics = reference.policy_loss(logp, logp.detach(), adv, mask, cu,
                                          **with_objective({"ref_logp": ref, "beta": beta, **kw}))
    (loss * upstream).backward()
    return loss.detach(), metrics, logp.detach(), ent, _grads(leaves)


def _fused(leaves, targets, adv, mask, cu, *, ref=None, beta=0.0, temperature=1.0, upstream=1.0, chunk=None,
           **kw):
    hidden, weight, bias = leaves
    out = fused_linear_policy_loss(
        hidden, weight, targets, adv, mask, cu, bias=bias, temperature=temperature, chunk_tokens=chunk,
        return_entropy=True, **with_objective({"ref_logp": ref, "beta": beta, **kw}),
    )
    assert isinstance(out, FusedPolicyLossOutput)
    loss, metrics, logp, ent = out
    assert not logp.requires_grad and not ent.requires_grad
    (loss * upstream).backward()
    return loss.detach(), metrics, logp, ent, _grads(leaves)


def _check(got, want, atol=2e-5, rtol=1e-4):
    g_loss, g_met, g_lp, g_ent, g_grads = got
    w_loss, w_met, w_lp, w_ent, w_grads = want
    torch.testing.assert_close(g_loss, w_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_lp, w_lp, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_ent, w_ent, atol=atol, rtol=rtol)
    assert set(g_met) == set(w_met)
    for k in w_met:
        torch.testing.assert_close(g_met[k], w_met[k], atol=atol, rtol=rtol, msg=k)
    for gg, wg in zip(g_grads, w_grads):
        assert (gg is None) == (wg is None)
        if wg is not None:
            torch.testing.assert_close(gg, wg, atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_matches_reference(backend, reduction, beta):
    leaves, targets, adv, mask, ref, cu = _make([5, 1, 7, 4], bias=beta > 0, seed=1)
    kw = {"ref": ref, "beta": beta, "reduction": reduction}
    want = _reference(leaves, targets, adv, mask, cu, **kw)
    got = _fused(leaves, targets, adv, mask, cu, chunk=6, **kw)  # 17 tokens: chunks 6, 6, 5
    _check(got, want)
    assert got[1]["ratio_mean"] == 1.0 and got[1]["clip_ratio/region_mean"] == 0.0
    if beta > 0:
        assert got[1]["kl"] > 0


@pytest.mark.parametrize("chunk", [1, 3, 4, 12, 13, 100])
def test_chunk_boundaries_temperature_bias_normalizer(backend, chunk):
    # 12 tokens: chunk = 1, divisor, non-divisor, exactly T, T + 1, larger than T
    leaves, targets, adv, mask, ref, cu = _make([3, 9], bias=True, seed=2, ignore=(2, 11))
    kw = {"ref": ref, "beta": 0.05, "temperature": 0.7, "reduction": "seq_mean_token_sum_norm",
              "max_completion_length": 10, "epsilon": 0.2, "epsilon_high": 0.28}
    want = _reference(leaves, targets, adv, mask, cu, **kw, upstream=2.5)
    got = _fused(leaves, targets, adv, mask, cu, chunk=chunk, **kw, upstream=2.5)
    _check(got, want)
    want = _reference(leaves, targets, adv, mask, cu, normalizer=37.0, reduction="token_mean")
    got = _fused(leaves, targets, adv, mask, cu, chunk=chunk, normalizer=37.0, reduction="token_mean")
    _check(got, want)


def test_single_token_and_all_masked(backend):
    for lengths, mask_p in (([1], 1.0), ([4, 2], 0.0)):
        for reduction in REDUCTIONS:
            leaves, targets, adv, mask, ref, cu = _make(lengths, seed=3, mask_p=mask_p)
            kw = {"ref": ref, "beta": 0.2, "reduction": reduction}
            want = _reference(leaves, targets, adv, mask, cu, **kw)
            got = _fused(leaves, targets, adv, mask, cu, chunk=4, **kw)
            _check(got, want)
            if mask_p == 0.0:
                assert got[0] == 0.0 and all(g.abs().max() == 0 for g in got[4] if g is not None)


def test_default_chunk_and_no_entropy_and_frozen_weight(backend):
    leaves, targets, adv, mask, _ref, cu = _make([6, 6], seed=4)
    hidden, weight, _ = leaves
    weight.requires_grad_(False)
    want = _reference([hidden, weight, None], targets, adv, mask, cu)
    loss, _metrics, logp, entropy = fused_linear_policy_loss(hidden, weight, targets, adv, mask, cu)
    assert entropy is None  # the same four fields without return_entropy
    loss.backward()
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(logp, want[2])
    torch.testing.assert_close(hidden.grad, want[4][0], atol=2e-5, rtol=1e-4)
    assert weight.grad is None


def test_grads_scale_with_upstream_and_no_grad(backend):
    leaves, targets, adv, mask, _ref, cu = _make([8], seed=5, bias=True)
    a = _fused(leaves, targets, adv, mask, cu, upstream=1.0)
    b = _fused(leaves, targets, adv, mask, cu, upstream=-3.0)
    for ga, gb in zip(a[4], b[4]):
        torch.testing.assert_close(gb, -3.0 * ga)
    with torch.no_grad():
        loss, *_ = fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, mask, cu, bias=leaves[2])
    assert not loss.requires_grad
    torch.testing.assert_close(loss, a[0])


def test_bf16_close_to_fp32(backend):
    leaves, targets, adv, mask, ref, cu = _make([7, 5], seed=6, bias=True)
    want = _reference(leaves, targets, adv, mask, cu, ref=ref, beta=0.1)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves]
    loss, *_ = fused_linear_policy_loss(low[0], low[1], targets, adv, mask, cu, Objective(beta=0.1), bias=low[2],
                                        ref_logp=ref, chunk_tokens=5)
    loss.backward()
    assert low[1].grad.dtype == torch.bfloat16 and low[2].grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.detach(), want[0], atol=5e-2, rtol=5e-2)
    for t, wg in zip(low, want[4]):
        torch.testing.assert_close(t.grad.float(), wg, atol=5e-2, rtol=5e-2)


def test_empty_and_errors(backend):
    leaves, targets, adv, mask, _ref, cu = _make([0], seed=7, bias=True)
    loss, _metrics, logp, _ = fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, mask, cu, bias=leaves[2])
    loss.backward()
    assert float(loss.detach()) == 0.0 and logp.shape == (0,) and leaves[1].grad.abs().sum() == 0
    leaves, targets, adv, mask, _ref, cu = _make([4], seed=7)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, mask, cu, Objective(reduction="nope"))
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_policy_loss(leaves[0], leaves[1], targets, adv[:3], mask, cu)
    with pytest.raises(ValueError, match="epsilon"):
        fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, mask, cu, Objective(epsilon=-0.1))
    loss, *_ = fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, mask, cu)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_autocast_runs_the_head_gemms_in_bf16(backend):
    # fp32 leaves under CPU autocast: every head GEMM in bf16, values and gradients as the reference's
    # (whose F.linear autocast runs in bf16)
    leaves, targets, adv, mask, ref, cu = _make([7, 5, 9], H=32, V=200, seed=8, bias=True)
    kw = {"ref": ref, "beta": 0.1, "reduction": "seq_mean_token_mean"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _reference(leaves, targets, adv, mask, cu, **kw)
        with GemmRecorder() as rec:
            got = _fused(leaves, targets, adv, mask, cu, chunk=6, **kw)
    assert len(rec.gemms) >= 3 * 4, rec.gemms  # logits, grad_hidden, grad_weight for each of 4 chunks
    fp32 = [op for op in rec.gemms if torch.float32 in op[1:]]
    assert not fp32, f"GEMMs in fp32 under autocast: {fp32}"
    for gg in got[4]:
        assert gg.dtype == torch.float32
    _check(got, want, atol=3e-2, rtol=3e-2)


def test_launches_run_on_the_tensors_device(backend, monkeypatch):
    if backend != "triton":
        pytest.skip("only the Triton path launches kernels")
    rec = LaunchRecorder(monkeypatch, tlp_mod, ["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"])
    leaves, targets, adv, mask, _ref, cu = _make([5, 4], seed=9)
    _fused(leaves, targets, adv, mask, cu, chunk=4)
    rec.check(["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"])
