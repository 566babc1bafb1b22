"""The bcr_kernels package surface: every name means one thing, and the package stands alone."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bcr_kernels

REPO = Path(__file__).resolve().parents[2]
OPS = ["fused_linear_logprobs", "fused_linear_policy_loss", "packed_targets", "policy_loss",
       "scatter_instance_advantages", "token_logprobs"]
MODULES = sorted(m.name for m in pkgutil.iter_modules(bcr_kernels.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_no_attribute_shadows_a_module(name):
    module = importlib.import_module(f"bcr_kernels.{name}")
    attr = getattr(bcr_kernels, name, module)
    assert attr is module, f"bcr_kernels.{name} is {attr!r}, not the module bcr_kernels.{name}"


@pytest.mark.parametrize("op", OPS)
def test_each_op_is_a_function_of_its_own_private_module(op):
    fn = getattr(bcr_kernels, op)
    assert callable(fn) and fn.__name__ == op
    assert fn is getattr(importlib.import_module(f"bcr_kernels._{op}"), op)
    assert fn is not getattr(bcr_kernels.reference, op, None)
    assert op in bcr_kernels.__all__


def test_importable_without_bcr():
    code = ("import sys, bcr_kernels; "
            "leaked = sorted(m for m in sys.modules if m == 'bcr' or m.startswith('bcr.')); "
            "assert not leaked, leaked")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
