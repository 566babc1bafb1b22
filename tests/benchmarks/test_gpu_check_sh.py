"""benchmarks/gpu_check.sh on a machine that is not ready: one clear line per missing piece, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(tmp_path, extra_pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, BCR_SITE=str(tmp_path / "site"), BCR_BUNDLE=str(tmp_path / "no-bundle"))
    if extra_pythonpath:
        env["PYTHONPATH"] = str(extra_pythonpath)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_missing_package_is_one_line(tmp_path):
    shadow = tmp_path / "shadow"  # packages that fail to import, as they would where they are absent
    for name in ("hypothesis", "transformers"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    rc, out = run_script(tmp_path, shadow)
    assert rc == 2, out
    assert "Traceback" not in out, out
    lines = out.splitlines()
    assert any(line.startswith("gpu_check: no wheels in") for line in lines), out  # no bundle here: said
    assert [line for line in lines if line.startswith("gpu_check: cannot import hypothesis")], out  # wanted
    needed = [line for line in lines if line.startswith("gpu_check: cannot import") and "hypothesis" not in line]
    assert len(needed) == 1 and "No module named 'transformers'" in needed[0] and "make gpu-bundle" in needed[0], out
    assert lines[-1] == needed[0]  # the last word, and the check did not start
    versions = (tmp_path / "out" / "versions.txt").read_text()
    assert versions.startswith("python ") and "\ntorch " in versions


@pytest.mark.slow
def test_no_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    rc, out = run_script(tmp_path)
    assert rc == 2 and "Traceback" not in out, out
    assert "gpu_check: no CUDA device visible to torch" in out.splitlines(), out
