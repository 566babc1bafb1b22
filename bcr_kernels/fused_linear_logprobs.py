"""LM head fused with token log-probs: ``token_logprobs(hidden @ weight.T + bias, targets)`` without
ever holding the full ``[T, V]`` logits.

The tokens are processed in chunks of ``chunk_tokens`` rows. Per chunk the logits
``hidden_c @ weight.T (+ bias)`` are computed into one reusable buffer, reduced to the target's
log-prob and the row's log-sum-exp, and forgotten. Only ``lse`` (fp32 ``[T]``) is saved for backward;
the backward recomputes each chunk's logits, turns them into ``d logp / d logits`` in place and
accumulates

    grad_hidden[c] = dlogits_c @ weight
    grad_weight   += dlogits_c.T @ hidden_c
    grad_bias     += dlogits_c.sum(0)

The upstream gradient is an arbitrary ``[T]`` vector (a per-token policy loss, not a scalar
cross-entropy), so gradients cannot be precomputed in the forward as fused cross-entropy kernels do
for a scalar loss; the price is one extra ``[T, H] x [H, V]`` matmul in backward (four matmuls
instead of three).

Two implementations share the chunking and the autograd.Function:

- Triton (``bcr_kernels._dispatch.use_triton``: CUDA tensors, or CPU under ``TRITON_INTERPRET=1``):
  the chunk's logits come from a torch matmul in the input dtype; the log-softmax forward and its
  in-place backward are the Triton kernels of ``bcr_kernels.token_logprobs``.
- PyTorch (everything else, e.g. plain CPU): the same chunking with in-place torch ops. For fp32
  inputs the chunk's logits buffer is the only ``[chunk, V]`` temporary; bf16/fp16 inputs add one
  fp32 copy of it (the log-softmax runs in fp32).

Memory: peak extra memory is O(``chunk_tokens`` x V) plus the gradients themselves; with bf16/fp16
weights ``grad_weight`` is accumulated in fp32 (one ``[V, H]`` fp32 buffer, cast at the end).

Default ``chunk_tokens`` (see :func:`default_chunk_tokens`): as many rows as fit one fp32 chunk of
logits into ``DEFAULT_CHUNK_BYTES`` (256 MiB: 441 rows at V = 151936), then evened out so all chunks
have about the same size (T = 2048 at V = 151936 gives 5 chunks of 410 rows).
"""

from __future__ import annotations

import importlib
import math

import torch

from ._dispatch import use_triton
from .reference import IGNORE_INDEX

__all__ = ["DEFAULT_CHUNK_BYTES", "default_chunk_tokens", "fused_linear_logprobs"]

#: Byte budget of one chunk's logits, counted in fp32, used when ``chunk_tokens`` is None.
DEFAULT_CHUNK_BYTES = 256 * 2**20

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def default_chunk_tokens(num_tokens: int, vocab_size: int, *, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: one chunk's fp32 logits fit ``budget_bytes``; chunks evened out over ``num_tokens``."""
    rows = max(1, budget_bytes // (4 * max(vocab_size, 1)))
    if num_tokens <= rows:
        return max(num_tokens, 1)
    n_chunks = math.ceil(num_tokens / rows)
    return math.ceil(num_tokens / n_chunks)


def _triton_ops():
    """The Triton log-softmax kernels of ``token_logprobs``, or None if that module has none."""
    # The package attribute ``token_logprobs`` is the function, not the module: import the module.
    _tl = importlib.import_module(__package__ + ".token_logprobs")
    fwd = getattr(_tl, "_logprobs_fwd", None)
    bwd = getattr(_tl, "_logprobs_bwd_inplace", None)
    if fwd is None or bwd is None:
        return None
    return fwd, bwd


# --------------------------------------------------------------------------------------------------
# shared pieces


def _chunk_logits(out, hidden_c, weight, bias, alpha):
    """``out = alpha * (hidden_c @ weight.T + bias)`` in the input dtype, no temporary."""
    if bias is None:
        # beta=0: ``out``'s (uninitialised) content is not read.
        torch.addmm(out, hidden_c, weight.t(), beta=0.0, alpha=alpha, out=out)
    else:
        torch.addmm(bias, hidden_c, weight.t(), beta=alpha, alpha=alpha, out=out)
    return out


_OUT_DTYPE_ADDMM = {"ok": None}


def _addmm_fp32_(acc, a, b):
    """``acc += a @ b`` with fp32 ``acc`` and low-precision ``a``, ``b``."""
    if acc.is_cuda and _OUT_DTYPE_ADDMM["ok"] is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_ADDMM["ok"] = True
            return acc
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # this torch has no mixed-dtype addmm: accumulate a product
            _OUT_DTYPE_ADDMM["ok"] = False
    return acc.add_(torch.mm(a, b))


# --------------------------------------------------------------------------------------------------
# PyTorch path


def _add_head_grads_torch_(d, h_c, weight, out_h, grad_w, grad_b, buf_low):
    """Add one chunk's LM-head gradients given ``d`` = d loss / d logits of the chunk (fp32).

    ``out_h`` (the chunk's rows of grad_hidden, or None) is written; ``grad_w`` / ``grad_b`` (fp32, or
    None) are accumulated. With low-precision inputs ``buf_low`` holds ``d`` cast for the matmul.
    """
    if out_h is not None:
        if buf_low is not None:
            low = buf_low[: d.shape[0]]
            low.copy_(d)
            torch.mm(low, weight, out=out_h)
        else:
            torch.mm(d, weight, out=out_h)
    if grad_w is not None:
        grad_w.addmm_(d.t(), h_c.float() if buf_low is not None else h_c)
    if grad_b is not None:
        grad_b.add_(d.sum(dim=0))


def _add_head_grads_triton_(d, h_c, weight, out_h, grad_w, grad_b):
    """As :func:`_add_head_grads_torch_` for ``d`` in the inputs' dtype (the Triton kernels' output)."""
    if out_h is not None:
        torch.mm(d, weight, out=out_h)
    if grad_w is not None:
        if d.dtype in _LOW_PRECISION:
            _addmm_fp32_(grad_w, d.t(), h_c)
        else:
            grad_w.addmm_(d.t(), h_c)
    if grad_b is not None:
        grad_b.add_(d.sum(dim=0, dtype=torch.float32))


def _torch_forward(hidden, weight, bias, targets, temperature, ignore_index, chunk, return_entropy):
    T = hidden.shape[0]
    V = weight.shape[0]
    lowp = hidden.dtype in _LOW_PRECISION
    inv_t = 1.0 / temperature
    rows = max(1, min(chunk, T))
    # fp32 path: the matmul writes straight into the fp32 buffer (temperature folded into alpha).
    buf32 = torch.empty(rows, V, device=hidden.device, dtype=torch.float32)
    buf_low = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype) if lowp else None
    ebuf = torch.empty_like(buf32) if return_entropy else None
    logp = torch.empty(T, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(T, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(T, device=hidden.device, dtype=torch.float32) if return_entropy else None

    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        x = buf32[:n]
        if lowp:
            _chunk_logits(buf_low[:n], hidden[c0 : c0 + n], weight, bias, 1.0)
            x.copy_(buf_low[:n])
            if inv_t != 1.0:
                x.mul_(inv_t)
        else:
            _chunk_logits(x, hidden[c0 : c0 + n], weight, bias, inv_t)
        t = targets[c0 : c0 + n]
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)
        x_t = x.gather(1, safe).squeeze(1)
        m = x.amax(dim=1, keepdim=True)
        x.sub_(m)  # x - max
        if return_entropy:
            e = ebuf[:n]
            torch.exp(x, out=e)
            s = e.sum(dim=1)
            # sum_v e_v * (x_v - m); terms with e_v == 0 contribute 0 (guards -inf logits).
            x.masked_fill_(e == 0, 0.0)
            dot = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(n)
            ent = s.log() - dot / s
            entropy[c0 : c0 + n] = torch.where(valid, ent, torch.zeros_like(ent))
        else:
            x.exp_()
            s = x.sum(dim=1)
        lse_c = m.squeeze(1) + s.log()
        lse[c0 : c0 + n] = lse_c
        logp[c0 : c0 + n] = torch.where(valid, x_t - lse_c, torch.zeros_like(lse_c))
    return logp, lse, entropy


def _torch_backward(hidden, weight, bias, targets, lse, grad_logp, temperature, ignore_index, chunk, needs):
    need_h, need_w, need_b = needs
    T, H = hidden.shape
    V = weight.shape[0]
    lowp = hidden.dtype in _LOW_PRECISION
    inv_t = 1.0 / temperature
    rows = max(1, min(chunk, T))
    valid = targets != ignore_index
    safe_all = torch.where(valid, targets, torch.zeros_like(targets))
    # d logp_t / d logits_{t,v} = (onehot - softmax) / temperature; scaled by the upstream gradient.
    g = torch.where(valid, grad_logp.float() * inv_t, torch.zeros_like(lse))

    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(V, H, device=hidden.device, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None

    buf32 = torch.empty(rows, V, device=hidden.device, dtype=torch.float32)
    buf_low = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype) if lowp else None
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        d = buf32[:n]
        if lowp:
            _chunk_logits(buf_low[:n], h_c, weight, bias, 1.0)
            d.copy_(buf_low[:n])
            if inv_t != 1.0:
                d.mul_(inv_t)
        else:
            _chunk_logits(d, h_c, weight, bias, inv_t)
        g_c = g[c0 : c0 + n].unsqueeze(1)
        d.sub_(lse[c0 : c0 + n].unsqueeze(1)).exp_()  # softmax
        d.mul_(g_c.neg())  # -g * p
        d.scatter_add_(1, safe_all[c0 : c0 + n].unsqueeze(1), g_c)  # + g * onehot
        _add_head_grads_torch_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b, buf_low)
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# Triton path (torch matmul per chunk + the token_logprobs kernels)


def _triton_forward(ops, hidden, weight, bias, targets, temperature, ignore_index, chunk, return_entropy):
    fwd, _ = ops
    T = hidden.shape[0]
    V = weight.shape[0]
    rows = max(1, min(chunk, T))
    buf = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype)
    logp = torch.empty(T, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(T, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(T, device=hidden.device, dtype=torch.float32) if return_entropy else None
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        x = _chunk_logits(buf[:n], hidden[c0 : c0 + n], weight, bias, 1.0)
        lp, ls, ent = fwd(x, targets[c0 : c0 + n], temperature, ignore_index, return_entropy)
        logp[c0 : c0 + n] = lp
        lse[c0 : c0 + n] = ls
        if return_entropy:
            entropy[c0 : c0 + n] = ent
    return logp, lse, entropy


def _triton_backward(ops, hidden, weight, bias, targets, lse, grad_logp, temperature, ignore_index, chunk, needs):
    _, bwd = ops
    need_h, need_w, need_b = needs
    T, H = hidden.shape
    V = weight.shape[0]
    lowp = hidden.dtype in _LOW_PRECISION
    rows = max(1, min(chunk, T))
    g = torch.where(targets != ignore_index, grad_logp.float(), torch.zeros_like(lse)).contiguous()

    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(V, H, device=hidden.device, dtype=torch.float32 if lowp else hidden.dtype) if need_w else None
    grad_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None
    buf = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype)
    for c0 in range(0, T, rows):
        n = min(rows, T - c0)
        h_c = hidden[c0 : c0 + n]
        d = _chunk_logits(buf[:n], h_c, weight, bias, 1.0)
        bwd(d, targets[c0 : c0 + n], lse[c0 : c0 + n], g[c0 : c0 + n], temperature, ignore_index)
        _add_head_grads_triton_(d, h_c, weight, grad_h[c0 : c0 + n] if need_h else None, grad_w, grad_b)
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# autograd


class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, temperature, ignore_index, chunk, return_entropy, triton_ops):
        if triton_ops is not None:
            logp, lse, entropy = _triton_forward(
                triton_ops, hidden, weight, bias, targets, temperature, ignore_index, chunk, return_entropy
            )
        else:
            logp, lse, entropy = _torch_forward(
                hidden, weight, bias, targets, temperature, ignore_index, chunk, return_entropy
            )
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.chunk = chunk
        ctx.triton_ops = triton_ops
        if entropy is None:
            entropy = logp.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        if not any(needs) or hidden.shape[0] == 0:
            zeros = [torch.zeros_like(t) if (t is not None and nd) else None
                     for t, nd in zip((hidden, weight, bias), needs)]
            return zeros[0], zeros[1], None, zeros[2], None, None, None, None, None
        args = (hidden, weight, bias, targets, lse, grad_logp, ctx.temperature, ctx.ignore_index, ctx.chunk, needs)
        if ctx.triton_ops is not None:
            grad_h, grad_w, grad_b = _triton_backward(ctx.triton_ops, *args)
        else:
            grad_h, grad_w, grad_b = _torch_backward(*args)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, None, grad_b, None, None, None, None, None


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
):
    """Token log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    ``hidden`` is ``[T, H]`` (or ``[..., H]`` with ``targets`` ``[...]``), ``weight`` the LM head
    ``[V, H]`` (may be tied to the embedding; its gradient is simply returned), ``bias`` ``[V]`` or
    None. Returns fp32 log-probs shaped like ``targets`` (0 and no gradient where
    ``targets == ignore_index``), and with ``return_entropy`` also the detached fp32 entropy of each
    row's distribution. Differentiable in ``hidden``, ``weight`` and ``bias`` for any upstream
    gradient. Same values as ``bcr_kernels.reference.fused_linear_logprobs``, but peak extra memory
    is O(``chunk_tokens`` x V) instead of O(T x V). ``chunk_tokens`` defaults to
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

    ops = _triton_ops() if use_triton(h2, w, t1, b) else None
    logp, entropy = FusedLinearLogprobsFunction.apply(
        h2, w, t1, b, float(temperature), int(ignore_index), chunk, bool(return_entropy), ops
    )
    logp = logp.view(out_shape)
    if return_entropy:
        return logp, entropy.view(out_shape)
    return logp
