"""``Objective``: every option of the policy loss, as one frozen object, checked once.

The three policy-loss entry points (``bcr_kernels.policy_loss``, ``bcr_kernels.fused_linear_policy_loss``
and the oracle ``bcr_kernels.reference.policy_loss``) take their tensors positionally and one
``Objective``::

    import bcr_kernels as K
    obj = K.Objective(kind="clip", reduction="token_mean", epsilon=0.2, epsilon_high=0.28, beta=0.04)
    loss, metrics = K.policy_loss(logp, old_logp, advantages, mask, cu_seqlens, obj, ref_logp=ref)

Everything that belongs to one training run lives here (what TRL's ``GRPOConfig`` calls the loss
options); what changes from call to call stays a keyword of the op (the tensors, the batch's
``normalizer``, ``entropy_weight``). The names and defaults are TRL 1.16's where TRL has the option.
The maths of each option is written out in ``bcr_kernels.reference.policy_loss``.

``Objective(...)`` takes keywords only and validates in ``__post_init__``: a bad value raises
``ObjectiveError`` (a ``ValueError``) whose ``field`` names the option. ``OBJECTIVES``, ``LEVELS`` and
``IS_MODES`` are the allowed values; ``check_rollout_correction`` is the check of the rollout
correction's options alone (``bcr.rl.config.BCRConfig`` runs it even where the correction is off).

The ops' old keyword form (``policy_loss(..., epsilon=0.2, objective="sapo", ...)``) still works for a
while: :func:`resolve` builds the ``Objective`` from those keywords and emits a ``FutureWarning``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

from ._common import REDUCTIONS

__all__ = ["IS_MODES", "LEVELS", "OBJECTIVES", "Objective", "ObjectiveError", "check_rollout_correction",
           "resolve"]

#: The per-token losses (TRL's ``loss_type`` families: ``bcr.rl.config.LOSS_TYPES`` maps them).
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")
#: ``importance_sampling_level``: one ratio per token, per sequence (GSPO) or per problem segment (BCR).
LEVELS = ("token", "sequence", "instance")
#: ``importance_sampling_mode`` of the rollout correction (TRL's ``vllm_importance_sampling_mode`` + BCR's).
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "instance_truncate",
            "instance_mask")


class ObjectiveError(ValueError):
    """A bad option of ``Objective``: ``field`` is its name, ``value`` its value, ``reason`` what is wrong."""

    def __init__(self, field: str, value, reason: str):
        super().__init__(f"{field}={value!r}: {reason}")
        self.field, self.value, self.reason = field, value, reason


@dataclass(frozen=True, kw_only=True)
class Objective:
    """The policy loss of one run: the per-token objective, its options and the aggregation.

    Attributes (TRL 1.16's names and defaults where TRL has them):
        kind: the per-token loss: ``clip`` (PPO/GRPO clipping; TRL's grpo, bnpo, dr_grpo, dapo, luspo),
            ``cispo``, ``sapo`` or ``vespo``.
        reduction: how token losses are aggregated: ``token_mean``, ``seq_mean_token_mean``,
            ``seq_mean_token_sum_norm`` (Dr. GRPO) or ``seq_mean_token_sum`` (LUSPO).
        max_completion_length: the Dr. GRPO constant of ``seq_mean_token_sum_norm`` (None: the longest
            masked sequence of the call).
        epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high``
            None: ``epsilon``); for ``cispo`` ``epsilon_high`` caps the ratio itself.
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at ``delta`` (None: off).
        importance_sampling_level: ``token``, ``sequence`` (GSPO) or ``instance`` (one ratio per problem
            segment; the op then needs ``segment_ids``).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures by the advantage's sign.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma weight parameters.
        beta: the KL coefficient (the KL term needs ``ref_logp``; 0 turns it off).
        use_bias_correction_kl: the KL term times the importance ratio.
        importance_sampling_mode: the rollout correction (None: off; else one of ``IS_MODES``), weights
            from the op's ``sampling_logp``, bounded by ``importance_sampling_clip_min`` / ``_max``.
        off_policy_mask_threshold: drop negative-advantage tokens of sequences whose mean
            KL(sampling || policy) exceeds it (None: off).
        top_entropy_quantile: keep in the policy loss only the tokens whose entropy is in this top
            quantile of the call's loss tokens (1.0: all; 0.0: the highest only). Needs entropies.
        entropy_coef: the entropy bonus: ``- entropy_coef`` x the mean entropy of the tokens the policy
            loss keeps (0: off). Needs entropies (differentiable for the bonus to have a gradient).
    """

    kind: str = "clip"
    reduction: str = "token_mean"
    max_completion_length: int | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    importance_sampling_mode: str | None = None
    importance_sampling_clip_min: float | None = None
    importance_sampling_clip_max: float | None = 3.0
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        _normalise_types(self)
        _check_choices(self)
        _check_ranges(self)
        check_rollout_correction(self.importance_sampling_mode, self.importance_sampling_clip_min,
                                 self.importance_sampling_clip_max)
        mode = self.importance_sampling_mode
        _check("importance_sampling_mode", mode, not (self.kind == "vespo" and mode and not mode.startswith("token")),
               "objective 'vespo' takes token-level rollout weights only ('token_truncate' or 'token_mask'): "
               "VESPO puts them into its sequence weight")

    # -- derived values ---------------------------------------------------------------------------
    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def lo(self) -> float:
        return 1.0 - self.epsilon

    @property
    def hi(self) -> float:
        return 1.0 + self.eps_high

    @property
    def uses_entropy(self) -> bool:
        """Whether the loss reads per-token entropies (``top_entropy_quantile`` < 1 or the bonus)."""
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0

    @property
    def plain(self) -> bool:
        """TRL's classic clipped token objective (the Triton ``policy_loss`` kernel's; the entropy bonus
        is added outside it, the entropy mask is not)."""
        return (self.kind == "clip" and self.importance_sampling_level == "token" and self.delta is None
                and self.importance_sampling_mode is None and self.off_policy_mask_threshold is None
                and not (self.use_bias_correction_kl and self.beta) and self.top_entropy_quantile >= 1.0)

    @property
    def needs_groups(self) -> bool:
        """Whether some term reduces over sequences or segments (else every term is token-local)."""
        return (self.importance_sampling_level != "token" or self.importance_sampling_mode is not None
                or self.off_policy_mask_threshold is not None or self.kind == "vespo")


_STRINGS = ("kind", "reduction", "importance_sampling_level", "importance_sampling_mode")


def _normalise_types(o: Objective) -> None:
    """Names are strings, ``use_bias_correction_kl`` a bool, ``max_completion_length`` a whole number,
    every other option a finite number, stored as a float."""
    for f in fields(o):
        v = getattr(o, f.name)
        if v is None and "None" in str(f.type):  # an optional option, off
            continue
        if f.name in _STRINGS:
            _check(f.name, v, isinstance(v, str), "must be a string")
        elif f.name == "use_bias_correction_kl":
            _check(f.name, v, isinstance(v, bool), "must be True or False")
        elif f.name == "max_completion_length":
            _check(f.name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   "must be None or an integer >= 1")
        else:
            _check(f.name, v, isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                   "must be a finite number")
            object.__setattr__(o, f.name, float(v))


def _check(field: str, value, holds: bool, reason: str) -> None:
    if not holds:
        raise ObjectiveError(field, value, reason)


def _check_choices(o: Objective) -> None:
    _check("kind", o.kind, o.kind in OBJECTIVES, f"must be one of {OBJECTIVES}")
    _check("reduction", o.reduction, o.reduction in REDUCTIONS,
           f"must be one of {REDUCTIONS} (TRL's loss_type names map to these: see bcr.rl.config.LOSS_TYPES)")
    _check("importance_sampling_level", o.importance_sampling_level, o.importance_sampling_level in LEVELS,
           f"must be one of {LEVELS}")


def _check_ranges(o: Objective) -> None:
    _check("epsilon", o.epsilon, o.epsilon >= 0, "must be >= 0")
    _check("epsilon_high", o.epsilon_high, o.epsilon_high is None or o.epsilon_high >= 0, "must be >= 0 (None: epsilon)")
    _check("delta", o.delta, o.delta is None or o.delta > 0,
           "must be > 0 (None: one-sided clipping; INTELLECT-2 uses > 1 + epsilon)")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        _check(name, getattr(o, name), getattr(o, name) > 0, "must be > 0")
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        _check(name, getattr(o, name), getattr(o, name) >= 0, "must be >= 0")
    _check("beta", o.beta, o.beta >= 0, "must be >= 0 (0.0 turns the KL term off)")
    _check("off_policy_mask_threshold", o.off_policy_mask_threshold,
           o.off_policy_mask_threshold is None or o.off_policy_mask_threshold >= 0,
           "must be >= 0 (None: no off-policy mask)")
    _check("top_entropy_quantile", o.top_entropy_quantile, 0.0 <= o.top_entropy_quantile <= 1.0,
           "must lie in [0, 1] (1.0: every token; 0.0: the highest-entropy token only)")


def check_rollout_correction(mode: str | None, clip_min: float | None, clip_max: float | None) -> None:
    """The rollout correction's options on their own: a known mode, bounds in range and in order, and
    a bound for a ``*_truncate`` mode. Raises ``ObjectiveError`` naming the option."""
    _check("importance_sampling_mode", mode, mode is None or mode in IS_MODES, f"must be None or one of {IS_MODES}")
    _check("importance_sampling_clip_max", clip_max, clip_max is None or clip_max > 0, "must be > 0 (None: no upper bound)")
    _check("importance_sampling_clip_min", clip_min, clip_min is None or clip_min >= 0,
           "must be >= 0 (None: no lower bound)")
    _check("importance_sampling_clip_min", clip_min, clip_min is None or clip_max is None or clip_min < clip_max,
           f"must be < importance_sampling_clip_max ({clip_max})")
    _check("importance_sampling_mode", mode,
           mode is None or not mode.endswith("truncate") or clip_min is not None or clip_max is not None,
           "a *_truncate mode needs importance_sampling_clip_min or importance_sampling_clip_max")


# --------------------------------------------------------------------------------------------------
# the ops' old keyword form

#: The ops' old keywords that are ``Objective`` fields now (``objective`` was ``kind``).
LEGACY_NAMES = {f.name for f in fields(Objective)} - {"kind"} | {"objective"}


def resolve(objective: Objective | str | None, legacy: dict, op: str) -> Objective:
    """The ``Objective`` of a call: ``objective`` itself, or one built from the old keywords (``legacy``,
    and ``objective`` given as a string, the old ``objective=`` keyword), with a ``FutureWarning``."""
    if isinstance(objective, str):
        legacy = {**legacy, "objective": objective}
        objective = None
    if not legacy:
        if objective is None:
            return Objective()
        if not isinstance(objective, Objective):
            raise TypeError(f"{op}: objective must be a bcr_kernels.Objective, got {type(objective).__name__}")
        return objective
    unknown = sorted(set(legacy) - LEGACY_NAMES)
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword arguments {unknown}")
    if objective is not None:
        raise TypeError(f"{op}: pass the loss options in the Objective only, not also as keywords "
                        f"{sorted(legacy)}")
    warnings.warn(f"{op}(..., {', '.join(f'{k}=' for k in sorted(legacy))}) is deprecated: pass "
                  "bcr_kernels.Objective(...) as the objective argument instead", FutureWarning, stacklevel=3)
    kw = dict(legacy)
    if "objective" in kw:
        kw["kind"] = kw.pop("objective")
    return Objective(**kw)
