"""Attention over packed rows in which several completions share one prompt.

A group of G samples of one prompt is packed once as ``[prompt, completion 1, ..., completion G]``:
the prompt attends causally to itself, and completion ``g`` attends to the whole prompt and causally
to its own tokens, never to another completion. Every token then sees exactly what it sees when the
group is packed as G separate ``[prompt, completion g]`` sequences, but the prompt's hidden states
are computed once, and its gradients add up over the G completions as they do there.

The layout is read from the position ids alone (``[T]``): a *sequence* starts where the position is
0; a *branch* starts wherever the position does not continue the previous one. A branch that starts
at position ``p > 0`` continues the first ``p`` tokens of its sequence (its *prefix*); a branch that
starts at 0 is the sequence's trunk (``[prompt, completion 1]`` above, positions ``0 .. P + C1 - 1``).
Completions ``2 .. G`` are branches at position ``P``, so their rotary positions continue from the
prompt's length. A row of ordinary packed sequences is the special case of trunks only.

Computation: each branch's keys and values are gathered as ``[its prefix; itself]`` (the prompt's
K/V rows are copied once per branch; its hidden states are not), then attention runs with separate
query and key lengths, causal aligned to the bottom right (query ``i`` of a branch with ``Lq``
queries and ``Lk`` keys sees keys ``0 .. Lk - Lq + i``). On CUDA in fp16/bf16 this is one
``flash_attn_varlen_func`` call (``cu_seqlens_q != cu_seqlens_k``); elsewhere one SDPA call per
branch with a lower-right causal mask. Semantics are those of packing every branch as its own
sequence and calling :func:`bcr_kernels.reference.varlen_attention`; the tests compare exactly that.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BranchLayout", "branch_layout", "shared_prefix_attention"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BranchLayout:
    """Where the branches of a packed row are, and which key/value rows each one reads."""

    cu_seqlens_q: torch.Tensor  # int32 [B + 1]: branch boundaries in the row (branches tile it)
    cu_seqlens_k: torch.Tensor  # int32 [B + 1]: boundaries of the gathered keys ([prefix; branch])
    kv_index: torch.Tensor  # long [K]: the row of k/v behind each gathered key
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def num_branches(self) -> int:
        return int(self.cu_seqlens_q.numel()) - 1

    @property
    def is_plain(self) -> bool:
        """True when no branch has a prefix (every branch is an ordinary sequence)."""
        return int(self.kv_index.numel()) == int(self.cu_seqlens_q[-1])


def branch_layout(position_ids: torch.Tensor) -> BranchLayout:
    """The :class:`BranchLayout` of a packed row from its position ids (``[T]`` or ``[1, T]``).

    Raises ValueError when a branch continues a prefix its sequence does not have (a branch at
    position ``p`` needs a trunk of at least ``p`` tokens before it, starting at position 0).
    Needs one device-to-host copy of the branch starts (not of the whole row).
    """
    pos = position_ids.reshape(-1)
    if position_ids.dim() > 2 or (position_ids.dim() == 2 and position_ids.shape[0] != 1):
        raise ValueError(f"position_ids must be [T] or [1, T], got shape {tuple(position_ids.shape)}")
    T = pos.numel()
    device = pos.device
    if T == 0:
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        return BranchLayout(zero, zero, torch.zeros(0, dtype=torch.long, device=device), 0, 0)
    starts = torch.ones(T, dtype=torch.bool, device=device)
    starts[1:] = pos[1:] != pos[:-1] + 1
    arange = torch.arange(T, device=device)
    seq_start = torch.where(pos == 0, arange, torch.full_like(arange, -1)).cummax(0).values
    b_start = starts.nonzero().flatten()
    info = torch.stack([b_start, pos[b_start], seq_start[b_start]]).tolist()
    bounds = info[0] + [T]
    q_lens, k_lens, pieces = [], [], []
    trunk_end: dict[int, int] = {}  # sequence start -> end of its trunk
    for i, (start, prefix, seq) in enumerate(zip(*info)):
        end = bounds[i + 1]
        if prefix == 0:
            trunk_end[start] = end
        elif seq < 0 or trunk_end.get(seq, seq) - seq < prefix:
            raise ValueError(
                f"position_ids: the branch at row {start} starts at position {prefix}, but its sequence has no "
                f"trunk of {prefix} tokens from position 0 before it; pack each group as [prompt, completion 1, "
                "...] with every completion's positions continuing from the prompt's length"
            )
        if prefix:
            pieces.append(torch.arange(seq, seq + prefix, device=device))
        pieces.append(torch.arange(start, end, device=device))
        q_lens.append(end - start)
        k_lens.append(prefix + end - start)
    return BranchLayout(
        cu_seqlens_q=_cumsum(q_lens, device),
        cu_seqlens_k=_cumsum(k_lens, device),
        kv_index=torch.cat(pieces),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(k_lens),
    )


def _cumsum(lengths: list[int], device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out.to(device)


@functools.cache
def _flash_attn_varlen_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BranchLayout,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of a packed row with shared prefixes (see the module docstring).

    ``q`` is ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (``Hq % Hkv == 0``); returns ``[T, Hq, Dv]``.
    """
    T, hq = q.shape[0], q.shape[1]
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if int(layout.cu_seqlens_q[-1]) != T:
        raise ValueError(f"the layout covers {int(layout.cu_seqlens_q[-1])} rows, the row has {T}")
    kg = k.index_select(0, layout.kv_index)
    vg = v.index_select(0, layout.kv_index)
    flash = _flash_attn_varlen_func()
    if flash is not None and q.is_cuda and q.dtype in _HALF and k.dtype == q.dtype and v.dtype == q.dtype:
        return flash(q, kg, vg, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q,
                     layout.max_seqlen_k, softmax_scale=softmax_scale, causal=True)
    return _sdpa_branches(q, kg, vg, layout, softmax_scale)


def _sdpa_branches(q, kg, vg, layout: BranchLayout, scale):
    hq, hkv, dv = q.shape[1], kg.shape[1], vg.shape[-1]
    extra = {"enable_gqa": True} if hq != hkv else {}
    cq, ck = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    outs = []
    for qs, qe, ks, ke in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        mask = None
        if lk != lq:  # queries see the whole prefix: causal aligned to the bottom right
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        o = F.scaled_dot_product_attention(
            q[None, qs:qe].transpose(1, 2), kg[None, ks:ke].transpose(1, 2), vg[None, ks:ke].transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=scale, **extra,
        )
        outs.append(o.transpose(1, 2).reshape(lq, hq, dv))
    if not outs:
        return q.new_zeros(0, hq, dv)
    return torch.cat(outs)
