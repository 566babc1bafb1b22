"""LM head + token log-probs + policy loss, for ``num_iterations == 1``: no ``[T, V]`` tensor.

Semantics: ``reference.policy_loss(logp, logp.detach(), ...)`` with
``logp = reference.fused_linear_logprobs(hidden, weight, targets, ...)``, values and gradients
(``hidden``, ``weight``, ``bias``), for every option of ``bcr_kernels.Objective`` (objective,
importance-sampling level, rollout correction, off-policy mask, entropy mask and bonus; see
``bcr_kernels._objectives``), the entropies being those of the same chunks. The head's gradients are
produced in the forward, chunk by chunk, from ``g = d loss / d logp`` and, with the entropy bonus,
``gh = d loss / d entropy`` (three big matmuls per chunk)::

    logits_c = hidden_c @ weight.T (+ bias)          # 1
    logp_c, lse_c (, entropy_c)
    g_c = d loss / d logp_c
    dlogits_c = (g_c * (onehot - p) - gh_c * p * (log p + entropy_c)) / temperature   (in place)
    grad_hidden[c] = dlogits_c @ weight              # 2
    grad_weight   += dlogits_c.T @ hidden_c          # 3
    grad_bias     += dlogits_c.sum(0)

``gh = -entropy_coef * entropy_weight * e / max(sum(e), 1)`` depends on which tokens the bonus averages
over only (``e``: the loss tokens, times the entropy mask), so it is known before the loop without the
entropy mask and after a first pass with it.

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
  rollout weights, the off-policy mask, ``vespo`` with KL or rollout weights, the entropy mask): ``g``
  needs per-segment sums of functions of ``logp`` (the weights are constants, but a head gradient
  summed over tokens cannot be rescaled per segment afterwards) or every token's entropy (the
  quantile of ``top_entropy_quantile``), so a first pass over the chunks computes ``logp`` (and the
  entropies) only (one matmul per chunk, no gradient), the segment reductions, the entropy mask and
  ``g`` follow on ``[T]`` vectors, and the second pass is the loop above. Cost: one extra head matmul
  per chunk (TRL instead runs a whole extra no-grad model forward for the old log-probs of its vLLM
  correction).

The loss value and the metrics are then computed from the ``[T]`` log-probs and entropies (cheap vector
ops).
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
    chunk_log_softmax_,
    chunk_logits,
    chunk_logits_fp32,
    policy_metrics,
    reduction_weights,
    token_weights,
)
from ._dispatch import use_triton
from ._fused_linear_logprobs import default_chunk_tokens
from ._policy_loss import check_inputs
from ._token_logprobs import logprobs_bwd_inplace, logprobs_fwd
from .objective import Objective, resolve
from .outputs import FusedPolicyLossOutput

__all__ = ["fused_linear_policy_loss"]


@dataclass(frozen=True)
class _Tokens:
    """The per-token constants ``[T]`` of the loss (no gradient)."""

    targets: torch.Tensor
    cu: torch.Tensor  # cu_seqlens
    adv: torch.Tensor  # fp32
    mask: torch.Tensor  # fp32
    wd: torch.Tensor  # fp32 token weight / D
    ref: torch.Tensor | None  # fp32 reference log-probs, None without the KL term
    sampling: torch.Tensor | None  # fp32 rollout-engine log-probs
    groups: _obj.Groups | None  # per-sequence / per-segment reductions
    entropy_weight: float = 1.0
    keep: torch.Tensor | None = None  # fp32 entropy mask (top_entropy_quantile < 1), once known
    kept: torch.Tensor | None = None  # fp32 tokens of the entropy terms, once known
    ent_grad: torch.Tensor | None = None  # fp32 d loss / d entropy (the bonus), once known


@dataclass(frozen=True)
class _Options:
    head: HeadOptions
    objective: Objective
    needs: tuple[bool, bool, bool]  # gradients of hidden, weight, bias


# --------------------------------------------------------------------------------------------------
# d loss / d logp and d loss / d entropy


def _plan(o: Objective, has_ref: bool) -> str:
    """How ``g`` is got (module docstring): ``upfront`` | ``chunk`` | ``two_pass``."""
    if o.top_entropy_quantile < 1.0:  # the entropy mask needs every token's entropy first
        return "two_pass"
    if not has_ref and o.importance_sampling_mode is None and o.off_policy_mask_threshold is None:
        return "upfront"
    mode = o.importance_sampling_mode
    token_local = (o.importance_sampling_level == "token" and o.kind != "vespo"
                   and o.off_policy_mask_threshold is None and (mode is None or mode.startswith("token")))
    return "chunk" if token_local else "two_pass"


def _with_entropy_terms(tok: _Tokens, entropy: torch.Tensor | None, o: Objective) -> _Tokens:
    """``tok`` with the entropy mask, the bonus's tokens and its gradient (``entropy`` may be None
    without ``top_entropy_quantile`` < 1: nothing then depends on its values)."""
    keep, kept = _obj.entropy_terms(entropy, tok.mask, tok.cu, o)
    grad = _obj.entropy_bonus_grad(kept, o, tok.entropy_weight) if o.entropy_coef != 0.0 else None
    return dataclasses.replace(tok, keep=keep, kept=kept, ent_grad=grad)


def _loss_terms(lp, tok: _Tokens, o: Objective, sl=slice(None)):
    """``per_token_loss`` at ``old = sg(lp)`` on tokens ``sl`` (the whole ``[T]`` when groups are used)."""
    ref = None if tok.ref is None else tok.ref[sl]
    sampling = None if tok.sampling is None else tok.sampling[sl]
    keep = None if tok.keep is None else tok.keep[sl]
    return _obj.per_token_loss(lp, lp.detach(), tok.adv[sl], tok.mask[sl], o, tok.groups, ref=ref,
                               sampling=sampling, keep=keep)


def _grad(lp, tok: _Tokens, o: Objective, sl=slice(None)):
    """``d sum_t(l_t * wd_t) / d lp`` on tokens ``sl`` (fp32, no graph kept)."""
    with torch.enable_grad():
        z = lp.detach().float().requires_grad_(True)
        loss = (_loss_terms(z, tok, o, sl)[0] * tok.wd[sl]).sum()
        (g,) = torch.autograd.grad(loss, z)
    return g


class _GradSource:
    """``(d loss / d logp, d loss / d entropy or None)`` of a chunk: sliced from precomputed ``[T]``
    vectors, or ``g`` computed from the chunk's log-probs."""

    def __init__(self, tok: _Tokens, o: Objective, g: torch.Tensor | None):
        self.tok, self.o, self.g = tok, o, g

    def __call__(self, c0: int, n: int, lp_c: torch.Tensor):
        sl = slice(c0, c0 + n)
        g = self.g[sl] if self.g is not None else _grad(lp_c, self.tok, self.o, sl)
        return g, None if self.tok.ent_grad is None else self.tok.ent_grad[sl]


# --------------------------------------------------------------------------------------------------
# chunk loops: fill logp (and entropy) and the three gradients


def _torch_dlogits_(d, x, s, ent, t, valid, g, gh, inv_t):
    """``d`` (``e = exp(x - max)``, ``[n, V]`` fp32) becomes ``d loss / d logits``: ``g`` through the
    log-prob, ``gh`` (or None) through the entropy. ``x`` (``x - max``, 0 where ``e`` is 0) is overwritten."""
    g = torch.where(valid, g * inv_t, torch.zeros_like(g)).unsqueeze(1)
    if gh is None:
        d.mul_((-g) / s.unsqueeze(1))  # -g * softmax
    else:  # d H / d x_v = -p_v (log p_v + H), log p_v = (x_v - max) - log s
        gh = torch.where(valid, gh * inv_t, torch.zeros_like(gh)).unsqueeze(1)
        x.sub_((s.log() - ent).unsqueeze(1)).mul_(-gh).sub_(g)  # -g - gh (log p + H)
        d.mul_(x).div_(s.unsqueeze(1))
    d.scatter_add_(1, torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1), g)  # + g * onehot
    return d


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
        g, gh = grad_of(c0, n, lp)
        d = _torch_dlogits_(d, x, s, ent, t, t != h_o.ignore_index, g, gh, inv_t)
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
        g, gh = grad_of(c0, n, lp)
        g = torch.where(t != h_o.ignore_index, g, torch.zeros_like(g)).contiguous()
        # x <- d loss / d logits
        logprobs_bwd_inplace(x, t, lse_c, g, h_o.temperature, h_o.ignore_index, grad_entropy=gh, entropy=ent)
        add_head_grads_(x, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return logp, entropy, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# autograd


def _head_pass(hidden, weight, bias, tok: _Tokens, o: _Options):
    """The chunk loop(s) of the plan: ``(logp, entropy, tok, grads)``; ``tok`` gains the entropy terms."""
    obj = o.objective
    run = _triton_pass if o.head.triton else _torch_pass
    plan = _plan(obj, tok.ref is not None)
    T = hidden.shape[0]
    if obj.uses_entropy and obj.top_entropy_quantile >= 1.0:  # the bonus's tokens are the loss tokens
        tok = _with_entropy_terms(tok, None, obj)
    g = None
    if plan == "upfront":
        g = _grad(torch.zeros(T, device=hidden.device), tok, obj)
    elif plan == "two_pass" and any(o.needs):
        quantile = obj.top_entropy_quantile < 1.0
        first = _Options(dataclasses.replace(o.head, return_entropy=quantile), obj, (False, False, False))
        lp0, ent0 = run(hidden, weight, bias, tok.targets, first, None)[:2]
        if quantile:
            tok = _with_entropy_terms(tok, ent0, obj)
        g = _grad(lp0, tok, obj)
    logp, entropy, grad_h, grad_w, grad_b = run(hidden, weight, bias, tok.targets, o, _GradSource(tok, obj, g))
    if obj.uses_entropy and tok.kept is None:  # no gradient asked: the mask from this pass's entropies
        tok = _with_entropy_terms(tok, entropy, obj)
    grads = [grad_h, None if grad_w is None else grad_w.result(weight.dtype),
             grad_b if grad_b is None or grad_b.dtype == bias.dtype else grad_b.to(bias.dtype)]
    return logp, entropy, tok, grads


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """``(loss, stats, logp, entropy)``; the head's gradients are computed here, in the forward.

    Call it with autocast off (the entry point casts the operands first).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tok: _Tokens, o: _Options):
        obj = o.objective
        if hidden.shape[0] == 0:
            logp = hidden.new_zeros(0, dtype=torch.float32)
            entropy = logp if o.head.return_entropy else None
            tok = _with_entropy_terms(tok, entropy, obj) if obj.uses_entropy else tok
            grads = [torch.zeros_like(t) if (t is not None and nd) else None
                     for t, nd in zip((hidden, weight, bias), o.needs)]
        else:
            logp, entropy, tok, grads = _head_pass(hidden, weight, bias, tok, o)
        # loss and metrics at old = logp, from the [T] log-probs (cheap vector ops)
        with torch.no_grad():
            per_tok, ratio, kl, low, high = _loss_terms(logp, tok, obj)
            loss = (per_tok * tok.wd).sum()  # wd already holds 1 / D
            stats = _obj.stats(tok.mask, ratio, kl, low, high)
            if obj.uses_entropy:
                if obj.entropy_coef != 0.0:
                    loss = loss + _obj.entropy_bonus(entropy, tok.kept, obj, tok.entropy_weight)
                stats = torch.cat([stats, _obj.entropy_stats(entropy, tok.kept)])
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


def _check_head(hidden, weight, bias, temperature, chunk_tokens) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] must share H; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype; got {hidden.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _tokens(targets, advantages, mask, cu_seqlens, o: Objective, dev, *, ref_logp, segment_ids, sampling_logp,
            normalizer, entropy_weight) -> _Tokens:
    """The constants of the loss on ``dev``, with ``policy_loss``'s aggregation weights (mask and
    sequence boundaries only)."""
    T = targets.numel()
    m = mask.to(device=dev, dtype=torch.float32).contiguous()
    cu = cu_seqlens.to(dev)
    f32 = (lambda t: None if t is None else t.detach().to(device=dev, dtype=torch.float32).contiguous())  # noqa: E731
    grp = _obj.groups(cu, T, None if segment_ids is None else segment_ids.to(dev)) if o.needs_groups else None
    seq_w, sid, denom = reduction_weights(m, cu, o.reduction, o.max_completion_length, normalizer)
    wd = (token_weights(m, seq_w, sid) / denom).contiguous()
    return _Tokens(targets.to(dev).contiguous(), cu, f32(advantages), m, wd,
                   f32(ref_logp) if o.beta != 0.0 else None, f32(sampling_logp), grp, float(entropy_weight))


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    objective: Objective | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    normalizer: float | None = None,
    entropy_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    return_entropy: bool = False,
    **legacy,
) -> FusedPolicyLossOutput:
    """Policy loss of the LM head's token log-probs with ``old_logp = logp.detach()`` (``num_iterations == 1``).

    Equals ``policy_loss(logp, logp.detach(), advantages, mask, cu_seqlens, objective, entropy=entropy, ...)``
    with ``logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
    return_entropy=True)`` in value and in the gradients of ``hidden`` ``[T, H]``, ``weight`` ``[V, H]`` and
    ``bias`` ``[V]``, which are computed during this call (see the module docstring); the entropies the
    objective reads (``top_entropy_quantile``, ``entropy_coef``) are computed per chunk. ``advantages``,
    ``mask``, ``ref_logp``, ``segment_ids``, ``sampling_logp`` are constants; ``objective``, ``normalizer``,
    ``entropy_weight`` and ``**legacy`` are ``policy_loss``'s. Returns ``FusedPolicyLossOutput(loss, metrics,
    logp, entropy)`` (``logp``: detached fp32 ``[T]``; ``entropy``: detached fp32 ``[T]`` with
    ``return_entropy``, else None). Under ``torch.autocast`` the operands are cast as for ``F.linear``.
    """
    o = resolve(objective, legacy, "fused_linear_policy_loss")
    if hidden.dim() == 2:
        check_inputs({"targets": targets, "advantages": advantages, "mask": mask, "ref_logp": ref_logp,
                      "segment_ids": segment_ids, "sampling_logp": sampling_logp}, hidden.shape[0], "hidden's rows")
    hidden, weight, bias = _common.cast_like_linear(hidden, weight, bias)
    _check_head(hidden, weight, bias, temperature, chunk_tokens)
    dev = hidden.device
    h, w = hidden.contiguous(), weight.contiguous()
    b = None if bias is None else bias.contiguous()
    tok = _tokens(targets, advantages, mask, cu_seqlens, o, dev, ref_logp=ref_logp, segment_ids=segment_ids,
                  sampling_logp=sampling_logp, normalizer=normalizer, entropy_weight=entropy_weight)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and w.requires_grad,
             grad_on and b is not None and b.requires_grad)
    T, V = h.shape[0], w.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(T, V)
    head = HeadOptions(float(temperature), int(ignore_index), chunk, bool(return_entropy) or o.uses_entropy,
                       use_triton(h, w, tok.targets, b))
    with _common.autocast_off(dev.type):
        loss, stats, logp, entropy = _FusedLinearPolicyLoss.apply(h, w, b, tok, _Options(head, o, needs))
    return FusedPolicyLossOutput(loss, policy_metrics(stats), logp, entropy if return_entropy else None)
