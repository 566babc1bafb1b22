"""The kernel tests' shared ``backend`` fixture (a test module with its own, stricter one overrides it)."""

from __future__ import annotations

import pytest
import torch

from bcr_kernels import _dispatch


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Select the implementation; 'triton' means whatever ``auto`` dispatch gives when it is Triton."""
    if request.param == "torch":
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")
    else:
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "auto")
        if not _dispatch.use_triton(torch.empty(1)):
            pytest.skip("Triton path not selected on CPU without TRITON_INTERPRET=1")
    return request.param
