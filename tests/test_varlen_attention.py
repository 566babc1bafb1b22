"""varlen_attention against the per-sequence reference, and the "bcr_varlen" transformers backend.

Op level: values and q/k/v gradients against ``bcr_kernels.reference.varlen_attention`` (GQA and
MHA, causal and not, explicit softmax scale, fp32 and bf16, T=1, length-1 and empty sequences, the
padded-group and the no-padding layouts of the SDPA path). Model level: a packed row through tiny
random Qwen2 / Llama models with ``attn_implementation="bcr_varlen"`` gives the logits and the
parameter gradients of running each sequence on its own with the stock sdpa/eager attention.
"""

from __future__ import annotations

import sys

import pytest
import torch

import bcr_kernels  # noqa: F401  (registers "bcr_varlen" with transformers)
from bcr_kernels import reference
from bcr_kernels.varlen_attention import (
    ATTN_IMPLEMENTATION,
    bcr_varlen_attention_forward,
    bcr_varlen_mask,
    cu_seqlens_from_position_ids,
    packed_model_kwargs,
    position_ids_from_cu_seqlens,
    varlen_attention,
)

# `bcr_kernels.varlen_attention` the attribute is the function; the module lives in sys.modules.
va_module = sys.modules["bcr_kernels.varlen_attention"]

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


# ---------------------------------------------------------------- transformers integration

transformers = pytest.importorskip("transformers")


def test_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert AttentionInterface._global_mapping[ATTN_IMPLEMENTATION] is bcr_varlen_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is bcr_varlen_mask


def _tiny(arch, attn="bcr_varlen", **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model


def test_no_dense_mask_for_packed_rows():
    from transformers.masking_utils import create_causal_mask

    model = _tiny("qwen2")
    pos = position_ids_from_cu_seqlens(_cu([3, 5, 1]))
    mask = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(1, 9, 64), attention_mask=None,
                              cache=None, position_ids=pos)
    assert mask is None
    # a real padding mask still becomes an SDPA mask
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[0, :2] = 0
    mask = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(2, 9, 64), attention_mask=pad,
                              cache=None, position_ids=None)
    assert mask is not None and mask.shape[-2:] == (9, 9)


def test_mask_with_cache_offset_is_sdpa_mask():
    """Chunked prefill (queries after cached keys): a real mask, not None, even without padding."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    kw = {"batch_size": 1, "q_length": 3, "kv_length": 5, "q_offset": 2, "kv_offset": 0,
          "mask_function": causal_mask_function, "attention_mask": None, "allow_is_causal_skip": True,
          "device": "cpu"}
    mask = bcr_varlen_mask(**kw)
    assert mask is not None and torch.equal(mask, sdpa_mask(**kw))
    assert bcr_varlen_mask(**{**kw, "q_length": 5, "q_offset": 0}) is None


PACK = [7, 1, 12, 4]


def _per_sequence(model, seqs, weights):
    """Logits and loss of running each sequence alone."""
    logits = [model(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
    logits = torch.cat(logits)
    return logits, (logits * weights).sum()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("route", ["position_ids", "packed_kwargs"])
def test_packed_model_matches_per_sequence(arch, route):
    model = _tiny(arch).train()  # dropout is 0; train mode exercises the training path
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in PACK]
    cu = _cu(PACK)
    T = int(cu[-1])
    weights = torch.randn(T, 128, generator=g)

    model.set_attn_implementation("sdpa")
    ref_logits, ref_loss = _per_sequence(model, seqs, weights)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))

    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    calls = []
    real = va_module.varlen_attention

    def spy(*a, **kw):
        calls.append(a[3].tolist())
        return real(*a, **kw)

    va_module.varlen_attention = spy
    try:
        kwargs = {"position_ids": position_ids_from_cu_seqlens(cu)}
        if route == "packed_kwargs":
            kwargs.update(packed_model_kwargs(cu, max(PACK)))
        logits = model(input_ids=torch.cat(seqs)[None], **kwargs).logits[0]
    finally:
        va_module.varlen_attention = real
    assert calls == [cu.tolist()] * model.config.num_hidden_layers  # every layer took the varlen path
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    loss = (logits * weights).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_packed_model_matches_eager_reference():
    model = _tiny("qwen2").eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in PACK]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        # use_cache left at its default (True): the packed row must still be split
        out = model(input_ids=torch.cat(seqs)[None], position_ids=position_ids_from_cu_seqlens(_cu(PACK))).logits[0]
        with torch.inference_mode():  # inference tensors (no version counter) take the same path
            inf = model(input_ids=torch.cat(seqs)[None],
                        position_ids=position_ids_from_cu_seqlens(_cu(PACK))).logits[0].clone()
        # without position_ids the row is one sequence: visibly different (the comparison can fail)
        joined = model(input_ids=torch.cat(seqs)[None]).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inf, ref, atol=1e-5, rtol=1e-4)
    assert (joined[PACK[0]:] - ref[PACK[0]:]).abs().max() > 1e-2


def test_position_ids_read_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids object: cu_seqlens is derived (one host sync) once."""
    model = _tiny("qwen2").eval()
    calls = []
    real = va_module.cu_seqlens_from_position_ids
    monkeypatch.setattr(va_module, "cu_seqlens_from_position_ids", lambda p: calls.append(1) or real(p))
    pos = position_ids_from_cu_seqlens(_cu([5, 3]))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 8)), position_ids=pos)
        assert len(calls) == 1
        model(input_ids=torch.randint(0, 128, (1, 8)), position_ids=pos.clone())  # a new tensor: derived again
        assert len(calls) == 2


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_batched_rows_and_padding_follow_sdpa(arch):
    model = _tiny(arch).eval()
    ids = torch.randint(0, 128, (3, 9))
    pad = torch.ones(3, 9, dtype=torch.long)
    pad[1, :3] = 0  # left padding
    with torch.no_grad():
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        plain, padded = model(input_ids=ids).logits, model(input_ids=ids, attention_mask=pad).logits
        gen = model.generate(ids, attention_mask=pad, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        plain_ref, padded_ref = model(input_ids=ids).logits, model(input_ids=ids, attention_mask=pad).logits
        gen_ref = model.generate(ids, attention_mask=pad, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(plain, plain_ref, atol=1e-5, rtol=1e-4)
    keep = pad.bool()
    torch.testing.assert_close(padded[keep], padded_ref[keep], atol=1e-5, rtol=1e-4)
    assert torch.equal(gen, gen_ref)


def test_sliding_window_in_effect_raises():
    model = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0).eval()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="sliding"):
        model(input_ids=ids, position_ids=position_ids_from_cu_seqlens(_cu([6, 4])))
    with torch.no_grad():  # window longer than every packed sequence: nothing to slide, it runs
        model(input_ids=ids[:, :7], position_ids=position_ids_from_cu_seqlens(_cu([3, 4])))


def test_softcap_raises():
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="softcap"):
        bcr_varlen_attention_forward(module, q, kv, kv, None, softcap=30.0, position_ids=torch.arange(5)[None])


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
