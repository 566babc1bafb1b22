"""Which implementation an op runs: Triton, or plain PyTorch.

``BCR_KERNEL_BACKEND`` picks explicitly: ``triton``, ``torch`` or ``auto`` (the default). Under
``auto`` Triton runs on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` (the
interpreter, used by the test-suite); every other case takes the op's PyTorch path.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for these tensors."""
    backend = os.environ.get("BCR_KERNEL_BACKEND", "auto").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"BCR_KERNEL_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or not triton_available():
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    on_cpu = all(t.device.type == "cpu" for t in tensors if t is not None)
    if on_cuda:
        return True
    if on_cpu and interpreting():
        return True
    if backend == "triton":
        raise RuntimeError(
            "BCR_KERNEL_BACKEND=triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
        )
    return False
