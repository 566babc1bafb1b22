"""Every Triton kernel of bcr_kernels compiles for sm_90 (H100) and sm_80 (A100), on a CPU, without a driver.

The work is ``gpu_compile.py`` (read its docstring): it runs in two child processes, one per target, in
parallel (the test-suite's ``TRITON_INTERPRET=1`` turns ``triton.jit`` into the interpreter, which cannot
compile). The table of registers, spills and shared memory is printed (``pytest -s`` or ``-rA``
shows it) and written to ``build/gpu_compile/<target>.{json,md}``. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = REPO / "build" / "gpu_compile"


def why_not_compilable() -> str | None:
    """Why the installed Triton cannot compile for CUDA here, or None. Only a missing piece is a reason:
    Triton itself (optional: it is Linux-only), its NVIDIA backend, or the ptxas it bundles."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it is optional; the kernels then run as PyTorch)"
    import triton

    root = Path(triton.__file__).parent / "backends" / "nvidia"
    if not (root / "compiler.py").is_file():
        return f"this triton ({triton.__version__}) has no NVIDIA backend ({root} is missing)"
    for tool in ("ptxas", "cuobjdump"):
        if not (root / "bin" / tool).is_file() and not os.environ.get(f"TRITON_{tool.upper()}_PATH"):
            return f"this triton ({triton.__version__}) ships no {tool} ({root / 'bin' / tool} is missing)"
    return None


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    why = why_not_compilable()
    if why:
        pytest.skip(why)
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob("*.json"):
        stale.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BCR_KERNEL_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = {
        target: subprocess.Popen(
            [sys.executable, str(HERE / "gpu_compile.py"), "--targets", target, "--json", str(OUT / f"{target}.json")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for target in ("sm_90", "sm_80")
    }
    out = {}
    for target, proc in procs.items():
        text, _ = proc.communicate(timeout=540)
        print(f"\n--- {target} (exit {proc.returncode})\n{text}")
        path = OUT / f"{target}.json"
        assert path.is_file(), f"gpu_compile.py --targets {target} wrote no report (exit {proc.returncode}):\n{text[-3000:]}"
        (OUT / f"{target}.md").write_text(text)
        out[target] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_every_kernel_compiles(reports, target):
    report = reports[target]
    assert not report["spec_errors"], f"a spec broke before compiling: {report['spec_errors']}"
    assert not report["uncovered"], f"kernels no spec launches (add specs to SPECS in gpu_compile.py): {report['uncovered']}"
    # the enumeration found the kernels (a walker that finds nothing would pass everything)
    names = {k.rsplit(".", 1)[1] for k in report["kernels"]}
    assert {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_policy_loss_fwd_kernel",
            "_policy_loss_bwd_kernel", "_scatter_fwd_kernel", "_scatter_bwd_kernel",
            "_packed_targets_kernel"} <= names
    compiled = {r["kernel"] for r in report["results"]}
    assert compiled == set(report["kernels"]), "every kernel is compiled at least once"
    failed = [f"{r['kernel']} [{r['signature']}]: {r['error']}" for r in report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    limit = report["targets"][target]["shared_limit_bytes"]
    for r in report["results"]:
        assert r["registers"] and r["registers"] <= 255
        assert 0 <= r["shared_bytes"] <= limit


def test_specialisation_is_the_real_launch(reports):
    """The binder saw what a launch would: bf16 logits, 16-byte aligned pointers, V = 151936 divisible
    by 16, the block the op picks for that V, and both a padded (multiple of 16) and an odd token count."""
    rows = reports["sm_90"]["results"]
    fwd = [r for r in rows if r["kernel"].endswith("_token_logprobs_fwd_kernel")]
    assert any("X:*bf16/16" in r["signature"] and "V:i32/16" in r["signature"] and "BLOCK_V=4096" in r["signature"]
               and r["num_warps"] == 8 for r in fwd)
    loss = [r["signature"] for r in rows if r["kernel"].endswith("_policy_loss_fwd_kernel")]
    assert any("T:i32/16," in s for s in loss) and any("T:i32," in s for s in loss)
