#!/usr/bin/env bash
# One prepared GPU check: gpu tests, token_logprobs bandwidth vs HBM peak, fused LM head vs
# materialised vs Liger, the packed training step vs padded eager vs TRL, varlen attention backends.
# No network (random-init models of Qwen2.5-1.5B shape); <= 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                 # writes to $OUT, else benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh DIR [--parts head,step] [--hbm-peak 3.35]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh DIR
#
# Prints one markdown table; DIR/gpu_check.json is rewritten after every part, so a run cut short
# by the time limit keeps what it measured. See benchmarks/README.md ("One prepared GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-benchmarks/results/gpu_check}"
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
python="${PYTHON:-$(command -v python || command -v python3)}"
limit="${GPU_CHECK_LIMIT_S:-480}"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET BCR_KERNEL_BACKEND  # the real kernels, not the interpreter or the torch paths

mkdir -p "$out"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.csv" || true
exec timeout --signal=INT --kill-after=20 "$limit" "$python" -m benchmarks.gpu_check "$out" "$@"
