"""The ``"bcr_varlen"`` attention backend for transformers models, on :func:`bcr_kernels.varlen_attention`.

``register()`` adds ``"bcr_varlen"`` to transformers' attention and mask interfaces (idempotent), so
``from_pretrained(..., attn_implementation="bcr_varlen")`` and ``model.set_attn_implementation("bcr_varlen")``
work. ``import bcr_kernels`` calls :func:`register_on_import`, which registers as soon as transformers'
modules load (at once if they already have), without importing transformers itself: importing the
kernels stays as cheap as importing torch. transformers is imported lazily here for that reason.

A packed row (``[1, T]`` input ids whose ``position_ids`` restart at 0 at every sequence start, or
with the ``cu_seq_lens_q`` / ``max_length_q`` kwargs of :func:`bcr_kernels.packed_model_kwargs`)
runs through :func:`bcr_kernels.varlen_attention`, per layer with the layer's
sliding window and scale; padded batches and cached generation take transformers' SDPA attention.

:func:`check_supported` tells, before any training step, whether a model's attention is one this
backend reproduces (full or sliding-window causal attention, any scale, GQA); what it is not (logit
soft-capping, attention sinks, chunked or linear attention layers, attention dropout) raises
:class:`UnsupportedModelError` naming the feature and the fix.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import weakref
from collections.abc import Callable

import torch

from ._shared_prefix_attention import shared_prefix_attention
from ._varlen_attention import compute_dtype, cu_seqlens_from_position_ids, varlen_attention

__all__ = [
    "ATTN_IMPLEMENTATION",
    "UnsupportedModelError",
    "bcr_varlen_attention_forward",
    "bcr_varlen_mask",
    "check_supported",
    "register",
    "register_on_import",
]

ATTN_IMPLEMENTATION = "bcr_varlen"

_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The model's attention does something ``bcr_varlen`` does not reproduce."""


# --------------------------------------------------------------------------------------------------
# registration


def _register_attention(modeling_utils) -> None:
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, bcr_varlen_attention_forward)


def _register_mask(masking_utils) -> None:
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, bcr_varlen_mask)


_HOOKS: dict[str, Callable] = {
    "transformers.modeling_utils": _register_attention,
    "transformers.masking_utils": _register_mask,
}


def register() -> bool:
    """Register ``"bcr_varlen"`` with transformers' attention and mask interfaces now (idempotent).

    Imports transformers' modeling and masking modules (seconds, the first time). Returns False when
    transformers is not installed.
    """
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        for name, hook in _HOOKS.items():
            hook(importlib.import_module(name))
    except (ImportError, AttributeError):  # a transformers without the attention interfaces (< 4.48)
        return False
    return True


class _ThenRegister(importlib.abc.Loader):
    """Runs a module's own loader, then registers with the freshly loaded module."""

    def __init__(self, loader, hook: Callable):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._hook(module)

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Finds transformers' modeling / masking modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None or fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        _pending.discard(fullname)
        if not _pending:
            sys.meta_path.remove(self)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader, hook)
        return spec


_pending: set[str] = set()
_finder = _RegisterWhenImported()


def register_on_import() -> None:
    """Register ``"bcr_varlen"`` as soon as transformers loads its modeling / masking modules (now, for
    those already loaded), without importing transformers. Idempotent; ``import bcr_kernels`` calls it."""
    for name, hook in _HOOKS.items():
        module = sys.modules.get(name)
        if module is None:
            _pending.add(name)
        elif name not in _pending:
            hook(module)
    if _pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# --------------------------------------------------------------------------------------------------
# what the backend can run


def check_supported(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``bcr_varlen`` reproduces the attention of ``model``.

    ``model`` is a transformers model or its config. Call it when the model is loaded (the trainer does
    before its first step): every per-layer feature that the HF forward applies and this backend does
    not is reported here, not mid-training. Supported: causal (or bidirectional) attention, grouped
    query heads, any softmax scale (``scaling``, e.g. Gemma's ``query_pre_attn_scalar``), and sliding
    windows per layer (``sliding_window`` with ``layer_types``, Mistral, Gemma 2/3, Qwen2
    ``use_sliding_window``).
    """
    config = getattr(model, "config", model)
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if callable(get_text) else config
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    what = f"{name} ({getattr(text, 'model_type', '?')})"
    problems = []
    if getattr(model, "config", None) is not None and not getattr(model, "_supports_attention_backend", True):
        problems.append("it does not route attention through transformers' AttentionInterface")
    if getattr(config, "is_encoder_decoder", False):
        problems.append("it is an encoder-decoder model (bcr_varlen is self-attention over packed rows)")
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None:
        problems.append(f"its attention logits are soft-capped (attn_logit_softcapping={softcap}); "
                        "use attn_implementation='eager'")
    chunk = getattr(text, "attention_chunk_size", None)
    if chunk is not None:
        problems.append(f"it uses chunked attention (attention_chunk_size={chunk})")
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(_LAYER_TYPES))
    if other:
        problems.append(f"it has layers of type {other} (bcr_varlen runs {list(_LAYER_TYPES)})")
    dropout = getattr(text, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        problems.append(f"attention_dropout={dropout} (set config.attention_dropout = 0)")
    if isinstance(model, torch.nn.Module):
        sinks = sorted({type(m).__name__ for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.Tensor)})
        if sinks:
            problems.append(f"its attention layers ({', '.join(sinks)}) have attention sinks")
    if problems:
        raise UnsupportedModelError(
            f"attn_implementation='bcr_varlen' cannot run {what}: " + "; ".join(problems)
            + ". Use another attn_implementation ('sdpa' builds a block mask from packed position_ids)."
        )


# --------------------------------------------------------------------------------------------------
# the attention function and the mask function


class _CuCache:
    """Remembers the ``cu_seqlens`` derived from the last ``position_ids`` tensor seen.

    A model hands the same ``position_ids`` object to every layer, so one forward derives (and syncs)
    once. Keyed on the object itself through a weak reference (a freed tensor can never match) and on
    its version counter (in-place edits invalidate).
    """

    def __init__(self):
        self.ref = None
        self.key = None
        self.value = None

    def get(self, position_ids: torch.Tensor, batch_size: int):
        """``(cu_seqlens, max_seqlen)`` of ``position_ids`` (``[T]``, ``[1, T]``, ``[B, T]``) as ``B`` rows."""
        try:
            key = (position_ids._version, batch_size)
        except RuntimeError:  # inference-mode tensors have no version counter: never cache them
            key = None
        if key is not None and self.ref is not None and self.ref() is position_ids and self.key == key:
            return self.value
        rows = position_ids if position_ids.dim() == 2 else position_ids[None]
        if rows.shape[0] != batch_size:
            rows = rows.expand(batch_size, -1)
        cu = cu_seqlens_from_position_ids(rows)
        self.value = (cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0)
        self.ref = weakref.ref(position_ids)
        self.key = key
        return self.value


_cu_cache = _CuCache()


def _as_int(x) -> int | None:
    if x is None:
        return None
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


@functools.cache
def _sdpa_attention_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def bcr_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``attn_implementation="bcr_varlen"``).

    ``query`` is ``[B, Hq, L, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]``; returns ``([B, L, Hq, D], None)``.
    Without an attention mask and with ``L == Lk`` the rows are split into sequences from, in order,
    the ``cu_seq_lens_q``/``max_length_q`` kwargs (see ``packed_model_kwargs``; they index the
    flattened ``B * L`` tokens), the ``position_ids`` kwarg (a sequence starts wherever the position
    does not continue; see ``cu_seqlens_from_position_ids``), or one sequence per row, and run
    through :func:`varlen_attention` with the layer's ``scaling`` and ``sliding_window``. With a
    padding mask (``[B, 1, L, Lk]``, built by :func:`bcr_varlen_mask`, window included) or a cache
    (``L != Lk``, generation) it is transformers' SDPA attention. As with ``flash_attention_2``, an
    all-ones 2-D attention mask counts as no mask, so packed ``position_ids`` still split the row.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if softcap is not None:
        raise NotImplementedError("bcr_varlen attention does not support softcap (check_supported(model) tells "
                                  "before training); use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("bcr_varlen attention does not support attention sinks or position bias")
    B, hq, L, D = query.shape
    if attention_mask is not None or L != key.shape[2]:
        return _sdpa_attention_forward()(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    layout = kwargs.get("bcr_branch_layout")
    if layout is not None:  # a row whose groups share their prompts (see shared_prefix_attention)
        return _branch_attention(query, key, value, layout, scaling, sliding_window, dropout, causal)
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k.to(cu.device), cu):
            raise NotImplementedError("bcr_varlen attention needs cu_seq_lens_k == cu_seq_lens_q (self-attention)")
        max_seqlen = _as_int(kwargs.get("max_length_q"))
    elif position_ids is not None:
        cu, max_seqlen = _cu_cache.get(position_ids, B)
    else:
        cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=query.device)
        max_seqlen = L
    if dropout:
        raise NotImplementedError("bcr_varlen attention does not support attention dropout; set attention_dropout=0")
    # [B, H, L, D] -> [B * L, H, D] (a free view when query comes from the usual [B, L, H, D] projection)
    q = query.transpose(1, 2).reshape(B * L, hq, D)
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], value.shape[-1])
    out = varlen_attention(q, k, v, cu, max_seqlen, causal=causal, softmax_scale=scaling,
                           sliding_window=sliding_window)
    return out.view(B, L, hq, value.shape[-1]), None


def _branch_attention(query, key, value, layout, scaling, sliding_window, dropout, causal):
    """One packed row with a ``bcr_branch_layout`` kwarg: completions that share their prompt."""
    B, hq, L, D = query.shape
    if B != 1:
        raise ValueError(f"bcr_branch_layout needs one packed row ([1, T]), got a batch of {B}")
    if not causal:
        raise NotImplementedError("shared-prompt rows are causal by construction; this layer is not causal")
    if sliding_window is not None and layout.max_seqlen_k > sliding_window:
        raise NotImplementedError("shared-prompt rows do not support sliding-window attention; set shared_prompt=false")
    if dropout:
        raise NotImplementedError("bcr_varlen attention does not support attention dropout; set attention_dropout=0")
    dtype = compute_dtype(query, key, value)  # as autocast would (RoPE leaves q, k in fp32, v in bf16)
    q = query.transpose(1, 2).reshape(L, hq, D).to(dtype)
    k = key.transpose(1, 2).reshape(L, key.shape[1], D).to(dtype)
    v = value.transpose(1, 2).reshape(L, value.shape[1], value.shape[-1]).to(dtype)
    out = shared_prefix_attention(q, k, v, layout, softmax_scale=scaling)
    return out.view(1, L, hq, value.shape[-1]), None


def bcr_varlen_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset=0,
    kv_offset=0,
    attention_mask: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs,
):
    """transformers mask function for ``"bcr_varlen"``: no mask unless one is needed.

    transformers >= 5 passes ``q_length`` / ``q_offset``; 4.56 and 4.57 pass ``cache_position``
    (the query positions) instead; both are accepted. Returns None (no ``[L, L]`` mask is built;
    packing is read from ``position_ids`` and the window applied by the attention function) when
    there is no padding and queries and keys line up (``q_length == kv_length``, no offsets).
    Otherwise -- padding, or decoding with a cache -- it is transformers' SDPA mask, built from the
    arguments as transformers passed them (the layer's sliding window is in its ``mask_function``).
    """
    if q_length is None:
        if cache_position is None:
            raise TypeError("bcr_varlen_mask needs q_length (transformers >= 5) or cache_position (4.56, 4.57)")
        q_length = cache_position.shape[0]
        q_offset = cache_position[0] if q_length else 0
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and q_length == kv_length and _as_int(q_offset) == 0 and _as_int(kv_offset) == 0:
        return None
    from transformers.masking_utils import sdpa_mask

    args = {"batch_size": batch_size, "kv_length": kv_length, "kv_offset": kv_offset,
            "attention_mask": attention_mask, **kwargs}
    if cache_position is not None:
        args["cache_position"] = cache_position
    else:
        args.update(q_length=q_length, q_offset=q_offset)
    return sdpa_mask(**args)
