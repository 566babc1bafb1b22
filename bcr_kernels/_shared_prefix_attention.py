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
``flash_attn_varlen_func`` call (``cu_seqlens_q != cu_seqlens_k``). Elsewhere branches of similar
shape are padded into groups (as :func:`bcr_kernels.varlen_attention` groups sequences on the CPU),
one SDPA call per group, gathering each group's ``[prefix; branch]`` keys straight from ``k`` and
``v``: plain causal with the branch's queries shifted past its prefix where that does fewer scores
(prefix shorter than the branch), else a lower-right causal mask; the plan is built once per layout
and shared by every layer. Semantics are those of packing every branch as its own
sequence and calling :func:`bcr_kernels.reference.varlen_attention`; the tests compare exactly that.
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
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
    flash = _flash_attn_varlen_func()
    if flash is not None and q.is_cuda and q.dtype in _HALF and k.dtype == q.dtype and v.dtype == q.dtype:
        kg = k.index_select(0, layout.kv_index)
        vg = v.index_select(0, layout.kv_index)
        return flash(q, kg, vg, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q,
                     layout.max_seqlen_k, softmax_scale=softmax_scale, causal=True)
    return _sdpa_branches(q, k, v, layout, softmax_scale)


# Branches are grouped for the CPU path as _varlen_attention groups sequences: a branch joins a group
# (sorted by size, largest first) while padding it to the group's query and key lengths costs at most
# this many extra attention scores per head; each group is then one SDPA call.
_PAD_BUDGET = 1 << 15


@dataclass(frozen=True)
class _Group:
    """One SDPA call: ``S`` branches padded to ``Lq`` queries and ``Lk`` keys.

    Either *causal* (``mask`` None, ``Lq == Lk``): each branch's queries sit after as many unused
    query slots as its prefix has tokens, so plain top-left causal attention is the bottom-right
    one the branch needs, and SDPA skips the blocks above the diagonal; or *masked*: the queries
    start at slot 0 and an additive mask gives query ``i`` of a branch with prefix ``p`` the keys
    ``0 .. p + i``. The plan takes the cheaper: ``Lk * Lk / 2`` against ``Lq * Lk`` scores a branch.
    The mask is additive (0 kept, -inf dropped) in the attention's dtype, built once per plan instead
    of converted from a boolean one by SDPA in every layer.
    """

    S: int
    Lq: int
    Lk: int
    q_rows: torch.Tensor  # long [S * Lq]: the row of q behind each query slot (0 for unused slots)
    kv_rows: torch.Tensor  # long [S * Lk]: the row of k / v behind each key slot (0 for padding)
    mask: torch.Tensor | None  # float [S, 1, Lq, Lk], 0 = attend, -inf = not (None: causal)


def _plan(layout: BranchLayout, device, dtype) -> tuple[list[_Group], torch.Tensor]:
    """The SDPA groups of a layout and, for each row of the output, its row in the groups' outputs."""
    cq, ck = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    kv_index = layout.kv_index.cpu()
    shapes = [(qe - qs, ke - ks) for qs, qe, ks, ke in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])]
    order = sorted((b for b, (lq, _) in enumerate(shapes) if lq), key=lambda b: -shapes[b][0] * shapes[b][1])
    members: list[list[int]] = []
    dims: list[tuple[int, int]] = []
    for b in order:
        lq, lk = shapes[b]
        if members:
            gq, gk = max(dims[-1][0], lq), max(dims[-1][1], lk)
            if gq * gk - min(shapes[m][0] * shapes[m][1] for m in members[-1] + [b]) <= _PAD_BUDGET:
                members[-1].append(b)
                dims[-1] = (gq, gk)
                continue
        members.append([b])
        dims.append((lq, lk))
    groups, out_pos, row = [], torch.empty(cq[-1], dtype=torch.long), 0
    for branch_ids, (Lq, Lk) in zip(members, dims):
        S = len(branch_ids)
        causal = Lk < 2 * Lq  # Lk * Lk / 2 scores per branch beat Lq * Lk
        if causal:
            Lq = Lk
        q_rows = torch.zeros(S, Lq, dtype=torch.long)
        kv_rows = torch.zeros(S, Lk, dtype=torch.long)
        prefix = torch.empty(S, dtype=torch.long)
        for j, b in enumerate(branch_ids):
            lq, lk = shapes[b]
            first = lk - lq if causal else 0  # the branch's first query slot
            q_rows[j, first : first + lq] = torch.arange(cq[b], cq[b] + lq)
            kv_rows[j, :lk] = kv_index[ck[b] : ck[b] + lk]
            out_pos[cq[b] : cq[b] + lq] = torch.arange(row + j * Lq + first, row + j * Lq + first + lq)
            prefix[j] = lk - lq
        row += S * Lq
        mask = None
        if not causal:
            # query i of a branch with prefix p sees keys 0 .. p + i (causal aligned to the bottom right);
            # valid queries never reach the padding after a branch's own keys
            reach = torch.arange(Lk)[None, None, :] - torch.arange(Lq)[None, :, None]  # key - query
            mask = torch.zeros(S, 1, Lq, Lk, dtype=dtype, device=device)
            mask.masked_fill_((reach > prefix[:, None, None])[:, None].to(device), float("-inf"))
        groups.append(_Group(S, Lq, Lk, q_rows.flatten().to(device), kv_rows.flatten().to(device), mask))
    return groups, out_pos.to(device)


class _PlanCache:
    """The plan of the last layout seen: every layer of a forward passes the same layout object."""

    def __init__(self):
        self.ref = None
        self.key = None
        self.plan = None

    def get(self, layout: BranchLayout, device, dtype):
        key = (device, dtype, _PAD_BUDGET)
        if self.ref is not None and self.ref() is layout and self.key == key:
            return self.plan
        self.plan = _plan(layout, device, dtype)
        self.ref, self.key = weakref.ref(layout), key
        return self.plan


_plans = _PlanCache()


def _sdpa_branches(q, k, v, layout: BranchLayout, scale):
    """Every branch group as one SDPA call on padded ``[S, L, H, D]`` copies gathered from ``k``, ``v``."""
    hq, hkv, dv = q.shape[1], k.shape[1], v.shape[-1]
    extra = {"enable_gqa": True} if hq != hkv else {}
    groups, out_pos = _plans.get(layout, q.device, q.dtype)
    if not groups:
        return q.new_zeros(0, hq, dv)
    outs = []
    for g in groups:
        qq = q.index_select(0, g.q_rows).view(g.S, g.Lq, hq, -1).transpose(1, 2)
        kk = k.index_select(0, g.kv_rows).view(g.S, g.Lk, hkv, -1).transpose(1, 2)
        vv = v.index_select(0, g.kv_rows).view(g.S, g.Lk, hkv, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=g.mask, is_causal=g.mask is None, scale=scale,
                                           **extra)
        outs.append(o.transpose(1, 2).reshape(g.S * g.Lq, hq, dv))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, out_pos)
