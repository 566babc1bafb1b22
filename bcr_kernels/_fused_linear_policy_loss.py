"""LM head + token log-probs + policy loss, for ``num_iterations == 1``: no ``[T, V]`` tensor.

Semantics: ``reference.policy_loss(logp, logp.detach(), ...)`` with
``logp = reference.fused_linear_logprobs(hidden, weight, targets, ...)``, values and gradients
(``hidden``, ``weight``, ``bias``), for every objective, importance-sampling level, rollout correction
and off-policy mask of ``policy_loss`` (``bcr_kernels._objectives``). The head's gradients are produced
in the forward, chunk by chunk, from ``g = d loss / d logp`` (three big matmuls per chunk)::

    logits_c = hidden_c @ weight.T (+ bias)          # 1
    logp_c, lse_c (, entropy_c)
    g_c = d loss / d logp_c
    dlogits_c = g_c * (onehot - softmax) / temperature   (in place, in the chunk buffer)
    grad_hidden[c] = dlogits_c @ weight              # 2
    grad_weight   += dlogits_c.T @ hidden_c          # 3
    grad_bias     += dlogits_c.sum(0)

``g`` is ``_objectives.per_token_loss`` differentiated by autograd on ``[T]`` vectors (the weights of
the ``reduction`` folded in); with ``old_logp = logp.detach()`` every ratio is exactly 1 in value, so
how much of ``logp`` it needs decides how ``g`` is got (``_plan``):

- ``upfront`` (no KL, no rollout weights, no off-policy mask): ``g`` does not depend on the values of
  ``logp`` at all (the objectives see ``logp`` only through ``logp - sg(logp)``, or linearly), so it is
  computed once before the chunk loop, at ``logp = 0``. This covers the ``sequence`` and ``instance``
  levels too: their per-segment reduction of the log-ratio is known (0) before any log-prob is;
- ``chunk`` (``token`` level with the KL term or ``token_*`` rollout weights): each token's ``g``
  depends on its own log-prob only, so it is computed per chunk, as soon as the chunk's log-probs are;
- ``two_pass`` (the KL term at the ``sequence``/``instance`` level, ``sequence_*``/``instance_*``
  rollout weights, the off-policy mask, ``vespo`` with KL or rollout weights): ``g`` needs per-segment
  sums of functions of ``logp`` (the weights are constants, but a head gradient summed over tokens
  cannot be rescaled per segment afterwards), so a first pass over
  the chunks computes ``logp`` only (one matmul per chunk, no gradient), the segment reductions and
  ``g`` follow on ``[T]`` vectors, and the second pass is the loop above. Cost: one extra head matmul
  per chunk (TRL instead runs a whole extra no-grad model forward for the old log-probs of its vLLM
  correction).

The loss value and the metrics are then computed from the ``[T]`` log-probs (cheap vector ops).
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

import dataclasses
from dataclasses import dataclass

import torch

from . import _common
from . import _objectives as _obj
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
    sampling: torch.Tensor | None  # fp32 rollout-engine log-probs
    groups: _obj.Groups | None  # per-sequence / per-segment reductions


@dataclass(frozen=True)
class _Options:
    head: HeadOptions
    objective: _obj.Objective
    needs: tuple[bool, bool, bool]  # gradients of hidden, weight, bias


# --------------------------------------------------------------------------------------------------
# d loss / d logp


def _plan(o: _obj.Objective, has_ref: bool) -> str:
    """How ``g`` is got (module docstring): ``upfront`` | ``chunk`` | ``two_pass``."""
    if not has_ref and o.is_mode is None and o.off_policy_mask_threshold is None:
        return "upfront"
    token_local = (o.level == "token" and o.kind != "vespo" and o.off_policy_mask_threshold is None
                   and (o.is_mode is None or o.is_mode.startswith("token")))
    return "chunk" if token_local else "two_pass"


def _loss_terms(lp, tok: _Tokens, o: _obj.Objective, sl=slice(None)):
    """``per_token_loss`` at ``old = sg(lp)`` on tokens ``sl`` (the whole ``[T]`` when groups are used)."""
    ref = None if tok.ref is None else tok.ref[sl]
    sampling = None if tok.sampling is None else tok.sampling[sl]
    return _obj.per_token_loss(lp, lp.detach(), tok.adv[sl], tok.mask[sl], o, tok.groups, ref=ref,
                               sampling=sampling)


def _grad(lp, tok: _Tokens, o: _obj.Objective, sl=slice(None)):
    """``d sum_t(l_t * wd_t) / d lp`` on tokens ``sl`` (fp32, no graph kept)."""
    with torch.enable_grad():
        z = lp.detach().float().requires_grad_(True)
        loss = (_loss_terms(z, tok, o, sl)[0] * tok.wd[sl]).sum()
        (g,) = torch.autograd.grad(loss, z)
    return g


class _GradSource:
    """``g`` of a chunk: sliced from a precomputed ``[T]`` vector, or computed from the chunk's log-probs."""

    def __init__(self, tok: _Tokens, o: _obj.Objective, g: torch.Tensor | None):
        self.tok, self.o, self.g = tok, o, g

    def __call__(self, c0: int, n: int, lp_c: torch.Tensor) -> torch.Tensor:
        if self.g is not None:
            return self.g[c0 : c0 + n]
        return _grad(lp_c, self.tok, self.o, slice(c0, c0 + n))


# --------------------------------------------------------------------------------------------------
# chunk loops: fill logp (and entropy) and the three gradients


def _torch_pass(hidden, weight, bias, targets, o: _Options, grad_of):
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
        t = targets[c0 : c0 + n]
        lp, _, ent, d, s = chunk_log_softmax_(x, t, h_o.ignore_index, ebuf[:n] if h_o.return_entropy else None)
        if h_o.return_entropy:
            entropy[c0 : c0 + n] = ent
        logp[c0 : c0 + n] = lp
        if not any(o.needs):
            continue
        g = grad_of(c0, n, lp)
        valid = t != h_o.ignore_index
        g = torch.where(valid, g * inv_t, torch.zeros_like(g)).unsqueeze(1)
        d.mul_((-g) / s.unsqueeze(1))  # d = exp(x - max): -g * softmax
        d.scatter_add_(1, torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1), g)  # + g * onehot
        if lowp:  # the head GEMMs run in the inputs' dtype
            d = buf_low[:n].copy_(d)
        add_head_grads_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return logp, entropy, grad_h, grad_w, grad_b


def _triton_pass(hidden, weight, bias, targets, o: _Options, grad_of):
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
        t = targets[c0 : c0 + n]
        x = chunk_logits(buf[:n], h_c, weight, bias, 1.0)
        lp, lse_c, ent = logprobs_fwd(x, t, h_o.temperature, h_o.ignore_index, h_o.return_entropy)
        logp[c0 : c0 + n] = lp
        if h_o.return_entropy:
            entropy[c0 : c0 + n] = ent
        if not any(o.needs):
            continue
        g = grad_of(c0, n, lp)
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
        obj = o.objective
        T = hidden.shape[0]
        if T == 0:
            logp = hidden.new_zeros(0, dtype=torch.float32)
            entropy = logp if o.head.return_entropy else None
            grads = [torch.zeros_like(t) if (t is not None and nd) else None
                     for t, nd in zip((hidden, weight, bias), o.needs)]
        else:
            run = _triton_pass if o.head.triton else _torch_pass
            plan = _plan(obj, tok.ref is not None)
            g = None
            if plan == "upfront":
                g = _grad(torch.zeros(T, device=hidden.device), tok, obj)
            elif plan == "two_pass" and any(o.needs):
                first = _Options(dataclasses.replace(o.head, return_entropy=False), obj, (False, False, False))
                lp0 = run(hidden, weight, bias, tok.targets, first, None)[0]
                g = _grad(lp0, tok, obj)
            logp, entropy, grad_h, grad_w, grad_b = run(hidden, weight, bias, tok.targets, o,
                                                       _GradSource(tok, obj, g))
            grads = [grad_h, None if grad_w is None else grad_w.result(weight.dtype),
                     grad_b if grad_b is None or grad_b.dtype == bias.dtype else grad_b.to(bias.dtype)]
        # loss and metrics at old = logp, from the [T] log-probs (cheap vector ops)
        with torch.no_grad():
            per_tok, ratio, kl, low, high = _loss_terms(logp, tok, obj)
            loss = (per_tok * tok.wd).sum()  # wd already holds 1 / D
            stats = _obj.stats(tok.mask, ratio, kl, low, high)
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
    objective: str = "clip",
    importance_sampling_level: str = "token",
    segment_ids: torch.Tensor | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = False,
    sampling_logp: torch.Tensor | None = None,
    importance_sampling_mode: str | None = None,
    importance_sampling_clip_min: float | None = None,
    importance_sampling_clip_max: float | None = 3.0,
    off_policy_mask_threshold: float | None = None,
) -> FusedPolicyLossOutput:
    """Policy loss of the LM head's token log-probs with ``old_logp = logp.detach()`` (``num_iterations == 1``).

    Equals ``policy_loss(logp, logp.detach(), advantages, mask, cu_seqlens, ...)`` with
    ``logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature).logp``
    in value and in the gradients of ``hidden`` ``[T, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]``,
    which are computed during this call (see the module docstring). ``advantages``, ``mask``,
    ``ref_logp``, ``segment_ids``, ``sampling_logp`` are constants; every keyword after
    ``return_entropy`` is ``policy_loss``'s. Returns ``FusedPolicyLossOutput(loss, metrics, logp,
    entropy)`` (``logp``: detached fp32 ``[T]``; ``entropy``: detached fp32 ``[T]`` with
    ``return_entropy``, else None). Under ``torch.autocast`` the operands are cast as for ``F.linear``.
    """
    check_reduction(reduction)
    o = _obj.Objective(
        objective, importance_sampling_level, float(epsilon), epsilon_high, delta, sapo_temperature_pos,
        sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, float(beta),
        bool(use_bias_correction_kl), importance_sampling_mode, importance_sampling_clip_min,
        importance_sampling_clip_max, off_policy_mask_threshold)
    o.check()
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] must share H; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    T = hidden.shape[0]
    named = {"targets": targets, "advantages": advantages, "mask": mask}
    for name, t in (("ref_logp", ref_logp), ("segment_ids", segment_ids), ("sampling_logp", sampling_logp)):
        if t is not None:
            named[name] = t
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

    dev = hidden.device
    h = hidden.contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    tg = targets.to(dev).contiguous()
    m = mask.to(device=dev, dtype=torch.float32).contiguous()
    adv = advantages.detach().to(device=dev, dtype=torch.float32).contiguous()
    has_kl = beta != 0.0 and ref_logp is not None
    ref = ref_logp.detach().to(device=dev, dtype=torch.float32).contiguous() if has_kl else None
    smp = None if sampling_logp is None else sampling_logp.detach().to(device=dev, dtype=torch.float32)
    cu = cu_seqlens.to(dev)
    grp = _obj.groups(cu, T, None if segment_ids is None else segment_ids.to(dev)) if _obj.needs_groups(o) else None

    # token weights / D (mask and sequence boundaries only): policy_loss's aggregation
    seq_w, sid, denom = reduction_weights(m, cu, reduction, max_completion_length, normalizer)
    wd = (token_weights(m, seq_w, sid) / denom).contiguous()

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and w.requires_grad,
             grad_on and b is not None and b.requires_grad)
    V = w.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(T, V)
    head = HeadOptions(float(temperature), int(ignore_index), chunk, bool(return_entropy), use_triton(h, w, tg, b))
    opts = _Options(head, o, needs)
    with _common.autocast_off(dev.type):
        loss, stats, logp, entropy = _FusedLinearPolicyLoss.apply(h, w, b, _Tokens(tg, adv, m, wd, ref, smp, grp),
                                                                  opts)
    return FusedPolicyLossOutput(loss, policy_metrics(stats), logp, entropy if return_entropy else None)
