"""PLACEHOLDER until the Triton op lands: re-exports the reference so imports work."""
from .reference import packed_targets  # noqa: F401
