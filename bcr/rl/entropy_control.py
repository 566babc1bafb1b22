"""The entropy bonus's coefficient over training: constant, or adaptive (Skywork-OR1; TRL 1.16's
``use_adaptive_entropy``).

One optimizer update at a time: :meth:`EntropyControl.applied` is the coefficient that update's loss
uses; after the update, :meth:`EntropyControl.update` reads its mean entropy over the tokens the bonus
acts on (sums over every micro-batch and rank) and, under adaptive control, moves the coefficient by
``entropy_coef_delta`` toward more bonus when that entropy is at or below ``entropy_target`` and toward
less otherwise, within ``[entropy_coef_min, entropy_coef_max]``. Under adaptive control the bonus
applies only while the last update's entropy was at or below the target (none before the first
measurement), so the coefficient built up during a collapse acts only while it lasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EntropyControl:
    coef: float  # the coefficient (adaptive: the current one)
    adaptive: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    delta: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf  # the mean entropy of the last update (inf: none measured yet)

    @classmethod
    def from_config(cls, cfg) -> EntropyControl | None:
        """The control of ``cfg`` (a ``BCRConfig``), or None without an entropy bonus."""
        if not cfg.entropy_bonus:
            return None
        return cls(cfg.entropy_coef, cfg.use_adaptive_entropy, cfg.entropy_coef_min, cfg.entropy_coef_max,
                   cfg.entropy_coef_delta, cfg.entropy_target)

    def applied(self) -> float:
        """The coefficient of the next update's loss."""
        if self.adaptive and not self.last_entropy <= self.target:
            return 0.0
        return self.coef

    def update(self, entropy_sum: float, tokens: float) -> None:
        """After an update: its summed entropy over ``tokens`` bonus tokens (all micro-batches and ranks)."""
        if not self.adaptive:
            return
        entropy = entropy_sum / max(tokens, 1.0)
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = entropy

    def state(self) -> dict:
        """What a checkpoint keeps (JSON: a missing measurement is None)."""
        return {"entropy_coef": self.coef,
                "last_entropy": None if math.isinf(self.last_entropy) else self.last_entropy}

    def load(self, state: dict) -> None:
        self.coef = float(state["entropy_coef"])
        last = state.get("last_entropy")
        self.last_entropy = math.inf if last is None else float(last)
