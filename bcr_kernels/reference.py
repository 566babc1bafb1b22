"""Plain PyTorch references for every bcr_kernels op: obviously correct, slow, the oracle.

Each function here defines the op's semantics. The Triton kernels and the lean PyTorch paths are
tested against these, values and gradients. Nothing here is tuned; it materialises whatever it likes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import IGNORE_INDEX, REDUCTIONS
from .objective import Objective, resolve
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
    ``LogprobsOutput.entropy`` holds the entropy of each row's distribution (fp32 ``[T]``, 0 and no
    gradient on ignored rows, differentiable: an entropy bonus trains through it); else it is None.
    """
    x = logits.float() / temperature
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, safe[:, None]).squeeze(-1) - lse
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return LogprobsOutput(logp)
    p = torch.softmax(x, dim=-1)
    x_seen = torch.where(p > 0, x, torch.zeros_like(x))  # p == 0 (x = -inf) adds 0, not 0 * inf
    entropy = lse - (p * x_seen).sum(-1)
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


def _rollout_weights(old, smp, m, seg, o: Objective):
    """Step 2 of ``policy_loss``: the constant rollout-correction weights of one sequence."""
    d = torch.nan_to_num((old - smp) * m, nan=0.0)
    mode = o.importance_sampling_mode
    unit = mode.split("_")[0]
    log_is = d if unit == "token" else _unit_value(d, torch.ones_like(m), seg, unit, d.numel(), mean=False)
    w = torch.exp(log_is)
    lo = -math.inf if o.importance_sampling_clip_min is None else o.importance_sampling_clip_min
    hi = math.inf if o.importance_sampling_clip_max is None else o.importance_sampling_clip_max
    if mode.endswith("truncate"):
        return torch.clamp(w, min=lo, max=hi)
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def _vespo_phi(lr, a, m, seg, w_is, o: Objective):
    """VESPO's (detached) Gamma weight of one sequence's tokens (step 3)."""
    x = torch.clamp(lr.detach(), -20.0, 20.0)
    if w_is is not None:
        x = x + torch.clamp(torch.log(w_is), math.log(1e-8), 20.0)
    level = "instance" if o.importance_sampling_level == "instance" else "sequence"
    log_w = torch.clamp(_unit_value(x, m, seg, level, x.numel(), mean=False), math.log(1e-8), 20.0)
    k = torch.where(a >= 0, o.vespo_k_pos, o.vespo_k_neg)
    lam = torch.where(a >= 0, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _surrogate(lp, lr, r, a, m, seg, w_is, o: Objective):
    """Step 3: ``(loss, low, high)`` of the objective ``o.kind`` on one sequence."""
    zero = torch.zeros_like(lp)
    eps_high = o.eps_high
    if o.kind == "clip":
        c1 = r if o.delta is None else torch.clamp(r, max=o.delta)
        loss = -torch.minimum(c1 * a, torch.clamp(r, 1 - o.epsilon, 1 + eps_high) * a)
        return loss, ((r < 1 - o.epsilon) & (a < 0)).float(), ((r > 1 + eps_high) & (a > 0)).float()
    if o.kind == "cispo":
        return -torch.clamp(r, max=eps_high).detach() * a * lp, zero, ((r > eps_high) & (a > 0)).float()
    if o.kind == "sapo":
        tau = torch.where(a > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        return -torch.sigmoid(tau * (r - 1)) * 4 / tau * a, zero, zero
    return -_vespo_phi(lr, a, m, seg, w_is, o) * a * lp, zero, zero


def _sequence_loss(lp, old, a, m, seg, smp, ref, keep, o: Objective):
    """Steps 1-5 of ``policy_loss`` on one sequence: ``(loss, ratio, kl, low, high)`` per token."""
    lr = lp - old
    level = o.importance_sampling_level
    r = torch.exp(lr if level == "token" else _unit_value(lr, m, seg, level, lp.numel(), mean=True))
    w_is = None if o.importance_sampling_mode is None else _rollout_weights(old, smp, m, seg, o)
    loss, low, high = _surrogate(lp, lr, r, a, m, seg, w_is, o)
    if o.off_policy_mask_threshold is not None:
        kl_seq = (torch.nan_to_num(smp - lp.detach(), nan=0.0) * m).sum() / m.sum().clamp(min=1.0)
        loss = loss * ((a >= 0) | (kl_seq <= o.off_policy_mask_threshold)).float()
    if keep is not None:
        loss = loss * keep
    if w_is is not None and o.kind != "vespo":
        loss = loss * w_is
    kl = torch.zeros_like(lp)
    if o.beta != 0.0 and ref is not None:
        dk = ref - lp
        kl = torch.exp(dk) - dk - 1
        if o.use_bias_correction_kl:
            kl = kl * r
        loss = loss + o.beta * kl
    return loss, r.detach(), kl.detach(), low, high


def _top_entropy_keep(entropy, mask, bounds, quantile):
    """Step 6: 1 for the loss tokens whose entropy is at least the ``1 - quantile`` quantile (linear
    interpolation between the sorted entropies of every loss token of every sequence), else 0."""
    keep = torch.zeros(mask.numel(), device=mask.device)
    h = entropy.detach().float()
    counted = [i for a0, b0 in zip(bounds[:-1], bounds[1:]) for i in range(a0, b0) if mask[i] > 0]
    if not counted:
        return keep
    values = sorted(float(h[i]) for i in counted)
    pos = (1.0 - quantile) * (len(values) - 1)
    below, frac = int(math.floor(pos)), pos - math.floor(pos)
    upper = values[min(below + 1, len(values) - 1)]
    threshold = values[below] + (upper - values[below]) * frac
    for i in counted:
        keep[i] = float(float(h[i]) >= threshold)
    return keep


def _aggregate(seq_sums, seq_cnts, mask, o: Objective, normalizer, zero):
    """The ``reduction`` of the per-sequence sums of ``l * m``."""
    S = len(seq_sums)
    total = sum(seq_sums, zero)
    if o.reduction == "token_mean":
        return total / (mask.sum().clamp(min=1.0) if normalizer is None else normalizer)
    if o.reduction == "seq_mean_token_mean":
        denom = max(S, 1) if normalizer is None else normalizer
        return sum((x / c.clamp(min=1.0) for x, c in zip(seq_sums, seq_cnts)), zero) / denom
    if o.reduction == "seq_mean_token_sum":
        return total / (max(S, 1) if normalizer is None else normalizer)
    if normalizer is None:
        longest = o.max_completion_length or max([int(c) for c in seq_cnts] + [1])
        return total / (max(S, 1) * longest)
    return total / normalizer


def _metrics(parts, mm, kept):
    """The detached metrics: masked token means over the sequences' tokens (``parts``: per sequence
    ``(ratio, kl, low, high)``), and the entropy terms' share and mean with ``kept`` = ``(sum(e),
    sum(entropy * e))``."""
    with torch.no_grad():
        ratio, kl, low, high = (torch.cat(xs) for xs in zip(*parts)) if parts else [mm.new_zeros(0)] * 4
        n = mm.sum().clamp(min=1.0)
        out = {
            "clip_ratio/low_mean": (low * mm).sum() / n,
            "clip_ratio/high_mean": (high * mm).sum() / n,
            "clip_ratio/region_mean": ((low + high) * mm).sum() / n,
            "ratio_mean": (ratio * mm).sum() / n,
            "kl": (kl * mm).sum() / n,
        }
        if kept is not None:
            out["entropy/kept_fraction"] = kept[0] / n
            out["entropy/kept_mean"] = kept[1] / kept[0].clamp(min=1.0)
    return out


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    objective: Objective | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | None = None,
    entropy_weight: float = 1.0,
    **legacy,
) -> PolicyLossOutput:
    """Policy loss over packed tokens: one objective per token, then an aggregation, plus the entropy bonus.

    All inputs are ``[T]``; ``mask`` (``m``) marks the tokens that count (completion tokens); ``o`` is
    ``objective`` (``bcr_kernels.Objective``; the old keyword form ``**legacy`` is deprecated). Computed
    sequence by sequence (``cu_seqlens``), per token ``t`` with advantage ``A``:

    1. log-ratio ``lr = logp - old_logp`` and importance weight ``r = exp(lw)``; ``lw`` by
       ``o.importance_sampling_level``: ``token``: ``lr``; ``sequence`` (GSPO): the ``m``-mean of ``lr``
       over the sequence; ``instance`` (BCR): the ``m``-mean of ``lr`` over the tokens of the same problem
       segment (``segment_ids``, instance index inside the sequence); shared tokens (segment -1: a
       preamble, separators) take the sequence's value, so ``instance`` equals ``sequence`` on a
       completion without problem segments.
    2. rollout weights ``w_is`` (``o.importance_sampling_mode``, TRL's vLLM correction): from
       ``d = (old_logp - sampling_logp) * m`` (NaN -> 0): ``token_*``: ``exp(d_t)``; ``sequence_*``:
       ``exp(sum of d over the sequence)``; ``instance_*``: ``exp(sum of d over the segment)`` (shared
       tokens: the sequence's sum). ``*_truncate`` clamps them to ``[clip_min, clip_max]``; ``*_mask``
       zeroes those outside it. Constants (no gradient).
    3. the objective ``o.kind`` (``sg`` = no gradient):
       ``clip``: ``-min(c1 * A, clamp(r, 1 - epsilon, 1 + epsilon_high) * A)``, ``c1 = min(r, delta)``
       with ``delta`` (two-sided clipping) else ``r``;
       ``cispo``: ``-sg(min(r, epsilon_high)) * A * logp``;
       ``sapo``: ``-sigmoid(tau * (r - 1)) * 4 / tau * A``, ``tau`` = ``sapo_temperature_pos`` if
       ``A > 0`` else ``sapo_temperature_neg``;
       ``vespo``: ``-sg(phi) * A * logp``, ``phi = exp(lam + k * log w - lam * w)``, ``log w`` = the sum
       over the sequence (the segment at the ``instance`` level) of ``m * (clamp(lr, -20, 20) +
       clamp(log w_is, log 1e-8, 20))``, clamped to ``[log 1e-8, 20]``; ``k, lam`` = ``vespo_k_pos,
       vespo_lambda_pos`` if ``A >= 0`` else the ``_neg`` pair (``lam >= 1e-4``); non-finite phi -> 0.
    4. the off-policy mask (``o.off_policy_mask_threshold`` = delta): the objective is zeroed where
       ``A < 0`` and the ``m``-mean over the sequence of ``sampling_logp - sg(logp)`` (default
       ``sampling_logp``: ``old_logp``) exceeds delta; then times the entropy mask (step 6), then times
       ``w_is`` (not for ``vespo``).
    5. ``+ beta * kl`` with ``kl = exp(ref - logp) - (ref - logp) - 1`` (times ``r`` with
       ``use_bias_correction_kl``), when ``beta != 0`` and ``ref_logp`` is given.
    6. the entropy terms (``entropy`` ``[T]``, needed by both): ``o.top_entropy_quantile`` = rho < 1
       keeps (mask 1) the loss tokens whose entropy is at least the ``1 - rho`` quantile (linear
       interpolation) of the entropies of every loss token of the call (TRL: of its micro-batch), and
       zeroes the objective of the others (step 4); ``o.entropy_coef`` adds the bonus
       ``-entropy_coef * entropy_weight * sum(entropy * e) / max(sum(e), 1)`` with ``e = m`` (times the
       entropy mask with rho < 1), outside the aggregation below, differentiable in ``entropy``.

    Aggregation (``o.reduction``; TRL's ``loss_type`` names in brackets):

    - ``token_mean``: ``sum(l * m) / D`` with ``D = sum(m)`` (TRL ``bnpo``; ``dapo``, ``cispo``,
      ``vespo`` pass the global token count of the whole batch as ``normalizer``);
    - ``seq_mean_token_mean``: ``sum_s(sum(l * m)_s / max(sum(m)_s, 1)) / D`` with ``D = S`` (TRL
      ``grpo``, ``sapo``);
    - ``seq_mean_token_sum_norm``: ``sum(l * m) / D`` with ``D = S * max_completion_length`` (Dr. GRPO;
      ``o.max_completion_length`` defaults to the longest masked sequence);
    - ``seq_mean_token_sum``: ``sum(l * m) / D`` with ``D = S`` (TRL ``luspo``).

    ``normalizer`` replaces ``D`` (for gradient accumulation over micro-batches). Returns
    ``PolicyLossOutput(loss, metrics)`` where metrics are detached fp32 masked token means:
    ``clip_ratio/low_mean`` (``r < 1 - epsilon`` and ``A < 0``; ``clip`` only),
    ``clip_ratio/high_mean`` (``r > 1 + epsilon_high`` and ``A > 0``; for ``cispo``: ``r > epsilon_high``
    and ``A > 0``; 0 for ``sapo`` / ``vespo``), ``clip_ratio/region_mean`` (their sum), ``ratio_mean``
    (of ``r``) and ``kl`` (after the bias correction); where the objective reads entropies also
    ``entropy/kept_fraction`` (``sum(e) / sum(m)``) and ``entropy/kept_mean`` (``sum(entropy * e) /
    max(sum(e), 1)``).
    """
    o = resolve(objective, legacy, "reference.policy_loss")
    if o.uses_entropy and entropy is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef need the tokens' entropy: pass entropy=")
    bounds = cu_seqlens.tolist()
    m_all = mask.float()
    keep = None if o.top_entropy_quantile >= 1.0 else _top_entropy_keep(entropy, m_all, bounds, o.top_entropy_quantile)
    e_all = torch.zeros_like(m_all)  # the entropy terms' tokens: m (times the entropy mask) in the sequences
    seq_sums, seq_cnts, parts = [], [], []
    for a0, b0 in zip(bounds[:-1], bounds[1:]):
        lp = logp[a0:b0].float()
        old = old_logp[a0:b0].float().detach()
        m = m_all[a0:b0]
        seg = None if segment_ids is None else segment_ids[a0:b0].long()
        smp = old if sampling_logp is None else sampling_logp[a0:b0].float()
        ref = None if ref_logp is None else ref_logp[a0:b0].float()
        k = None if keep is None else keep[a0:b0]
        loss, r, kl, low, high = _sequence_loss(lp, old, advantages[a0:b0].float().detach(), m, seg, smp, ref, k, o)
        seq_sums.append((loss * m).sum())
        seq_cnts.append(m.sum())
        parts.append((r, kl, low, high))
        e_all[a0:b0] = m if k is None else m * k
    loss = _aggregate(seq_sums, seq_cnts, m_all, o, normalizer, logp.float().sum() * 0.0)  # 0 keeps the graph
    kept = None
    if o.uses_entropy:
        h_sum = (entropy.float() * e_all).sum()
        if o.entropy_coef != 0.0:
            loss = loss - o.entropy_coef * entropy_weight * h_sum / e_all.sum().clamp(min=1.0)
        kept = (e_all.sum(), h_sum.detach())
    mm = torch.cat([m_all[a0:b0] for a0, b0 in zip(bounds[:-1], bounds[1:])]) if parts else m_all[:0]
    return PolicyLossOutput(loss, _metrics(parts, mm, kept))


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
