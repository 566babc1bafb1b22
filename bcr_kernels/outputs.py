"""What the ops return: named tuples of a fixed shape, whatever the flags.

A field that a flag turns off (``entropy`` without ``return_entropy``) is ``None``; the tuple keeps its
length, so ``logp, entropy = token_logprobs(...)`` always unpacks and ``.logp`` always works. Named
tuples (not dataclasses) because ``torch.utils._pytree`` and FSDP2's forward hooks walk them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["FusedPolicyLossOutput", "LogprobsOutput", "PolicyLossOutput"]


class LogprobsOutput(NamedTuple):
    """``token_logprobs`` / ``fused_linear_logprobs``."""

    #: fp32 log-probs of the targets (0 where the target is ``ignore_index``), differentiable.
    logp: torch.Tensor
    #: fp32 entropy of each row's distribution with ``return_entropy`` (differentiable), else None.
    entropy: torch.Tensor | None = None


class PolicyLossOutput(NamedTuple):
    """``policy_loss``."""

    #: fp32 scalar.
    loss: torch.Tensor
    #: detached fp32 scalars ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
    #: ``ratio_mean``, ``kl`` (TRL's names), and ``entropy/kept_fraction``, ``entropy/kept_mean`` where the
    #: objective reads entropies.
    metrics: dict[str, torch.Tensor]


class FusedPolicyLossOutput(NamedTuple):
    """``fused_linear_policy_loss``: the loss and metrics of ``policy_loss`` plus the head's outputs."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    #: detached fp32 log-probs ``[T]``.
    logp: torch.Tensor
    #: detached fp32 entropy ``[T]`` with ``return_entropy``, else None.
    entropy: torch.Tensor | None = None
