"""Next-token targets for packed sequences, never crossing a sequence boundary.

``targets[i] = input_ids[i + 1]`` when tokens ``i`` and ``i + 1`` lie in the same sequence, else
``ignore_index`` (the last token of every sequence, and tokens outside ``[cu_seqlens[0],
cu_seqlens[-1])``). Semantics are those of :func:`bcr_kernels.reference.packed_targets`.

The Triton kernel handles a block of tokens per program: each token binary-searches
``cu_seqlens`` for ``i + 1`` (a hit means ``i + 1`` starts a sequence, so ``i`` ends one). The
PyTorch path marks sequence starts with one scatter. Both are sync-free. The op maps integers to
integers, so it has no backward. ``cu_seqlens`` must be non-decreasing with values in ``[0, T]``
(not checked: checking would force a device sync); empty sequences (repeated values) are fine.
"""

from __future__ import annotations

import torch

from . import _common, _dispatch
from ._common import IGNORE_INDEX

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["packed_targets"]

_BLOCK_T = 1024


if triton is not None:

    @triton.jit
    def _packed_targets_kernel(
        IDS, CU, OUT,
        T, S, n_steps, ignore_index,
        BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        i = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        in_t = i < T
        key = i + 1
        # Lower bound of key in CU[0..S]: first k with CU[k] >= key (k == S + 1 when none).
        lo = tl.zeros((BLOCK_T,), tl.int64)
        hi = tl.full((BLOCK_T,), 0, tl.int64) + (S + 1)
        for _ in range(n_steps):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(CU + mid, mask=active & in_t, other=0).to(tl.int64)
            go_right = active & (v < key)
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(active & ~go_right, mid, hi)
        hit = tl.load(CU + lo, mask=in_t & (lo <= S), other=-1).to(tl.int64)
        is_last = hit == key
        first = tl.load(CU).to(tl.int64)
        last = tl.load(CU + S).to(tl.int64)
        has_next = in_t & (i >= first) & (i < last) & ~is_last
        nxt = tl.load(IDS + key, mask=has_next, other=0)
        out = tl.where(has_next, nxt, ignore_index)
        tl.store(OUT + i, out.to(OUT.dtype.element_ty), mask=in_t)


def _check(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D [T], got shape {tuple(input_ids.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1] with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    for name, t in (("input_ids", input_ids), ("cu_seqlens", cu_seqlens)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if cu_seqlens.device != input_ids.device:
        raise ValueError(
            f"cu_seqlens ({cu_seqlens.device}) and input_ids ({input_ids.device}) must be on one device"
        )


def _packed_targets_triton(input_ids, cu_seqlens, ignore_index):
    T = input_ids.shape[0]
    out = torch.empty_like(input_ids)
    if T == 0:
        return out
    ids = input_ids.contiguous()
    cu = cu_seqlens.contiguous()
    S = cu.numel() - 1
    n_steps = (S + 1).bit_length() + 1
    block = min(_BLOCK_T, triton.next_power_of_2(T))
    with _common.device_guard(ids):
        _packed_targets_kernel[(triton.cdiv(T, block),)](
            ids, cu, out, T, S, n_steps, int(ignore_index), BLOCK_T=block, num_warps=4
        )
    return out


def _packed_targets_torch(input_ids, cu_seqlens, ignore_index):
    T = input_ids.shape[0]
    dev = input_ids.device
    cu = cu_seqlens.long()
    starts = torch.zeros(T + 1, dtype=torch.bool, device=dev)
    starts[cu[1:]] = True  # position cu[k] (k >= 1) starts a sequence or is the end T
    i = torch.arange(T, device=dev)
    has_next = (i >= cu[0]) & (i < cu[-1]) & ~starts[1:]
    nxt = torch.empty_like(input_ids)
    if T:
        nxt[:-1] = input_ids[1:]
        nxt[-1] = ignore_index
    return torch.where(has_next, nxt, torch.full_like(input_ids, ignore_index))


def packed_targets(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Next-token targets ``[T]`` (``input_ids``' dtype) for packed ``input_ids [T]``.

    ``cu_seqlens`` is the int prefix-sum ``[S + 1]`` of sequence lengths (``cu_seqlens[-1] == T``).
    The last token of each sequence gets ``ignore_index``. No gradient (integer op).
    """
    _check(input_ids, cu_seqlens)
    if _dispatch.use_triton(input_ids, cu_seqlens):
        return _packed_targets_triton(input_ids, cu_seqlens, ignore_index)
    return _packed_targets_torch(input_ids, cu_seqlens, ignore_index)
