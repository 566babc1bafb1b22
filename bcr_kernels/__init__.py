"""bcr_kernels: Triton kernels for packed N-problem RL, usable on their own.

Every op has a plain PyTorch reference (``bcr_kernels.reference``), a Triton forward and backward,
and a functional entry point that runs Triton on CUDA tensors (or on the CPU under
``TRITON_INTERPRET=1``) and a PyTorch path otherwise. See ``bcr_kernels._dispatch``. The
``"bcr_varlen"`` transformers attention backend is ``bcr_kernels.transformers_attention``.

The ops live in private modules named after them (``bcr_kernels._token_logprobs`` holds
``token_logprobs``), so each package attribute names one thing. Ops with several results return the
named tuples of ``bcr_kernels.outputs``, of the same length whatever the flags. The policy-loss ops
take their options as one ``bcr_kernels.Objective`` (``bcr_kernels.objective``).
"""

from . import objective, outputs, reference, transformers_attention
from ._common import IGNORE_INDEX, REDUCTIONS
from ._fused_linear_logprobs import DEFAULT_CHUNK_BYTES, default_chunk_tokens, fused_linear_logprobs
from ._fused_linear_policy_loss import fused_linear_policy_loss
from ._packed_targets import packed_targets
from .objective import Objective, ObjectiveError
from ._policy_loss import policy_loss
from ._scatter_instance_advantages import scatter_instance_advantages
from ._shared_prefix_attention import BranchLayout, branch_layout, shared_prefix_attention
from ._token_logprobs import token_logprobs
from .outputs import FusedPolicyLossOutput, LogprobsOutput, PolicyLossOutput
from ._varlen_attention import (
    cu_seqlens_from_position_ids,
    packed_model_kwargs,
    position_ids_from_cu_seqlens,
    varlen_attention,
)

__all__ = [
    "BranchLayout",
    "DEFAULT_CHUNK_BYTES",
    "FusedPolicyLossOutput",
    "IGNORE_INDEX",
    "LogprobsOutput",
    "Objective",
    "ObjectiveError",
    "PolicyLossOutput",
    "REDUCTIONS",
    "branch_layout",
    "cu_seqlens_from_position_ids",
    "default_chunk_tokens",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "objective",
    "outputs",
    "packed_model_kwargs",
    "packed_targets",
    "policy_loss",
    "position_ids_from_cu_seqlens",
    "reference",
    "scatter_instance_advantages",
    "shared_prefix_attention",
    "token_logprobs",
    "varlen_attention",
]

# "bcr_varlen" joins transformers' attention backends once transformers loads (no import of it here)
transformers_attention.register_on_import()
