#!/usr/bin/env bash
# One prepared GPU check: gpu tests, token_logprobs bandwidth vs HBM peak, fused LM head vs
# materialised vs Liger, the packed training step vs padded eager vs TRL, varlen attention backends.
# No network (random-init models of Qwen2.5-1.5B shape); install + check <= 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                 # writes to $OUT, else benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh DIR [--parts head,step] [--hbm-peak 3.35]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh DIR
#
# On a machine where the project is not installed (the lent GPU machine: no registry, no build
# isolation), the wheels `make gpu-bundle` put in .whl/ are installed offline first
# (pip --no-index --no-deps --target, into $BCR_SITE, default /tmp/bcr-site; $BCR_BUNDLE names another
# folder of wheels) and the repository is
# used from PYTHONPATH (nothing is built). Prints the versions found, then one markdown table;
# DIR/gpu_check.json is rewritten after every part, so a run cut short keeps what it measured.
# See benchmarks/README.md ("One prepared GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

out="${OUT:-benchmarks/results/gpu_check}"
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
python="${PYTHON:-$(command -v python3 || command -v python)}"
limit="${GPU_CHECK_LIMIT_S:-450}"
site=$(realpath -m "${BCR_SITE:-/tmp/bcr-site}")
say() { echo "gpu_check: $*"; }
smoke=0
for a in "$@"; do [[ $a == --smoke ]] && smoke=1; done  # tiny sizes on the CPU: the rehearsal's way in

mkdir -p "$out" || { say "cannot create the output folder $out"; exit 2; }
[[ -x $python ]] || { say "no python found (set PYTHON=...)"; exit 2; }

# 1. the bundle, offline
shopt -s nullglob
bundle="${BCR_BUNDLE:-.whl}"
wheels=("$bundle"/*.whl)
if ((${#wheels[@]})) && ! "$python" -m pip --version >/dev/null 2>&1; then
    # no pip: pure-Python wheels are zip files that import once unpacked
    mkdir -p "$site" && for w in "${wheels[@]}"; do "$python" -m zipfile -e "$w" "$site" || say "cannot unpack $w"; done
    say "no pip for $python: unpacked ${#wheels[@]} bundled wheels into $site"
    export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
elif ((${#wheels[@]})); then
    if "$python" -m pip install -q --no-index --no-deps --no-warn-conflicts --disable-pip-version-check \
        --upgrade --target "$site" "${wheels[@]}" >"$out/bundle-install.log" 2>&1; then
        say "installed ${#wheels[@]} bundled wheels into $site"
    else
        say "installing the bundle failed (the last lines follow; all of it in $out/bundle-install.log)"
        tail -5 "$out/bundle-install.log"
    fi
    export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    say "no wheels in $bundle/ (make gpu-bundle, then carry .whl): using $python's own packages"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET BCR_KERNEL_BACKEND  # the real kernels, not the interpreter or the torch paths

# 2. what is here: versions, the device, and whether the project imports (one line per missing piece)
"$python" - "$out/versions.txt" "$smoke" <<'EOF' || exit 2
import importlib, importlib.metadata as md, platform, sys
lines = [f"python {platform.python_version()} ({sys.executable})"]
for name in ("torch", "triton", "transformers", "accelerate", "peft", "numpy", "math-verify",
             "latex2sympy2_extended", "antlr4-python3-runtime", "hypothesis", "pytest", "liger-kernel", "trl",
             "flash-attn", "vllm"):
    try:
        lines.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        lines.append(f"{name} absent")
missing, wanted = [], []
try:
    import torch
    cuda = torch.cuda.is_available()
    lines.append(f"cuda {torch.version.cuda}; device: " + (torch.cuda.get_device_name() if cuda else "none visible"))
except Exception as exc:  # noqa: BLE001
    cuda = False
    missing.append(f"torch does not import: {type(exc).__name__}: {exc}")
fix = "(make gpu-bundle on a machine with network, then carry .whl)"
for module in ("bcr", "bcr_kernels", "bcr.rl.trainer", "benchmarks.gpu_check"):  # the check needs these
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"cannot import {module}: {type(exc).__name__}: {exc} {fix}")
        break
for module, what in (("hypothesis", "the tests part's kernel test modules"), ("math_verify", "bcr's answer checks")):
    try:  # wanted, not needed: the other parts still run
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        wanted.append(f"cannot import {module} ({what} need it): {type(exc).__name__}: {exc} {fix}")
if not cuda and not missing and sys.argv[2] != "1":
    missing.append("no CUDA device visible to torch")
text = "\n".join(lines)
print(text)
open(sys.argv[1], "w").write(text + "\n")
for m in wanted + missing:
    print(f"gpu_check: {m}")
sys.exit(2 if missing else 0)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/nvidia-smi.csv" 2>&1

# 3. the check
timeout --signal=INT --kill-after=20 "$limit" "$python" -m benchmarks.gpu_check "$out" "$@"
status=$?
((status == 124)) && say "stopped at the ${limit} s limit: $out/gpu_check.json keeps the parts that finished"
exit $status
