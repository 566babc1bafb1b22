"""PLACEHOLDER until the Triton op lands: re-exports the reference so imports work."""
from .reference import policy_loss  # noqa: F401
