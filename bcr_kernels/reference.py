"""Plain PyTorch references for every bcr_kernels op: obviously correct, slow, the oracle.

Each function here defines the op's semantics. The Triton kernels and the lean PyTorch paths are
tested against these, values and gradients. Nothing here is tuned; it materialises whatever it likes.
"""

from __future__ import annotations

import math

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


def _unit_value(x, m, seg, level, n, *, mean: bool):
    """Per token of one sequence: ``x`` summed (or ``m``-averaged) over its ratio unit."""
    out = torch.zeros(n, dtype=x.dtype, device=x.device)
    whole = (x * m).sum() / (m.sum().clamp(min=1.0) if mean else 1.0)
    out[:] = whole
    if level == "instance" and seg is not None:
        for k in sorted(set(seg.tolist()) - {-1}):
            idx = (seg == k).nonzero().flatten()
            v = (x[idx] * m[idx]).sum()
            out[idx] = v / m[idx].sum().clamp(min=1.0) if mean else v
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
) -> PolicyLossOutput:
    """Policy loss over packed tokens: one objective per token, then an aggregation.

    All inputs are ``[T]``; ``mask`` (``m``) marks the tokens that count (completion tokens). Computed
    sequence by sequence (``cu_seqlens``), per token ``t`` with advantage ``A``:

    1. log-ratio ``lr = logp - old_logp`` and importance weight ``r = exp(lw)``; ``lw`` by
       ``importance_sampling_level``: ``token``: ``lr``; ``sequence`` (GSPO): the ``m``-mean of ``lr``
       over the sequence; ``instance`` (BCR): the ``m``-mean of ``lr`` over the tokens of the same problem
       segment (``segment_ids``, instance index inside the sequence); shared tokens (segment -1: a
       preamble, separators) take the sequence's value, so ``instance`` equals ``sequence`` on a
       completion without problem segments.
    2. rollout weights ``w_is`` (``importance_sampling_mode``, TRL's vLLM correction): from
       ``d = (old_logp - sampling_logp) * m`` (NaN -> 0): ``token_*``: ``exp(d_t)``; ``sequence_*``:
       ``exp(sum of d over the sequence)``; ``instance_*``: ``exp(sum of d over the segment)`` (shared
       tokens: the sequence's sum). ``*_truncate`` clamps them to ``[clip_min, clip_max]``; ``*_mask``
       zeroes those outside it. Constants (no gradient).
    3. the objective (``sg`` = no gradient):
       ``clip``: ``-min(c1 * A, clamp(r, 1 - epsilon, 1 + epsilon_high) * A)``, ``c1 = min(r, delta)``
       with ``delta`` (two-sided clipping) else ``r``;
       ``cispo``: ``-sg(min(r, epsilon_high)) * A * logp``;
       ``sapo``: ``-sigmoid(tau * (r - 1)) * 4 / tau * A``, ``tau`` = ``sapo_temperature_pos`` if
       ``A > 0`` else ``sapo_temperature_neg``;
       ``vespo``: ``-sg(phi) * A * logp``, ``phi = exp(lam + k * log w - lam * w)``, ``log w`` = the sum
       over the sequence (the segment at the ``instance`` level) of ``m * (clamp(lr, -20, 20) +
       clamp(log w_is, log 1e-8, 20))``, clamped to ``[log 1e-8, 20]``; ``k, lam`` = ``vespo_k_pos,
       vespo_lambda_pos`` if ``A >= 0`` else the ``_neg`` pair (``lam >= 1e-4``); non-finite phi -> 0.
    4. the off-policy mask (``off_policy_mask_threshold`` = delta): the objective is zeroed where
       ``A < 0`` and the ``m``-mean over the sequence of ``sampling_logp - sg(logp)`` (default
       ``sampling_logp``: ``old_logp``) exceeds delta; then times ``w_is`` (not for ``vespo``).
    5. ``+ beta * kl`` with ``kl = exp(ref - logp) - (ref - logp) - 1`` (times ``r`` with
       ``use_bias_correction_kl``), when ``beta != 0`` and ``ref_logp`` is given.

    Aggregation (``reduction``; TRL's ``loss_type`` names in brackets):

    - ``token_mean``: ``sum(l * m) / D`` with ``D = sum(m)`` (TRL ``bnpo``; ``dapo``, ``cispo``,
      ``vespo`` pass the global token count of the whole batch as ``normalizer``);
    - ``seq_mean_token_mean``: ``sum_s(sum(l * m)_s / max(sum(m)_s, 1)) / D`` with ``D = S`` (TRL
      ``grpo``, ``sapo``);
    - ``seq_mean_token_sum_norm``: ``sum(l * m) / D`` with ``D = S * max_completion_length`` (Dr. GRPO;
      ``max_completion_length`` defaults to the longest masked sequence);
    - ``seq_mean_token_sum``: ``sum(l * m) / D`` with ``D = S`` (TRL ``luspo``).

    ``normalizer`` replaces ``D`` (for gradient accumulation over micro-batches). Returns
    ``PolicyLossOutput(loss, metrics)`` where metrics are detached fp32 masked token means:
    ``clip_ratio/low_mean`` (``r < 1 - epsilon`` and ``A < 0``; ``clip`` only),
    ``clip_ratio/high_mean`` (``r > 1 + epsilon_high`` and ``A > 0``; for ``cispo``: ``r > epsilon_high``
    and ``A > 0``; 0 for ``sapo`` / ``vespo``), ``clip_ratio/region_mean`` (their sum), ``ratio_mean``
    (of ``r``) and ``kl`` (after the bias correction).
    """
    check_reduction(reduction)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    S = cu_seqlens.numel() - 1
    bounds = cu_seqlens.tolist()
    m_all = mask.float()
    dev = logp.device
    pieces, ratios, kls, lows, highs = [], [], [], [], []
    for s in range(S):
        a0, b0 = bounds[s], bounds[s + 1]
        n = b0 - a0
        lp = logp[a0:b0].float()
        old = old_logp[a0:b0].float().detach()
        a = advantages[a0:b0].float().detach()
        m = m_all[a0:b0]
        seg = None if segment_ids is None else segment_ids[a0:b0].long()
        lr = lp - old
        if importance_sampling_level == "token":
            lw = lr
        else:
            lw = _unit_value(lr, m, seg, importance_sampling_level, n, mean=True)
        r = torch.exp(lw)
        w_is = None
        if importance_sampling_mode is not None:
            smp = old if sampling_logp is None else sampling_logp[a0:b0].float()
            d = torch.nan_to_num((old - smp) * m, nan=0.0)
            unit = importance_sampling_mode.split("_")[0]
            log_is = d if unit == "token" else _unit_value(d, torch.ones_like(m), seg, unit, n, mean=False)
            w_is = torch.exp(log_is)
            lo_is = -float("inf") if importance_sampling_clip_min is None else importance_sampling_clip_min
            hi_is = float("inf") if importance_sampling_clip_max is None else importance_sampling_clip_max
            if importance_sampling_mode.endswith("truncate"):
                w_is = torch.clamp(w_is, min=lo_is, max=hi_is)
            else:
                w_is = torch.where((w_is < lo_is) | (w_is > hi_is), torch.zeros_like(w_is), w_is)
        low = high = torch.zeros(n, device=dev)
        if objective == "clip":
            c1 = r if delta is None else torch.clamp(r, max=delta)
            loss = -torch.minimum(c1 * a, torch.clamp(r, 1 - epsilon, 1 + eps_high) * a)
            low = ((r < 1 - epsilon) & (a < 0)).float()
            high = ((r > 1 + eps_high) & (a > 0)).float()
        elif objective == "cispo":
            loss = -torch.clamp(r, max=eps_high).detach() * a * lp
            high = ((r > eps_high) & (a > 0)).float()
        elif objective == "sapo":
            tau = torch.where(a > 0, sapo_temperature_pos, sapo_temperature_neg)
            loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
        elif objective == "vespo":
            x = torch.clamp(lr.detach(), -20.0, 20.0)
            if w_is is not None:
                x = x + torch.clamp(torch.log(w_is), math.log(1e-8), 20.0)
            level = "instance" if importance_sampling_level == "instance" else "sequence"
            log_w = torch.clamp(_unit_value(x, m, seg, level, n, mean=False), math.log(1e-8), 20.0)
            k = torch.where(a >= 0, vespo_k_pos, vespo_k_neg)
            lam = torch.where(a >= 0, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            loss = -phi * a * lp
        else:
            raise ValueError(f"unknown objective {objective!r}")
        if off_policy_mask_threshold is not None:
            smp = old if sampling_logp is None else sampling_logp[a0:b0].float()
            kl_seq = (torch.nan_to_num(smp - lp.detach(), nan=0.0) * m).sum() / m.sum().clamp(min=1.0)
            keep = (a >= 0) | (kl_seq <= off_policy_mask_threshold)
            loss = loss * keep.float()
        if w_is is not None and objective != "vespo":
            loss = loss * w_is
        kl = torch.zeros(n, device=dev)
        if beta != 0.0 and ref_logp is not None:
            dk = ref_logp[a0:b0].float() - lp
            kl = torch.exp(dk) - dk - 1
            if use_bias_correction_kl:
                kl = kl * r
            loss = loss + beta * kl
        pieces.append(loss)
        ratios.append(r.detach())
        kls.append(kl.detach())
        lows.append(low)
        highs.append(high)

    seq_sums = [(p * m_all[bounds[s] : bounds[s + 1]]).sum() for s, p in enumerate(pieces)]
    seq_cnts = [m_all[bounds[s] : bounds[s + 1]].sum() for s in range(S)]
    zero = logp.float().sum() * 0.0  # keeps the graph when there are no sequences
    total = sum(seq_sums, zero)
    if reduction == "token_mean":
        denom = m_all.sum().clamp(min=1.0) if normalizer is None else normalizer
        loss = total / denom
    elif reduction == "seq_mean_token_mean":
        denom = max(S, 1) if normalizer is None else normalizer
        loss = sum((x / c.clamp(min=1.0) for x, c in zip(seq_sums, seq_cnts)), zero) / denom
    elif reduction == "seq_mean_token_sum":
        denom = max(S, 1) if normalizer is None else normalizer
        loss = total / denom
    else:
        if normalizer is None:
            if max_completion_length is None:
                max_completion_length = max([int(c) for c in seq_cnts] + [1])
            denom = max(S, 1) * max_completion_length
        else:
            denom = normalizer
        loss = total / denom
    with torch.no_grad():
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, device=dev))  # noqa: E731
        mm = torch.cat([m_all[bounds[s] : bounds[s + 1]] for s in range(S)]) if S else torch.zeros(0, device=dev)
        n = mm.sum().clamp(min=1.0)
        low, high = cat(lows), cat(highs)
        metrics = {
            "clip_ratio/low_mean": (low * mm).sum() / n,
            "clip_ratio/high_mean": (high * mm).sum() / n,
            "clip_ratio/region_mean": ((low + high) * mm).sum() / n,
            "ratio_mean": (cat(ratios) * mm).sum() / n,
            "kl": (cat(kls) * mm).sum() / n,
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
