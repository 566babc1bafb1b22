"""varlen_attention benchmarks: bcr vs the per-sequence reference vs one padded SDPA batch.

Run: ``python -m pytest benchmarks/test_bench_varlen_attention.py --benchmark-only``. The project's
pytest ``testpaths`` is ``tests``, so ``make test`` never collects this file.

Every implementation gets the same packed tokens (lengths drawn once per shape, seeded):

- ``bcr``: :func:`bcr_kernels.varlen_attention` with its default dispatch (flash-attn, else torch's
  varlen flash kernel on CUDA; grouped SDPA on the CPU);
- ``bcr_sdpa``: the same entry point forced onto its SDPA grouping path (CUDA only: on the CPU it is
  ``bcr``);
- ``bcr_window``: ``bcr`` with a sliding window of a quarter of the longest length (flash-attn's
  ``window_size`` on CUDA, a band mask on the SDPA path), as Mistral / Gemma sliding layers run;
- ``reference``: :func:`bcr_kernels.reference.varlen_attention` (one 3-D SDPA call per sequence, with
  ``repeat_interleave`` copies of k/v);
- ``padded``: the classic unpacked layout -- every sequence padded to the longest, one causal
  ``[S, H, Lmax, D]`` SDPA call (``enable_gqa``), padding stripped afterwards.

For the ``bcr*`` rows ``extra_info["backend"]`` records the path that ran (``last_dispatch()``).

On CUDA: bf16, D=128, head layouts of Qwen2.5-1.5B (12 q / 2 kv heads) and Qwen3-4B (32 / 8), packs of
8k and 32k tokens with lengths uniform in [64, 4096]; peak memory is recorded. On CPU: fp32, one
small pack (T=1024, 8 / 2 heads, D=32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed")

from bcr_kernels import reference
from bcr_kernels._varlen_attention import last_dispatch, varlen_attention

pytestmark = pytest.mark.benchmark(group="varlen_attention")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    # (T, Hq, Hkv, D, min_len, max_len)
    SHAPES = [
        (8192, 12, 2, 128, 64, 4096),
        (32768, 12, 2, 128, 64, 4096),
        (32768, 32, 8, 128, 64, 4096),
    ]
    DTYPE = torch.bfloat16
    ROUNDS = 5
else:
    SHAPES = [(1024, 8, 2, 32, 16, 256)]
    DTYPE = torch.float32
    ROUNDS = 3
IMPLS = ["bcr", "bcr_sdpa", "bcr_window", "reference", "padded"]
MODES = ["fwd", "fwd_bwd"]


def _lengths(T: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while sum(out) < T:
        out.append(min(int(torch.randint(lo, hi + 1, (1,), generator=g)), T - sum(out)))
    return out


def _padded(q, k, v, cu, max_seqlen, **_):
    lengths = (cu[1:] - cu[:-1]).tolist()
    S, L = len(lengths), int(max_seqlen)
    T = q.shape[0]
    starts = cu[:-1].long()
    seq = torch.repeat_interleave(torch.arange(S, device=q.device), torch.tensor(lengths, device=q.device),
                                  output_size=T)
    dest = seq * L + torch.arange(T, device=q.device) - starts[seq]

    def pad(x):
        return x.new_zeros(S * L, *x.shape[1:]).index_copy(0, dest, x).view(S, L, *x.shape[1:]).transpose(1, 2)

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, **gqa)
    return o.transpose(1, 2).reshape(S * L, *q.shape[1:]).index_select(0, dest)


def _make_impl(name):
    if name == "bcr":
        return lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m)
    if name == "bcr_sdpa":
        if not CUDA:
            pytest.skip("on the CPU bcr already runs its SDPA path")
        return lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m, backend="sdpa")
    if name == "bcr_window":
        return lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m, sliding_window=max(1, m // 4))
    if name == "reference":
        return lambda q, k, v, cu, m: reference.varlen_attention(q, k, v, cu, m)
    if name == "padded":
        return lambda q, k, v, cu, m: _padded(q, k, v, cu, m)
    raise ValueError(name)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-H{s[1]}x{s[2]}-D{s[3]}" for s in SHAPES])
def test_varlen_attention(benchmark, impl, mode, shape):
    T, hq, hkv, d, lo, hi = shape
    fn = _make_impl(impl)
    lengths = _lengths(T, lo, hi)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    max_seqlen = max(lengths)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(T, hq, d, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(T, hkv, d, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(T, hkv, d, device=DEVICE, dtype=DTYPE, generator=gen)
    grad_out = torch.randn(T, hq, d, device=DEVICE, dtype=DTYPE, generator=gen)
    if mode == "fwd_bwd":
        for t in (q, k, v):
            t.requires_grad_(True)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, cu, max_seqlen)
        else:
            out = fn(q, k, v, cu, max_seqlen)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            del grads
        _sync()

    if CUDA:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    oom = False
    try:
        run()  # warm-up; measures peak memory on CUDA
    except torch.OutOfMemoryError:
        oom = True
    if oom:
        del q, k, v, grad_out
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} {mode} at T={T} runs out of device memory")
    if CUDA:
        peak = torch.cuda.max_memory_allocated()
        benchmark.extra_info["peak_mem_over_inputs_bytes"] = peak - base
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
    if impl.startswith("bcr"):
        benchmark.extra_info["backend"] = last_dispatch().backend

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    # causal attention FLOPs actually needed: 4 * sum(L^2 / 2) * Hq * D forward, 2.5x that fwd+bwd
    # (full attention's count: for bcr_window, which needs less, it is an upper bound)
    flops = 2 * sum(n * n for n in lengths) * hq * d * (1.0 if mode == "fwd" else 3.5)
    benchmark.extra_info.update(
        impl=impl, mode=mode, T=T, Hq=hq, Hkv=hkv, D=d, S=len(lengths), max_seqlen=max_seqlen,
        dtype=str(DTYPE).removeprefix("torch."), padded_fraction=1 - T / (len(lengths) * max_seqlen),
        useful_flops=flops,
    )
    mean_s = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean_s:
        benchmark.extra_info["useful_TFLOPs_per_s"] = flops / mean_s / 1e12
