"""Plain PyTorch references for every bcr_kernels op: obviously correct, slow, the oracle.

Each function here defines the op's semantics. The Triton kernels and the lean PyTorch paths are
tested against these, values and gradients. Nothing here is tuned; it materialises whatever it likes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import IGNORE_INDEX, REDUCTIONS, check_reduction
from .outputs import LogprobsOutput, PolicyLossOutput

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "fused_linear_logprobs",
    "packed_targets",
    "policy_loss",
    "scatter_instance_advantages",
    "token_logprobs",
    "varlen_attention",
]


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
) -> LogprobsOutput:
    """log softmax(logits / temperature)[t, targets[t]] as fp32 ``[T]``, in ``LogprobsOutput.logp``.

    An ignored target (``ignore_index``) gives log-prob 0 and no gradient. With ``return_entropy``
    ``LogprobsOutput.entropy`` holds the entropy of each row's distribution (fp32 ``[T]``, 0 on
    ignored rows, detached: it is a metric, not a training signal); else it is None.
    """
    x = logits.float() / temperature
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, safe[:, None]).squeeze(-1) - lse
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return LogprobsOutput(logp)
    with torch.no_grad():
        p = torch.softmax(x, dim=-1)
        px = torch.where(p > 0, p * x, torch.zeros_like(x))
        entropy = lse - px.sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return LogprobsOutput(logp, entropy)


def packed_targets(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, *, ignore_index: int = IGNORE_INDEX):
    """Next-token targets for packed sequences that never cross a sequence boundary.

    ``input_ids`` is ``[T]``; ``cu_seqlens`` the int32 prefix sums ``[S + 1]`` (``cu_seqlens[-1] == T``).
    ``targets[i] = input_ids[i + 1]`` unless ``i`` is the last token of its sequence, which gets
    ``ignore_index``.
    """
    targets = torch.full_like(input_ids, ignore_index)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - start > 1:
            targets[start : end - 1] = input_ids[start + 1 : end]
    return targets


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
    """``token_logprobs(hidden @ weight.T + bias, targets)``, materialising the full logits.

    ``chunk_tokens`` is accepted for signature parity and ignored here.
    """
    logits = F.linear(hidden, weight, bias)
    return token_logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


def scatter_instance_advantages(
    instance_advantages: torch.Tensor,
    segment_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_instances: torch.Tensor | None = None,
    shared: str = "mean",
):
    """Scatter per-instance advantages of each packed sequence to its tokens.

    ``instance_advantages`` is ``[S, N_max]`` (row ``s`` holds sequence ``s``'s instances; sequences
    may hold different N, given by ``num_instances [S]``, default ``N_max`` for all). ``segment_ids``
    ``[T]`` holds, per token, the instance index inside its own sequence, or -1 for shared text.
    Shared tokens get the mean of the sequence's first ``num_instances[s]`` advantages
    (``shared="mean"``) or 0 (``shared="zero"``). Returns fp32 ``[T]``.
    """
    if shared not in ("mean", "zero"):
        raise ValueError(f"shared must be 'mean' or 'zero', got {shared!r}")
    S, n_max = instance_advantages.shape
    if num_instances is None:
        num_instances = torch.full((S,), n_max, dtype=torch.long, device=instance_advantages.device)
    adv = instance_advantages.float()
    out = torch.zeros(segment_ids.shape[0], dtype=torch.float32, device=adv.device)
    bounds = cu_seqlens.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = int(num_instances[s])
        seg = segment_ids[start:end].long()
        if seg.numel() and (int(seg.max()) >= n or int(seg.min()) < -1):
            raise ValueError(f"sequence {s}: segment ids must lie in [-1, {n}), got {seg.tolist()}")
        row = adv[s, :n]
        fill = row.mean() if (shared == "mean" and n > 0) else adv.new_zeros(())
        vals = torch.where(seg >= 0, row[seg.clamp(min=0)] if n > 0 else fill.expand_as(seg), fill)
        out[start:end] = vals
    return out


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
    reduction: str = "token_mean",
    max_completion_length: int | None = None,
    normalizer: float | None = None,
) -> PolicyLossOutput:
    """GRPO clipped surrogate (+ k3 KL to a reference policy) over packed tokens.

    All inputs are ``[T]``; ``mask`` marks the tokens that count (completion tokens). Per token:
    ``ratio = exp(logp - old_logp)``,
    ``l = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl`` with
    ``kl = exp(ref - logp) - (ref - logp) - 1``. Aggregation (``reduction``; TRL's ``loss_type`` names in
brackets):

    - ``token_mean``: ``sum(l * m) / D`` with ``D = sum(m)`` (TRL ``bnpo``; ``dapo`` passes the global
      token count of the whole batch as ``normalizer``);
    - ``seq_mean_token_mean``: ``sum_s(sum(l * m)_s / max(sum(m)_s, 1)) / D`` with ``D = S`` (TRL ``grpo``);
    - ``seq_mean_token_sum_norm``: ``sum(l * m) / D`` with ``D = S * max_completion_length`` (Dr. GRPO;
      ``max_completion_length`` defaults to the longest masked sequence).

    ``normalizer`` replaces ``D`` (for gradient accumulation over micro-batches). Returns
    ``PolicyLossOutput(loss, metrics)`` where metrics are detached fp32 scalars: ``clip_ratio/low_mean`` (tokens with
    ``ratio < 1 - epsilon`` and ``A < 0``), ``clip_ratio/high_mean`` (``ratio > 1 + epsilon_high`` and
    ``A > 0``), ``clip_ratio/region_mean`` (their sum), ``ratio_mean`` and ``kl`` (masked means).
    """
    check_reduction(reduction)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.float()
    adv = advantages.float()
    ratio = torch.exp(logp.float() - old_logp.float())
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_tok = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(per_tok)
    if beta != 0.0 and ref_logp is not None:
        d = ref_logp.float() - logp.float()
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    S = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_index = torch.repeat_interleave(torch.arange(S, device=logp.device), lengths)
    if reduction == "token_mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        loss = (per_tok * m).sum() / denom
    elif reduction == "seq_mean_token_mean":
        seq_sum = torch.zeros(S, device=logp.device).index_add(0, seq_index, per_tok * m)
        seq_cnt = torch.zeros(S, device=logp.device).index_add(0, seq_index, m)
        denom = max(S, 1) if normalizer is None else normalizer
        loss = (seq_sum / seq_cnt.clamp(min=1.0)).sum() / denom
    else:
        if normalizer is None:
            if max_completion_length is None:
                seq_cnt = torch.zeros(S, device=logp.device).index_add(0, seq_index, m)
                max_completion_length = max(int(seq_cnt.max().item()) if S else 1, 1)
            denom = max(S, 1) * max_completion_length
        else:
            denom = normalizer
        loss = (per_tok * m).sum() / denom
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        low = ((ratio < 1 - epsilon) & (adv < 0)).float()
        high = ((ratio > 1 + eps_high) & (adv > 0)).float()
        metrics = {
            "clip_ratio/low_mean": (low * m).sum() / n,
            "clip_ratio/high_mean": (high * m).sum() / n,
            "clip_ratio/region_mean": ((low + high) * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "kl": (kl * m).sum() / n,
        }
    return PolicyLossOutput(loss, metrics)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
):
    """Attention over packed sequences, one SDPA call per sequence.

    ``q`` is ``[T, Hq, D]``, ``k``/``v`` are ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (grouped-query
    attention); tokens attend only within their own sequence. Returns ``[T, Hq, D]``.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
        out[start:end] = o.transpose(0, 1)
    return out
