"""PLACEHOLDER until the Triton op lands: re-exports the reference so imports work."""
from .reference import scatter_instance_advantages  # noqa: F401
