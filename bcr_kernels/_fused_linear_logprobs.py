"""LM head fused with token log-probs: ``token_logprobs(hidden @ weight.T + bias, targets)`` without
ever holding the full ``[T, V]`` logits.

The tokens are processed in chunks of ``chunk_tokens`` rows. Per chunk the logits
``hidden_c @ weight.T (+ bias)`` are computed into one reusable buffer, reduced to the target's
log-prob and the row's log-sum-exp (and entropy), and forgotten. Only ``lse`` (and the entropy, fp32
``[T]``) is saved for backward; the backward recomputes each chunk's logits, turns them into
``d loss / d logits`` in place (through the log-probs, and through the entropies when they get a
gradient: an entropy bonus) and accumulates

    grad_hidden[c] = dlogits_c @ weight
    grad_weight   += dlogits_c.T @ hidden_c
    grad_bias     += dlogits_c.sum(0)

The upstream gradients are arbitrary ``[T]`` vectors (a per-token policy loss, not a scalar
cross-entropy), so gradients cannot be precomputed in the forward as fused cross-entropy kernels do
for a scalar loss; the price is one extra ``[T, H] x [H, V]`` matmul in backward (four matmuls
instead of three).

Two implementations share the chunking and the autograd.Function:

- Triton (``bcr_kernels._dispatch.use_triton``: CUDA tensors, or CPU under ``TRITON_INTERPRET=1``):
  the chunk's logits come from a torch matmul in the input dtype; the log-softmax forward and its
  in-place backward are the Triton kernels of ``token_logprobs`` (``logprobs_fwd`` / ``logprobs_bwd_inplace``).
- PyTorch (everything else, e.g. plain CPU): the same chunking with in-place torch ops. For fp32
  inputs the chunk's logits buffer is the only ``[chunk, V]`` temporary; bf16/fp16 inputs add one
  fp32 copy of it (the log-softmax runs in fp32).

Mixed precision: under ``torch.autocast`` hidden, weight and bias are cast to autocast's dtype first,
as autocast casts the operands of ``F.linear`` (the head's ``addmm(out=)`` / ``mm(out=)`` are not
autocast ops, so they would otherwise run in fp32); gradients flow back through that cast to the fp32
leaves. With bf16/fp16 operands every head GEMM runs in that dtype; ``grad_weight`` is accumulated in
fp32 (``bcr_kernels._common.WeightGrad``: one ``[V, H]`` fp32 buffer, cast at the end).

Memory: peak extra memory is O(``chunk_tokens`` x V) plus the gradients themselves.

Default ``chunk_tokens`` (see :func:`default_chunk_tokens`): as many rows as fit one fp32 chunk of
logits into ``DEFAULT_CHUNK_BYTES`` (256 MiB: 441 rows at V = 151936), then evened out so all chunks
have about the same size (T = 2048 at V = 151936 gives 5 chunks of 410 rows).
"""

from __future__ import annotations

import math

import torch

from . import _common
from ._common import (
    IGNORE_INDEX,
    LOW_PRECISION,
    HeadOptions,
    WeightGrad,
    add_head_grads_,
    chunk_log_softmax_,
    chunk_logits,
    chunk_logits_fp32,
)
from ._dispatch import use_triton
from ._token_logprobs import logprobs_bwd_inplace, logprobs_fwd
from .outputs import LogprobsOutput

__all__ = ["DEFAULT_CHUNK_BYTES", "default_chunk_tokens", "fused_linear_logprobs"]

#: Byte budget of one chunk's logits, counted in fp32, used when ``chunk_tokens`` is None.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(num_tokens: int, vocab_size: int, *, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: one chunk's fp32 logits fit ``budget_bytes``; chunks evened out over ``num_tokens``."""
    rows = max(1, budget_bytes // (4 * max(vocab_size, 1)))
    if num_tokens <= rows:
        return max(num_tokens, 1)
    n_chunks = math.ceil(num_tokens / rows)
    return math.ceil(num_tokens / n_chunks)


# --------------------------------------------------------------------------------------------------
# PyTorch path


def _torch_forward(hidden, weight, bias, targets, o: HeadOptions):
    T = hidden.shape[0]
    V = weight.shape[0]
    lowp = hidden.dtype in LOW_PRECISION
    inv_t = 1.0 / o.temperature
    rows = max(1, min(o.chunk, T))
    # fp32 path: the matmul writes straight into the fp32 buffer (temperature folded into alpha).
    buf32 = torch.empty(rows, V, device=hidden.device, dtype=torch.float32)
    buf_low = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype) if lowp else None
    ebuf = torch.empty_like(buf32) if o.return_entropy else None
    logp = torch.empty(T, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(T, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(T, device=hidden.device, dtype=torch.float32) if o.return_entropy else None

    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        x = chunk_logits_fp32(buf32[:n], buf_low[:n] if lowp else None, hidden[c0 : c0 + n], weight, bias, inv_t)
        lp, ls, ent, _, _ = chunk_log_softmax_(x, targets[c0 : c0 + n], o.ignore_index,
                                              ebuf[:n] if o.return_entropy else None)
        logp[c0 : c0 + n] = lp
        lse[c0 : c0 + n] = ls
        if o.return_entropy:
            entropy[c0 : c0 + n] = ent
    return logp, lse, entropy


def _torch_backward(hidden, weight, bias, targets, lse, grad_logp, o: HeadOptions, needs, grad_ent=None, ent=None):
    need_h, need_w, need_b = needs
    T = hidden.shape[0]
    V = weight.shape[0]
    lowp = hidden.dtype in LOW_PRECISION
    inv_t = 1.0 / o.temperature
    rows = max(1, min(o.chunk, T))
    valid = targets != o.ignore_index
    safe_all = torch.where(valid, targets, torch.zeros_like(targets))
    # d logp_t / d logits_{t,v} = (onehot - softmax) / temperature; scaled by the upstream gradient.
    g = torch.where(valid, grad_logp.float() * inv_t, torch.zeros_like(lse))
    gh = None if grad_ent is None else torch.where(valid, grad_ent.float() * inv_t, torch.zeros_like(lse))
    pbuf = None if gh is None else torch.empty(rows, V, device=hidden.device, dtype=torch.float32)

    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = WeightGrad(weight, rows) if need_w else None
    grad_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None

    buf32 = torch.empty(rows, V, device=hidden.device, dtype=torch.float32)
    buf_low = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype) if lowp else None
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        d = chunk_logits_fp32(buf32[:n], buf_low[:n] if lowp else None, h_c, weight, bias, inv_t)
        g_c = g[c0 : c0 + n].unsqueeze(1)
        d.sub_(lse[c0 : c0 + n].unsqueeze(1))  # log softmax
        if gh is None:
            d.exp_().mul_(g_c.neg())  # -g * p
        else:  # d entropy / d logits = -p (log p + H) / temperature: -p * (g + gh (log p + H))
            p = torch.exp(d, out=pbuf[:n])
            d.masked_fill_(p == 0, 0.0).add_(ent[c0 : c0 + n].unsqueeze(1)).mul_(gh[c0 : c0 + n].unsqueeze(1))
            d.add_(g_c).mul_(p).neg_()
        d.scatter_add_(1, safe_all[c0 : c0 + n].unsqueeze(1), g_c)  # + g * onehot
        if lowp:  # the head GEMMs run in the inputs' dtype
            d = buf_low[:n].copy_(d)
        add_head_grads_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# Triton path (torch matmul per chunk + the token_logprobs kernels)


def _triton_forward(hidden, weight, bias, targets, o: HeadOptions):
    T = hidden.shape[0]
    V = weight.shape[0]
    rows = max(1, min(o.chunk, T))
    buf = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype)
    logp = torch.empty(T, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(T, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(T, device=hidden.device, dtype=torch.float32) if o.return_entropy else None
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        x = chunk_logits(buf[:n], hidden[c0 : c0 + n], weight, bias, 1.0)
        lp, ls, ent = logprobs_fwd(x, targets[c0 : c0 + n], o.temperature, o.ignore_index, o.return_entropy)
        logp[c0 : c0 + n] = lp
        lse[c0 : c0 + n] = ls
        if o.return_entropy:
            entropy[c0 : c0 + n] = ent
    return logp, lse, entropy


def _triton_backward(hidden, weight, bias, targets, lse, grad_logp, o: HeadOptions, needs, grad_ent=None, ent=None):
    need_h, need_w, need_b = needs
    T = hidden.shape[0]
    V = weight.shape[0]
    rows = max(1, min(o.chunk, T))
    g = torch.where(targets != o.ignore_index, grad_logp.float(), torch.zeros_like(lse)).contiguous()
    gh = None if grad_ent is None else grad_ent.float().contiguous()

    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = WeightGrad(weight, rows) if need_w else None
    grad_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None
    buf = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype)
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        d = chunk_logits(buf[:n], h_c, weight, bias, 1.0)
        sl = slice(c0, c0 + n)
        logprobs_bwd_inplace(d, targets[sl], lse[sl], g[sl], o.temperature, o.ignore_index,
                             grad_entropy=None if gh is None else gh[sl], entropy=None if gh is None else ent[sl])
        add_head_grads_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# autograd


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """``(logp, entropy)`` of the chunked head, both differentiable; ``entropy`` is empty without
    ``return_entropy``.

    Call it with autocast off (the entry point casts the operands first, see the module docstring).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, opts: HeadOptions):
        ctx.set_materialize_grads(False)  # an entropy used as a metric only costs no backward term
        fwd = _triton_forward if opts.triton else _torch_forward
        logp, lse, entropy = fwd(hidden, weight, bias, targets, opts)
        if entropy is None:
            entropy = logp.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.opts = opts
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        if not any(needs) or hidden.shape[0] == 0:
            zeros = [torch.zeros_like(t) if (t is not None and nd) else None
                     for t, nd in zip((hidden, weight, bias), needs)]
            return zeros[0], zeros[1], None, zeros[2], None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        bwd = _triton_backward if ctx.opts.triton else _torch_backward
        with _common.autocast_off(hidden.device.type):  # backward may run inside the caller's autocast
            grad_h, grad_w, grad_b = bwd(hidden, weight, bias, targets, lse, grad_logp, ctx.opts, needs,
                                         grad_entropy, entropy)
            grad_w = None if grad_w is None else grad_w.result(weight.dtype)
            if grad_b is not None and grad_b.dtype != bias.dtype:
                grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, None, grad_b, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    return_entropy: bool = False,
) -> LogprobsOutput:
    """Token log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    ``hidden`` is ``[T, H]`` (or ``[..., H]`` with ``targets`` ``[...]``), ``weight`` the LM head
    ``[V, H]`` (may be tied to the embedding; its gradient is simply returned), ``bias`` ``[V]`` or
    None. Returns ``LogprobsOutput(logp, entropy)``: fp32 log-probs shaped like ``targets`` (0 and no
    gradient where ``targets == ignore_index``) and, with ``return_entropy``, the fp32 entropy of each
    row's distribution (else None; 0 and no gradient at ignored targets). Both are differentiable in
    ``hidden``, ``weight`` and ``bias`` for any upstream gradients (an entropy bonus included). Under ``torch.autocast`` the operands are cast as for ``F.linear``. Same
    values as ``bcr_kernels.reference.fused_linear_logprobs``, but peak extra memory is
    O(``chunk_tokens`` x V) instead of O(T x V). ``chunk_tokens`` defaults to
    :func:`default_chunk_tokens` (one chunk's fp32 logits within ``DEFAULT_CHUNK_BYTES`` = 256 MiB).
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(
            f"hidden [..., H] and weight [V, H] must share H; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    hidden, weight, bias = _common.cast_like_linear(hidden, weight, bias)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden, weight and bias must share a dtype; got {hidden.dtype}, {weight.dtype}, "
            f"{None if bias is None else bias.dtype} (cast them, e.g. hidden.to(weight.dtype))"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    out_shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t1 = targets.reshape(-1).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    T, V = h2.shape[0], w.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(T, V)
    opts = HeadOptions(float(temperature), int(ignore_index), chunk, bool(return_entropy), use_triton(h2, w, t1, b))
    with _common.autocast_off(h2.device.type):
        logp, entropy = FusedLinearLogprobsFunction.apply(h2, w, t1, b, opts)
    return LogprobsOutput(logp.view(out_shape), entropy.view(out_shape) if return_entropy else None)
