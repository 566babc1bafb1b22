#!/usr/bin/env bash
# Download, on a machine with network, the wheels the lent GPU machine lacks for the GPU check, into
# .whl/ (ignored by git; the device run carries it), and print the command to run there.
#
#   bash benchmarks/gpu_bundle.sh          # or: make gpu-bundle
#
# The GPU machine: Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17, peft, accelerate,
# numpy, rich, typer, pyyaml, matplotlib, pytest, pytest-benchmark; no package registry. bcr imports
# math-verify (and its latex2sympy2_extended / antlr4 runtime); the kernel tests use hypothesis; the
# check compares against Liger-Kernel. Pure Python but hypothesis (a CPython 3.12 manylinux wheel,
# which is why the download names the GPU machine's Python and platform), 2.4 MB, pinned to the
# versions the project is tested with. Not bundled: flash-attn and vLLM (compiled for one torch / CUDA build,
# hundreds of MB), TRL (needs datasets + pyarrow + pandas, about 60 MB): their rows are skipped with
# the reason. Each wheel is installed there with --no-deps, so every dependency is listed here.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-$(command -v python3 || command -v python)}"
dest=.whl
max_mib=40
wheels=(
    math-verify==0.9.0
    latex2sympy2_extended==1.11.0
    antlr4-python3-runtime==4.13.2  # latex2sympy2_extended 1.11 needs >=4.9.3,<=4.13.2
    hypothesis==6.170.27
    sortedcontainers==2.4.0  # hypothesis' one dependency
    liger-kernel==0.8.5  # needs torch and triton only
)

rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "${wheels[@]}" 2>&1 | grep -v "^WARNING: Location" || true

n=$(ls "$dest"/*.whl 2>/dev/null | wc -l)
if ((n != ${#wheels[@]})); then
    echo "gpu_bundle: expected ${#wheels[@]} wheels in $dest, found $n" >&2
    exit 1
fi
bytes=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
if ((bytes > max_mib * 1024 * 1024)); then
    echo "gpu_bundle: $dest holds $((bytes / 1024 / 1024)) MiB, over the ${max_mib} MiB budget" >&2
    exit 1
fi
(cd "$dest" && sha256sum ./*.whl >SHA256SUMS)
ls -l "$dest"
echo
echo "gpu_bundle: ${n} wheels, $((bytes / 1024)) KiB in $dest/. On the GPU machine, from the repository root"
echo "(device tool: carry [\".whl\"]; everything it writes under \$OUT comes back):"
echo
echo '    bash benchmarks/gpu_check.sh "$OUT"'
