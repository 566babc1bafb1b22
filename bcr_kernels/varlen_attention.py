"""PLACEHOLDER until the Triton op lands: re-exports the reference so imports work."""
from .reference import varlen_attention  # noqa: F401
