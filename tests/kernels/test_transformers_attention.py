"""The "bcr_varlen" transformers backend (bcr_kernels.transformers_attention) on real tiny models.

A packed row through tiny random Qwen2 / Llama / Mistral / Gemma-3 models with
``attn_implementation="bcr_varlen"`` gives the logits and parameter gradients of running each
sequence on its own with the stock sdpa/eager attention, sliding-window layers included (sequences
longer than the window, mixed layer types). Registration (explicit and on import, without importing
transformers), the mask function under both mask-interface conventions (transformers >= 5 and
4.56/4.57), the dtype the attention sees under CPU autocast, and ``check_supported``'s errors.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from bcr_kernels import transformers_attention as ta
from bcr_kernels.transformers_attention import (
    ATTN_IMPLEMENTATION,
    UnsupportedModelError,
    bcr_varlen_attention_forward,
    bcr_varlen_mask,
    check_supported,
    register,
)
from bcr_kernels._varlen_attention import (
    choose_backend,
    last_dispatch,
    packed_model_kwargs,
    position_ids_from_cu_seqlens,
)

transformers = pytest.importorskip("transformers")
from transformers import masking_utils  # noqa: E402

assert register()


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _tiny(arch, attn=ATTN_IMPLEMENTATION, **extra):
    torch.manual_seed(0)
    kw = {**COMMON, **extra}
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    elif arch == "gemma3":
        kw = {"head_dim": 16, "query_pre_attn_scalar": 24, **kw, "num_hidden_layers": len(kw.get("layer_types", "abc"))}
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw))
    else:
        raise ValueError(arch)
    model.set_attn_implementation(attn)
    return model


def _spy_varlen(monkeypatch):
    """Record (cu_seqlens, sliding_window) of every varlen_attention call the backend makes."""
    calls = []
    real = ta.varlen_attention

    def spy(*a, **kw):
        calls.append((a[3].tolist(), kw.get("sliding_window")))
        return real(*a, **kw)

    monkeypatch.setattr(ta, "varlen_attention", spy)
    return calls


# ---------------------------------------------------------------- registration


def test_registered_with_transformers():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register() and register()  # idempotent
    assert ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is bcr_varlen_attention_forward
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is bcr_varlen_mask


def test_import_registers_lazily_without_importing_transformers():
    """``import bcr_kernels`` leaves transformers unloaded; loading it (as a model does) registers bcr_varlen."""
    code = (
        "import sys, bcr_kernels\n"
        "assert not any(m.startswith('transformers') for m in sys.modules), 'bcr_kernels imported transformers'\n"
        "import transformers\n"
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                               num_attention_heads=2, num_key_value_heads=1)\n"
        "model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation='bcr_varlen')\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "assert model.config._attn_implementation == 'bcr_varlen' and 'bcr_varlen' in ALL_MASK_ATTENTION_FUNCTIONS\n"
        "import torch\n"
        "model(input_ids=torch.zeros(1, 5, dtype=torch.long), position_ids=torch.tensor([[0, 1, 0, 1, 2]]))\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---------------------------------------------------------------- the mask function


def _causal_mask(config, embeds, attention_mask, position_ids):
    """create_causal_mask under each signature (transformers >= 5, or 4.56/4.57 with cache_position)."""
    params = inspect.signature(masking_utils.create_causal_mask).parameters
    kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    if "inputs_embeds" in params:  # the cache argument is `cache` from 5.2x, `past_key_values` before (5.17)
        kw.update({"inputs_embeds": embeds, "cache" if "cache" in params else "past_key_values": None})
    else:
        kw.update(input_embeds=embeds, cache_position=torch.arange(embeds.shape[1]), past_key_values=None)
    return masking_utils.create_causal_mask(**kw)


def test_no_dense_mask_for_packed_rows():
    model = _tiny("qwen2")
    pos = position_ids_from_cu_seqlens(_cu([3, 5, 1]))
    assert _causal_mask(model.config, torch.zeros(1, 9, 64), None, pos) is None
    # a real padding mask still becomes an SDPA mask
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[0, :2] = 0
    mask = _causal_mask(model.config, torch.zeros(2, 9, 64), pad, None)
    assert mask is not None and mask.shape[-2:] == (9, 9)


def _mask_kwargs(q_length, kv_length, q_offset):
    """The arguments create_causal_mask hands a mask function, in the installed transformers' convention."""
    kw = {"batch_size": 1, "kv_length": kv_length, "kv_offset": 0, "mask_function": masking_utils.causal_mask_function,
          "attention_mask": None, "allow_is_causal_skip": True}
    if "cache_position" in inspect.signature(masking_utils.sdpa_mask).parameters:  # 4.56 / 4.57
        kw["cache_position"] = torch.arange(q_offset, q_offset + q_length)
    else:
        kw.update(q_length=q_length, q_offset=q_offset, device="cpu")
    return kw


def test_mask_with_cache_offset_is_sdpa_mask():
    """Chunked prefill (queries after cached keys): a real mask, not None, even without padding."""
    kw = _mask_kwargs(3, 5, 2)
    mask = bcr_varlen_mask(**kw)
    assert mask is not None and torch.equal(mask, masking_utils.sdpa_mask(**kw))
    assert bcr_varlen_mask(**_mask_kwargs(5, 5, 0)) is None


def test_mask_accepts_both_interface_conventions():
    """4.56/4.57 pass cache_position= and no q_length; transformers 5 passes q_length/q_offset."""
    assert bcr_varlen_mask(batch_size=1, cache_position=torch.arange(6), kv_length=6, kv_offset=0) is None
    assert bcr_varlen_mask(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0) is None
    with pytest.raises(TypeError, match="q_length .* or cache_position"):
        bcr_varlen_mask(batch_size=1, kv_length=6)


# ---------------------------------------------------------------- packed forward == per-sequence forward

PACK = [7, 1, 12, 4]


def _check_packed_matches_per_sequence(model, lengths, kwargs_route="position_ids", ref_attn="sdpa"):
    """Logits and parameter gradients of the packed row vs each sequence alone with ``ref_attn``."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    cu = _cu(lengths)
    weights = torch.randn(int(cu[-1]), 128, generator=g)

    model.set_attn_implementation(ref_attn)
    ref_logits = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
    ref_grads = torch.autograd.grad((ref_logits * weights).sum(), list(model.parameters()))

    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    kwargs = {"position_ids": position_ids_from_cu_seqlens(cu)}
    if kwargs_route == "packed_kwargs":
        kwargs.update(packed_model_kwargs(cu, max(lengths)))
    logits = model(input_ids=torch.cat(seqs)[None], **kwargs).logits[0]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        # fp32 sums in another order: the absolute tolerance scales with the tensor's largest gradient
        # (Gemma's sqrt(hidden)-scaled embeddings give gradients of ~10; the worst measured gap is ~3e-6 of it)
        atol = 1e-5 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    return logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("route", ["position_ids", "packed_kwargs"])
def test_packed_model_matches_per_sequence(monkeypatch, arch, route):
    model = _tiny(arch).train()  # dropout is 0; train mode exercises the training path
    calls = _spy_varlen(monkeypatch)
    _check_packed_matches_per_sequence(model, PACK, route)
    # every layer took the varlen path (the per-sequence reference ran on sdpa, not here)
    assert calls == [(_cu(PACK).tolist(), None)] * model.config.num_hidden_layers


FULL3 = ["full_attention"] * 3
SLIDING = {  # window 4, sequences up to 12 tokens: the window is in effect. (extra, windows per layer, no-window extra)
    "mistral": ("mistral", {"sliding_window": 4}, [4, 4], {"sliding_window": None}),
    "gemma3_mixed": ("gemma3", {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention",
                                                                     "sliding_attention"]}, [4, None, 4],
                     {"sliding_window": 4, "layer_types": FULL3}),
    "qwen2_mixed": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, [None, 4],
                    {"use_sliding_window": False}),
}


@pytest.mark.parametrize("case", list(SLIDING), ids=list(SLIDING))
@pytest.mark.parametrize("route", ["position_ids", "packed_kwargs"])
def test_sliding_window_packed_matches_per_sequence(monkeypatch, case, route):
    arch, extra, windows, no_window = SLIDING[case]
    model = _tiny(arch, **extra).train()
    check_supported(model)
    calls = _spy_varlen(monkeypatch)
    logits = _check_packed_matches_per_sequence(model, PACK, route)
    assert [w for _, w in calls] == windows  # each layer ran with its own window (or none)
    # the window changes the result (so the comparison above can fail): the same weights without it
    nowin = _tiny(arch, **{**extra, **no_window})
    nowin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (1, sum(PACK)), generator=torch.Generator().manual_seed(3))
    pos = position_ids_from_cu_seqlens(_cu(PACK))
    with torch.no_grad():
        plain, windowed = nowin(input_ids=ids, position_ids=pos).logits[0], model(input_ids=ids, position_ids=pos).logits[0]
    assert logits.shape == windowed.shape and (plain - windowed).abs().max() > 1e-3


def test_sliding_window_padded_batch_and_generation_follow_sdpa():
    """Padded rows and cached decoding of a sliding-window model go through transformers' own masks."""
    model = _tiny("mistral", sliding_window=4).eval()
    ids = torch.randint(0, 128, (2, 9))
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :3] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=pad).logits
        gen = model.generate(ids, attention_mask=pad, max_new_tokens=6, do_sample=False)
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, attention_mask=pad).logits
        gen_ref = model.generate(ids, attention_mask=pad, max_new_tokens=6, do_sample=False)
    keep = pad.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-4)
    assert torch.equal(gen, gen_ref)


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
    real = ta.cu_seqlens_from_position_ids
    monkeypatch.setattr(ta, "cu_seqlens_from_position_ids", lambda p: calls.append(1) or real(p))
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


# ---------------------------------------------------------------- dtypes under autocast


def test_autocast_attention_computes_in_bf16(monkeypatch):
    """fp32 weights under CPU autocast: RoPE hands over fp32 q, k (beside a bf16 v); the attention computes
    in bf16, so on CUDA the same forward would take flash-attn / torch varlen, not the grouped-SDPA loop."""
    model = _tiny("qwen2").train()
    seen = []
    real = ta.varlen_attention
    monkeypatch.setattr(ta, "varlen_attention", lambda *a, **kw: (seen.append(tuple(t.dtype for t in a[:3])),
                                                                  real(*a, **kw))[1])
    ids = torch.randint(0, 128, (1, sum(PACK)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, position_ids=position_ids_from_cu_seqlens(_cu(PACK))).logits
    # q, k arrive in fp32 (the case a dispatch on q.dtype sends to the slow path); v is bf16 on
    # transformers 5 and fp32 on 4.57
    assert seen and all(d[:2] == (torch.float32, torch.float32) for d in seen)
    rec = last_dispatch()
    assert rec.input_dtypes == seen[-1]
    assert (rec.device_type, rec.dtype, rec.backend) == ("cpu", torch.bfloat16, "sdpa")
    assert choose_backend("cuda", rec.dtype, available={"flash_attn", "torch_varlen"})[0] == "flash_attn"
    logits.float().sum().backward()  # and it trains
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- what the backend cannot run


@pytest.mark.parametrize("arch,extra", [("qwen2", {}), ("mistral", {"sliding_window": 4}),
                                        ("gemma3", {"sliding_window": 4})], ids=["qwen2", "mistral", "gemma3"])
def test_check_supported_accepts(arch, extra):
    model = _tiny(arch, **extra)
    check_supported(model)
    check_supported(model.config)


def test_check_supported_rejects_softcapped_gemma2_at_load_time():
    cfg = transformers.Gemma2Config(**COMMON, head_dim=16)
    assert cfg.attn_logit_softcapping is not None  # Gemma 2's default
    model = transformers.Gemma2ForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError, match=r"soft-capped \(attn_logit_softcapping=50.0\).*eager"):
        check_supported(model)
    with pytest.raises(ValueError, match="gemma2"):  # a ValueError naming the architecture
        check_supported(cfg)


@pytest.mark.parametrize("field,value,match", [
    ("attention_dropout", 0.1, "attention_dropout=0.1"),
    ("layer_types", ["full_attention", "chunked_attention"], "chunked_attention"),
    ("attention_chunk_size", 8, "chunked attention"),
])
def test_check_supported_rejects_config_features(field, value, match):
    cfg = transformers.LlamaConfig(**COMMON)
    setattr(cfg, field, value)
    with pytest.raises(UnsupportedModelError, match=match):
        check_supported(cfg)


def test_check_supported_rejects_attention_sinks():
    model = _tiny("llama")
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # as gpt-oss's attention has
    with pytest.raises(UnsupportedModelError, match="attention sinks"):
        check_supported(model)


def test_softcap_raises_at_runtime_too():
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="softcap"):
        bcr_varlen_attention_forward(torch.nn.Module(), q, kv, kv, None, softcap=30.0,
                                     position_ids=torch.arange(5)[None])


def test_trainer_refuses_an_unsupported_model_before_training(tmp_path, tiny_tokenizer):
    """BCRTrainer checks the model when it picks bcr_varlen: the error comes at construction, before any output."""
    from bcr.rl.config import BCRConfig
    from bcr.task.synthetic import make_arithmetic_problems
    from bcr.rl.trainer import BCRTrainer

    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**COMMON, "vocab_size": len(tiny_tokenizer)},
                                                                     head_dim=16))
    cfg = BCRConfig(output_dir=str(tmp_path / "run"), n_problems=1, num_generations=2, max_completion_length=8,
                    bundles_per_step=2, max_steps=1, disable_progress_bar=True)
    with pytest.raises(UnsupportedModelError, match="soft-capped"):
        BCRTrainer(model, make_arithmetic_problems(4, seed=0), cfg, tokenizer=tiny_tokenizer,
                   reward_fn=lambda completion_ids, **kw: [0.0] * len(completion_ids))
    assert not (tmp_path / "run").exists()
