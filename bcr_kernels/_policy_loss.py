"""Policy loss over packed tokens: every TRL 1.16 objective, with a fused Triton forward and backward
for the classic clipped one.

Semantics: ``bcr_kernels.reference.policy_loss``. The options are one ``bcr_kernels.Objective``: the
objectives (``kind`` = ``clip`` | ``cispo`` | ``sapo`` | ``vespo``), importance-sampling levels
(``token`` | ``sequence`` | ``instance``), two-sided clipping (``delta``), rollout correction,
off-policy mask and entropy terms are described in ``bcr_kernels._objectives``; they run on the
vectorised PyTorch path of that module (vector ops over ``[T]``: O(T) memory, nothing of the
vocabulary's size). The Triton kernels below cover TRL's classic objective (``clip`` at the ``token``
level, no ``delta``, no rollout weights, off-policy mask or entropy mask, KL without the bias
correction; the entropy bonus is added outside them), the one every loss type used before and the hot
path of ``num_iterations > 1``. Per token ``t`` (all inputs ``[T]``)::

    ratio = exp(logp - old_logp)
    l     = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl
    kl    = exp(ref - logp) - (ref - logp) - 1

and every ``reduction`` is a weighted token sum ``loss = sum_t l_t * w_t / D`` with ``w_t = mask_t``
(``token_mean``, ``seq_mean_token_sum_norm``, ``seq_mean_token_sum``) or ``w_t = mask_t / max(sum(mask)_s(t), 1)``
(``seq_mean_token_mean``). ``D`` and the per-sequence weights depend on the mask only, so they are
computed up front in PyTorch; one Triton pass then gives the loss and every metric:

- forward: one program per block of tokens writes a row of partial sums (weighted loss, mask,
  low-clip, high-clip, ratio and KL counts); a ``torch.sum`` over the rows finishes the reduction,
  so the result is deterministic (no atomics);
- backward: one program per block of tokens writes ``d loss / d logp`` (only ``logp`` gets a
  gradient: ``old_logp``, ``ref_logp``, ``advantages`` and ``mask`` are constants). The gradient of
  ``min`` follows ``torch.minimum`` (a tie splits the gradient equally between both branches) and
  that of ``clamp`` follows ``torch.clamp`` (it passes the gradient on the closed interval), so the
  kernel matches the reference's autograd exactly, including the common ``ratio == 1`` case.

The vectorised PyTorch path (``_objectives.per_token_loss``, autograd) runs every other objective, and
this one when Triton is not picked (``bcr_kernels._dispatch.use_triton``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _common
from . import _objectives as _obj
from ._common import policy_metrics, reduction_weights, token_weights
from ._dispatch import use_triton
from .objective import Objective, resolve
from .outputs import PolicyLossOutput

try:  # Triton is optional: the PyTorch path covers machines without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

_BLOCK = 1024
_N_STATS = 8  # columns of the partial-sum rows (6 used, padded to 8)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _policy_loss_fwd_kernel(
        logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,  # [T] each (ref unused without KL)
        seq_w_ptr, sid_ptr,  # [S] fp32 and [T] int32 (PER_SEQ only)
        part_ptr,  # [num_blocks, N_STATS] fp32
        T, lo, hi, beta,
        HAS_KL: tl.constexpr,
        PER_SEQ: tl.constexpr,
        N_STATS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < T
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=inb, other=0.0).to(tl.float32)

        ratio = tl.exp(lp - old)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        per_tok = -tl.minimum(ratio * a, clipped * a)
        if HAS_KL:
            d = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lp
            kl = tl.exp(d) - d - 1.0
            per_tok = per_tok + beta * kl
        else:
            kl = tl.zeros([BLOCK], dtype=tl.float32)
        lm = per_tok * m
        if PER_SEQ:
            sid = tl.load(sid_ptr + offs, mask=inb, other=-1)
            w = tl.load(seq_w_ptr + tl.where(sid >= 0, sid, 0), mask=inb & (sid >= 0), other=0.0)
            lm = lm * w
        lm = tl.where(inb, lm, 0.0)
        low = tl.where((ratio < lo) & (a < 0.0), m, 0.0)
        high = tl.where((ratio > hi) & (a > 0.0), m, 0.0)

        row = part_ptr + pid * N_STATS
        tl.store(row + 0, tl.sum(lm, axis=0))
        tl.store(row + 1, tl.sum(m, axis=0))
        tl.store(row + 2, tl.sum(low, axis=0))
        tl.store(row + 3, tl.sum(high, axis=0))
        tl.store(row + 4, tl.sum(tl.where(inb, ratio * m, 0.0), axis=0))
        tl.store(row + 5, tl.sum(tl.where(inb, kl * m, 0.0), axis=0))

    @triton.jit
    def _policy_loss_bwd_kernel(
        scale_ptr,  # 0-d fp32: upstream gradient / D
        logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,
        seq_w_ptr, sid_ptr,
        dlogp_ptr,  # [T], logp's dtype
        T, lo, hi, beta,
        HAS_KL: tl.constexpr,
        PER_SEQ: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < T
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr)

        g_tok = scale * m  # d loss / d l_t
        if PER_SEQ:
            sid = tl.load(sid_ptr + offs, mask=inb, other=-1)
            w = tl.load(seq_w_ptr + tl.where(sid >= 0, sid, 0), mask=inb & (sid >= 0), other=0.0)
            g_tok = g_tok * w

        ratio = tl.exp(lp - old)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        a1 = ratio * a
        a2 = clipped * a
        # torch.minimum backward: the smaller input takes the gradient, a tie splits it in half.
        tie = a1 == a2
        w1 = tl.where(a1 < a2, 1.0, tl.where(tie, 0.5, 0.0))
        w2 = tl.where(a2 < a1, 1.0, tl.where(tie, 0.5, 0.0))
        # torch.clamp backward: gradient passes where lo <= ratio <= hi.
        passes = (ratio >= lo) & (ratio <= hi)
        g_min = -g_tok
        g_ratio = g_min * w1 * a + tl.where(passes, g_min * w2 * a, 0.0)
        g = g_ratio * ratio
        if HAS_KL:
            d = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lp
            g_kl = g_tok * beta
            g = g - (g_kl * tl.exp(d) - g_kl)
        tl.store(dlogp_ptr + offs, g.to(dlogp_ptr.dtype.element_ty), mask=inb)


@dataclass(frozen=True)
class _Consts:
    """The step's constants: everything but ``logp``, which alone gets a gradient."""

    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor  # fp32
    ref_logp: torch.Tensor | None  # None without the KL term
    seq_w: torch.Tensor | None  # [S] per-sequence weights (seq_mean_token_mean only)
    sid: torch.Tensor | None  # [T] int32 sequence index (with seq_w)
    denom: torch.Tensor  # 0-d fp32
    lo: float
    hi: float
    beta: float


def _kernel_args(c: _Consts):
    """The optional pointers of the kernels (a stand-in that is never read where one is absent)."""
    dummy = c.mask
    per_seq = c.seq_w is not None
    return (c.ref_logp if c.ref_logp is not None else dummy, c.seq_w if per_seq else dummy,
            c.sid if per_seq else dummy, per_seq)


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, c: _Consts):
        T = logp.numel()
        nblocks = triton.cdiv(T, _BLOCK)
        partials = torch.zeros((nblocks, _N_STATS), dtype=torch.float32, device=logp.device)
        ref, seq_w, sid, per_seq = _kernel_args(c)
        with _common.device_guard(logp):
            _policy_loss_fwd_kernel[(nblocks,)](
                logp, c.old_logp, c.advantages, c.mask, ref, seq_w, sid,
                partials, T, c.lo, c.hi, c.beta,
                HAS_KL=c.ref_logp is not None, PER_SEQ=per_seq, N_STATS=_N_STATS, BLOCK=_BLOCK,
            )
        sums = partials.sum(0)
        loss = sums[0] / c.denom
        stats = sums[1:6].clone()
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logp)
        ctx.consts = c
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return None, None
        (logp,) = ctx.saved_tensors
        c = ctx.consts
        T = logp.numel()
        scale = (grad_loss.to(torch.float32) / c.denom).reshape(()).contiguous()
        dlogp = torch.empty_like(logp)
        ref, seq_w, sid, per_seq = _kernel_args(c)
        with _common.device_guard(logp):
            _policy_loss_bwd_kernel[(triton.cdiv(T, _BLOCK),)](
                scale, logp, c.old_logp, c.advantages, c.mask, ref, seq_w, sid,
                dlogp, T, c.lo, c.hi, c.beta,
                HAS_KL=c.ref_logp is not None, PER_SEQ=per_seq, BLOCK=_BLOCK,
            )
        return dlogp, None


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_policy_loss(logp, old_logp, advantages, m, cu, segment_ids, o: Objective, ref, sampling, keep,
                       seq_w, sid, denom):
    # as in the Triton path, only logp is differentiated: the others are constants of the step
    g = _obj.groups(cu, logp.numel(), segment_ids) if o.needs_groups else None
    per_tok, ratio, kl, low, high = _obj.per_token_loss(logp, old_logp, advantages, m, o, g, ref=ref,
                                                        sampling=sampling, keep=keep)
    loss = (per_tok * token_weights(m, seq_w, sid)).sum() / denom
    return loss, _obj.stats(m, ratio, kl, low, high)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def check_inputs(named: dict, T: int, like: str) -> None:
    """Each tensor of ``named`` (None: absent) must be ``[T]``."""
    for name, t in named.items():
        if t is not None and (t.dim() != 1 or t.numel() != T):
            raise ValueError(f"{name} must be [T] = [{T}] like {like}, got shape {tuple(t.shape)}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    objective: Objective | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | None = None,
    entropy_weight: float = 1.0,
    **legacy,
) -> PolicyLossOutput:
    """The policy loss of ``objective`` over packed tokens; returns ``PolicyLossOutput(loss, metrics)``.

    Semantics: ``bcr_kernels.reference.policy_loss`` (same arguments).

    Args:
        logp: ``[T]`` log-probs of the current policy (differentiated).
        old_logp: ``[T]`` log-probs of the policy that the ratio is taken against.
        advantages: ``[T]`` per-token advantages (e.g. from ``scatter_instance_advantages``).
        mask: ``[T]`` bool or float; the tokens that count (completion tokens).
        cu_seqlens: int32 ``[S + 1]`` prefix sums of the packed sequence lengths.
        objective: ``bcr_kernels.Objective`` (default: ``Objective()``, TRL's clipped token loss).
        ref_logp: ``[T]`` reference-policy log-probs (the KL term, with ``objective.beta != 0``).
        segment_ids: ``[T]`` problem segment of each token inside its sequence, -1 for shared text
            (the ``instance`` level and ``instance_*`` modes need them).
        sampling_logp: ``[T]`` log-probs of the rollout engine (the rollout correction and the
            off-policy mask; default: ``old_logp``).
        entropy: ``[T]`` entropy of each token's distribution, needed when the objective reads it
            (``top_entropy_quantile`` < 1, ``entropy_coef``); the bonus is differentiated through it.
        normalizer: replaces the loss denominator of ``objective.reduction`` (gradient accumulation).
        entropy_weight: the weight of this call's entropy bonus (a batch split over calls: each call's
            share of the batch's loss tokens, so the bonus of the batch is its mean entropy).
        **legacy: the old keyword form of the objective's options (``epsilon=``, ``objective="sapo"``,
            ...): deprecated, a ``FutureWarning``.

    Returns:
        ``loss`` (fp32 scalar) and ``metrics``: detached fp32 scalars ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``ratio_mean`` and ``kl``; where the objective
        reads entropies also ``entropy/kept_fraction`` and ``entropy/kept_mean``.
    """
    o = resolve(objective, legacy, "policy_loss")
    T = logp.numel()
    check_inputs({"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask, "ref_logp": ref_logp,
                  "segment_ids": segment_ids, "sampling_logp": sampling_logp, "entropy": entropy}, T, "logp")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [S + 1], got shape {tuple(cu_seqlens.shape)}")
    if o.uses_entropy and entropy is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef need the tokens' entropy: pass entropy=")
    device = logp.device
    cu = cu_seqlens.to(device)
    m = mask.to(device=device, dtype=torch.float32).contiguous()
    seq_w, sid, denom = reduction_weights(m, cu, o.reduction, o.max_completion_length, normalizer)
    ref = ref_logp if (o.beta != 0.0 and ref_logp is not None) else None
    keep, e = _obj.entropy_terms(entropy, m, cu, o) if o.uses_entropy else (None, None)
    if T > 0 and o.plain and use_triton(logp, old_logp, advantages, m, ref):
        c = _Consts(old_logp.contiguous(), advantages.contiguous(), m, None if ref is None else ref.contiguous(),
                    seq_w, sid, denom, o.lo, o.hi, o.beta)
        loss, stats = _PolicyLoss.apply(logp.contiguous(), c)
    else:
        loss, stats = _torch_policy_loss(logp, old_logp, advantages, m, cu, segment_ids, o, ref, sampling_logp,
                                         keep, seq_w, sid, denom)
    if e is not None:
        if o.entropy_coef != 0.0:
            loss = loss + _obj.entropy_bonus(entropy, e, o, float(entropy_weight))
        stats = torch.cat([stats, _obj.entropy_stats(entropy, e)])
    return PolicyLossOutput(loss, policy_metrics(stats))
