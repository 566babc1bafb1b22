"""bcr_kernels: Triton kernels for packed N-problem RL, usable on their own.

Every op has a plain PyTorch reference (``bcr_kernels.reference``), a Triton forward and backward,
and a functional entry point that runs Triton on CUDA tensors (or on the CPU under
``TRITON_INTERPRET=1``) and a PyTorch path otherwise. See ``bcr_kernels._dispatch``.
"""

from . import reference
from .fused_linear_logprobs import fused_linear_logprobs
from .fused_linear_policy_loss import fused_linear_policy_loss
from .packed_targets import packed_targets
from .policy_loss import policy_loss
from .scatter_instance_advantages import scatter_instance_advantages
from .shared_prefix_attention import BranchLayout, branch_layout, shared_prefix_attention
from .token_logprobs import token_logprobs
from .varlen_attention import varlen_attention

__all__ = [
    "BranchLayout",
    "branch_layout",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "packed_targets",
    "policy_loss",
    "reference",
    "scatter_instance_advantages",
    "shared_prefix_attention",
    "token_logprobs",
    "varlen_attention",
]
