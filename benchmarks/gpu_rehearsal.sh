#!/usr/bin/env bash
# Rehearse the first GPU minutes on a CPU: a venv as close to the lent GPU machine as a CPU allows,
# the .whl bundle installed offline as gpu_check.sh installs it there, then the kernel tests under the
# Triton interpreter, the ahead-of-time compile of every kernel with that venv's Triton, and
# gpu_check.sh itself at smoke sizes. Not part of make test (it downloads ~3 GB once).
#
#   bash benchmarks/gpu_rehearsal.sh       # or: make gpu-rehearsal
#
# The GPU machine: Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17, peft, accelerate,
# numpy, rich, typer, pyyaml, matplotlib, pytest, pytest-benchmark. Here: Python 3.12 where pyenv
# (or PATH) has one, else this machine's python3 (said in the log); torch 2.11.0 from PyPI (its CUDA
# build: the same wheel as there, running on the CPU) where the index has it for that Python, else
# the newest torch the index offers (said in the log); numpy < 2.4, because triton 3.6's interpreter
# calls int() on 1-element arrays, an error from numpy 2.4 on (triton 3.9 squeezes them first; the
# GPU never runs the interpreter).
# Writes build/gpu-rehearsal/rehearsal.log.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
root=build/gpu-rehearsal
venv=$root/venv
site=$root/site
log=$root/rehearsal.log
mkdir -p "$root"
exec > >(tee "$log") 2>&1
t0=$(date +%s)
note() { echo "rehearsal: $*"; }

py312=""
for c in "${GPU_REHEARSAL_PYTHON:-}" "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if [[ -n $c && -x $c ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        py312=$c
        break
    fi
done
if [[ -z $py312 ]]; then
    py312=$(command -v python3)
    note "no Python 3.12 here: using $("$py312" --version) (the GPU machine has 3.12)"
fi

# the venv: the GPU machine's packages, nothing of bcr's own needs (those come from the bundle)
if [[ ! -f $venv/.installed ]]; then
    rm -rf "$venv"
    "$py312" -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip || exit 1
    torch_spec=torch==2.11.0
    if ! "$venv/bin/pip" download -q --no-deps -d "$root/probe" "$torch_spec" >/dev/null 2>&1; then
        torch_spec=torch
        note "torch 2.11.0 is not on this machine's index for $("$py312" --version): installing the newest torch"
    fi
    rm -rf "$root/probe"
    "$venv/bin/pip" install -q --disable-pip-version-check "$torch_spec" triton==3.6.0 transformers==5.17.0 \
        "numpy<2.4" pyyaml rich typer matplotlib pytest pytest-benchmark peft accelerate 2>&1 | grep -v "^WARNING: Location"
    "$venv/bin/python" -c 'import torch, triton, transformers' && touch "$venv/.installed" || exit 1
fi
"$venv/bin/python" -c 'import numpy, torch, triton, transformers, sys; print("rehearsal: python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)'

# the bundle, then exactly what the GPU machine runs (smoke sizes: no GPU here)
[[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1 || bash benchmarks/gpu_bundle.sh || exit 1
rm -rf "$site" "$root/out"
PYTHON=$venv/bin/python BCR_SITE=$site bash benchmarks/gpu_check.sh "$root/out" --smoke
check=$?
note "gpu_check.sh --smoke exit $check"

# kernel tests under the interpreter and the ahead-of-time compile, with the bundle on the path as there
export PYTHONPATH="$repo:$repo/$site"
TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/kernels tests/rl/test_packing.py
tests=$?
note "kernel tests (interpreter) + compile test exit $tests"
note "wall time $(($(date +%s) - t0)) s"
((check == 0 && tests == 0))
