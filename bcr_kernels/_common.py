"""Pieces shared by several ops (private to ``bcr_kernels``).

- constants: ``IGNORE_INDEX``, the loss ``REDUCTIONS``, the low-precision float dtypes;
- :func:`device_guard`: Triton launches on the tensors' GPU, not the current one;
- the mask-only aggregation weights of the policy loss and the per-token sequence index
  (``policy_loss``, ``fused_linear_policy_loss``, ``scatter_instance_advantages``);
- the chunked LM head (``fused_linear_logprobs``, ``fused_linear_policy_loss``): casting as autocast
  casts a linear, one chunk's logits, and the chunk's contribution to the head's gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
#: How the policy loss aggregates token losses (``bcr_kernels.reference.policy_loss`` defines them).
REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def device_guard(t: torch.Tensor):
    """Context in which a Triton launch runs on ``t``'s GPU (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# policy-loss aggregation (mask and sequence boundaries only)


def seq_mask_counts(m: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """fp32 ``[S]``: ``sum(mask)`` of each sequence (fp64 prefix sums: deterministic, exact for 0/1 masks)."""
    csum = torch.zeros(m.numel() + 1, dtype=torch.float64, device=m.device)
    torch.cumsum(m.to(torch.float64), 0, out=csum[1:])
    cu = cu.long()
    return (csum[cu[1:]] - csum[cu[:-1]]).to(torch.float32)


def token_sequence_index(cu: torch.Tensor, T: int) -> torch.Tensor:
    """int32 ``[T]``: the sequence each token belongs to, -1 outside ``[cu[0], cu[-1])``."""
    cu = cu.long()
    pos = torch.arange(T, device=cu.device, dtype=torch.int64)
    sid = torch.searchsorted(cu[1:], pos, right=True)  # first s with cu[s + 1] > t
    inside = (pos >= cu[0]) & (sid < cu.numel() - 1)
    return torch.where(inside, sid, torch.full_like(sid, -1)).to(torch.int32)


def reduction_weights(m, cu, reduction, max_completion_length, normalizer):
    """Return ``(seq_w [S] | None, sid [T] | None, denom 0-d fp32 tensor)``.

    The loss is ``sum_t l_t * m_t * seq_w[sid_t] / denom`` (``seq_w`` None: weight 1).
    """
    device = m.device
    S = cu.numel() - 1
    seq_w = sid = None
    if reduction == "token_mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
    elif reduction == "seq_mean_token_mean":
        seq_w = 1.0 / seq_mask_counts(m, cu).clamp(min=1.0)
        sid = token_sequence_index(cu, m.numel())
        denom = max(S, 1) if normalizer is None else normalizer
    elif reduction == "seq_mean_token_sum":  # LUSPO: each sequence's token sum, averaged over sequences
        denom = max(S, 1) if normalizer is None else normalizer
    else:
        if normalizer is None:
            if max_completion_length is None:
                cnt = seq_mask_counts(m, cu)
                max_completion_length = max(int(cnt.max().item()) if S else 1, 1)
            denom = max(S, 1) * max_completion_length
        else:
            denom = normalizer
    denom = torch.as_tensor(denom, dtype=torch.float32, device=device).detach().reshape(())
    return seq_w, sid, denom


def token_weights(m, seq_w, sid):
    """``m * seq_w[sid]`` (0 outside every sequence), or ``m`` when ``seq_w`` is None."""
    if seq_w is None:
        return m
    return m * torch.where(sid >= 0, seq_w[sid.clamp(min=0).long()], torch.zeros((), device=m.device))


def policy_metrics(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics from the fp32 sums ``[mask, low, high, ratio, kl]`` (detached), and, where the objective
    reads entropies, ``[kept, kept entropy]``: the tokens its entropy terms act on and their entropy."""
    stats = stats.detach()
    n = stats[0].clamp(min=1.0)
    out = {
        "clip_ratio/low_mean": stats[1] / n,
        "clip_ratio/high_mean": stats[2] / n,
        "clip_ratio/region_mean": (stats[1] + stats[2]) / n,
        "ratio_mean": stats[3] / n,
        "kl": stats[4] / n,
    }
    if stats.numel() > 5:
        out["entropy/kept_fraction"] = stats[5] / n
        out["entropy/kept_mean"] = stats[6] / stats[5].clamp(min=1.0)
    return out


# --------------------------------------------------------------------------------------------------
# autocast


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives a linear on ``device_type`` now, or None when autocast is off."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """Context without autocast: the ops' internals choose their own dtypes."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def cast_like_linear(hidden, weight, bias):
    """``(hidden, weight, bias)`` cast as autocast casts the operands of ``F.linear`` (differentiably).

    ``addmm(out=)`` / ``mm(out=)`` / ``addmm_`` are not autocast ops, so a head built on them would run
    its GEMMs in fp32 under autocast; casting the operands once up front gives the GEMMs autocast's dtype.
    Without autocast the tensors are returned as they are. Float64 is left alone, as autocast does.
    """
    dtype = autocast_dtype(hidden.device.type)
    if dtype is None:
        return hidden, weight, bias

    def cast(t):
        if t is None or t.dtype == dtype or t.dtype not in (torch.float32,) + LOW_PRECISION:
            return t
        return t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


# --------------------------------------------------------------------------------------------------
# chunked LM head


def chunk_logits(out, hidden_c, weight, bias, alpha):
    """``out = alpha * (hidden_c @ weight.T + bias)`` in the input dtype, no temporary."""
    if bias is None:
        # beta=0: ``out``'s (uninitialised) content is not read.
        torch.addmm(out, hidden_c, weight.t(), beta=0.0, alpha=alpha, out=out)
    else:
        torch.addmm(bias, hidden_c, weight.t(), beta=alpha, alpha=alpha, out=out)
    return out


def chunk_logits_fp32(x, low, hidden_c, weight, bias, inv_t):
    """``x`` (fp32 ``[n, V]``) ``= (hidden_c @ weight.T + bias) * inv_t``. With low-precision inputs the
    GEMM runs in their dtype into ``low`` and ``x`` is its fp32 copy (``low`` None: fp32 inputs)."""
    if low is None:
        return chunk_logits(x, hidden_c, weight, bias, inv_t)
    chunk_logits(low, hidden_c, weight, bias, 1.0)
    x.copy_(low)
    if inv_t != 1.0:
        x.mul_(inv_t)
    return x


def chunk_log_softmax_(x, targets, ignore_index, ebuf):
    """Log-softmax statistics of fp32 chunk logits ``x [n, V]`` (already divided by the temperature).

    Overwrites ``x``. Returns ``(logp, lse, entropy, e, s)``: the targets' log-probs (0 where ignored),
    the rows' log-sum-exp, the entropy (only with the ``[n, V]`` buffer ``ebuf``, else None; 0 where
    ignored), ``e = exp(x - max)`` (in ``ebuf`` with the entropy, else in ``x``) and its row sums ``s``,
    so that ``e / s`` is the softmax.
    """
    n = x.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)
    x_t = x.gather(1, safe).squeeze(1)
    m = x.amax(dim=1, keepdim=True)
    x.sub_(m)  # x - max
    entropy = None
    if ebuf is not None:
        e = ebuf
        torch.exp(x, out=e)
        s = e.sum(dim=1)
        # sum_v e_v * (x_v - m); terms with e_v == 0 contribute 0 (guards -inf logits).
        x.masked_fill_(e == 0, 0.0)
        dot = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(n)
        ent = s.log() - dot / s
        entropy = torch.where(valid, ent, torch.zeros_like(ent))
    else:
        e = x.exp_()
        s = e.sum(dim=1)
    lse = m.squeeze(1) + s.log()
    logp = torch.where(valid, x_t - lse, torch.zeros_like(lse))
    return logp, lse, entropy, e, s


#: This torch has ``addmm(..., out_dtype=float32)`` (low-precision inputs, fp32 output); decided once.
FP32_OUT_ADDMM = hasattr(torch.ops.aten, "addmm") and "dtype_out" in torch.ops.aten.addmm.overloads()


def fp32_out_addmm_supported(device: torch.device) -> bool:
    """Whether ``addmm(out_dtype=float32)`` has a kernel for ``device`` (CUDA only, as of torch 2.13)."""
    return FP32_OUT_ADDMM and device.type == "cuda"


class WeightGrad:
    """``grad_weight [V, H]`` accumulated over chunks as ``+= dlogits_c.T @ hidden_c``.

    For bf16/fp16 weights the sum is kept in fp32. Where ``addmm(out_dtype=float32)`` exists for the
    device, each chunk is one GEMM with low-precision inputs and fp32 accumulation into the sum. Elsewhere
    the chunk's product is computed in the inputs' dtype in blocks of ``block`` rows of ``V`` (one
    reusable ``[block, H]`` buffer no larger than a chunk of logits) and added to the fp32 sum: never a
    ``[V, H]`` temporary per chunk.
    """

    def __init__(self, weight: torch.Tensor, rows: int):
        V, H = weight.shape
        self.low = weight.dtype in LOW_PRECISION
        acc_dtype = torch.float32 if self.low else weight.dtype
        self.acc = torch.zeros(V, H, device=weight.device, dtype=acc_dtype)
        self.fused = self.low and fp32_out_addmm_supported(weight.device)
        self.block = max(1, min(V, (rows * V) // max(H, 1)))
        self._buf: torch.Tensor | None = None

    def add_(self, d: torch.Tensor, h: torch.Tensor) -> None:
        """``acc += d.T @ h`` for ``d [n, V]`` and ``h [n, H]`` in the weight's dtype."""
        if not self.low:
            self.acc.addmm_(d.t(), h)
        elif self.fused:
            torch.addmm(self.acc, d.t(), h, out_dtype=torch.float32, out=self.acc)
        else:
            V = self.acc.shape[0]
            if self._buf is None:
                self._buf = torch.empty(self.block, self.acc.shape[1], device=d.device, dtype=d.dtype)
            for v0 in range(0, V, self.block):
                v1 = min(v0 + self.block, V)
                part = self._buf[: v1 - v0]
                torch.mm(d[:, v0:v1].t(), h, out=part)
                self.acc[v0:v1].add_(part)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.acc if self.acc.dtype == dtype else self.acc.to(dtype)


def add_head_grads_(d, h_c, weight, out_h, grad_w: WeightGrad | None, grad_b):
    """Add one chunk's LM-head gradients given ``d`` = d loss / d logits of the chunk (weight's dtype).

    ``out_h`` (the chunk's rows of grad_hidden, or None) is written; ``grad_w`` / ``grad_b`` (fp32 for
    low-precision weights, or None) are accumulated.
    """
    if out_h is not None:
        torch.mm(d, weight, out=out_h)
    if grad_w is not None:
        grad_w.add_(d, h_c)
    if grad_b is not None:
        grad_b.add_(d.sum(dim=0, dtype=grad_b.dtype))


@dataclass(frozen=True)
class HeadOptions:
    """The non-tensor arguments of a chunked LM-head op."""

    temperature: float
    ignore_index: int
    chunk: int  # rows per chunk
    return_entropy: bool
    triton: bool  # Triton log-softmax kernels, else in-place PyTorch ops
