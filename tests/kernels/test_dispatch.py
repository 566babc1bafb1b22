"""Where Triton is installed and picked: pyproject's dependency marker and the dispatch rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bcr_kernels import _dispatch

REPO = Path(__file__).resolve().parents[2]


def _triton_requirement():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    requirements = pytest.importorskip("packaging.requirements", reason="packaging not installed")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [requirements.Requirement(d) for d in deps if requirements.Requirement(d).name == "triton"]
    return req


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])  # aarch64: GH200 / Grace nodes
def test_triton_is_a_dependency_on_linux_gpu_hosts(machine):
    req = _triton_requirement()
    env = {"platform_system": "Linux", "platform_machine": machine, "sys_platform": "linux"}
    assert req.marker is None or req.marker.evaluate(env), f"{req} is not installed on Linux {machine}"


def test_triton_is_not_required_where_it_has_no_wheels():
    req = _triton_requirement()
    assert req.marker is not None
    assert not req.marker.evaluate({"platform_system": "Darwin", "platform_machine": "arm64", "sys_platform": "darwin"})
    assert not req.marker.evaluate({"platform_system": "Windows", "platform_machine": "AMD64", "sys_platform": "win32"})


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="BCR_KERNEL_BACKEND must be one of"):
        _dispatch.use_triton(torch.empty(1))


def test_torch_backend_never_picks_triton(monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _dispatch.use_triton(torch.empty(1))
