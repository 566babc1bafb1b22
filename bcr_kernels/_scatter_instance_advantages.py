"""Scatter per-instance advantages of packed sequences to their tokens (Triton forward + backward).

A packed batch holds ``S`` sequences (``cu_seqlens`` int32 ``[S + 1]``); sequence ``s`` answers
``num_instances[s]`` problems whose advantages sit in row ``s`` of ``instance_advantages [S, N_max]``.
``segment_ids [T]`` names, per token, the instance (inside its own sequence) the token belongs to,
or -1 for shared text. The op returns fp32 ``[T]``: the instance's advantage, and for shared tokens
the mean of the sequence's advantages (``shared="mean"``) or 0 (``shared="zero"``). Tokens outside
``[cu_seqlens[0], cu_seqlens[-1])`` get 0. Semantics: ``bcr_kernels.reference.scatter_instance_advantages``.

Implementation:

- forward: one Triton program per block of tokens. The per-token sequence index comes from one
  ``torch.searchsorted`` over ``cu_seqlens``; the shared fill value of each sequence is computed once
  per sequence (a vectorised masked mean over ``[S, N_max]``).
- backward: one Triton program per sequence walks the sequence's tokens and accumulates the token
  gradients into an ``N_max``-wide one-hot tile (instance grads) and a scalar (shared grads). No
  atomics, so the result is deterministic; shared gradients are spread as ``1 / n`` over the
  sequence's ``n`` instances when ``shared="mean"``.
- a vectorised PyTorch path (same maths, autograd) runs when Triton is not picked
  (``bcr_kernels._dispatch.use_triton``).
"""

from __future__ import annotations

import torch

from . import _common
from ._common import token_sequence_index
from ._dispatch import use_triton

try:  # Triton is optional: the PyTorch path covers machines without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

_SHARED_MODES = ("mean", "zero")
_FWD_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# Shared helpers (used by both paths)
# ----------------------------------------------------------------------------------------------


def _check_args(instance_advantages, segment_ids, cu_seqlens, num_instances, shared):
    if shared not in _SHARED_MODES:
        raise ValueError(f"shared must be 'mean' or 'zero', got {shared!r}")
    if instance_advantages.dim() != 2:
        raise ValueError(
            f"instance_advantages must be [S, N_max], got shape {tuple(instance_advantages.shape)}"
        )
    if not instance_advantages.is_floating_point():
        raise ValueError(f"instance_advantages must be a float tensor, got {instance_advantages.dtype}")
    if segment_ids.dim() != 1 or segment_ids.is_floating_point():
        raise ValueError(
            f"segment_ids must be an integer tensor [T], got {segment_ids.dtype} {tuple(segment_ids.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be an integer tensor [S + 1], got {tuple(cu_seqlens.shape)}")
    S = cu_seqlens.numel() - 1
    if instance_advantages.shape[0] != S:
        raise ValueError(
            f"instance_advantages has {instance_advantages.shape[0]} rows but cu_seqlens describes {S} "
            "sequences (len(cu_seqlens) - 1)"
        )
    if num_instances is not None and (num_instances.dim() != 1 or num_instances.numel() != S):
        raise ValueError(f"num_instances must be [S] = [{S}], got shape {tuple(num_instances.shape)}")


def _num_instances(num_instances, S, n_max, device):
    if num_instances is None:
        return torch.full((S,), n_max, dtype=torch.int32, device=device)
    return num_instances.to(device=device, dtype=torch.int32)


def _shared_fill(adv: torch.Tensor, n: torch.Tensor, shared: str) -> torch.Tensor:
    """fp32 ``[S]``: what a shared token of each sequence gets (mean of its first n, or 0)."""
    S, n_max = adv.shape
    if shared == "zero" or n_max == 0:
        return adv.new_zeros(S, dtype=torch.float32)
    keep = torch.arange(n_max, device=adv.device)[None, :] < n[:, None]
    total = torch.where(keep, adv.float(), torch.zeros((), device=adv.device)).sum(1)
    return total / n.clamp(min=1).to(torch.float32)


def _validate(segment_ids, sid, n, n_max):
    """Raise a ValueError naming the first token whose segment id is outside [-1, n_s)."""
    if n.numel() and (int(n.min()) < 0 or int(n.max()) > n_max):
        bad = int(torch.nonzero((n < 0) | (n > n_max))[0])
        raise ValueError(
            f"num_instances[{bad}] = {int(n[bad])} is outside [0, N_max={n_max}] "
            "(instance_advantages has N_max columns)"
        )
    if segment_ids.numel() == 0 or n.numel() == 0:
        return
    seg = segment_ids.to(torch.int64)
    inside = sid >= 0
    n_tok = torch.where(inside, n[sid.clamp(min=0).long()].to(torch.int64), torch.full_like(seg, 1 << 62))
    bad = (seg < -1) | (seg >= n_tok)
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0])
        s = int(sid[t])
        raise ValueError(
            f"sequence {s}: segment_ids[{t}] = {int(seg[t])} must lie in [-1, {int(n[s])}) "
            f"(num_instances[{s}] = {int(n[s])}; -1 marks shared text)"
        )


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _scatter_fwd_kernel(
        adv_ptr,  # [S, N_max] any float dtype
        adv_stride,
        seg_ptr,  # [T] int
        sid_ptr,  # [T] int32, -1 outside every sequence
        fill_ptr,  # [S] fp32 shared fill value
        out_ptr,  # [T] fp32
        T,
        N_MAX,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < T
        sid = tl.load(sid_ptr + offs, mask=inb, other=-1)
        seg = tl.load(seg_ptr + offs, mask=inb, other=-1).to(tl.int64)
        inside = sid >= 0
        sid64 = tl.where(inside, sid, 0).to(tl.int64)
        # ids >= N_MAX (possible only with validate=False) must not read the next row or past the buffer
        own = inside & (seg >= 0) & (seg < N_MAX)
        val = tl.load(adv_ptr + sid64 * adv_stride + tl.where(own, seg, 0), mask=own, other=0.0)
        fill = tl.load(fill_ptr + sid64, mask=inside & (seg < 0), other=0.0)
        out = tl.where(own, val.to(tl.float32), fill)
        tl.store(out_ptr + offs, out, mask=inb)

    @triton.jit
    def _scatter_bwd_kernel(
        grad_ptr,  # [T] fp32 upstream gradient
        seg_ptr,  # [T] int
        cu_ptr,  # [S + 1] int
        n_ptr,  # [S] int32
        dadv_ptr,  # [S, N_max] fp32 output (every entry written)
        dadv_stride,
        N_MAX,
        SHARED_MEAN: tl.constexpr,
        BLOCK: tl.constexpr,
        N_P2: tl.constexpr,
    ):
        s = tl.program_id(0)
        start = tl.load(cu_ptr + s).to(tl.int32)
        end = tl.load(cu_ptr + s + 1).to(tl.int32)
        cols = tl.arange(0, N_P2)
        acc = tl.zeros([N_P2], dtype=tl.float32)
        acc_shared = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            inb = offs < end
            g = tl.load(grad_ptr + offs, mask=inb, other=0.0)
            seg = tl.load(seg_ptr + offs, mask=inb, other=-1).to(tl.int32)
            hit = seg[:, None] == cols[None, :]
            acc += tl.sum(tl.where(hit, g[:, None], 0.0), axis=0)
            acc_shared += tl.where(seg < 0, g, 0.0)
        n = tl.load(n_ptr + s)
        if SHARED_MEAN:
            spread = tl.sum(acc_shared, axis=0) / tl.maximum(n, 1).to(tl.float32)
            acc += tl.where(cols < n, spread, 0.0)
        tl.store(dadv_ptr + s * dadv_stride + cols, acc, mask=cols < N_MAX)


def _triton_forward(adv, seg, sid, fill):
    T = seg.numel()
    out = torch.empty(T, dtype=torch.float32, device=adv.device)
    if T == 0:
        return out
    grid = (triton.cdiv(T, _FWD_BLOCK),)
    with _common.device_guard(adv):
        _scatter_fwd_kernel[grid](adv, adv.stride(0), seg, sid, fill, out, T, adv.shape[1], BLOCK=_FWD_BLOCK)
    return out


def _triton_backward(grad, seg, cu, n, n_max, shared):
    S = cu.numel() - 1
    dadv = torch.empty((S, n_max), dtype=torch.float32, device=grad.device)
    if S == 0 or n_max == 0:
        return dadv.zero_()
    n_p2 = triton.next_power_of_2(n_max)
    block = max(16, min(1024, 8192 // n_p2))
    with _common.device_guard(grad):
        _scatter_bwd_kernel[(S,)](
            grad, seg, cu, n, dadv, dadv.stride(0), n_max,
            SHARED_MEAN=shared == "mean", BLOCK=block, N_P2=n_p2,
        )
    return dadv


class _ScatterInstanceAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adv, seg, cu, sid, n, shared):
        adv_c = adv.contiguous() if adv.stride(-1) != 1 else adv
        fill = _shared_fill(adv_c, n, shared)
        out = _triton_forward(adv_c, seg, sid, fill)
        ctx.save_for_backward(seg, cu, n)
        ctx.shared = shared
        ctx.n_max = adv.shape[1]
        ctx.adv_dtype = adv.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        seg, cu, n = ctx.saved_tensors
        grad = grad_out.contiguous().to(torch.float32)
        dadv = _triton_backward(grad, seg, cu, n, ctx.n_max, ctx.shared)
        return dadv.to(ctx.adv_dtype), None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_scatter(adv, seg, sid, n, shared):
    T = seg.numel()
    S, n_max = adv.shape
    if T == 0 or S == 0:
        return adv.new_zeros(T, dtype=torch.float32) + 0.0 * adv.float().sum()
    fill = _shared_fill(adv, n, shared)
    inside = sid >= 0
    sid_l = sid.clamp(min=0).long()
    own = inside & (seg >= 0) & (seg < n_max)  # as the kernel: an id >= N_max (validate=False) reads nothing
    if n_max > 0:
        vals = adv.float()[sid_l, torch.where(own, seg.long(), torch.zeros_like(seg, dtype=torch.long))]
    else:
        vals = fill[sid_l]
    zero = torch.zeros((), device=adv.device)
    out = torch.where(own, vals, torch.where(seg < 0, fill[sid_l], zero))
    return torch.where(inside, out, zero)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def scatter_instance_advantages(
    instance_advantages: torch.Tensor,
    segment_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_instances: torch.Tensor | None = None,
    shared: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """Per-token advantages (fp32 ``[T]``) from per-instance advantages ``[S, N_max]``.

    Args:
        instance_advantages: ``[S, N_max]`` float; row ``s`` holds sequence ``s``'s instances.
            Differentiable (the gradient is the segment sum of the token gradients).
        segment_ids: integer ``[T]``: instance index inside the token's own sequence, -1 = shared.
        cu_seqlens: int32 ``[S + 1]`` prefix sums of the packed sequence lengths.
        num_instances: integer ``[S]``, instances per sequence (default ``N_max`` everywhere).
        shared: ``"mean"`` (shared tokens get the mean of the sequence's advantages) or ``"zero"``.
        validate: check every segment id lies in ``[-1, num_instances[s])`` and raise a ValueError
            naming the offending token otherwise. Costs one host synchronisation; pass ``False`` on
            hot GPU paths whose ids are known to be valid (invalid ids then give unspecified values, but
            nothing outside ``instance_advantages`` is read: an id >= ``N_max`` gives 0).
    """
    _check_args(instance_advantages, segment_ids, cu_seqlens, num_instances, shared)
    S, n_max = instance_advantages.shape
    device = instance_advantages.device
    T = segment_ids.numel()
    seg = segment_ids.to(device).contiguous()
    cu = cu_seqlens.to(device).contiguous()
    n = _num_instances(num_instances, S, n_max, device)
    sid = token_sequence_index(cu, T)
    if validate:
        _validate(seg, sid, n, n_max)
    if use_triton(instance_advantages, seg, cu) and n_max > 0 and S > 0:
        return _ScatterInstanceAdvantages.apply(instance_advantages, seg, cu, sid, n, shared)
    return _torch_scatter(instance_advantages, seg, sid, n, shared)
