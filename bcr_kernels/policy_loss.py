"""GRPO clipped surrogate (+ k3 KL) over packed tokens: fused Triton forward and backward.

Semantics: ``bcr_kernels.reference.policy_loss``. Per token ``t`` (all inputs ``[T]``)::

    ratio = exp(logp - old_logp)
    l     = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl
    kl    = exp(ref - logp) - (ref - logp) - 1

and every ``loss_type`` is a weighted token sum ``loss = sum_t l_t * w_t / D`` with ``w_t = mask_t``
(``token_mean``, ``seq_mean_token_sum_norm``) or ``w_t = mask_t / max(sum(mask)_s(t), 1)``
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

A vectorised PyTorch path (same maths, autograd) runs when Triton is not picked
(``bcr_kernels._dispatch.use_triton``).
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton

try:  # Triton is optional: the PyTorch path covers machines without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

LOSS_TYPES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
_BLOCK = 1024
_N_STATS = 8  # columns of the partial-sum rows (6 used, padded to 8)
METRIC_NAMES = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "ratio_mean",
    "kl",
)


# ----------------------------------------------------------------------------------------------
# Aggregation weights (mask-only, shared by both paths)
# ----------------------------------------------------------------------------------------------


def _seq_mask_counts(m: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """fp32 ``[S]``: ``sum(mask)`` of each sequence (fp64 prefix sums: deterministic, exact for 0/1 masks)."""
    csum = torch.zeros(m.numel() + 1, dtype=torch.float64, device=m.device)
    torch.cumsum(m.to(torch.float64), 0, out=csum[1:])
    cu = cu.long()
    return (csum[cu[1:]] - csum[cu[:-1]]).to(torch.float32)


def _token_sequence_index(cu: torch.Tensor, T: int) -> torch.Tensor:
    """int32 ``[T]``: each token's sequence, -1 outside ``[cu[0], cu[-1])``."""
    cu = cu.long()
    pos = torch.arange(T, device=cu.device, dtype=torch.int64)
    sid = torch.searchsorted(cu[1:], pos, right=True)
    inside = (pos >= cu[0]) & (sid < cu.numel() - 1)
    return torch.where(inside, sid, torch.full_like(sid, -1)).to(torch.int32)


def _aggregation(m, cu, loss_type, max_completion_length, normalizer):
    """Return ``(seq_w [S] | None, sid [T] | None, denom 0-d fp32 tensor)``."""
    device = m.device
    S = cu.numel() - 1
    seq_w = sid = None
    if loss_type == "token_mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
    elif loss_type == "seq_mean_token_mean":
        seq_w = 1.0 / _seq_mask_counts(m, cu).clamp(min=1.0)
        sid = _token_sequence_index(cu, m.numel())
        denom = max(S, 1) if normalizer is None else normalizer
    else:
        if normalizer is None:
            if max_completion_length is None:
                cnt = _seq_mask_counts(m, cu)
                max_completion_length = max(int(cnt.max().item()) if S else 1, 1)
            denom = max(S, 1) * max_completion_length
        else:
            denom = normalizer
    denom = torch.as_tensor(denom, dtype=torch.float32, device=device).detach().reshape(())
    return seq_w, sid, denom


def _metrics(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics from the fp32 sums ``[mask, low, high, ratio, kl]`` (detached)."""
    stats = stats.detach()
    n = stats[0].clamp(min=1.0)
    low, high = stats[1] / n, stats[2] / n
    return {
        "clip_ratio/low_mean": low,
        "clip_ratio/high_mean": high,
        "clip_ratio/region_mean": (stats[1] + stats[2]) / n,
        "ratio_mean": stats[3] / n,
        "kl": stats[4] / n,
    }


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


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, m, ref_logp, seq_w, sid, denom, lo, hi, beta, has_kl):
        T = logp.numel()
        nblocks = triton.cdiv(T, _BLOCK)
        partials = torch.zeros((nblocks, _N_STATS), dtype=torch.float32, device=logp.device)
        per_seq = seq_w is not None
        dummy = m  # stands in for absent optional pointers (never read)
        _policy_loss_fwd_kernel[(nblocks,)](
            logp, old_logp, advantages, m, ref_logp if has_kl else dummy,
            seq_w if per_seq else dummy, sid if per_seq else dummy,
            partials, T, lo, hi, beta,
            HAS_KL=has_kl, PER_SEQ=per_seq, N_STATS=_N_STATS, BLOCK=_BLOCK,
        )
        sums = partials.sum(0)
        loss = sums[0] / denom
        stats = sums[1:6].clone()
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logp, old_logp, advantages, m, ref_logp if has_kl else None,
                              seq_w, sid, denom)
        ctx.consts = (lo, hi, beta, has_kl)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        nones = (None,) * 11
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return (None,) + nones
        logp, old_logp, advantages, m, ref_logp, seq_w, sid, denom = ctx.saved_tensors
        lo, hi, beta, has_kl = ctx.consts
        T = logp.numel()
        scale = (grad_loss.to(torch.float32) / denom).reshape(()).contiguous()
        dlogp = torch.empty_like(logp)
        per_seq = seq_w is not None
        dummy = m
        _policy_loss_bwd_kernel[(triton.cdiv(T, _BLOCK),)](
            scale, logp, old_logp, advantages, m, ref_logp if has_kl else dummy,
            seq_w if per_seq else dummy, sid if per_seq else dummy,
            dlogp, T, lo, hi, beta,
            HAS_KL=has_kl, PER_SEQ=per_seq, BLOCK=_BLOCK,
        )
        return (dlogp,) + nones


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_policy_loss(logp, old_logp, advantages, m, ref_logp, seq_w, sid, denom, lo, hi, beta, has_kl):
    # as in the Triton path, only logp is differentiated: the others are constants of the step
    lp = logp.float()
    a = advantages.detach().float()
    ratio = torch.exp(lp - old_logp.detach().float())
    per_tok = -torch.minimum(ratio * a, torch.clamp(ratio, lo, hi) * a)
    if has_kl:
        d = ref_logp.detach().float() - lp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    else:
        kl = torch.zeros_like(per_tok)
    w = m
    if seq_w is not None:
        inside = sid >= 0
        w = m * torch.where(inside, seq_w[sid.clamp(min=0).long()], torch.zeros((), device=m.device))
    loss = (per_tok * w).sum() / denom
    with torch.no_grad():
        low = ((ratio < lo) & (a < 0)).float()
        high = ((ratio > hi) & (a > 0)).float()
        stats = torch.stack([m.sum(), (low * m).sum(), (high * m).sum(), (ratio * m).sum(), (kl * m).sum()])
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "token_mean",
    max_completion_length: int | None = None,
    normalizer: float | None = None,
):
    """GRPO clipped surrogate (+ ``beta`` * k3 KL) over packed tokens; returns ``(loss, metrics)``.

    Args:
        logp: ``[T]`` log-probs of the current policy (the only input that gets a gradient).
        old_logp: ``[T]`` log-probs of the sampling policy.
        advantages: ``[T]`` per-token advantages (e.g. from ``scatter_instance_advantages``).
        mask: ``[T]`` bool or float; the tokens that count (completion tokens).
        cu_seqlens: int32 ``[S + 1]`` prefix sums of the packed sequence lengths.
        ref_logp: ``[T]`` reference-policy log-probs; the KL term is used when ``beta != 0``.
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high``
            defaults to ``epsilon``).
        loss_type: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum_norm`` (see
            ``bcr_kernels.reference.policy_loss`` for the exact aggregation).
        max_completion_length: the Dr. GRPO constant (default: longest masked sequence).
        normalizer: replaces the loss denominator (gradient accumulation over micro-batches).

    Returns:
        ``loss`` (fp32 scalar) and ``metrics``: detached fp32 scalars ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``ratio_mean`` and ``kl``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    T = logp.numel()
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, t in named.items():
        if t.dim() != 1 or t.numel() != T:
            raise ValueError(f"{name} must be [T] = [{T}] like logp, got shape {tuple(t.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [S + 1], got shape {tuple(cu_seqlens.shape)}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    lo, hi = 1.0 - float(epsilon), 1.0 + float(eps_high)
    has_kl = beta != 0.0 and ref_logp is not None
    device = logp.device
    cu = cu_seqlens.to(device)
    m = mask.to(device=device, dtype=torch.float32).contiguous()
    seq_w, sid, denom = _aggregation(m, cu, loss_type, max_completion_length, normalizer)

    args = (old_logp, advantages, m, ref_logp if has_kl else None, seq_w, sid, denom,
            lo, hi, float(beta), has_kl)
    if T > 0 and use_triton(logp, old_logp, advantages, m, ref_logp if has_kl else None):
        c = [t.contiguous() if t is not None else None for t in (logp,) + args[:4]]
        loss, stats = _PolicyLoss.apply(c[0], c[1], c[2], c[3], c[4], *args[4:])
    else:
        loss, stats = _torch_policy_loss(logp, *args)
    return loss, _metrics(stats)
