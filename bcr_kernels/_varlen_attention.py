"""Attention over packed variable-length sequences.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen)`` follows flash-attn's varlen API: ``q`` is
``[T, Hq, D]``, ``k``/``v`` are ``[T, Hkv, D]`` holding ``S`` sequences back to back, delimited by the
int32 prefix sums ``cu_seqlens [S + 1]``; a token attends only to tokens of its own sequence (and,
with ``causal``, only to earlier ones; with ``sliding_window``, only to the nearest ones). Grouped-query
attention (``Hq % Hkv == 0``) is native on every path (no copies of ``k``/``v``, except where noted
below). Semantics are those of :func:`bcr_kernels.reference.varlen_attention`. The transformers
attention backend built on this op lives in :mod:`bcr_kernels.transformers_attention`; this module
does not import transformers.

This op has no Triton kernel of its own: FlashAttention-2 and PyTorch's built-in varlen flash kernel
already do the job on CUDA, and a hand-written Triton attention would be slower than both. The path
is chosen on the dtype the attention computes in (:func:`compute_dtype`: the autocast dtype under
``torch.autocast``, else the common dtype of q, k, v; the inputs are cast to it), by the pure
function :func:`choose_backend`, and recorded (:func:`last_dispatch`). In order:

1. ``flash_attn.flash_attn_varlen_func`` -- CUDA, fp16/bf16, ``flash-attn`` installed;
2. ``torch.nn.attention.varlen.varlen_attn`` -- CUDA, fp16/bf16, the torch build has it (its
   signature changed between torch 2.9 and 2.12; it is inspected, and on builds without
   ``enable_gqa`` the ``k``/``v`` heads are expanded first);
3. the PyTorch SDPA path below -- CPU, fp32 on CUDA, or whenever 1 and 2 are unavailable or fail
   (a CUDA out-of-memory error is re-raised, never retried on this hungrier path).

``BCR_KERNEL_BACKEND=torch`` (or ``backend="sdpa"``) forces path 3; a forced ``"flash_attn"`` or
``"torch_varlen"`` runs that kernel or raises (never a silent fallback). Every path is differentiable.

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
pads); a non-causal call gets a key-padding mask. A sliding window shorter than a group's length
adds an ``[L, L]`` band mask to that group's call (the work stays that of full attention).
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
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "Dispatch",
    "available_backends",
    "choose_backend",
    "compute_dtype",
    "cu_seqlens_from_position_ids",
    "last_dispatch",
    "packed_model_kwargs",
    "position_ids_from_cu_seqlens",
    "varlen_attention",
]

# A sequence of length l joins the current group (sorted by length, longest first, longest L) while
# padding it costs at most this many extra attention scores per head: L * L - l * l <= _PAD_BUDGET.
# Below it the saved per-call overhead of SDPA outweighs the padded work on the CPU (measured).
_PAD_BUDGET = 1 << 15
BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
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
    ``"bcr_varlen"`` backend (:mod:`bcr_kernels.transformers_attention`) and ``flash_attention_2`` reuse them instead of re-deriving
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
# dispatch: which path runs, decided on the dtype the attention computes in


@dataclass(frozen=True)
class Dispatch:
    """What one :func:`varlen_attention` call ran (see :func:`last_dispatch`)."""

    backend: str  # the path that produced the output: "flash_attn", "torch_varlen" or "sdpa"
    device_type: str
    dtype: torch.dtype  # the compute dtype (q, k, v were cast to it)
    input_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]  # q, k, v as they came in
    sliding_window: int | None  # the window that ran (None when it covered every sequence whole)


_last_dispatch: Dispatch | None = None


def last_dispatch() -> Dispatch | None:
    """The :class:`Dispatch` of the most recent :func:`varlen_attention` call in this process (None before any)."""
    return _last_dispatch


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype the attention runs in: what autocast would give SDPA, else the common dtype of q, k, v.

    Under ``torch.autocast`` for the tensors' device it is the autocast dtype (RoPE under autocast hands
    over fp32 q, k beside a bf16 v; autocast runs SDPA in bf16, and so does this op). Outside autocast
    it is ``torch.promote_types`` of the three (equal dtypes stay as they are).
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def available_backends() -> frozenset[str]:
    """The CUDA kernels installed in this process: a subset of ``{"flash_attn", "torch_varlen"}``."""
    found = set()
    if _flash_attn_varlen_func() is not None:
        found.add("flash_attn")
    if _torch_varlen_attn()[0] is not None:
        found.add("torch_varlen")
    return frozenset(found)


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    requested: str = "auto",
    *,
    available: Collection[str] | None = None,
) -> tuple[str, ...]:
    """The paths :func:`varlen_attention` tries, in order, for tensors on ``device_type`` computing in ``dtype``.

    A pure function of its arguments (``available`` defaults to :func:`available_backends`). Under
    ``"auto"`` CUDA fp16/bf16 tries ``flash_attn``, then ``torch_varlen`` (those installed), then
    ``sdpa``; every other case is ``("sdpa",)``. A forced ``"flash_attn"`` / ``"torch_varlen"`` is
    the only path tried: ``ValueError`` when the tensors cannot run it (CPU, fp32), ``RuntimeError``
    when it is not installed.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "sdpa":
        return ("sdpa",)
    fast = device_type == "cuda" and dtype in _HALF
    if available is None:
        available = available_backends() if fast else frozenset()
    if requested == "auto":
        if not fast:
            return ("sdpa",)
        return tuple(b for b in ("flash_attn", "torch_varlen") if b in available) + ("sdpa",)
    if not fast:
        raise ValueError(
            f"varlen_attention: backend={requested!r} needs CUDA fp16/bf16 tensors, got {dtype} on {device_type}; "
            "cast q, k, v to bf16 (or run under torch.autocast), or use backend='sdpa' / 'auto'"
        )
    if requested not in available:
        why = ("flash-attn is not installed or does not import (pip install flash-attn)" if requested == "flash_attn"
               else "this torch build has no torch.nn.attention.varlen.varlen_attn (torch >= 2.9)")
        raise RuntimeError(f"varlen_attention: backend={requested!r} is not available: {why}; use backend='auto'")
    return (requested,)


def _requested_backend(requested: str | None) -> str:
    if requested is not None:
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


def _window_size(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """flash-attn's ``(left, right)``: query ``i`` sees keys ``i - left .. i + right`` (-1: unbounded)."""
    left = -1 if sliding_window is None else sliding_window - 1
    return left, 0 if causal else left


def _run_flash_attn(q, k, v, cu, max_seqlen, causal, scale, sliding_window=None):
    fn = _flash_attn_varlen_func()
    if fn is None:
        return None
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=causal,
              window_size=_window_size(causal, sliding_window))


def _run_torch_varlen(q, k, v, cu, max_seqlen, causal, scale, sliding_window=None):
    """torch's varlen flash kernel; None when this torch's signature cannot express the call."""
    fn, params = _torch_varlen_attn()
    if fn is None:
        return None
    kw = {}
    if "window_size" in params:
        kw["window_size"] = _window_size(causal, sliding_window)
    elif sliding_window is not None:
        return None
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
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)


# --------------------------------------------------------------------------------------------------
# the SDPA path (CPU, fp32 on CUDA, fallback)


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


def _group_mask(L: int, key_len, causal: bool, sliding_window: int | None, device):
    """The boolean SDPA mask of one group (None: ``is_causal`` alone is exact), and whether it holds causality.

    Padding sits at the end of each sequence, so under causality valid queries never see it; without
    causality keys past a sequence's length are masked, except for the padded queries themselves
    (their outputs are dropped, and a row with no key at all would turn into NaNs in the backward).
    A sliding window of ``W`` keeps the keys at distance ``< W`` (before the query, or either side).
    """
    windowed = sliding_window is not None and L > sliding_window
    if not windowed and (causal or key_len is None):
        return None
    pos = torch.arange(L, device=device)
    mask = None
    if windowed:
        dist = pos[:, None] - pos[None, :]  # query - key
        mask = (dist >= 0) & (dist < sliding_window) if causal else dist.abs() < sliding_window
        mask = mask[None, None]  # [1, 1, L, L]
    if key_len is not None and not causal:
        key_ok = pos[None, :] < key_len[:, None]  # [S, L]
        keep = (key_ok[:, None, :] | ~key_ok[:, :, None])[:, None]  # [S, 1, L, L]: padded queries see all
        mask = keep if mask is None else mask & keep
    return mask


def _sdpa_varlen(q, k, v, bounds, causal, scale, sliding_window):
    hq, hkv, dv = q.shape[1], k.shape[1], v.shape[-1]
    groups, out_pos, in_tok, in_pos, in_rows = _group_plan(bounds, q.device)
    extra = {"enable_gqa": True} if hq != hkv else {}

    def attend(qq, kk, vv, key_len=None):  # [S, L, H, D] views -> [S * L, Hq, Dv]
        mask = _group_mask(qq.shape[1], key_len, causal, sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
            attn_mask=mask, is_causal=causal and mask is None, scale=scale, **extra,
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
        outs.append(attend(pq[row : row + n].view(S, L, hq, -1), pk[row : row + n].view(S, L, hkv, -1),
                           pv[row : row + n].view(S, L, hkv, -1), key_len))
    out = torch.cat(outs)
    return out if out_pos is None else out.index_select(0, out_pos)


# --------------------------------------------------------------------------------------------------
# cu_seqlens validation (once per tensor: every layer of a forward gets the same cu_seqlens object)


class _ValidatedBounds:
    """The validated host copy of the last ``cu_seqlens`` tensor seen (one device-to-host read per tensor).

    Keyed on the tensor object through a weak reference (a freed tensor can never match), its version
    counter (in-place edits invalidate), ``T`` and ``max_seqlen``.
    """

    def __init__(self):
        self.ref = None
        self.key = None
        self.bounds: tuple[int, ...] = ()

    def get(self, cu_seqlens: torch.Tensor, T: int, max_seqlen: int | None) -> tuple[int, ...]:
        try:
            key = (cu_seqlens._version, T, max_seqlen)
        except RuntimeError:  # inference-mode tensors have no version counter: never cache them
            key = None
        if key is not None and self.ref is not None and self.ref() is cu_seqlens and self.key == key:
            return self.bounds
        bounds = tuple(cu_seqlens.tolist())
        _check_bounds(bounds, T, max_seqlen)
        self.ref, self.key, self.bounds = weakref.ref(cu_seqlens), key, bounds
        return bounds


_validated = _ValidatedBounds()


def _check_bounds(bounds: tuple[int, ...], T: int, max_seqlen: int | None) -> None:
    if not bounds or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in itertools.pairwise(bounds)):
        head = list(bounds) if len(bounds) <= 8 else [*bounds[:4], "...", *bounds[-3:]]
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {head}")
    longest = max((b - a for a, b in itertools.pairwise(bounds)), default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest}) in cu_seqlens; "
                         "pass the true maximum (or None to derive it)")


# --------------------------------------------------------------------------------------------------
# the op


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each of the sequences packed in ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``.

    ``cu_seqlens`` is the int32 ``[S + 1]`` prefix sums of the sequence lengths (``cu_seqlens[0] == 0``,
    ``cu_seqlens[-1] == T``; repeated entries are empty sequences); it is validated on every path
    (``ValueError``; read once per tensor object, so the layers of one forward share one read).
    ``max_seqlen`` is the longest length (derived when None; a smaller value is an error).
    ``softmax_scale`` defaults to ``D ** -0.5``. ``sliding_window=W`` keeps, for each query, the keys
    at distance ``< W`` (the query and the ``W - 1`` before it; either side without ``causal``), as
    transformers' sliding-window layers do. ``backend`` (``"auto"``, ``"flash_attn"``,
    ``"torch_varlen"``, ``"sdpa"``) forces a path, see :func:`choose_backend`; the default follows
    ``BCR_KERNEL_BACKEND`` (``torch`` means ``"sdpa"``). q, k, v are cast to :func:`compute_dtype`
    first; returns ``[T, Hq, Dv]`` in that dtype. :func:`last_dispatch` tells what ran.
    """
    global _last_dispatch
    _check_inputs(q, k, v, cu_seqlens, sliding_window)
    T = q.shape[0]
    bounds = _validated.get(cu_seqlens, T, None if max_seqlen is None else int(max_seqlen))
    input_dtypes = (q.dtype, k.dtype, v.dtype)
    dtype = compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    candidates = choose_backend(q.device.type, dtype, _requested_backend(backend))
    longest = max((b - a for a, b in itertools.pairwise(bounds)), default=0)
    if sliding_window is not None and sliding_window >= longest:
        sliding_window = None  # the window covers every sequence whole: plain attention
    if T == 0:
        ran = candidates[-1]
        out = q.new_zeros(0, q.shape[1], v.shape[-1])
        if q.requires_grad or k.requires_grad or v.requires_grad:
            out = out + 0 * (q.sum() + k.sum() + v.sum())  # keep the graph (zero gradients)
    else:
        m = longest if max_seqlen is None else int(max_seqlen)
        ran, out = _run_first_that_works(candidates, q, k, v, cu_seqlens, bounds, m, causal, softmax_scale,
                                         sliding_window)
    _last_dispatch = Dispatch(ran, q.device.type, dtype, input_dtypes, sliding_window)
    return out


def _check_inputs(q, k, v, cu_seqlens, sliding_window) -> None:
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
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of keys (or None), got {sliding_window}")


def _run_first_that_works(candidates, q, k, v, cu_seqlens, bounds, max_seqlen, causal, scale, sliding_window):
    """``(name, output)`` of the first candidate path that runs. A single (forced) candidate runs or
    raises; under ``auto`` a failing CUDA kernel falls through to the next path, except on out-of-memory."""
    runners = {"flash_attn": _run_flash_attn, "torch_varlen": _run_torch_varlen}
    fast = [name for name in candidates if name != "sdpa"]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32) if fast else None
    for name in fast:
        if len(candidates) == 1:
            out = runners[name](q, k, v, cu, max_seqlen, causal, scale, sliding_window)
            if out is None:
                raise RuntimeError(f"varlen_attention: this torch's varlen_attn cannot run causal={causal}, "
                                   f"sliding_window={sliding_window}; use backend='auto'")
            return name, out
        try:
            out = runners[name](q, k, v, cu, max_seqlen, causal, scale, sliding_window)
        except torch.OutOfMemoryError:
            raise  # the SDPA fallback needs more memory, not less
        except (RuntimeError, ValueError) as exc:  # unsupported GPU / head dim: fall through
            _warn_once(name, f"varlen_attention: {name} failed ({exc}); trying the next path")
            continue
        if out is not None:
            return name, out
    return "sdpa", _sdpa_varlen(q, k, v, bounds, causal, scale, sliding_window)
