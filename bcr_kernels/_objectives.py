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
- ``+ beta * kl`` with ``kl = exp(ref - logp) - (ref - logp) - 1``, times ``r`` with
  ``use_bias_correction_kl``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import token_sequence_index

OBJECTIVES = ("clip", "cispo", "sapo", "vespo")
LEVELS = ("token", "sequence", "instance")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "instance_truncate", "instance_mask")
_VESPO_LOG_MIN = math.log(1e-8)


@dataclass(frozen=True)
class Objective:
    """Every option of the per-token loss (the aggregation is the op's ``reduction``)."""

    kind: str = "clip"
    level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    is_mode: str | None = None
    is_clip_min: float | None = None
    is_clip_max: float | None = 3.0
    off_policy_mask_threshold: float | None = None

    @property
    def eps_high(self) -> float:
        return float(self.epsilon if self.epsilon_high is None else self.epsilon_high)

    @property
    def lo(self) -> float:
        return 1.0 - float(self.epsilon)

    @property
    def hi(self) -> float:
        return 1.0 + self.eps_high

    def check(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.kind!r}")
        if self.level not in LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {LEVELS}, got {self.level!r}")
        if self.is_mode is not None and self.is_mode not in IS_MODES:
            raise ValueError(f"importance_sampling_mode must be None or one of {IS_MODES}, got {self.is_mode!r}")
        if self.is_mode is not None and self.is_mode.endswith("truncate") and \
                self.is_clip_min is None and self.is_clip_max is None:
            raise ValueError(f"importance_sampling_mode={self.is_mode!r} needs a clip_min or a clip_max")
        if self.kind == "vespo" and self.is_mode is not None and not self.is_mode.startswith("token"):
            raise ValueError("objective 'vespo' takes token-level rollout weights only (importance_sampling_mode "
                             f"'token_truncate' or 'token_mask'), got {self.is_mode!r}")
        if not (self.epsilon >= 0 and self.eps_high >= 0):
            raise ValueError(f"epsilon and epsilon_high must be >= 0, got {self.epsilon}, {self.epsilon_high}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def plain(self) -> bool:
        """TRL's classic clipped token objective (the Triton ``policy_loss`` kernel's)."""
        return (self.kind == "clip" and self.level == "token" and self.delta is None and self.is_mode is None
                and self.off_policy_mask_threshold is None and not (self.use_bias_correction_kl and self.beta))


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
    unit = o.is_mode.split("_")[0]
    log_w = diff if unit == "token" else _level_reduce(diff, m, g, unit, mean=False)
    w = torch.exp(log_w)
    if o.is_mode.endswith("truncate"):
        return torch.clamp(w, min=o.is_clip_min, max=o.is_clip_max)
    lo = -math.inf if o.is_clip_min is None else o.is_clip_min
    hi = math.inf if o.is_clip_max is None else o.is_clip_max
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def vespo_phi(lr, a, m, g: Groups, o: Objective, is_w) -> torch.Tensor:
    """The (detached) VESPO Gamma weight of each token's sequence (segment at the ``instance`` level)."""
    with torch.no_grad():
        x = torch.clamp(lr, -20.0, 20.0)
        if is_w is not None:
            x = x + torch.clamp(torch.log(is_w), _VESPO_LOG_MIN, 20.0)
        level = "instance" if o.level == "instance" else "sequence"
        log_w = torch.clamp(_level_reduce(x, m, g, level, mean=False), _VESPO_LOG_MIN, 20.0)
        pos = a >= 0
        k = torch.where(pos, o.vespo_k_pos, o.vespo_k_neg)
        lam = torch.where(pos, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def per_token_loss(lp, old, a, m, o: Objective, g: Groups | None, *, ref=None, sampling=None):
    """``(loss [T], ratio [T], kl [T], low [T], high [T])`` in fp32; ``loss`` is differentiable in ``lp``.

    ``g`` may be None for the ``token`` level with neither rollout weights nor the off-policy mask nor
    ``vespo`` (then every term is token-local, and any slice of the tokens can be evaluated alone).
    """
    lp = lp.float()
    old = old.detach().float()
    a = a.detach().float()
    lr = lp - old
    log_ratio = lr if o.level == "token" else _level_reduce(lr, m, g, o.level, mean=True)
    ratio = torch.exp(log_ratio)
    is_w = None
    if o.is_mode is not None:
        is_w = rollout_weights(old, old if sampling is None else sampling, m, g, o)
    zero = torch.zeros_like(lp)
    low = high = zero
    if o.kind == "clip":
        c1 = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        loss = -torch.minimum(c1 * a, torch.clamp(ratio, o.lo, o.hi) * a)
        low = ((ratio < o.lo) & (a < 0)).float()
        high = ((ratio > o.hi) & (a > 0)).float()
    elif o.kind == "cispo":
        loss = -torch.clamp(ratio, max=o.eps_high).detach() * a * lp
        high = ((ratio > o.eps_high) & (a > 0)).float()
    elif o.kind == "sapo":
        tau = torch.where(a > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * a
    else:  # vespo
        loss = -vespo_phi(lr.detach(), a, m, g, o, is_w) * a * lp
    if o.off_policy_mask_threshold is not None:
        smp = old if sampling is None else sampling.detach().float()
        seq_kl = group_mean(torch.nan_to_num(smp - lp.detach(), nan=0.0), m, g.seq, g.n_seq)
        loss = loss * ((a >= 0) | (seq_kl <= o.off_policy_mask_threshold)).float()
    if is_w is not None and o.kind != "vespo":
        loss = loss * is_w
    kl = zero
    if o.beta != 0.0 and ref is not None:
        d = ref.detach().float() - lp
        kl = torch.exp(d) - d - 1
        if o.use_bias_correction_kl:
            kl = kl * ratio
        loss = loss + o.beta * kl
    return loss, ratio.detach(), kl.detach(), low, high


def needs_groups(o: Objective) -> bool:
    return (o.level != "token" or o.is_mode is not None or o.off_policy_mask_threshold is not None
            or o.kind == "vespo")


def stats(m, ratio, kl, low, high) -> torch.Tensor:
    """fp32 ``[mask, low, high, ratio, kl]`` sums (``_common.policy_metrics``' input)."""
    with torch.no_grad():
        return torch.stack([m.sum(), (low * m).sum(), (high * m).sum(), (ratio * m).sum(), (kl * m).sum()])
