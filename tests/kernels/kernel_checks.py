"""Helpers of the kernel tests: Triton launches and their device guard, GEMM operand dtypes, and
``with_objective`` (the policy-loss options of a test case as one ``bcr_kernels.Objective``).

``LaunchRecorder``: which kernel ran, under which ``device_guard``, on which tensors. Every Triton launch of bcr_kernels must run inside ``bcr_kernels._common.device_guard(t)`` for the
tensors it reads, so a launch on ``cuda:1`` does not run on the current device (``cuda:0``). On the CPU
(``TRITON_INTERPRET=1``) the guard itself is a no-op, but whether each launch sits inside a guard
for its tensors' device can be checked all the same; the two-GPU tests check the effect.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bcr_kernels import Objective, _common

_FIELDS = set(Objective.__dataclass_fields__)


def with_objective(kw: dict) -> dict:
    """``kw`` with its ``Objective`` options (``objective="sapo"`` is its ``kind``) gathered into one
    ``Objective`` under ``objective``; the per-call keywords (tensors, ``normalizer``, ...) stay."""
    options = {("kind" if k == "objective" else k): v for k, v in kw.items() if k in _FIELDS or k == "objective"}
    rest = {k: v for k, v in kw.items() if k not in _FIELDS and k != "objective"}
    return {**rest, "objective": Objective(**options)}


class LaunchRecorder:
    def __init__(self, monkeypatch, module, kernel_names):
        self.launches: list[tuple[str, torch.device | None, set[torch.device]]] = []
        self._active: list[torch.device] = []
        real_guard = _common.device_guard

        @contextlib.contextmanager
        def guard(t):
            self._active.append(t.device)
            try:
                with real_guard(t):
                    yield
            finally:
                self._active.pop()

        monkeypatch.setattr(_common, "device_guard", guard)
        for name in kernel_names:
            monkeypatch.setattr(module, name, _KernelSpy(getattr(module, name), name, self))

    def check(self, expected_kernels):
        """Each expected kernel ran, every launch inside a guard for the device of all its tensors."""
        ran = {name for name, _, _ in self.launches}
        assert ran == set(expected_kernels), f"launched {sorted(ran)}, expected {sorted(expected_kernels)}"
        for name, guarded, devices in self.launches:
            assert guarded is not None, f"{name} launched outside device_guard"
            assert devices == {guarded}, f"{name} launched under a guard for {guarded}, tensors on {devices}"


class _KernelSpy:
    def __init__(self, kernel, name, recorder):
        self.kernel, self.name, self.recorder = kernel, name, recorder

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            active = self.recorder._active[-1] if self.recorder._active else None
            self.recorder.launches.append((self.name, active, devices))
            return launch(*args, **kwargs)

        return run


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


_GEMMS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)


class GemmRecorder(TorchDispatchMode):
    """Records the operand dtypes of every mm / addmm (any overload: out=, in place, out_dtype).

    A dispatch mode sees the operands after autocast has (or has not) cast them.
    """

    def __init__(self):
        super().__init__()
        self.gemms = []  # (op, dtype of mat1, dtype of mat2)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _GEMMS:
            mats = args[:2] if func.overloadpacket is torch.ops.aten.mm else args[1:3]
            self.gemms.append((str(func), mats[0].dtype, mats[1].dtype))
        return func(*args, **(kwargs or {}))
