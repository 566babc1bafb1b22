"""varlen_attention against the per-sequence reference (the transformers backend: test_transformers_attention.py).

Values and q/k/v gradients against ``bcr_kernels.reference.varlen_attention`` (GQA and MHA, causal
and not, explicit softmax scale, fp32 and bf16, T=1, length-1 and empty sequences, the padded-group
and the no-padding layouts of the SDPA path); sliding windows against a masked-softmax oracle; the
dispatch (compute dtype under autocast, forced backends, fallbacks, OOM) and cu_seqlens validation
on every path.
"""

from __future__ import annotations

import pytest
import torch

import bcr_kernels._varlen_attention as va_module  # the private helpers under test
from bcr_kernels import reference
from bcr_kernels._varlen_attention import (
    choose_backend,
    compute_dtype,
    cu_seqlens_from_position_ids,
    last_dispatch,
    packed_model_kwargs,
    position_ids_from_cu_seqlens,
    varlen_attention,
)

CUDA = torch.cuda.is_available()


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _qkv(T, hq, hkv, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(T, hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(T, hkv, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(T, hkv, d, device=device).to(dtype).requires_grad_()
    return q, k, v


def _fwd_bwd(fn, q, k, v, cu, grad_out, **kw):
    out = fn(q, k, v, cu, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


LENGTHS = {
    "single_token": [1],
    "mixed_with_empty_and_ones": [5, 0, 1, 7, 3, 3, 0],
    "padded_groups": [100, 95, 3, 2, 1, 1],  # a padded long group and a padded short group
    "equal_lengths": [16, 16, 16],  # no-padding [S, H, L, D] layout
    "distinct_lengths": [300, 1, 200, 0],  # every group one sequence: sliced, no padding buffer
    "slices_and_pads": [3, 250, 400, 240, 2],  # sliced and padded groups, outputs re-ordered
    "one_long": [130],
    "leading_trailing_empty": [0, 0, 9, 0],
}


@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=["gqa", "mha"])
def test_matches_reference_fp32(lengths, causal, heads):
    hq, hkv = heads
    cu = _cu(lengths)
    T = int(cu[-1])
    q, k, v = _qkv(T, hq, hkv, 16)
    g = torch.randn(T, hq, 16)
    out, grads = _fwd_bwd(varlen_attention, q, k, v, cu, g, max_seqlen=max(lengths), causal=causal)
    ref, ref_grads = _fwd_bwd(reference.varlen_attention, q, k, v, cu, g, causal=causal)
    assert out.shape == (T, hq, 16) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_group_plan_covers_every_layout():
    """The LENGTHS cases above reach each layout of the SDPA path (guards the coverage of the tests)."""
    def kinds(lengths):
        groups, out_pos, in_tok, in_pos, _ = va_module._group_plan(tuple(_cu(lengths).tolist()),
                                                                  torch.device("cpu"))
        return [g[0] for g in groups], out_pos is None, in_pos is None, in_tok is None

    assert kinds(LENGTHS["equal_lengths"]) == (["pad"], True, True, True)  # views only, no copies
    assert kinds(LENGTHS["distinct_lengths"]) == (["slice", "slice", "slice"], True, True, True)
    assert kinds(LENGTHS["slices_and_pads"]) == (["slice", "pad", "pad"], False, False, False)
    assert kinds(LENGTHS["padded_groups"]) == (["pad"], False, False, True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_softmax_scale(causal):
    lengths = [9, 1, 30, 28]
    cu = _cu(lengths)
    q, k, v = _qkv(int(cu[-1]), 4, 1, 8)
    g = torch.randn_like(q)
    out, grads = _fwd_bwd(varlen_attention, q, k, v, cu, g, causal=causal, softmax_scale=0.9)
    ref, ref_grads = _fwd_bwd(reference.varlen_attention, q, k, v, cu, g, causal=causal, softmax_scale=0.9)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the scale matters (a test that ignores it would pass the default-scale comparison)
    default = varlen_attention(q, k, v, cu, causal=causal)
    assert (default - out).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_reference_bf16(causal):
    lengths = [40, 1, 0, 37, 5, 64]
    cu = _cu(lengths)
    T = int(cu[-1])
    q, k, v = _qkv(T, 4, 2, 32, dtype=torch.bfloat16)
    g = torch.randn(T, 4, 32).to(torch.bfloat16)
    out, grads = _fwd_bwd(varlen_attention, q, k, v, cu, g, causal=causal)
    assert out.dtype == torch.bfloat16
    # oracle: the reference in fp32 on the same (bf16-representable) inputs
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_grads = _fwd_bwd(reference.varlen_attention, q32, k32, v32, cu, g.float(), causal=causal)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)


def test_sequences_are_isolated():
    """Changing one sequence's tokens leaves every other sequence's outputs and causal prefixes unchanged."""
    lengths = [12, 1, 20, 7]
    cu = _cu(lengths)
    q, k, v = (t.detach() for t in _qkv(int(cu[-1]), 4, 2, 8))
    base = varlen_attention(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[13 + 10 :] += 3.0  # tail of sequence 2 (tokens 23..32) and all of sequence 3
    v2[13 + 10 :] -= 2.0
    out = varlen_attention(q, k2, v2, cu)
    torch.testing.assert_close(out[: 13 + 10], base[: 13 + 10], atol=0, rtol=0)
    assert (out[13 + 10 :] - base[13 + 10 :]).abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]], ids=["no_seq", "one_empty", "three_empty"])
def test_empty_pack(lengths):
    cu = _cu(lengths) if lengths else torch.zeros(1, dtype=torch.int32)
    q, k, v = _qkv(0, 4, 2, 8)
    out = varlen_attention(q, k, v, cu)
    assert out.shape == (0, 4, 8)
    out.sum().backward()  # the graph exists and gives (empty) gradients
    assert q.grad is not None and q.grad.shape == q.shape


def test_bad_inputs_raise():
    q, k, v = _qkv(6, 4, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, _cu([2, 3]))  # sums to 5, not 6
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k[:, :1].expand(6, 3, 8), v[:, :1].expand(6, 3, 8), _cu([6]))
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, _cu([6]), backend="nope")


def test_env_torch_backend(monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")
    cu = _cu([3, 4])
    q, k, v = (t.detach() for t in _qkv(7, 2, 1, 8))
    torch.testing.assert_close(varlen_attention(q, k, v, cu), reference.varlen_attention(q, k, v, cu))


def _fake_varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "torch 2.9's varlen_attn has no GQA"
    return reference.varlen_attention(query, key, value, cu_seq_q, max_q, causal=is_causal)


def _fake_varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    assert query.shape[1] == key.shape[1], "this varlen_attn has no GQA"
    assert tuple(window_size) in ((-1, -1), (-1, 0))
    return reference.varlen_attention(query, key, value, cu_seq_q, max_q, causal=tuple(window_size) == (-1, 0),
                                      softmax_scale=scale)


def _fake_varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa == (query.shape[1] != key.shape[1])
    return reference.varlen_attention(query, key, value, cu_seq_q, max_q, causal=tuple(window_size) == (-1, 0),
                                      softmax_scale=scale)


@pytest.mark.parametrize("fake", [_fake_varlen_2_9, _fake_varlen_2_11, _fake_varlen_2_13],
                         ids=["torch2.9", "torch2.11", "torch2.13"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_torch_varlen_signature_adapter(monkeypatch, fake, causal):
    """The call into torch.nn.attention.varlen adapts to each released signature (GQA, scale, causality)."""
    import inspect

    monkeypatch.setattr(va_module, "_torch_varlen_attn",
                        lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    lengths = [6, 1, 9]
    cu = _cu(lengths)
    q, k, v = _qkv(16, 4, 2, 8)
    g = torch.randn(16, 4, 8)
    out, grads = _fwd_bwd(va_module._run_torch_varlen, q, k, v, cu, g, max_seqlen=9, causal=causal, scale=0.7)
    ref, ref_grads = _fwd_bwd(reference.varlen_attention, q, k, v, cu, g, causal=causal, softmax_scale=0.7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- cu_seqlens / position_ids helpers


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6, 10]
    assert cu_seqlens_from_position_ids(pos).dtype == torch.int32
    assert cu_seqlens_from_position_ids(pos[0]).tolist() == [0, 3, 4, 6, 10]
    # every row starts a sequence; a jump that is not +1 starts one too
    rows = torch.tensor([[0, 1, 2, 3], [5, 6, 0, 1]])
    assert cu_seqlens_from_position_ids(rows).tolist() == [0, 4, 6, 8]
    assert cu_seqlens_from_position_ids(torch.zeros(1, 3, dtype=torch.long)).tolist() == [0, 1, 2, 3]


def test_position_ids_round_trip_and_kwargs():
    cu = _cu([4, 1, 6])
    pos = position_ids_from_cu_seqlens(cu)
    assert pos.tolist() == [[0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5]]
    assert cu_seqlens_from_position_ids(pos).tolist() == cu.tolist()
    kw = packed_model_kwargs(cu)
    assert kw["max_length_q"] == kw["max_length_k"] == 6
    assert kw["cu_seq_lens_q"].tolist() == cu.tolist() and kw["cu_seq_lens_q"].dtype == torch.int32


# ---------------------------------------------------------------- sliding window


def _windowed_oracle(q, k, v, cu, causal, window, scale=None):
    """Per sequence: explicit scores, a |query - key| < window band (and causality), softmax, values."""
    hq, hkv = q.shape[1], k.shape[1]
    out = []
    for s, e in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        scores = qs @ ks.transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        pos = torch.arange(e - s)
        dist = pos[:, None] - pos[None, :]
        keep = dist.abs() < window
        if causal:
            keep &= dist >= 0
        out.append((scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(0, hq, v.shape[-1])


WINDOW_LENGTHS = {
    "slices_and_pads": [3, 250, 400, 240, 2],  # long slices, a padded long group, a padded short group
    "padded_short": [10, 9, 2, 1, 0, 12],  # one padded group, sequences longer and shorter than the window
    "equal_lengths": [16, 16, 16],  # the one [S, L] batch layout, every sequence longer than the window
}


@pytest.mark.parametrize("lengths", list(WINDOW_LENGTHS.values()), ids=list(WINDOW_LENGTHS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("window", [1, 5, 64])
def test_sliding_window_matches_oracle(lengths, causal, window):
    cu = _cu(lengths)
    T = int(cu[-1])
    q, k, v = _qkv(T, 4, 2, 8)
    g = torch.randn(T, 4, 8)
    out, grads = _fwd_bwd(varlen_attention, q, k, v, cu, g, causal=causal, sliding_window=window, softmax_scale=0.4)
    ref, ref_grads = _fwd_bwd(_windowed_oracle, q, k, v, cu, g, causal=causal, window=window, scale=0.4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert torch.isfinite(a).all(), f"grad {name} has non-finite entries"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")
    # where a sequence is longer than the window it is in effect (the oracle comparison can fail)
    full = varlen_attention(q, k, v, cu, causal=causal, softmax_scale=0.4)
    assert ((full - out).abs().max() > 1e-3) == (window < max(lengths))


def test_sliding_window_longer_than_every_sequence_is_plain_attention():
    cu = _cu([7, 1, 5])
    q, k, v = (t.detach() for t in _qkv(13, 2, 1, 8))
    torch.testing.assert_close(varlen_attention(q, k, v, cu, sliding_window=7), varlen_attention(q, k, v, cu),
                               atol=0, rtol=0)
    assert last_dispatch().sliding_window is None  # recorded as what ran: no window
    varlen_attention(q, k, v, cu, sliding_window=6)
    assert last_dispatch().sliding_window == 6
    with pytest.raises(ValueError, match="sliding_window"):
        varlen_attention(q, k, v, cu, sliding_window=0)


# ---------------------------------------------------------------- dispatch: dtype, forced backends, fallbacks


def test_choose_backend_is_decided_on_the_compute_dtype():
    both = {"flash_attn", "torch_varlen"}
    assert choose_backend("cuda", torch.bfloat16, available=both) == ("flash_attn", "torch_varlen", "sdpa")
    assert choose_backend("cuda", torch.float16, available={"torch_varlen"}) == ("torch_varlen", "sdpa")
    assert choose_backend("cuda", torch.float32, available=both) == ("sdpa",)
    assert choose_backend("cpu", torch.bfloat16, available=both) == ("sdpa",)
    assert choose_backend("cuda", torch.bfloat16, "flash_attn", available=both) == ("flash_attn",)
    assert choose_backend("cuda", torch.bfloat16, "sdpa", available=both) == ("sdpa",)


def test_forced_backend_is_never_silently_ignored():
    with pytest.raises(ValueError, match="needs CUDA fp16/bf16"):
        choose_backend("cuda", torch.float32, "flash_attn", available={"flash_attn"})
    with pytest.raises(ValueError, match="needs CUDA fp16/bf16"):
        choose_backend("cpu", torch.bfloat16, "torch_varlen", available={"torch_varlen"})
    with pytest.raises(RuntimeError, match="not available: flash-attn is not installed"):
        choose_backend("cuda", torch.bfloat16, "flash_attn", available={"torch_varlen"})
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("cuda", torch.bfloat16, "nope")
    q, k, v = _qkv(6, 4, 2, 8)  # CPU fp32: the op refuses a forced CUDA kernel instead of running SDPA
    for backend in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match=backend):
            varlen_attention(q, k, v, _cu([6]), backend=backend)


def test_autocast_casts_to_the_autocast_dtype_and_records_it():
    """RoPE under autocast hands over fp32 q, k and a bf16 v: the op computes in bf16, as autocast would."""
    cu = _cu([9, 4])
    q, k = (torch.randn(13, 4, 8, requires_grad=True) for _ in range(2))
    v = torch.randn(13, 2, 8).to(torch.bfloat16).requires_grad_()
    k = k[:, :2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(q, k, v) == torch.bfloat16
        out = varlen_attention(q, k, v, cu)
    rec = last_dispatch()
    assert (rec.backend, rec.device_type, rec.dtype) == ("sdpa", "cpu", torch.bfloat16)
    assert rec.input_dtypes == (torch.float32, torch.float32, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # on CUDA the same dtype takes the fast kernels first
    assert choose_backend("cuda", rec.dtype, available={"flash_attn", "torch_varlen"})[0] == "flash_attn"
    ref = reference.varlen_attention(q.detach().bfloat16().float(), k.detach().bfloat16().float(), v.detach().float(), cu)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    # outside autocast, mixed dtypes compute in their common dtype
    assert compute_dtype(q, k, v) == torch.float32


def _fake_flash(calls, exc=None):
    def run(q, k, v, cu, max_seqlen, causal, scale, sliding_window=None):
        calls.append((cu.tolist(), max_seqlen))
        if exc is not None:
            raise exc
        return reference.varlen_attention(q, k, v, cu, causal=causal, softmax_scale=scale)
    return run


def _pretend_cuda(monkeypatch, run):
    """Route the CPU tensors down the CUDA candidate list, with ``run`` standing in for flash-attn."""
    monkeypatch.setattr(va_module, "choose_backend", lambda *a, **kw: ("flash_attn", "sdpa"))
    monkeypatch.setattr(va_module, "_run_flash_attn", run)


def test_fast_path_validates_cu_seqlens(monkeypatch):
    calls = []
    _pretend_cuda(monkeypatch, _fake_flash(calls))
    q, k, v = (t.detach() for t in _qkv(6, 4, 2, 8))
    for bad in (_cu([2, 3]), torch.tensor([0, 4, 2, 6], dtype=torch.int32), torch.tensor([1, 6], dtype=torch.int32)):
        with pytest.raises(ValueError, match="cu_seqlens"):
            varlen_attention(q, k, v, bad, max_seqlen=6)
    with pytest.raises(ValueError, match="max_seqlen=3 is shorter"):
        varlen_attention(q, k, v, _cu([2, 4]), max_seqlen=3)
    assert calls == []  # the kernel never saw a bad cu_seqlens
    out = varlen_attention(q, k, v, _cu([2, 4]), max_seqlen=4)
    assert calls == [([0, 2, 6], 4)] and last_dispatch().backend == "flash_attn"
    torch.testing.assert_close(out, reference.varlen_attention(q, k, v, _cu([2, 4])))


def test_validation_is_read_once_per_tensor_and_sees_in_place_edits():
    q, k, v = (t.detach() for t in _qkv(6, 4, 2, 8))
    cu = _cu([2, 4])
    varlen_attention(q, k, v, cu)
    assert va_module._validated.ref() is cu  # the next layer with this tensor reuses the checked copy
    cu[1] = 7  # in place: the version counter moves, the cached copy is not used
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, cu)


def test_fast_path_failure_falls_back_but_oom_is_reraised(monkeypatch):
    q, k, v = (t.detach() for t in _qkv(9, 4, 2, 8))
    cu = _cu([4, 5])
    _pretend_cuda(monkeypatch, _fake_flash([], RuntimeError("head dim 8 not supported")))
    with pytest.warns(RuntimeWarning, match="flash_attn failed"):
        out = varlen_attention(q, k, v, cu)
    assert last_dispatch().backend == "sdpa"
    torch.testing.assert_close(out, reference.varlen_attention(q, k, v, cu))
    _pretend_cuda(monkeypatch, _fake_flash([], torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        varlen_attention(q, k, v, cu)


# ---------------------------------------------------------------- CUDA kernels (flash-attn / torch varlen)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch_varlen", "sdpa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_backends_match_reference(backend, causal):
    lengths = [300, 1, 0, 77, 128, 5]
    cu = _cu(lengths, device="cuda")
    T = int(cu[-1])
    q, k, v = _qkv(T, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
    g = torch.randn(T, 8, 64, device="cuda").to(torch.bfloat16)
    out, grads = _fwd_bwd(varlen_attention, q, k, v, cu, g, max_seqlen=max(lengths), causal=causal,
                          softmax_scale=0.1, backend=backend)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_grads = _fwd_bwd(reference.varlen_attention, q32, k32, v32, cu, g.float(), causal=causal,
                              softmax_scale=0.1)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch_varlen", "sdpa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_sliding_window_matches_oracle(backend, causal):
    if backend != "auto" and backend != "sdpa" and backend not in va_module.available_backends():
        pytest.skip(f"{backend} is not installed")
    lengths = [300, 1, 0, 77, 128, 5]
    cu = _cu(lengths, device="cuda")
    T = int(cu[-1])
    q, k, v = _qkv(T, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
    g = torch.randn(T, 8, 64, device="cuda").to(torch.bfloat16)
    out, grads = _fwd_bwd(varlen_attention, q, k, v, cu, g, max_seqlen=max(lengths), causal=causal,
                          sliding_window=50, backend=backend)
    if backend != "auto":
        assert last_dispatch().backend == backend
    q32, k32, v32 = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))
    ref, ref_grads = _fwd_bwd(_windowed_oracle, q32, k32, v32, cu.cpu(), g.float().cpu(), causal=causal, window=50)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float().cpu(), b, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_autocast_mixed_dtypes_take_the_fast_kernel():
    if not va_module.available_backends():
        pytest.skip("neither flash-attn nor torch varlen_attn is available")
    cu = _cu([100, 28], device="cuda")
    q, k = torch.randn(128, 4, 64, device="cuda"), torch.randn(128, 2, 64, device="cuda")
    v = torch.randn(128, 2, 64, device="cuda").to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, cu, 100)
    assert out.dtype == torch.bfloat16 and last_dispatch().backend in ("flash_attn", "torch_varlen")
    with pytest.raises(ValueError, match="cu_seqlens"):  # validated on the fast path too
        varlen_attention(q.bfloat16(), k.bfloat16(), v, _cu([100, 27], device="cuda"), 100)
