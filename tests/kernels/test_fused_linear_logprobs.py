"""fused_linear_logprobs against the materialising reference: values, entropy and gradients.

Every test runs twice: on the chunked PyTorch path (``BCR_KERNEL_BACKEND=torch``) and on the path
``auto`` dispatch picks (the Triton kernels under ``TRITON_INTERPRET=1``, as ``make test`` sets, or on
CUDA). The second is skipped where dispatch would not pick Triton.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bcr_kernels
from bcr_kernels import (
    DEFAULT_CHUNK_BYTES,
    LogprobsOutput,
    _common,
    default_chunk_tokens,
    fused_linear_logprobs,
    reference,
)
from bcr_kernels import _fused_linear_logprobs as flp_mod
from kernel_checks import GemmRecorder

IGN = -100


def _make(T, H, V, *, dtype=torch.float32, bias=False, ignore=(), seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (T,) if lead is None else lead
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, shape, generator=g)
    flat = targets.view(-1)
    for i in ignore:
        flat[i] = IGN
    upstream = torch.randn(shape, generator=g)  # arbitrary per-token upstream gradient
    cast = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return cast[0], cast[1], cast[2], targets, upstream


def _run(fn, hidden, weight, bias, targets, upstream, upstream_entropy=None, **kw):
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(hidden, weight, targets, bias=bias, **kw)
    assert isinstance(out, LogprobsOutput)
    loss = (out.logp * upstream).sum()
    if upstream_entropy is not None:  # an entropy bonus: its gradient goes through the head too
        loss = loss + (out.entropy * upstream_entropy).sum()
    if leaves:
        loss.backward()
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in (hidden, weight, bias)]
    for t in leaves:
        t.grad = None
    return out, grads


def _check(hidden, weight, bias, targets, upstream, *, atol=2e-5, rtol=2e-5, gatol=None, **kw):
    got, got_g = _run(fused_linear_logprobs, hidden, weight, bias, targets, upstream, **kw)
    kw.pop("chunk_tokens", None)
    want, want_g = _run(reference.fused_linear_logprobs, hidden, weight, bias, targets, upstream, **kw)
    assert (got.entropy is None) == (want.entropy is None) == (not kw.get("return_entropy", False))
    for a, b in zip(got, want):
        if a is not None:
            assert a.dtype == torch.float32 and a.shape == targets.shape
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, want_g):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a.float(), b.float(), atol=gatol or atol, rtol=rtol, msg=name)
    return got, got_g


# ------------------------------------------------------------------------------------------------
# values and gradients against the reference


@pytest.mark.parametrize(
    "T,H,V,chunk",
    [
        (1, 32, 1000, None),  # single token
        (37, 24, 1000, 8),  # T not a multiple of chunk_tokens
        (9, 16, 300, 1),  # chunk_tokens=1
        (20, 16, 1000, 64),  # chunk larger than T
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_fp32(backend, T, H, V, chunk, bias):
    h, w, b, t, g = _make(T, H, V, bias=bias, seed=T + V)
    _check(h, w, b, t, g, chunk_tokens=chunk)


def test_large_vocab_small_T(backend):
    h, w, b, t, g = _make(5, 16, 50257, bias=True, ignore=(2,), seed=3)
    _check(h, w, b, t, g, chunk_tokens=2, temperature=0.9, return_entropy=True)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature_ignored_and_entropy(backend, temperature):
    h, w, b, t, g = _make(30, 16, 777, bias=True, ignore=(0, 7, 8, 29), seed=1)
    (logp, ent), grads = _check(
        h, w, b, t, g, chunk_tokens=7, temperature=temperature, return_entropy=True
    )
    ignored = t == IGN
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(grads[0][ignored] == 0)  # ignored tokens send no gradient to their hidden
    assert ent.requires_grad


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_entropy_gradient(backend, chunk):
    """An upstream gradient on the entropies as well as on the log-probs (bias, temperature, ignored
    targets): the head's gradients match the reference's autograd; the entropy term is a real share."""
    h, w, b, t, g = _make(30, 16, 777, bias=True, ignore=(0, 7, 29), seed=2)
    u = torch.randn(30, generator=torch.Generator().manual_seed(3))
    _, with_entropy = _check(h, w, b, t, g, upstream_entropy=u, chunk_tokens=chunk, temperature=0.7,
                             return_entropy=True)
    _, without = _check(h, w, b, t, g, chunk_tokens=chunk, temperature=0.7, return_entropy=True)
    assert (with_entropy[1] - without[1]).norm() > 0.1 * without[1].norm()


def test_all_targets_ignored(backend):
    h, w, b, t, g = _make(12, 16, 500, bias=True, ignore=range(12), seed=2)
    (logp, _), grads = _check(h, w, b, t, g, chunk_tokens=5)
    assert torch.all(logp == 0)
    for gr in grads:
        assert torch.all(gr == 0)


def test_sum_loss_and_custom_ignore_index(backend):
    h, w, _, t, _ = _make(16, 16, 400, seed=4)
    t[3] = 7  # ignore_index 7 (also a real vocab id elsewhere would be ignored)
    ones = torch.ones(16)
    _check(h, w, None, t, ones, chunk_tokens=6, ignore_index=7)


def test_leading_dims(backend):
    """[B, S, H] hidden with [B, S] targets (an extension: the reference takes [T, H]; compare flattened)."""
    h, w, b, t, g = _make(0, 16, 300, bias=True, seed=5, lead=(3, 7))
    got, got_g = _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=4)
    assert got.logp.shape == (3, 7)
    want, want_g = _run(
        lambda h2, w2, t2, bias: reference.fused_linear_logprobs(h2.reshape(21, 16), w2, t2.reshape(21), bias=bias),
        h, w, b, t, g.reshape(21),
    )
    torch.testing.assert_close(got.logp.reshape(21), want.logp, atol=2e-5, rtol=2e-5)
    for a, c in zip(got_g, want_g):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_partial_requires_grad(backend, which):
    h, w, b, t, g = _make(10, 16, 300, bias=True, seed=6)
    for name, x in (("hidden", h), ("weight", w), ("bias", b)):
        x.requires_grad_(name == which)
    _, grads = _check(h, w, b, t, g, chunk_tokens=3)
    assert [x is not None for x in grads] == [n == which for n in ("hidden", "weight", "bias")]


def test_tied_weight_accumulates(backend):
    """The LM head shares its weight with the embedding: gradients from both uses add up."""
    g_ = torch.Generator().manual_seed(7)
    V, H, T = 300, 16, 11
    weight = (torch.randn(V, H, generator=g_) * 0.3).requires_grad_()
    ids = torch.randint(0, V, (T,), generator=g_)
    targets = torch.randint(0, V, (T,), generator=g_)
    up = torch.randn(T, generator=g_)

    def loss(fn):
        hidden = torch.nn.functional.embedding(ids, weight) * 1.5
        return (fn(hidden, weight, targets).logp * up).sum()

    (gw,) = torch.autograd.grad(loss(lambda h, w, t: fused_linear_logprobs(h, w, t, chunk_tokens=4)), [weight])
    (rw,) = torch.autograd.grad(loss(reference.fused_linear_logprobs), [weight])
    torch.testing.assert_close(gw, rw, atol=2e-5, rtol=2e-5)


def test_no_grad_forward(backend):
    h, w, b, t, _ = _make(13, 16, 300, bias=True, seed=8)
    with torch.no_grad():
        got = fused_linear_logprobs(h, w, t, bias=b, chunk_tokens=5).logp
        want = reference.fused_linear_logprobs(h, w, t, bias=b).logp
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    h, w, b, t, g = _make(19, 32, 1000, dtype=dtype, bias=True, ignore=(4,), seed=9)
    # Logits are rounded to the input dtype in both; log-softmax runs in fp32 in both.
    (logp, _ent), grads = _check(
        h, w, b, t, g, chunk_tokens=6, temperature=0.8, return_entropy=True, atol=2e-2, rtol=2e-2, gatol=6e-2
    )
    for gr in grads:
        assert gr.dtype == dtype and torch.isfinite(gr.float()).all()
    # and both are close to the fp32 answer on the same (rounded) inputs
    ref32 = reference.fused_linear_logprobs(h.float(), w.float(), t, bias=b.float(), temperature=0.8).logp
    torch.testing.assert_close(logp, ref32, atol=0.15, rtol=0.05)


# ------------------------------------------------------------------------------------------------
# memory: no [T, V] logits, and (torch path, fp32) one chunk buffer per pass


class _AllocTracker(TorchDispatchMode):
    """Records every op output that is a fresh allocation (storage not shared with an input)."""

    def __init__(self):
        super().__init__()
        self.fresh = []  # (op name, numel)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = set()
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                ins.add(a.untyped_storage().data_ptr())
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins:
                self.fresh.append((str(func), o.untyped_storage().nbytes() // o.element_size()))
        return out


@pytest.mark.parametrize("bias", [False, True])
def test_never_materialises_full_logits(backend, bias):
    T, H, V, chunk = 100, 16, 1000, 32  # chunk * V = 32000 > V * H = 16000, T * V = 100000
    h, w, b, t, g = _make(T, H, V, bias=bias, seed=10)
    with _AllocTracker() as tr:
        _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=chunk)
    assert max(n for _, n in tr.fresh) <= chunk * V
    big = [op for op, n in tr.fresh if n > V * H]  # bigger than grad_weight
    if backend == "torch":
        # fp32: the chunk's logits buffer is the only big temporary, once in forward, once in backward.
        assert len(big) == 2, big


# ------------------------------------------------------------------------------------------------
# mixed precision: the head's GEMMs under autocast, and the fp32 grad_weight accumulation

@pytest.mark.parametrize("bias", [False, True])
def test_autocast_runs_the_head_gemms_in_bf16(backend, bias):
    # fp32 weights and fp32 hidden states under autocast, as the trainer's default GPU path has them
    h, w, b, t, g = _make(23, 32, 300, bias=bias, ignore=(3,), seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with GemmRecorder() as rec:
            got, got_g = _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=5, return_entropy=True)
        want, want_g = _run(reference.fused_linear_logprobs, h, w, b, t, g, return_entropy=True)
    n_chunks = 5
    # forward: one logits GEMM per chunk; backward: logits again, grad_hidden and grad_weight per chunk
    assert len(rec.gemms) >= 4 * n_chunks, rec.gemms
    fp32 = [op for op in rec.gemms if torch.float32 in op[1:]]
    assert not fp32, f"GEMMs in fp32 under autocast: {fp32}"
    torch.testing.assert_close(got.logp, want.logp, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.entropy, want.entropy, atol=2e-2, rtol=2e-2)
    for name, a, c in zip(("hidden", "weight", "bias"), got_g, want_g):
        if c is None:
            continue
        assert a.dtype == torch.float32, name  # the leaves are fp32: their gradients too
        torch.testing.assert_close(a, c, atol=3e-2, rtol=3e-2, msg=name)


def test_without_autocast_fp32_stays_fp32(backend):
    h, w, b, t, g = _make(9, 16, 100, bias=True, seed=15)
    with GemmRecorder() as rec:
        _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=4)
    assert rec.gemms and all(op[1:] == (torch.float32, torch.float32) for op in rec.gemms)


def test_grad_weight_fallback_has_no_full_temporary_per_chunk(backend, monkeypatch):
    # torch without addmm(out_dtype=float32) for this device: the product is formed in blocks of V rows
    monkeypatch.setattr(_common, "fp32_out_addmm_supported", lambda device: False)
    T, H, V, chunk = 40, 32, 300, 4  # 10 chunks; chunk * V = 1200 < V * H = 9600
    h, w, b, t, g = _make(T, H, V, dtype=torch.bfloat16, bias=True, seed=16)
    with _AllocTracker() as tr:
        got, got_g = _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=chunk)
    full = [op for op, n in tr.fresh if n >= V * H and "clone" not in op]  # (clone: _run's copy of .grad)
    # the fp32 accumulator and its final cast to bf16, not one [V, H] product per chunk
    assert len(full) == 2, full
    # the same accumulation as one fp32 sum of the chunks' bf16 products
    want = _reference_bf16_grad_weight(h, w, b, t, g, chunk)
    torch.testing.assert_close(got_g[1].float(), want, atol=2e-2, rtol=1e-2)


def _reference_bf16_grad_weight(h, w, b, t, g, chunk):
    """sum over chunks of (dlogits_c.T @ hidden_c) in fp32, with dlogits_c from the reference in bf16."""
    hd, wd, bd = (x.detach().requires_grad_() for x in (h, w, b))
    logits = torch.nn.functional.linear(hd, wd, bd).detach().requires_grad_()
    (reference.token_logprobs(logits, t).logp * g).sum().backward()
    d = logits.grad
    acc = torch.zeros(w.shape, dtype=torch.float32)
    for c0 in range(0, h.shape[0], chunk):
        acc += (d[c0 : c0 + chunk].t() @ h.detach()[c0 : c0 + chunk]).float()
    return acc


class EmulatedFp32OutAddmm(TorchDispatchMode):
    """Runs ``aten.addmm.dtype_out`` (a CUDA kernel) on the CPU: fp32 products of bf16 operands."""

    def __init__(self, fail: Exception | None = None):
        super().__init__()
        self.calls = 0
        self.fail = fail

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.addmm.dtype_out:
            self.calls += 1
            if self.fail is not None:
                raise self.fail
            acc, m1, m2, out_dtype = args
            assert out_dtype == torch.float32 and m1.dtype == m2.dtype == torch.bfloat16
            assert kwargs["out"] is acc and acc.dtype == torch.float32
            acc.add_(m1.float() @ m2.float())
            return acc
        return func(*args, **kwargs)


def test_grad_weight_fp32_out_addmm_branch(backend, monkeypatch):
    if not _common.FP32_OUT_ADDMM:
        pytest.skip("this torch has no addmm(out_dtype=...)")
    monkeypatch.setattr(_common, "fp32_out_addmm_supported", lambda device: True)
    T, H, V, chunk = 40, 32, 300, 4
    h, w, b, t, g = _make(T, H, V, dtype=torch.bfloat16, bias=True, seed=16)
    with EmulatedFp32OutAddmm() as emu:
        got, got_g = _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=chunk)
    assert emu.calls == T // chunk  # one fused GEMM per chunk
    want, want_g = _run(reference.fused_linear_logprobs, h, w, b, t, g)
    torch.testing.assert_close(got_g[1].float(), want_g[1].float(), atol=2e-2, rtol=1e-2)


def test_grad_weight_errors_are_not_swallowed(backend, monkeypatch):
    # an error inside the chosen GEMM (e.g. a CUDA fault) surfaces instead of switching branches
    if not _common.FP32_OUT_ADDMM:
        pytest.skip("this torch has no addmm(out_dtype=...)")
    monkeypatch.setattr(_common, "fp32_out_addmm_supported", lambda device: True)
    h, w, b, t, g = _make(8, 16, 50, dtype=torch.bfloat16, seed=17)
    with EmulatedFp32OutAddmm(fail=RuntimeError("CUDA error: an illegal memory access was encountered")):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            _run(fused_linear_logprobs, h, w, b, t, g, chunk_tokens=4)


def test_fp32_out_addmm_is_decided_by_the_schema():
    assert _common.FP32_OUT_ADDMM == ("dtype_out" in torch.ops.aten.addmm.overloads())
    assert not _common.fp32_out_addmm_supported(torch.device("cpu"))  # no CPU kernel in any torch yet
    assert _common.fp32_out_addmm_supported(torch.device("cuda")) == _common.FP32_OUT_ADDMM


def test_torch_path_does_not_call_reference(monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")

    def boom(*a, **k):
        raise AssertionError("the chunked path must not fall back to the materialising reference")

    monkeypatch.setattr(reference, "fused_linear_logprobs", boom)
    monkeypatch.setattr(reference, "token_logprobs", boom)
    h, w, b, t, g = _make(8, 16, 200, bias=True, seed=11)
    logp = fused_linear_logprobs(h, w, t, bias=b, chunk_tokens=3).logp
    (logp * g).sum().backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None


def test_default_chunk_tokens():
    V = 151936
    rows = DEFAULT_CHUNK_BYTES // (4 * V)
    assert default_chunk_tokens(1, V) == 1
    assert default_chunk_tokens(rows, V) == rows
    for T in (rows + 1, 2048, 4096, 16384, 100_003):
        c = default_chunk_tokens(T, V)
        assert 1 <= c <= rows
        n = -(-T // c)
        assert n == -(-T // rows)  # as few chunks as the budget allows, evened out
        assert T - (n - 1) * c >= c - n  # the last chunk is not a runt
    assert default_chunk_tokens(10, 10**12) == 1


def test_bad_inputs():
    h, w, b, t, _ = _make(4, 16, 50, bias=True)
    with pytest.raises(ValueError, match="share H"):
        fused_linear_logprobs(h[:, :8], w, t)
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_logprobs(h.double(), w, t)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_logprobs(h, w, t, chunk_tokens=0)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(h, w, t, bias=b[:10])


def test_public_export():
    assert bcr_kernels.fused_linear_logprobs is flp_mod.fused_linear_logprobs


# ------------------------------------------------------------------------------------------------
# CUDA and Liger (only where available)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_reference():
    h, w, b, t, g = _make(300, 64, 5000, dtype=torch.bfloat16, bias=True, ignore=(5, 6), seed=12)
    h, w, b = (x.detach().cuda().requires_grad_() for x in (h, w, b))
    t, g = t.cuda(), g.cuda()
    _check(h, w, b, t, g, chunk_tokens=64, temperature=0.9, atol=2e-2, rtol=2e-2, gatol=6e-2)


@pytest.mark.gpu
def test_matches_liger_fused_linear_cross_entropy():
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger_kernel not installed")
    if not torch.cuda.is_available():
        pytest.skip("Liger's fused linear cross-entropy needs CUDA")
    h, w, _, t, _ = _make(257, 64, 3000, ignore=(3, 100), seed=13)
    h, w = (x.detach().cuda().requires_grad_() for x in (h, w))
    t = t.cuda()
    ours = -fused_linear_logprobs(h, w, t, chunk_tokens=64).logp.sum() / (t != IGN).sum()
    gh, gw = torch.autograd.grad(ours, [h, w])
    theirs = liger.LigerFusedLinearCrossEntropyLoss(ignore_index=IGN)(w, h, t)
    lh, lw = torch.autograd.grad(theirs, [h, w])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gh, lh, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gw, lw, atol=1e-4, rtol=1e-3)
