"""PLACEHOLDER until the Triton op lands: re-exports the reference so imports work."""
from .reference import fused_linear_logprobs  # noqa: F401
