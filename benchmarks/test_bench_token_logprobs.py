"""token_logprobs benchmarks: bcr vs eager PyTorch vs torch.compile vs Liger, forward and fwd+bwd.

Run: ``python -m pytest benchmarks/test_bench_token_logprobs.py --benchmark-only``. The project's
pytest ``testpaths`` is ``tests``, so ``make test`` never collects this file.

On CUDA: ``V = 151936`` bf16 with ``T`` in {4096, 16384, 65536}; ``extra_info`` records the minimal
bytes an ideal kernel moves (forward reads the logits once; fwd+bwd reads them twice and writes the
gradient once), the effective bandwidth that implies, its fraction of the device's peak HBM
bandwidth, and peak allocated memory. Shapes that do not fit (eager at large ``T``) are skipped.
On CPU: one tiny fp32 shape so the suite stays quick; ``bcr`` runs its PyTorch path there (the
Triton interpreter is a correctness tool, not something to time), ``torch.compile`` and Liger
(CUDA-only) are skipped.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed")

from bcr_kernels import token_logprobs

pytestmark = pytest.mark.benchmark(group="token_logprobs")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    SHAPES = [(4096, 151936), (16384, 151936), (65536, 151936)]
    DTYPE = torch.bfloat16
    ROUNDS = 5
else:
    SHAPES = [(256, 32000)]
    DTYPE = torch.float32
    ROUNDS = 5
IMPLS = ["bcr", "eager", "compile", "liger"]
MODES = ["fwd", "fwd_bwd"]

# Peak HBM bandwidth (bytes/s) by device-name substring; first match wins.
_PEAK_BW = [("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L40", 0.864e12), ("A10", 0.6e12)]


def _peak_bandwidth() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    for key, bw in _PEAK_BW:
        if key in name:
            return bw
    return None


def _eager(logits, targets):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1)


_compiled = None


def _make_impl(name):
    global _compiled
    if name == "bcr":
        return lambda logits, targets: token_logprobs(logits, targets).logp
    if name == "eager":
        return _eager
    if name == "compile":
        if not CUDA:
            pytest.skip("torch.compile is only benchmarked on CUDA (compiling on CPU is slow)")
        if _compiled is None:
            _compiled = torch.compile(_eager, dynamic=False)
        return _compiled
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger_kernel not installed")
        if not CUDA:
            pytest.skip("Liger's kernels need CUDA")
        from liger_kernel.transformers import LigerCrossEntropyLoss

        ce = LigerCrossEntropyLoss(reduction="none")
        return lambda logits, targets: -ce(logits, targets)
    raise ValueError(name)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _backend(monkeypatch):
    # On CPU, time the PyTorch path even when TRITON_INTERPRET=1 is set (e.g. by `make bench`).
    if not CUDA:
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,V", SHAPES, ids=[f"T{t}-V{v}" for t, v in SHAPES])
def test_token_logprobs(benchmark, impl, mode, T, V):
    fn = _make_impl(impl)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(T, V, device=DEVICE, dtype=DTYPE, generator=gen)
    targets = torch.randint(0, V, (T,), device=DEVICE, generator=gen)
    if mode == "fwd_bwd":
        logits.requires_grad_(True)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(logits, targets)
        else:
            out = fn(logits, targets)
            (grad,) = torch.autograd.grad(out.sum(), logits)
            del grad
        _sync()

    if CUDA:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    oom = False
    try:
        run()  # warm-up (also compiles); measures peak memory on CUDA
    except torch.OutOfMemoryError:
        oom = True  # skip outside the handler so the failed attempt's tensors are freed first
    if oom:
        del logits, targets
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} {mode} at T={T}, V={V} runs out of device memory")
    if CUDA:
        peak = torch.cuda.max_memory_allocated()
        benchmark.extra_info["peak_mem_bytes"] = peak
        benchmark.extra_info["peak_mem_over_inputs_bytes"] = peak - base
        benchmark.extra_info["device"] = torch.cuda.get_device_name()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    elt = logits.element_size()
    ideal_bytes = T * V * elt * (1 if mode == "fwd" else 3)
    benchmark.extra_info.update(
        impl=impl, mode=mode, T=T, V=V, dtype=str(DTYPE).removeprefix("torch."),
        path=("triton" if CUDA else "torch") if impl == "bcr" else impl,
        ideal_bytes=ideal_bytes,
    )
    mean_s = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean_s:
        bw = ideal_bytes / mean_s
        benchmark.extra_info["effective_bandwidth_GBps"] = bw / 1e9
        peak_bw = _peak_bandwidth()
        if peak_bw:
            benchmark.extra_info["fraction_of_peak_bandwidth"] = bw / peak_bw
