"""LM head + token log-probs + GRPO policy loss in one pass, for ``num_iterations == 1``.

Semantics: ``reference.policy_loss(logp, logp.detach(), ...)`` with
``logp = reference.fused_linear_logprobs(hidden, weight, targets, ...)``, values and gradients
(``hidden``, ``weight``, ``bias``). With ``old_logp = logp.detach()`` the ratio is exactly 1, so the
upstream gradient of each token's log-prob is known as soon as that log-prob is:

    d loss / d logp_t = w_t / D * ( -A_t * c_min  +  beta * (1 - exp(ref_t - logp_t)) )

where ``w_t / D`` is the token weight of the loss type (``bcr_kernels.policy_loss._aggregation``:
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

Backends: as ``fused_linear_logprobs`` — Triton log-softmax kernels (``_logprobs_fwd`` /
``_logprobs_bwd_inplace`` of ``bcr_kernels.token_logprobs``) when ``bcr_kernels._dispatch.use_triton``
picks Triton, in-place PyTorch ops otherwise.
"""

from __future__ import annotations

import importlib

import torch

from ._dispatch import use_triton
from .reference import IGNORE_INDEX

_fll = importlib.import_module(__package__ + ".fused_linear_logprobs")
_pl = importlib.import_module(__package__ + ".policy_loss")

__all__ = ["fused_linear_policy_loss"]


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


def _torch_pass(hidden, weight, bias, targets, adv, wd, ref, beta, c_min, temperature, ignore_index, chunk,
                return_entropy, needs):
    need_h, need_w, need_b = needs
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    lowp = hidden.dtype in _fll._LOW_PRECISION
    inv_t = 1.0 / temperature
    rows = max(1, min(chunk, T))
    buf32 = torch.empty(rows, V, device=dev, dtype=torch.float32)
    buf_low = torch.empty(rows, V, device=dev, dtype=hidden.dtype) if lowp else None
    ebuf = torch.empty_like(buf32) if return_entropy else None
    logp = torch.empty(T, device=dev, dtype=torch.float32)
    entropy = torch.empty(T, device=dev, dtype=torch.float32) if return_entropy else None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(V, H, device=dev, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_b else None

    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        x = buf32[:n]
        if lowp:
            _fll._chunk_logits(buf_low[:n], h_c, weight, bias, 1.0)
            x.copy_(buf_low[:n])
            if inv_t != 1.0:
                x.mul_(inv_t)
        else:
            _fll._chunk_logits(x, h_c, weight, bias, inv_t)
        t = targets[c0 : c0 + n]
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)
        x_t = x.gather(1, safe).squeeze(1)
        mx = x.amax(dim=1, keepdim=True)
        x.sub_(mx)
        if return_entropy:
            e = ebuf[:n]
            torch.exp(x, out=e)
            s = e.sum(dim=1)
            x.masked_fill_(e == 0, 0.0)
            dot = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(n)
            ent = s.log() - dot / s
            entropy[c0 : c0 + n] = torch.where(valid, ent, torch.zeros_like(ent))
            d = e  # exp(x - max), becomes the gradient
        else:
            x.exp_()
            s = x.sum(dim=1)
            d = x
        lse_c = mx.squeeze(1) + s.log()
        lp = torch.where(valid, x_t - lse_c, torch.zeros_like(lse_c))
        logp[c0 : c0 + n] = lp
        if not any(needs):
            continue
        g = _dloss_dlogp(lp, adv[c0 : c0 + n], wd[c0 : c0 + n], None if ref is None else ref[c0 : c0 + n],
                         beta, c_min)
        g = torch.where(valid, g * inv_t, torch.zeros_like(g)).unsqueeze(1)
        d.mul_((-g) / s.unsqueeze(1))  # -g * softmax
        d.scatter_add_(1, safe, g)  # + g * onehot
        _fll._add_head_grads_torch_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b,
                                    buf_low)
    return logp, entropy, grad_h, grad_w, grad_b


def _triton_pass(ops, hidden, weight, bias, targets, adv, wd, ref, beta, c_min, temperature, ignore_index, chunk,
                 return_entropy, needs):
    fwd, bwd = ops
    need_h, need_w, need_b = needs
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    lowp = hidden.dtype in _fll._LOW_PRECISION
    rows = max(1, min(chunk, T))
    buf = torch.empty(rows, V, device=dev, dtype=hidden.dtype)
    logp = torch.empty(T, device=dev, dtype=torch.float32)
    entropy = torch.empty(T, device=dev, dtype=torch.float32) if return_entropy else None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(V, H, device=dev, dtype=torch.float32 if lowp else hidden.dtype) if need_w else None
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_b else None
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        t = targets[c0 : c0 + n]
        x = _fll._chunk_logits(buf[:n], h_c, weight, bias, 1.0)
        lp, lse_c, ent = fwd(x, t, temperature, ignore_index, return_entropy)
        logp[c0 : c0 + n] = lp
        if return_entropy:
            entropy[c0 : c0 + n] = ent
        if not any(needs):
            continue
        g = _dloss_dlogp(lp, adv[c0 : c0 + n], wd[c0 : c0 + n], None if ref is None else ref[c0 : c0 + n],
                         beta, c_min)
        g = torch.where(t != ignore_index, g, torch.zeros_like(g)).contiguous()
        bwd(x, t, lse_c, g, temperature, ignore_index)  # x <- d loss / d logits (chunk)
        _fll._add_head_grads_triton_(x, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return logp, entropy, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# autograd


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, adv, m, wd, ref, beta, lo, hi, temperature,
                ignore_index, chunk, return_entropy, needs, ops):
        c_min = _ratio_one_grad_coef(lo, hi)
        T = hidden.shape[0]
        if T == 0:
            logp = hidden.new_zeros(0, dtype=torch.float32)
            entropy = logp if return_entropy else None
            grads = [torch.zeros_like(t) if (t is not None and nd) else None
                     for t, nd in zip((hidden, weight, bias), needs)]
        else:
            args = (hidden, weight, bias, targets, adv, wd, ref, beta, c_min, temperature, ignore_index, chunk,
                    return_entropy, needs)
            logp, entropy, *grads = _triton_pass(ops, *args) if ops is not None else _torch_pass(*args)
            if grads[1] is not None and grads[1].dtype != weight.dtype:
                grads[1] = grads[1].to(weight.dtype)
            if grads[2] is not None and grads[2].dtype != bias.dtype:
                grads[2] = grads[2].to(bias.dtype)
        # loss and metrics at ratio 1, from the [T] log-probs (cheap vector ops)
        ratio = torch.ones_like(logp)
        per_tok = -torch.minimum(adv, min(max(1.0, lo), hi) * adv)
        if ref is not None:
            dk = ref - logp
            kl = torch.exp(dk) - dk - 1
            per_tok = per_tok + beta * kl
        else:
            kl = torch.zeros_like(logp)
        loss = (per_tok * wd).sum()  # wd already holds 1 / D
        low = ((ratio < lo) & (adv < 0)).float()
        high = ((ratio > hi) & (adv > 0)).float()
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
        return (out[0], out[1], out[2]) + (None,) * 14


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
    loss_type: str = "token_mean",
    max_completion_length: int | None = None,
    normalizer: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    return_entropy: bool = False,
):
    """GRPO loss of the LM head's token log-probs with ``old_logp = logp.detach()`` (``num_iterations == 1``).

    Equals ``policy_loss(logp, logp.detach(), advantages, mask, cu_seqlens, ...)`` with
    ``logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)`` in
    value and in the gradients of ``hidden`` ``[T, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]``,
    which are computed during this call (see the module docstring). ``advantages``, ``mask``,
    ``ref_logp`` are constants. Returns ``(loss, metrics, logp)`` (``logp``: detached fp32 ``[T]``),
    plus the detached entropy ``[T]`` with ``return_entropy``. ``epsilon``/``epsilon_high`` only
    matter for the metrics' definitions (the ratio is 1: nothing is clipped).
    """
    if loss_type not in _pl.LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_pl.LOSS_TYPES}, got {loss_type!r}")
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
    seq_w, sid, denom = _pl._aggregation(m, cu_seqlens.to(dev), loss_type, max_completion_length, normalizer)
    wt = m
    if seq_w is not None:
        wt = m * torch.where(sid >= 0, seq_w[sid.clamp(min=0).long()], torch.zeros((), device=dev))
    wd = (wt / denom).contiguous()

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and w.requires_grad,
             grad_on and b is not None and b.requires_grad)
    V = w.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens is not None else _fll.default_chunk_tokens(T, V)
    ops = _fll._triton_ops() if use_triton(h, w, tg, b) else None
    loss, stats, logp, entropy = _FusedLinearPolicyLoss.apply(
        h, w, b, tg, adv, m, wd, ref, float(beta), lo, hi, float(temperature), int(ignore_index), chunk,
        bool(return_entropy), needs, ops,
    )
    metrics = _pl._metrics(stats)
    if return_entropy:
        return loss, metrics, logp, entropy
    return loss, metrics, logp
