"""bcr_kernels: Triton kernels for packed N-problem RL, usable on their own.

Every op has a plain PyTorch reference (``bcr_kernels.reference``), a Triton forward and backward,
and a functional entry point that runs Triton on CUDA tensors (or on the CPU under
``TRITON_INTERPRET=1``) and a PyTorch path otherwise. See ``bcr_kernels._dispatch``. The
``"bcr_varlen"`` transformers attention backend is ``bcr_kernels.transformers_attention``.
"""

from . import reference, transformers_attention
from .fused_linear_logprobs import fused_linear_logprobs
from .fused_linear_policy_loss import fused_linear_policy_loss
from .packed_targets import packed_targets
from .policy_loss import policy_loss
from .scatter_instance_advantages import scatter_instance_advantages
from .token_logprobs import token_logprobs
from .varlen_attention import varlen_attention

__all__ = [
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "packed_targets",
    "policy_loss",
    "reference",
    "scatter_instance_advantages",
    "token_logprobs",
    "varlen_attention",
]

# "bcr_varlen" joins transformers' attention backends once transformers loads (no import of it here)
transformers_attention.register_on_import()
