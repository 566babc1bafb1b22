"""Attention over packed variable-length sequences, and the ``"bcr_varlen"`` transformers backend.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen)`` follows flash-attn's varlen API: ``q`` is
``[T, Hq, D]``, ``k``/``v`` are ``[T, Hkv, D]`` holding ``S`` sequences back to back, delimited by the
int32 prefix sums ``cu_seqlens [S + 1]``; a token attends only to tokens of its own sequence (and,
with ``causal``, only to earlier ones). Grouped-query attention (``Hq % Hkv == 0``) is native on
every path (no copies of ``k``/``v``, except where noted below). Semantics are those of
:func:`bcr_kernels.reference.varlen_attention`.

This op has no Triton kernel of its own: FlashAttention-2 and PyTorch's built-in varlen flash kernel
already do the job on CUDA, and a hand-written Triton attention would be slower than both. The entry
point picks, in order:

1. ``flash_attn.flash_attn_varlen_func`` -- CUDA, fp16/bf16, ``flash-attn`` installed;
2. ``torch.nn.attention.varlen.varlen_attn`` -- CUDA, fp16/bf16, the torch build has it (its
   signature changed between torch 2.9 and 2.12; it is inspected, and on builds without
   ``enable_gqa`` the ``k``/``v`` heads are expanded first);
3. the PyTorch SDPA path below -- CPU, fp32 on CUDA, or whenever 1 and 2 are unavailable or fail.

``BCR_KERNEL_BACKEND=torch`` (or ``backend="sdpa"``) forces path 3. Every path is differentiable.

The packed attention on the CPU runs one SDPA call per group of similar-length sequences (short
ones padded into one batch, long ones of different lengths one call each, straight from the packed
tensors), because that was the fastest or within noise of the fastest everywhere we measured it.
fwd+bwd, fp32, Hq=8, Hkv=2, 1 thread on a shared 2-core box (min of 9 interleaved rounds, ms;
noise between runs is about +-20 %):

=================================  =======  ===========  ===========  ===========  ==========
T, lengths (S sequences), D        grouped  per-seq 4-D  per-seq 3-D  one padded   block-diag
                                   (this)   SDPA         (reference)  batch        mask, 1 call
=================================  =======  ===========  ===========  ===========  ==========
2048, 32..1024 (S=5), D=32            36         34           98           59          145
2048, 32..1024 (S=5), D=64            66         64          141          108          252
2048, 32..128 (S=24), D=32            25         25           36           21          152
2048, 32..128 (S=24), D=64            46         44           64           39          259
4096, 200..256 (S=18), D=32           59         61          116           52          667
4096, 200..256 (S=18), D=64          100        107          178           90         1037
8192, 16..2048 (S=11), D=32          229        228         1091          630           --
=================================  =======  ===========  ===========  ===========  ==========

Why: SDPA's CPU flash kernel runs only on 4-D inputs; the reference's 3-D ``[H, L, D]`` calls fall to
``_scaled_dot_product_attention_math`` (materialised ``L x L`` scores: 2-5x slower, growing with
length; checked with the profiler). Attention work
grows as ``L**2``, so padding long sequences to a common length costs more than it saves (the one
padded batch is 1.7-2.8x slower on mixed lengths), while for short sequences SDPA's fixed per-call
cost dominates and one padded call wins (``_PAD_BUDGET`` is the crossover). With every sequence in
one group this path does exactly the padded batch's work; those rows were measured before a redundant
gather was removed, the remaining gap is noise. One block-diagonal masked call does ``T**2`` work and holds a
``T x T`` mask (3-10x slower). ``flex_attention`` has no backward on the CPU in torch 2.13.
Padding sits at the end of each sequence, so a causal call needs no mask (valid queries never see
pads); a non-causal call gets a key-padding mask.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from .shared_prefix_attention import shared_prefix_attention

__all__ = [
    "ATTN_IMPLEMENTATION",
    "bcr_varlen_attention_forward",
    "bcr_varlen_mask",
    "cu_seqlens_from_position_ids",
    "packed_model_kwargs",
    "position_ids_from_cu_seqlens",
    "register_transformers",
    "varlen_attention",
]

ATTN_IMPLEMENTATION = "bcr_varlen"

# A sequence of length l joins the current group (sorted by length, longest first, longest L) while
# padding it costs at most this many extra attention scores per head: L * L - l * l <= _PAD_BUDGET.
# Below it the saved per-call overhead of SDPA outweighs the padded work on the CPU (measured).
_PAD_BUDGET = 1 << 15
_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# helpers on cu_seqlens / position_ids


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[S + 1]`` prefix sums of the sequences packed in ``position_ids`` (``[T]`` or ``[B, T]``).

    A sequence starts at every row start and wherever the position does not continue the previous
    one (``pos[t] != pos[t - 1] + 1``), so position ids restarting at 0 delimit sequences. Rows of a
    ``[B, T]`` tensor are concatenated (token ``b * T + t``). Needs one device-to-host sync.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [T] or [B, T], got shape {tuple(position_ids.shape)}")
    B, L = position_ids.shape
    starts = torch.ones(B, L, dtype=torch.bool, device=position_ids.device)
    if L > 1:
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().flatten().to(torch.int32)
    end = torch.tensor([B * L], dtype=torch.int32, device=position_ids.device)
    return torch.cat([idx, end])


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[1, T]`` int64 position ids restarting at 0 at every sequence start of ``cu_seqlens``."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    T = int(cu[-1]) if cu.numel() else 0
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=T)
    return (torch.arange(T, device=cu.device) - starts)[None]


def packed_model_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> dict:
    """Keyword arguments that tell a transformers model where the sequences of a packed row are.

    ``model(input_ids=ids[None], position_ids=pos[None], **packed_model_kwargs(cu, max_len))`` --
    transformers forwards these (its flash-attention kwargs) to every attention layer, so the
    ``"bcr_varlen"`` backend (and ``flash_attention_2``) reuse them instead of re-deriving
    ``cu_seqlens`` from ``position_ids`` in each forward. ``position_ids`` must still be passed: they
    drive the rotary embeddings, and the ``sdpa``/``eager`` backends build their block mask from them.
    """
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": int(max_seqlen),
        "max_length_k": int(max_seqlen),
    }


# --------------------------------------------------------------------------------------------------
# the op


def _backend(requested: str | None) -> str:
    if requested is not None:
        if requested not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {requested!r}")
        return requested
    env = os.environ.get("BCR_KERNEL_BACKEND", "auto").lower()
    return "sdpa" if env == "torch" else "auto"


@functools.cache
def _flash_attn_varlen_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError):  # broken build (ABI mismatch, missing CUDA libs)
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _max_seqlen(cu: torch.Tensor, max_seqlen) -> int:
    if max_seqlen is None:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return int(max_seqlen)


def _run_flash_attn(q, k, v, cu, max_seqlen, causal, scale):
    fn = _flash_attn_varlen_func()
    if fn is None:
        return None
    m = _max_seqlen(cu, max_seqlen)
    return fn(q, k, v, cu, cu, m, m, dropout_p=0.0, softmax_scale=scale, causal=causal)


def _run_torch_varlen(q, k, v, cu, max_seqlen, causal, scale):
    fn, params = _torch_varlen_attn()
    if fn is None:
        return None
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kw["is_causal"] = causal
    elif causal:
        return None
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older torch: no GQA, expand the key/value heads (query head h reads kv head h // g)
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        else:  # fold the scale into q: softmax((q * s / s0) k^T * s0) with s0 = 1 / sqrt(D)
            q = q * (scale * math.sqrt(q.shape[-1]))
    m = _max_seqlen(cu, max_seqlen)
    return fn(q, k, v, cu, cu, m, m, **kw)


@functools.lru_cache(maxsize=32)
def _group_plan(bounds: tuple[int, ...], device: torch.device):
    """How the SDPA path batches the sequences of ``bounds``.

    Sequences are sorted by length (longest first); one of length ``l`` joins the current group (whose
    longest is ``L``) while ``L * L - l * l <= _PAD_BUDGET``: short sequences share a call, long ones
    of different lengths each get their own (padding them would cost more than the call).
    Returns ``(groups, out_pos, in_tok, in_pos, in_rows)``:

    - ``groups``: in output order, ``("slice", start, end)`` for a group of one sequence (read
      straight from the packed tensors) or ``("pad", n_seqs, pad_len, in_row, key_lengths)`` for a
      group read from the padded input buffer at row ``in_row`` (``key_lengths``, int64 ``[n_seqs]``,
      is None when the group holds no padding);
    - ``out_pos [T]``: each token's row in the concatenated group outputs (None when that is the
      identity: a single group that is the whole pack, or only single-sequence groups in token order);
    - ``in_pos``: the rows in the padded input buffer (``in_rows`` rows) of the tokens ``in_tok`` of
      padded groups (``in_pos`` is None when there is no padded group, ``in_tok`` None when every
      token is in one).
    """
    lengths = [e - s for s, e in itertools.pairwise(bounds)]
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    members: list[list[int]] = []
    for i in order:
        if members:
            top = lengths[members[-1][0]]
            if top * top - lengths[i] * lengths[i] <= _PAD_BUDGET:
                members[-1].append(i)
                continue
        members.append([i])
    T = bounds[-1]
    # the whole pack is S equal-length sequences back to back: one [S, L] batch, no copies at all
    if len(members) == 1 and len(members[0]) == len(lengths) and len(set(lengths)) == 1:
        return (("pad", len(lengths), lengths[0], None, None),), None, None, None, None

    if all(len(g) == 1 for g in members):  # no group to pad: slices in token order, outputs concatenate
        return tuple(("slice", bounds[g[0]], bounds[g[0] + 1]) for g in sorted(members)), None, None, None, None

    groups = []
    out_base = [0] * len(lengths)  # output row of each sequence's first token
    in_base = [-1] * len(lengths)  # padded-input row of each sequence's first token (-1: sliced)
    out_row = in_row = 0
    for g in members:
        if len(g) == 1:
            i = g[0]
            groups.append(("slice", bounds[i], bounds[i + 1]))
            out_base[i] = out_row
            out_row += lengths[i]
            continue
        L = lengths[g[0]]
        for j, i in enumerate(g):
            out_base[i] = out_row + j * L
            in_base[i] = in_row + j * L
        padded = any(lengths[i] != L for i in g)
        key_len = torch.tensor([lengths[i] for i in g], device=device) if padded else None
        groups.append(("pad", len(g), L, in_row, key_len))
        out_row += len(g) * L
        in_row += len(g) * L

    starts = torch.tensor(bounds[:-1], dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    tok = torch.arange(T)
    out_pos = tok + torch.repeat_interleave(torch.tensor(out_base) - starts, lens, output_size=T)
    in_tok = in_pos = None
    if in_row:
        in_shift = torch.repeat_interleave(torch.tensor(in_base) - starts, lens, output_size=T)
        in_mask = torch.repeat_interleave(torch.tensor(in_base) >= 0, lens, output_size=T)
        in_pos = (tok + in_shift)[in_mask].to(device)
        in_tok = None if bool(in_mask.all()) else tok[in_mask].to(device)
    return tuple(groups), out_pos.to(device), in_tok, in_pos, in_row


def _sdpa_varlen(q, k, v, bounds, causal, scale):
    hq, hkv, dv = q.shape[1], k.shape[1], v.shape[-1]
    groups, out_pos, in_tok, in_pos, in_rows = _group_plan(bounds, q.device)
    extra = {"enable_gqa": True} if hq != hkv else {}

    def attend(qq, kk, vv, mask=None):  # [S, L, H, D] views -> [S * L, Hq, Dv]
        o = F.scaled_dot_product_attention(
            qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
            attn_mask=mask, is_causal=causal, scale=scale, **extra,
        )
        return o.transpose(1, 2).reshape(-1, hq, dv)

    if out_pos is None and groups[0][0] == "pad":  # S sequences of one length L back to back: one batch
        _, S, L, _, _ = groups[0]
        return attend(q.view(S, L, hq, -1), k.view(S, L, hkv, -1), v.view(S, L, hkv, -1))

    if in_pos is not None:
        def pad(x):
            src = x if in_tok is None else x.index_select(0, in_tok)
            return x.new_zeros(in_rows, *x.shape[1:]).index_copy(0, in_pos, src)

        pq, pk, pv = pad(q), pad(k), pad(v)
    outs = []
    for grp in groups:
        if grp[0] == "slice":
            _, s, e = grp
            outs.append(attend(q[None, s:e], k[None, s:e], v[None, s:e]))
            continue
        _, S, L, row, key_len = grp
        n = S * L
        mask = None
        if key_len is not None and not causal:  # causal: pads sit after every valid key, never seen
            mask = (torch.arange(L, device=q.device)[None, :] < key_len[:, None])[:, None, None, :]
        outs.append(
            attend(pq[row : row + n].view(S, L, hq, -1), pk[row : row + n].view(S, L, hkv, -1),
                   pv[row : row + n].view(S, L, hkv, -1), mask)
        )
    out = torch.cat(outs)
    return out if out_pos is None else out.index_select(0, out_pos)


def _check_bounds(bounds: list[int], T: int) -> None:
    if not bounds or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in itertools.pairwise(bounds)):
        head = bounds if len(bounds) <= 8 else bounds[:4] + ["..."] + bounds[-3:]
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {head}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each of the sequences packed in ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``.

    ``cu_seqlens`` is the int32 ``[S + 1]`` prefix sums of the sequence lengths (``cu_seqlens[0] == 0``,
    ``cu_seqlens[-1] == T``; repeated entries are empty sequences). ``max_seqlen`` is the longest
    length (used by the CUDA kernels; derived with a sync when None). ``softmax_scale`` defaults to
    ``D ** -0.5``. ``backend`` (``"auto"``, ``"flash_attn"``, ``"torch_varlen"``, ``"sdpa"``) forces a
    path; the default follows ``BCR_KERNEL_BACKEND`` (``torch`` means ``"sdpa"``). Returns
    ``[T, Hq, Dv]`` in ``q``'s dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] disagree: {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    which = _backend(backend)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)

    if q.is_cuda and q.dtype in _HALF and which in ("auto", "flash_attn", "torch_varlen") and q.shape[0] > 0:
        runners = {"flash_attn": [_run_flash_attn], "torch_varlen": [_run_torch_varlen]}.get(
            which, [_run_flash_attn, _run_torch_varlen]
        )
        for run in runners:
            try:
                out = run(q, k, v, cu, max_seqlen, causal, softmax_scale)
            except (RuntimeError, ValueError) as exc:  # unsupported GPU / head dim: fall through
                _warn_once(run.__name__, f"varlen_attention: {run.__name__[5:]} failed ({exc}); using SDPA")
                continue
            if out is not None:
                return out
        if which != "auto":
            _warn_once(which, f"varlen_attention: backend {which!r} unavailable here; using SDPA")

    bounds = cu_seqlens.tolist()
    T = q.shape[0]
    _check_bounds(bounds, T)
    if T == 0 or bounds[0] == bounds[-1]:
        out = q.new_zeros(T, hq, v.shape[-1])
        if q.requires_grad or k.requires_grad or v.requires_grad:
            out = out + 0 * (q.sum() + k.sum() + v.sum())  # keep the graph (zero gradients)
        return out
    return _sdpa_varlen(q, k, v, tuple(bounds), causal, softmax_scale)


# --------------------------------------------------------------------------------------------------
# transformers integration


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
        self.value = (cu, _max_seqlen(cu, None))
        self.ref = weakref.ref(position_ids)
        self.key = key
        return self.value


_cu_cache = _CuCache()


def _as_int(x) -> int | None:
    if x is None:
        return None
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


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
    the ``cu_seq_lens_q``/``max_length_q`` kwargs (see :func:`packed_model_kwargs`; they index the
    flattened ``B * L`` tokens), or the ``position_ids`` kwarg (a sequence starts wherever the
    position does not continue; see :func:`cu_seqlens_from_position_ids`), and run through
    :func:`varlen_attention`. With a padding mask (``[B, 1, L, Lk]``, built by :func:`bcr_varlen_mask`)
    or a cache (``L != Lk``, generation) it is transformers' SDPA attention. As with
    ``flash_attention_2``, an all-ones 2-D attention mask counts as no mask, so packed ``position_ids``
    still split the row (``sdpa``/``eager`` would not split it then).
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if softcap is not None:
        raise NotImplementedError("bcr_varlen attention does not support softcap; use eager attention")
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("bcr_varlen attention does not support attention sinks or position bias")
    B, hq, L, D = query.shape
    Lk = key.shape[2]
    layout = kwargs.get("bcr_branch_layout")
    if layout is not None:  # a row whose groups share their prompts (see shared_prefix_attention)
        return _branch_attention(query, key, value, attention_mask, layout, scaling, sliding_window, dropout)
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    varlen = attention_mask is None and L == Lk and (cu is not None or position_ids is not None)
    if not varlen:
        if attention_mask is None and sliding_window is not None and Lk > sliding_window:
            raise NotImplementedError("bcr_varlen attention does not support sliding-window attention")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )

    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k.to(cu.device), cu):
            raise NotImplementedError("bcr_varlen attention needs cu_seq_lens_k == cu_seq_lens_q (self-attention)")
        max_seqlen = _as_int(kwargs.get("max_length_q"))
    else:
        cu, max_seqlen = _cu_cache.get(position_ids, B)
    if sliding_window is not None and _max_seqlen(cu, max_seqlen) > sliding_window:
        raise NotImplementedError(
            f"bcr_varlen attention does not support sliding-window attention (window {sliding_window} is "
            "shorter than the longest packed sequence); use flash_attention_2 or sdpa"
        )
    if dropout:
        raise NotImplementedError("bcr_varlen attention does not support attention dropout; set attention_dropout=0")
    # [B, H, L, D] -> [B * L, H, D] (a free view when query comes from the usual [B, L, H, D] projection)
    q = query.transpose(1, 2).reshape(B * L, hq, D)
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], value.shape[-1])
    out = varlen_attention(q, k, v, cu, max_seqlen, causal=causal, softmax_scale=scaling)
    return out.view(B, L, hq, value.shape[-1]), None


def _branch_attention(query, key, value, attention_mask, layout, scaling, sliding_window, dropout):
    B, hq, L, D = query.shape
    if B != 1 or key.shape[2] != L or attention_mask is not None:
        raise ValueError("bcr_branch_layout needs one packed row ([1, T]) with no attention mask and no cache")
    if sliding_window is not None and layout.max_seqlen_k > sliding_window:
        raise NotImplementedError("shared-prompt rows do not support sliding-window attention; set shared_prompt=false")
    if dropout:
        raise NotImplementedError("bcr_varlen attention does not support attention dropout; set attention_dropout=0")
    q = query.transpose(1, 2).reshape(L, hq, D)
    k = key.transpose(1, 2).reshape(L, key.shape[1], D)
    v = value.transpose(1, 2).reshape(L, value.shape[1], value.shape[-1])
    out = shared_prefix_attention(q, k, v, layout, softmax_scale=scaling)
    return out.view(1, L, hq, value.shape[-1]), None


def bcr_varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """transformers mask function for ``"bcr_varlen"``: no mask unless one is needed.

    Returns None (no ``[L, L]`` mask is built; packing is read from ``position_ids`` by the attention
    function) when there is no padding and queries and keys line up (``q_length == kv_length``, no
    cache offset). Otherwise -- padding, or decoding with a cache -- it is transformers' SDPA mask.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and q_length == kv_length and not (isinstance(kv_offset, int) and kv_offset != 0):
        return None
    from transformers.masking_utils import sdpa_mask

    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register_transformers() -> bool:
    """Register ``"bcr_varlen"`` with transformers' attention and mask interfaces (idempotent).

    Runs at ``import bcr_kernels``; returns False when transformers is not installed.
    """
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, bcr_varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, bcr_varlen_mask)
    return True


register_transformers()
