"""LM head + token log-probs + GRPO policy loss in one pass, for ``num_iterations == 1``.

Semantics: ``reference.policy_loss(logp, logp.detach(), ...)`` with
``logp = reference.fused_linear_logprobs(hidden, weight, targets, ...)``, values and gradients
(``hidden``, ``weight``, ``bias``). With ``old_logp = logp.detach()`` the ratio is exactly 1, so the
upstream gradient of each token's log-prob is known as soon as that log-prob is:

    d loss / d logp_t = w_t / D * ( -A_t * c_min  +  beta * (1 - exp(ref_t - logp_t)) )

where ``w_t / D`` is the token weight of the ``reduction`` (``bcr_kernels._common.reduction_weights``:
mask-only, computed before the chunk loop) and ``c_min`` is ``d(-min(r * A, clamp(r) * A)) / d r`` at
``r = 1`` with ``torch.minimum`` / ``torch.clamp`` tie semantics (1 for any ``epsilon >= 0``: a tie
splits the gradient in halves, both pass). So the LM-head gradients are produced in the forward,
chunk by chunk (three big matmuls per chunk instead of four: no recomputation in backward)::

    logits_c = hidden_c @ weight.T (+ bias)          # 1
    logp_c, lse_c (, entropy_c)
    g_c = d loss / d logp_c
    dlogits_c = g_c * (onehot - softmax) / temperature   (in place, in the chunk buffer)
    grad_hidden[c] = dlogits_c @ weight              # 2
    grad_weight   += dlogits_c.T @ hidden_c          # 3
    grad_bias     += dlogits_c.sum(0)

Backward only scales the stored gradients by the scalar upstream gradient (in place; the graph can be
back-propagated once). Memory: the gradients of ``hidden``/``weight``/``bias`` are held from the forward
to the backward (fp32 ``grad_weight`` for bf16/fp16 weights, as in ``fused_linear_logprobs``), plus
O(``chunk_tokens`` x V) during the forward.

Backends and mixed precision: as ``fused_linear_logprobs`` — Triton log-softmax kernels
(``logprobs_fwd`` / ``logprobs_bwd_inplace`` of ``token_logprobs``) when
``bcr_kernels._dispatch.use_triton`` picks Triton, in-place PyTorch ops otherwise; under
``torch.autocast`` the operands are cast as for ``F.linear`` and every head GEMM runs in that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _common
from ._common import (
    IGNORE_INDEX,
    LOW_PRECISION,
    HeadOptions,
    WeightGrad,
    add_head_grads_,
    check_reduction,
    chunk_log_softmax_,
    chunk_logits,
    chunk_logits_fp32,
    policy_metrics,
    reduction_weights,
    token_weights,
)
from ._dispatch import use_triton
from ._fused_linear_logprobs import default_chunk_tokens
from ._token_logprobs import logprobs_bwd_inplace, logprobs_fwd
from .outputs import FusedPolicyLossOutput

__all__ = ["fused_linear_policy_loss"]


@dataclass(frozen=True)
class _Tokens:
    """The per-token constants ``[T]`` of the loss (no gradient)."""

    targets: torch.Tensor
    adv: torch.Tensor  # fp32
    mask: torch.Tensor  # fp32
    wd: torch.Tensor  # fp32 token weight / D
    ref: torch.Tensor | None  # fp32 reference log-probs, None without the KL term


@dataclass(frozen=True)
class _Options:
    head: HeadOptions
    beta: float
    lo: float  # clip range of the ratio (metrics only: the ratio is 1)
    hi: float
    needs: tuple[bool, bool, bool]  # gradients of hidden, weight, bias


# --------------------------------------------------------------------------------------------------
# per-token pieces (fp32 [n] vectors)


def _dloss_dlogp(logp_c, adv_c, wd_c, ref_c, beta, c_min):
    """``d loss / d logp`` for a chunk at ratio 1; ``wd_c`` = token weight / D."""
    g = -adv_c * c_min * wd_c
    if ref_c is not None:
        g_kl = wd_c * beta
        g = g - (g_kl * torch.exp(ref_c - logp_c) - g_kl)
    return g


def _ratio_one_grad_coef(lo: float, hi: float) -> float:
    """``d(min(r * A, clamp(r, lo, hi) * A)) / d(r * A)`` at ``r = 1``, torch.minimum/clamp semantics."""
    c = min(max(1.0, lo), hi)
    if c == 1.0:  # tie: half to each branch; clamp passes on the closed interval
        return 1.0
    # ratio is clipped: clamp blocks its gradient; the unclipped branch wins where it is smaller, which
    # depends on sign(A) -- not reachable with epsilon >= 0, rejected by the caller.
    raise ValueError("fused_linear_policy_loss needs 1 - epsilon <= 1 <= 1 + epsilon_high")


# --------------------------------------------------------------------------------------------------
# chunk loops: fill logp (and entropy) and the three gradients


def _chunk_grad(lp, tok: _Tokens, c0, n, o: _Options, c_min):
    return _dloss_dlogp(lp, tok.adv[c0 : c0 + n], tok.wd[c0 : c0 + n],
                        None if tok.ref is None else tok.ref[c0 : c0 + n], o.beta, c_min)


def _torch_pass(hidden, weight, bias, tok: _Tokens, o: _Options, c_min):
    h_o = o.head
    need_h, need_w, need_b = o.needs
    T = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    lowp = hidden.dtype in LOW_PRECISION
    inv_t = 1.0 / h_o.temperature
    rows = max(1, min(h_o.chunk, T))
    buf32 = torch.empty(rows, V, device=dev, dtype=torch.float32)
    buf_low = torch.empty(rows, V, device=dev, dtype=hidden.dtype) if lowp else None
    ebuf = torch.empty_like(buf32) if h_o.return_entropy else None
    logp = torch.empty(T, device=dev, dtype=torch.float32)
    entropy = torch.empty(T, device=dev, dtype=torch.float32) if h_o.return_entropy else None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = WeightGrad(weight, rows) if need_w else None
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_b else None

    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        x = chunk_logits_fp32(buf32[:n], buf_low[:n] if lowp else None, h_c, weight, bias, inv_t)
        t = tok.targets[c0 : c0 + n]
        lp, _, ent, d, s = chunk_log_softmax_(x, t, h_o.ignore_index, ebuf[:n] if h_o.return_entropy else None)
        if h_o.return_entropy:
            entropy[c0 : c0 + n] = ent
        logp[c0 : c0 + n] = lp
        if not any(o.needs):
            continue
        g = _chunk_grad(lp, tok, c0, n, o, c_min)
        valid = t != h_o.ignore_index
        g = torch.where(valid, g * inv_t, torch.zeros_like(g)).unsqueeze(1)
        d.mul_((-g) / s.unsqueeze(1))  # d = exp(x - max): -g * softmax
        d.scatter_add_(1, torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1), g)  # + g * onehot
        if lowp:  # the head GEMMs run in the inputs' dtype
            d = buf_low[:n].copy_(d)
        add_head_grads_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return logp, entropy, grad_h, grad_w, grad_b


def _triton_pass(hidden, weight, bias, tok: _Tokens, o: _Options, c_min):
    h_o = o.head
    need_h, need_w, need_b = o.needs
    T = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    rows = max(1, min(h_o.chunk, T))
    buf = torch.empty(rows, V, device=dev, dtype=hidden.dtype)
    logp = torch.empty(T, device=dev, dtype=torch.float32)
    entropy = torch.empty(T, device=dev, dtype=torch.float32) if h_o.return_entropy else None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = WeightGrad(weight, rows) if need_w else None
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_b else None
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        t = tok.targets[c0 : c0 + n]
        x = chunk_logits(buf[:n], h_c, weight, bias, 1.0)
        lp, lse_c, ent = logprobs_fwd(x, t, h_o.temperature, h_o.ignore_index, h_o.return_entropy)
        logp[c0 : c0 + n] = lp
        if h_o.return_entropy:
            entropy[c0 : c0 + n] = ent
        if not any(o.needs):
            continue
        g = _chunk_grad(lp, tok, c0, n, o, c_min)
        g = torch.where(t != h_o.ignore_index, g, torch.zeros_like(g)).contiguous()
        logprobs_bwd_inplace(x, t, lse_c, g, h_o.temperature, h_o.ignore_index)  # x <- d loss / d logits
        add_head_grads_(x, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return logp, entropy, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# autograd


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """``(loss, stats, logp, entropy)``; the head's gradients are computed here, in the forward.

    Call it with autocast off (the entry point casts the operands first).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tok: _Tokens, o: _Options):
        c_min = _ratio_one_grad_coef(o.lo, o.hi)
        T = hidden.shape[0]
        if T == 0:
            logp = hidden.new_zeros(0, dtype=torch.float32)
            entropy = logp if o.head.return_entropy else None
            grads = [torch.zeros_like(t) if (t is not None and nd) else None
                     for t, nd in zip((hidden, weight, bias), o.needs)]
        else:
            run = _triton_pass if o.head.triton else _torch_pass
            logp, entropy, grad_h, grad_w, grad_b = run(hidden, weight, bias, tok, o, c_min)
            grads = [grad_h, None if grad_w is None else grad_w.result(weight.dtype),
                     grad_b if grad_b is None or grad_b.dtype == bias.dtype else grad_b.to(bias.dtype)]
        # loss and metrics at ratio 1, from the [T] log-probs (cheap vector ops)
        adv, m = tok.adv, tok.mask
        ratio = torch.ones_like(logp)
        per_tok = -torch.minimum(adv, min(max(1.0, o.lo), o.hi) * adv)
        if tok.ref is not None:
            dk = tok.ref - logp
            kl = torch.exp(dk) - dk - 1
            per_tok = per_tok + o.beta * kl
        else:
            kl = torch.zeros_like(logp)
        loss = (per_tok * tok.wd).sum()  # wd already holds 1 / D
        low = ((ratio < o.lo) & (adv < 0)).float()
        high = ((ratio > o.hi) & (adv > 0)).float()
        stats = torch.stack([m.sum(), (low * m).sum(), (high * m).sum(), (ratio * m).sum(), (kl * m).sum()])
        ctx.grads = grads
        if entropy is None:
            entropy = logp.new_empty(0)
        ctx.mark_non_differentiable(stats, logp, entropy)
        return loss, stats, logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _gs, _glp, _ge):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("fused_linear_policy_loss: the graph can be back-propagated only once")
        ctx.grads = None
        go = grad_loss.reshape(())
        out = [None if g is None else g.mul_(go.to(g.dtype)) for g in grads]
        return out[0], out[1], out[2], None, None


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    max_completion_length: int | None = None,
    normalizer: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    return_entropy: bool = False,
) -> FusedPolicyLossOutput:
    """GRPO loss of the LM head's token log-probs with ``old_logp = logp.detach()`` (``num_iterations == 1``).

    Equals ``policy_loss(logp, logp.detach(), advantages, mask, cu_seqlens, ...)`` with
    ``logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature).logp``
    in value and in the gradients of ``hidden`` ``[T, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]``,
    which are computed during this call (see the module docstring). ``advantages``, ``mask``,
    ``ref_logp`` are constants. Returns ``FusedPolicyLossOutput(loss, metrics, logp, entropy)``
    (``logp``: detached fp32 ``[T]``; ``entropy``: detached fp32 ``[T]`` with ``return_entropy``, else
    None). ``epsilon``/``epsilon_high`` only matter for the metrics' definitions (the ratio is 1:
    nothing is clipped). Under ``torch.autocast`` the operands are cast as for ``F.linear``.
    """
    check_reduction(reduction)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] must share H; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    T = hidden.shape[0]
    named = {"targets": targets, "advantages": advantages, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, t in named.items():
        if t.dim() != 1 or t.numel() != T:
            raise ValueError(f"{name} must be [T] = [{T}], got shape {tuple(t.shape)}")
    hidden, weight, bias = _common.cast_like_linear(hidden, weight, bias)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype; got {hidden.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    lo, hi = 1.0 - float(epsilon), 1.0 + float(eps_high)
    _ratio_one_grad_coef(lo, hi)  # validate early

    dev = hidden.device
    h = hidden.contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    tg = targets.to(dev).contiguous()
    m = mask.to(device=dev, dtype=torch.float32).contiguous()
    adv = advantages.detach().to(device=dev, dtype=torch.float32).contiguous()
    has_kl = beta != 0.0 and ref_logp is not None
    ref = ref_logp.detach().to(device=dev, dtype=torch.float32).contiguous() if has_kl else None

    # token weights / D (mask and sequence boundaries only): policy_loss's aggregation
    seq_w, sid, denom = reduction_weights(m, cu_seqlens.to(dev), reduction, max_completion_length, normalizer)
    wd = (token_weights(m, seq_w, sid) / denom).contiguous()

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and w.requires_grad,
             grad_on and b is not None and b.requires_grad)
    V = w.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(T, V)
    head = HeadOptions(float(temperature), int(ignore_index), chunk, bool(return_entropy), use_triton(h, w, tg, b))
    opts = _Options(head, float(beta), lo, hi, needs)
    with _common.autocast_off(dev.type):
        loss, stats, logp, entropy = _FusedLinearPolicyLoss.apply(h, w, b, _Tokens(tg, adv, m, wd, ref), opts)
    return FusedPolicyLossOutput(loss, policy_metrics(stats), logp, entropy if return_entropy else None)
