"""The policy objectives of ``policy_loss`` / ``fused_linear_policy_loss``, vectorised over packed tokens.

Semantics: ``bcr_kernels.reference.policy_loss`` (a plain per-sequence loop). This module is the lean
PyTorch form of the same maths on ``[T]`` vectors, with per-group reductions (``index_add``) where a
ratio covers several tokens. It never sees the vocabulary: it maps log-probs ``[T]`` to per-token
losses ``[T]``, so both ops reuse it (the fused op differentiates it to get ``d loss / d logp``).

The pieces, per token ``t`` of sequence ``s`` (``m`` = mask, ``A`` = advantage):

- log-ratio ``lr_t = logp_t - old_t``; importance weight ``r_t = exp(lw_t)`` where ``lw_t`` is, by
  ``importance_sampling_level``: ``lr_t`` (``token``); the masked mean of ``lr`` over ``s``
  (``sequence``, GSPO); the masked mean of ``lr`` over the tokens of ``t``'s problem segment
  (``instance``: same sequence and same ``segment_ids`` value), where shared tokens (segment -1)
  take their sequence's ratio, as under ``sequence``;
- objective (TRL 1.16's ``loss_type`` families): ``clip`` ``-min(c1 A, clamp(r, 1 - eps, 1 + eps_high) A)``
  with ``c1 = r``, or ``min(r, delta)`` with ``delta`` (two-sided clipping); ``cispo``
  ``-sg(min(r, eps_high)) A logp``; ``sapo`` ``-sigmoid(tau (r - 1)) 4 / tau A`` with ``tau`` by the sign
  of ``A``; ``vespo`` ``-sg(phi) A logp`` with ``phi = exp(lam + k log w - lam w)`` the Gamma weight of
  ``w = exp(sum of clamp(lr, +-20) over the sequence`` (over the segment at the ``instance`` level)
  ``+ sum of the log rollout weights)``, ``k``/``lam`` by the sign of ``A`` (``sg`` = stop-gradient);
- off-policy mask (``off_policy_mask_threshold``): a token is dropped when ``A < 0`` and the masked
  mean of ``sampling_logp - sg(logp)`` over its sequence exceeds the threshold;
- rollout correction (``importance_sampling_mode``): constant weights from ``old - sampling_logp``
  (token; summed over the sequence, or over the segment with shared tokens taking the sequence's sum,
  for the ``sequence_*`` / ``instance_*`` modes), truncated to ``[clip_min, clip_max]`` or zeroed
  outside it, multiplying the objective (``vespo`` puts them into ``w`` instead);
- entropy mask (``top_entropy_quantile`` < 1, :func:`top_entropy_keep`): the objective of a loss token
  whose entropy is below the ``1 - top_entropy_quantile`` quantile of the call's loss tokens is zeroed
  (before the rollout weights; the KL term is kept);
- ``+ beta * kl`` with ``kl = exp(ref - logp) - (ref - logp) - 1``, times ``r`` with
  ``use_bias_correction_kl``.

The entropy bonus (``entropy_coef``, :func:`entropy_bonus`) is added by the ops outside the per-token
loss and its aggregation: ``-entropy_coef * entropy_weight * sum(H * e) / max(sum(e), 1)`` over the
tokens ``e`` that the entropy mask keeps. The options are one ``bcr_kernels.Objective`` (``o``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import token_sequence_index
from .objective import Objective

_VESPO_LOG_MIN = math.log(1e-8)


@dataclass(frozen=True)
class Groups:
    """Token -> group indices for the per-sequence and per-segment reductions (tokens outside every
    sequence, and shared tokens for ``inst``, fall in a last, unused group)."""

    seq: torch.Tensor  # long [T]
    n_seq: int
    inst: torch.Tensor | None  # long [T], with segment ids
    n_inst: int
    shared: torch.Tensor | None  # bool [T]: the token takes its sequence's value (segment -1)


def groups(cu_seqlens: torch.Tensor, T: int, segment_ids: torch.Tensor | None) -> Groups:
    S = cu_seqlens.numel() - 1
    sid = token_sequence_index(cu_seqlens, T).long()
    seq = torch.where(sid >= 0, sid, torch.full_like(sid, S))
    if segment_ids is None:
        return Groups(seq, S + 1, None, 0, None)
    seg = segment_ids.to(device=seq.device, dtype=torch.long)
    K = max(int(seg.max()) + 1, 1) if T else 1
    own = (seg >= 0) & (sid >= 0)
    inst = torch.where(own, seq * K + seg.clamp(min=0), torch.full_like(seq, (S + 1) * K))
    return Groups(seq, S + 1, inst, (S + 1) * K + 1, ~own)


def group_sum(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``[T]``: the sum of ``x`` over each token's group."""
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, index, x)[index]


def group_mean(x: torch.Tensor, m: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``[T]``: the ``m``-weighted mean of ``x`` over each token's group (0 for an all-masked group)."""
    s = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, index, x * m)
    c = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, index, m)
    return (s / c.clamp(min=1.0))[index]


def _level_reduce(x, m, g: Groups, level: str, *, mean: bool):
    """``x`` reduced per ratio unit of ``level`` (``sequence`` or ``instance``), broadcast to tokens."""
    per_seq = group_mean(x, m, g.seq, g.n_seq) if mean else group_sum(x * m, g.seq, g.n_seq)
    if level == "sequence":
        return per_seq
    if g.inst is None:
        raise ValueError("importance_sampling_level / importance_sampling_mode 'instance' needs segment_ids")
    per_inst = group_mean(x, m, g.inst, g.n_inst) if mean else group_sum(x * m, g.inst, g.n_inst)
    return torch.where(g.shared, per_seq, per_inst)


def rollout_weights(old, sampling, m, g: Groups | None, o: Objective) -> torch.Tensor:
    """Constant rollout-correction weights ``[T]`` (``old`` = the trainer's log-probs before the update)."""
    diff = torch.nan_to_num((old.detach().float() - sampling.detach().float()) * m, nan=0.0)
    mode, lo, hi = o.importance_sampling_mode, o.importance_sampling_clip_min, o.importance_sampling_clip_max
    unit = mode.split("_")[0]
    log_w = diff if unit == "token" else _level_reduce(diff, m, g, unit, mean=False)
    w = torch.exp(log_w)
    if mode.endswith("truncate"):
        return torch.clamp(w, min=lo, max=hi)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def vespo_phi(lr, a, m, g: Groups, o: Objective, is_w) -> torch.Tensor:
    """The (detached) VESPO Gamma weight of each token's sequence (segment at the ``instance`` level)."""
    with torch.no_grad():
        x = torch.clamp(lr, -20.0, 20.0)
        if is_w is not None:
            x = x + torch.clamp(torch.log(is_w), _VESPO_LOG_MIN, 20.0)
        level = "instance" if o.importance_sampling_level == "instance" else "sequence"
        log_w = torch.clamp(_level_reduce(x, m, g, level, mean=False), _VESPO_LOG_MIN, 20.0)
        pos = a >= 0
        k = torch.where(pos, o.vespo_k_pos, o.vespo_k_neg)
        lam = torch.where(pos, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def per_token_loss(lp, old, a, m, o: Objective, g: Groups | None, *, ref=None, sampling=None, keep=None):
    """``(loss [T], ratio [T], kl [T], low [T], high [T])`` in fp32; ``loss`` is differentiable in ``lp``.

    ``keep`` (fp32 ``[T]`` of 0/1, or None) is the entropy mask of ``top_entropy_quantile``: it multiplies
    the objective (not the KL term). ``g`` may be None for the ``token`` level with neither rollout
    weights nor the off-policy mask nor ``vespo`` (then every term is token-local, and any slice of the
    tokens can be evaluated alone).
    """
    lp = lp.float()
    old = old.detach().float()
    a = a.detach().float()
    lr = lp - old
    level = o.importance_sampling_level
    ratio = torch.exp(lr if level == "token" else _level_reduce(lr, m, g, level, mean=True))
    is_w = None
    if o.importance_sampling_mode is not None:
        is_w = rollout_weights(old, old if sampling is None else sampling, m, g, o)
    loss, low, high = _surrogate(lp, lr, ratio, a, m, g, o, is_w)
    if o.off_policy_mask_threshold is not None:
        smp = old if sampling is None else sampling.detach().float()
        seq_kl = group_mean(torch.nan_to_num(smp - lp.detach(), nan=0.0), m, g.seq, g.n_seq)
        loss = loss * ((a >= 0) | (seq_kl <= o.off_policy_mask_threshold)).float()
    if keep is not None:
        loss = loss * keep
    if is_w is not None and o.kind != "vespo":
        loss = loss * is_w
    kl = torch.zeros_like(lp)
    if o.beta != 0.0 and ref is not None:
        d = ref.detach().float() - lp
        kl = torch.exp(d) - d - 1
        if o.use_bias_correction_kl:
            kl = kl * ratio
        loss = loss + o.beta * kl
    return loss, ratio.detach(), kl.detach(), low, high


def _surrogate(lp, lr, ratio, a, m, g, o: Objective, is_w):
    """The objective of ``o.kind`` per token, and its low / high clip indicators."""
    zero = torch.zeros_like(lp)
    if o.kind == "clip":
        c1 = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        loss = -torch.minimum(c1 * a, torch.clamp(ratio, o.lo, o.hi) * a)
        return loss, ((ratio < o.lo) & (a < 0)).float(), ((ratio > o.hi) & (a > 0)).float()
    if o.kind == "cispo":
        loss = -torch.clamp(ratio, max=o.eps_high).detach() * a * lp
        return loss, zero, ((ratio > o.eps_high) & (a > 0)).float()
    if o.kind == "sapo":
        tau = torch.where(a > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        return -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * a, zero, zero
    return -vespo_phi(lr.detach(), a, m, g, o, is_w) * a * lp, zero, zero


def top_entropy_keep(entropy, loss_tokens, quantile: float) -> torch.Tensor:
    """fp32 ``[T]``: 1 for the loss tokens (``loss_tokens > 0``) whose entropy is at least the
    ``1 - quantile`` quantile (``torch.quantile``, linear interpolation) of the loss tokens' entropies,
    else 0 (TRL's ``top_entropy_quantile`` mask, over the tokens of one call)."""
    h = entropy.detach().float()
    counted = loss_tokens > 0
    values = h[counted]
    if values.numel() == 0:
        return torch.zeros_like(h)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (counted & (h >= threshold)).float()


def entropy_terms(entropy, m, cu_seqlens, o: Objective):
    """``(keep, e)``: the entropy mask (None without ``top_entropy_quantile`` < 1) and the tokens the
    entropy bonus averages over: the loss tokens of the sequences (``m``, 0 outside every sequence),
    times ``keep``."""
    loss_tokens = m * (token_sequence_index(cu_seqlens, m.numel()) >= 0).float()
    if o.top_entropy_quantile >= 1.0:
        return None, loss_tokens
    keep = top_entropy_keep(entropy, loss_tokens, o.top_entropy_quantile)
    return keep, loss_tokens * keep


def entropy_bonus(entropy, e, o: Objective, weight: float) -> torch.Tensor:
    """The bonus term of the loss: ``-entropy_coef * weight * sum(entropy * e) / max(sum(e), 1)``
    (differentiable in ``entropy``)."""
    return (entropy.float() * e).sum() * (-o.entropy_coef * weight) / e.sum().clamp(min=1.0)


def entropy_bonus_grad(e, o: Objective, weight: float) -> torch.Tensor:
    """``d bonus / d entropy`` per token: ``-entropy_coef * weight * e / max(sum(e), 1)``."""
    return e * (-o.entropy_coef * weight / e.sum().clamp(min=1.0))


def stats(m, ratio, kl, low, high) -> torch.Tensor:
    """fp32 ``[mask, low, high, ratio, kl]`` sums (``_common.policy_metrics``' input)."""
    with torch.no_grad():
        return torch.stack([m.sum(), (low * m).sum(), (high * m).sum(), (ratio * m).sum(), (kl * m).sum()])


def entropy_stats(entropy, e) -> torch.Tensor:
    """fp32 ``[kept, kept entropy]`` sums over the entropy terms' tokens ``e`` (appended to ``stats``)."""
    with torch.no_grad():
        return torch.stack([e.sum(), (entropy.detach().float() * e).sum()])
