"""pytest-benchmark: LM head + token log-probs, forward + backward with an arbitrary upstream gradient.

    pytest benchmarks/test_bench_fused_linear_logprobs.py --benchmark-only

Variants (one benchmark group per shape):
- ``fused``: ``bcr_kernels.fused_linear_logprobs`` (chunked, never holds [T, V] logits);
- ``unfused``: ``F.linear`` then ``bcr_kernels.token_logprobs`` on the full logits;
- ``eager``: ``F.linear`` + ``log_softmax`` + ``gather`` (materialised, plain PyTorch);
- ``liger``: Liger-Kernel's fused linear cross-entropy (mean loss; a scalar-loss op, so it gets a
  scalar upstream gradient), CUDA only and only where ``liger_kernel`` is installed.

On CUDA the shapes are real (T in {4096, 16384}, H in {1536, 2560}, V = 151936, bf16) and each
benchmark's ``extra_info`` holds the peak extra CUDA memory of one step (``max_memory_allocated``
after ``reset_peak_memory_stats`` minus the memory allocated before the step). On CPU the shape is
small so the suite always runs quickly (under ``TRITON_INTERPRET=1`` the Triton kernels are
interpreted, so CPU timings say nothing about GPU speed); see ``benchmarks/cpu_fused_logprobs.py``
for the CPU memory/time profile at real shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bcr_kernels import fused_linear_logprobs, token_logprobs

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    DTYPE = torch.bfloat16
    SHAPES = [(T, H, 151936) for T in (4096, 16384) for H in (1536, 2560)]
    ROUNDS = 5
else:
    DTYPE = torch.float32
    SHAPES = [(128, 64, 4096)]
    ROUNDS = 3

VARIANTS = ("fused", "unfused", "eager", "liger")


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss()


def _inputs(T, H, V):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(DEVICE, DTYPE).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g).to(DEVICE)
    upstream = torch.randn(T, generator=g).to(DEVICE)
    return hidden, weight, targets, upstream


def _step_fn(variant):
    if variant == "fused":
        def logp(h, w, t):
            return fused_linear_logprobs(h, w, t).logp
    elif variant == "unfused":
        def logp(h, w, t):
            return token_logprobs(F.linear(h, w), t).logp
    elif variant == "eager":
        def logp(h, w, t):
            return torch.log_softmax(F.linear(h, w).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)
    else:
        if not CUDA:
            pytest.skip("Liger's fused linear cross-entropy needs CUDA")
        loss = _liger_loss()
        if loss is None:
            pytest.skip("liger_kernel not installed")

        def step(h, w, t, up):
            return torch.autograd.grad(loss(w, h, t), [h, w])

        return step

    def step(h, w, t, up):
        return torch.autograd.grad(logp(h, w, t), [h, w], up)

    return step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-H{s[1]}-V{s[2]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_fwd_bwd(benchmark, variant, shape):
    T, H, V = shape
    step = _step_fn(variant)
    hidden, weight, targets, upstream = _inputs(T, H, V)
    benchmark.group = f"fused_linear_logprobs fwd+bwd T={T} H={H} V={V} {str(DTYPE).split('.')[-1]} {DEVICE}"

    def run():
        grads = step(hidden, weight, targets, upstream)
        if CUDA:
            torch.cuda.synchronize()
        return grads

    if CUDA:
        try:  # one measured step for peak memory (also the warm-up)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            grads = run()
            grad_bytes = sum(g.numel() * g.element_size() for g in grads)
            del grads
            benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            benchmark.extra_info["peak_extra_beyond_grads_mib"] = (
                torch.cuda.max_memory_allocated() - base - grad_bytes
            ) / 2**20
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            pytest.skip(f"{variant} runs out of CUDA memory at T={T} H={H} V={V}")
    benchmark.extra_info["upstream"] = "scalar mean loss" if variant == "liger" else "arbitrary [T]"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
