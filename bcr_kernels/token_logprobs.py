"""PLACEHOLDER until the Triton op lands: re-exports the reference so imports work."""
from .reference import token_logprobs  # noqa: F401
