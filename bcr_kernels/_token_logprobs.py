"""Per-token log-probabilities of targets under ``softmax(logits / temperature)``.

The Triton forward reads each row once: an online log-sum-exp over vocabulary blocks yields the
target log-prob, the row's log-sum-exp (saved for backward) and, on request, the entropy. The
backward recomputes the softmax from the saved log-sum-exp and writes the logits' gradient in their
dtype. Neither direction allocates a ``[T, V]`` fp32 temporary. When dispatch picks PyTorch (CPU
without the interpreter, or ``BCR_KERNEL_BACKEND=torch``) rows are processed in chunks so the fp32
temporaries stay bounded; its backward recomputes each chunk's softmax.

:func:`logprobs_fwd` / :func:`logprobs_bwd_inplace` (Triton) and their ``*_torch`` twins work on one
chunk of rows; the fused LM-head ops build on the Triton pair.

Semantics are those of :func:`bcr_kernels.reference.token_logprobs`; on top of them:

- a target outside ``[0, V)`` that is not ``ignore_index`` gives NaN on the Triton path (no
  out-of-bounds read) and an indexing error on the PyTorch path;
- ``-inf`` logits are allowed (they get probability 0 and contribute nothing to the entropy);
- the op is differentiable once (no double backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _common, _dispatch
from ._common import IGNORE_INDEX
from .outputs import LogprobsOutput

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["token_logprobs"]

# Largest vocabulary block one program loads at a time (tests lower it to exercise many blocks).
_MAX_BLOCK_V = 4096
# Elements per chunk on the PyTorch path: bounds its fp32 temporaries (16 Mi elements = 64 MiB).
_TORCH_CHUNK_ELEMS = 1 << 24


def _block_v(V: int) -> int:
    return min(_MAX_BLOCK_V, triton.next_power_of_2(max(V, 1)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


if triton is not None:

    @triton.jit
    def _token_logprobs_fwd_kernel(
        X, stride_xt, stride_xv,
        TGT, LOGP, LSE, ENT,
        V, temperature, ignore_index,
        RETURN_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # One program per row. Running state over the blocks seen so far, with m the running max:
        #   s = sum exp(x - m),  t = sum exp(x - m) * (x - m)
        # so lse = m + log(s) and entropy = log(s) - t / s (shifted form: no cancellation at |x| ~ 1e4).
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_xt
        tgt = tl.load(TGT + row).to(tl.int64)
        valid = tgt != ignore_index
        in_range = (tgt >= 0) & (tgt < V)

        offs = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(x_row + cols * stride_xv, mask=cols < V, other=float("-inf")).to(tl.float32)
            x = x / temperature
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While everything seen is -inf keep the shift finite so exp() gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            e = tl.exp(x - shift)
            if RETURN_ENTROPY:
                # Re-centre t on the new max: sum e_old*(x - m_new) = t + (m - m_new) * s.
                # (s == 0 means m == -inf: nothing to re-centre; avoid -inf * 0.)
                recentre = (tl.where(s > 0, m, shift) - shift) * s
                d = tl.where(e > 0, x - shift, 0.0)
                t = alpha * (t + recentre) + tl.sum(e * d, axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new

        log_s = tl.log(s)
        lse = m + log_s
        safe_tgt = tl.where(valid & in_range, tgt, 0)
        xt = tl.load(x_row + safe_tgt * stride_xv).to(tl.float32) / temperature
        logp = tl.where(in_range, xt - lse, float("nan"))
        logp = tl.where(valid, logp, 0.0)
        tl.store(LOGP + row, logp)
        tl.store(LSE + row, lse)
        if RETURN_ENTROPY:
            ent = tl.where(valid, log_s - t / s, 0.0)
            tl.store(ENT + row, ent)

    @triton.jit
    def _token_logprobs_bwd_kernel(
        X, stride_xt, stride_xv,
        DX, stride_dt, stride_dv,
        TGT, LSE, G, GE, ENT,  # GE, ENT: the entropy's upstream gradient and value (HAS_ENT_GRAD only)
        V, temperature, ignore_index,
        HAS_ENT_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # d logp / d x_v = (onehot(target)_v - p_v) / tau and d entropy / d x_v = -p_v (log p_v + H) / tau,
        # p = softmax(x / tau). DX may alias X (in place): each block is read before it is written, by
        # the same program.
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_xt
        dx_row = DX + row * stride_dt
        tgt = tl.load(TGT + row).to(tl.int64)
        valid = tgt != ignore_index
        lse = tl.load(LSE + row)
        g = tl.load(G + row).to(tl.float32)
        scale = tl.where(valid, g / temperature, 0.0)
        if HAS_ENT_GRAD:
            ent_scale = tl.where(valid, tl.load(GE + row).to(tl.float32) / temperature, 0.0)
            ent = tl.load(ENT + row).to(tl.float32)

        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(x_row + cols * stride_xv, mask=mask, other=float("-inf")).to(tl.float32)
            logp = x / temperature - lse
            p = tl.exp(logp)
            grad = (tl.where(cols == tgt, 1.0, 0.0) - p) * scale
            if HAS_ENT_GRAD:  # p == 0 (x = -inf, log p = -inf) contributes 0, not 0 * inf
                grad += -p * (tl.where(p > 0.0, logp, 0.0) + ent) * ent_scale
            grad = tl.where(valid, grad, 0.0)
            tl.store(dx_row + cols * stride_dv, grad.to(DX.dtype.element_ty), mask=mask)


def _check_2d(logits2d: torch.Tensor, targets: torch.Tensor) -> None:
    if logits2d.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, V], got shape {tuple(logits2d.shape)}")
    if targets.shape != logits2d.shape[:1]:
        raise ValueError(
            f"targets must have shape [T] = {tuple(logits2d.shape[:1])}, got {tuple(targets.shape)}"
        )


def logprobs_fwd(logits2d, targets, temperature, ignore_index, return_entropy):
    """Triton forward. ``logits2d`` ``[T, V]`` may be a strided view (any strides).

    Returns ``(logp fp32 [T], lse fp32 [T], entropy fp32 [T] or None)``; ``lse`` is the log-sum-exp
    of ``logits2d / temperature`` per row, as :func:`logprobs_bwd_inplace` needs it.
    """
    _check_2d(logits2d, targets)
    T, V = logits2d.shape
    dev = logits2d.device
    logp = torch.empty(T, dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    ent = torch.empty(T, dtype=torch.float32, device=dev) if return_entropy else None
    if T == 0:
        return logp, lse, ent
    targets = targets.contiguous()
    block = _block_v(V)
    with _common.device_guard(logits2d):
        _token_logprobs_fwd_kernel[(T,)](
            logits2d, logits2d.stride(0), logits2d.stride(1),
            targets, logp, lse, ent if ent is not None else logp,
            V, float(temperature), int(ignore_index),
            RETURN_ENTROPY=bool(return_entropy), BLOCK_V=block, num_warps=_num_warps(block),
        )
    return logp, lse, ent


def logprobs_bwd_inplace(logits2d, targets, lse, grad_logp, temperature, ignore_index, *, grad_entropy=None,
                         entropy=None):
    """Triton backward that overwrites ``logits2d`` with ``d(sum grad_logp * logp) / d logits2d``, plus
    ``d(sum grad_entropy * entropy) / d logits2d`` with ``grad_entropy`` (and the rows' ``entropy``).

    ``lse`` (and ``entropy``) come from :func:`logprobs_fwd` with the same ``temperature``; the gradient
    is written in ``logits2d``'s dtype; rows with an ignored target become 0.
    """
    _check_2d(logits2d, targets)
    if logits2d.shape[0] == 0:
        return
    _launch_bwd(logits2d, logits2d, targets, lse, grad_logp, temperature, ignore_index, grad_entropy, entropy)


def _launch_bwd(x, dx, targets, lse, grad_logp, temperature, ignore_index, grad_entropy=None, entropy=None):
    T, V = x.shape
    block = _block_v(V)
    g = grad_logp.float().contiguous()
    has_ent = grad_entropy is not None
    ge = grad_entropy.float().contiguous() if has_ent else g  # a stand-in that is never read
    ent = entropy.float().contiguous() if has_ent else g
    with _common.device_guard(x):
        _token_logprobs_bwd_kernel[(T,)](
            x, x.stride(0), x.stride(1),
            dx, dx.stride(0), dx.stride(1),
            targets.contiguous(), lse.contiguous(), g, ge, ent,
            V, float(temperature), int(ignore_index),
            HAS_ENT_GRAD=has_ent, BLOCK_V=block, num_warps=_num_warps(block),
        )


def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMS // max(V, 1))


def _scaled_chunk(x2d, a, b, temperature):
    x = x2d[a:b].float()  # a view (no copy) for fp32 input: never modify it in place
    return x if temperature == 1.0 else x / temperature


def logprobs_fwd_torch(logits2d, targets, temperature, ignore_index, return_entropy):
    """PyTorch twin of :func:`logprobs_fwd`: rows in chunks, fp32 temporaries of one chunk only."""
    return _fwd_torch(logits2d, targets, temperature, ignore_index, return_entropy, need_lse=True)


def _fwd_torch(logits2d, targets, temperature, ignore_index, return_entropy, need_lse):
    _check_2d(logits2d, targets)
    T, V = logits2d.shape
    dev = logits2d.device
    logp = torch.empty(T, dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev) if need_lse else None
    ent = torch.empty(T, dtype=torch.float32, device=dev) if return_entropy else None
    step = _chunk_rows(V)
    for a in range(0, T, step):
        b = min(a + step, T)
        x = _scaled_chunk(logits2d, a, b, temperature)
        tgt = targets[a:b]
        valid = tgt != ignore_index
        safe = torch.where(valid, tgt, torch.zeros_like(tgt)).long()
        logsm = torch.log_softmax(x, dim=-1)
        c_logp = logsm.gather(1, safe[:, None]).squeeze(1)
        logp[a:b] = torch.where(valid, c_logp, torch.zeros_like(c_logp))
        if lse is not None:
            lse[a:b] = torch.logsumexp(x, dim=-1)
        if ent is not None:
            # entropy = -sum p * log p; terms with p == 0 (incl. x == -inf) contribute 0.
            p = torch.exp(logsm)
            c_ent = -torch.where(p > 0, p * logsm, torch.zeros_like(p)).sum(-1)
            ent[a:b] = torch.where(valid, c_ent, torch.zeros_like(c_ent))
    return logp, lse, ent


def _torch_bwd_into(x2d, dx2d, targets, lse, grad_logp, temperature, ignore_index, grad_entropy=None):
    # The softmax is recomputed with torch.softmax (one fused pass); ``lse`` is not needed here. With
    # ``grad_entropy``: d entropy / d x_v = -p_v (log p_v + H) / temperature, H recomputed per chunk.
    T, V = x2d.shape
    step = _chunk_rows(V)
    g_all = grad_logp.float()
    for a in range(0, T, step):
        b = min(a + step, T)
        tgt = targets[a:b]
        valid = tgt != ignore_index
        g = torch.where(valid, g_all[a:b], torch.zeros_like(g_all[a:b])) / temperature
        if grad_entropy is None:
            grad = torch.softmax(_scaled_chunk(x2d, a, b, temperature), dim=-1).mul_(-g[:, None])
        else:
            gh = torch.where(valid, grad_entropy[a:b].float(), torch.zeros_like(g)) / temperature
            logsm = torch.log_softmax(_scaled_chunk(x2d, a, b, temperature), dim=-1)
            p = logsm.exp()
            logsm.masked_fill_(p == 0, 0.0)  # p == 0 contributes 0 (not 0 * inf)
            h = -(p * logsm).sum(-1, keepdim=True)
            grad = logsm.add_(h).mul_(gh[:, None]).add_(g[:, None]).mul_(p).neg_()
        safe = torch.where(valid, tgt, torch.zeros_like(tgt)).long()
        grad.scatter_add_(1, safe[:, None], g[:, None])
        dx2d[a:b] = grad


def logprobs_bwd_inplace_torch(logits2d, targets, lse, grad_logp, temperature, ignore_index):
    """PyTorch twin of :func:`logprobs_bwd_inplace` (overwrites ``logits2d`` chunk by chunk)."""
    _check_2d(logits2d, targets)
    _torch_bwd_into(logits2d, logits2d, targets, lse, grad_logp, temperature, ignore_index)


@dataclass(frozen=True)
class _Options:
    temperature: float
    ignore_index: int
    return_entropy: bool
    triton: bool  # Triton kernels, else the chunked PyTorch path


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves ``(logits, targets, lse, entropy)`` (``lse`` and ``entropy`` on the Triton
    path only); backward recomputes the softmax. Returns ``(logp, entropy)``, both differentiable,
    ``entropy`` empty without ``return_entropy``."""

    @staticmethod
    def forward(ctx, logits, targets, opts: _Options):
        ctx.set_materialize_grads(False)  # an entropy used as a metric only costs no backward term
        args = (logits, targets, opts.temperature, opts.ignore_index, opts.return_entropy)
        if opts.triton:
            logp, lse, ent = logprobs_fwd(*args)
        else:  # the PyTorch backward recomputes a fused softmax and needs no lse
            logp, lse, ent = _fwd_torch(*args, need_lse=False)
        if ent is None:
            ent = logp.new_empty(0)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.opts = opts
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, ent = ctx.saved_tensors
        opts = ctx.opts
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if grad_logp is None:
            grad_logp = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        if logits.shape[0] > 0:
            args = (logits, grad, targets, lse, grad_logp, opts.temperature, opts.ignore_index, grad_entropy)
            if opts.triton:
                _launch_bwd(*args, None if grad_entropy is None else ent)
            else:
                _torch_bwd_into(*args)
        return grad, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
) -> LogprobsOutput:
    """``log softmax(logits / temperature)[t, targets[t]]`` as fp32 ``[T]``.

    ``logits`` is ``[T, V]`` in fp32/bf16/fp16 (row-strided views are read in place); ``targets`` is
    integer ``[T]``. Returns ``LogprobsOutput(logp, entropy)``: an ``ignore_index`` target gives
    log-prob 0 and a zero gradient row; ``entropy`` is the per-row entropy (fp32 ``[T]``, 0 and no
    gradient on ignored rows, differentiable like ``logp``) with ``return_entropy``, else None. The gradient w.r.t. ``logits`` has their dtype.
    Runs Triton when :func:`bcr_kernels._dispatch.use_triton` says so, else a chunked PyTorch path.
    """
    _check_2d(logits, targets)
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension (V >= 1)")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    opts = _Options(temperature, int(ignore_index), bool(return_entropy), _dispatch.use_triton(logits, targets))
    logp, ent = TokenLogprobsFunction.apply(logits, targets, opts)
    return LogprobsOutput(logp, ent if return_entropy else None)
