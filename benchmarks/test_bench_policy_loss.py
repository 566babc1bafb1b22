"""Benchmarks: policy_loss and scatter_instance_advantages, forward + backward.

Compared implementations:

- ``bcr``: the ``bcr_kernels`` entry point (Triton on CUDA; under ``TRITON_INTERPRET=1`` on the CPU
  it runs the interpreter, otherwise its PyTorch path);
- ``eager``: a vectorised PyTorch formulation written the way one would by hand (reference maths,
  no Python loop over sequences);
- ``compile``: ``torch.compile`` of the eager function (CUDA only).

CUDA shapes: T in {16384, 65536} packed tokens; on the CPU one small shape so the file always runs
fast. Run with ``make bench`` or ``pytest benchmarks/test_bench_policy_loss.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

import bcr_kernels

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOKENS = [16384, 65536] if CUDA else [1024]
IMPLS = ["bcr", "eager", "compile"]
N_MAX = 8


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _layout(T, seed=0):
    """Random packed layout of T tokens: ~T/512 sequences, lengths 1..1023, some of them empty."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    left = T
    while left > 0:
        n = int(torch.randint(0, 1024, (), generator=gen))
        n = min(n, left)
        lengths.append(n)
        left -= n
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(DEVICE)


def _seq_index(cu, T):
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), lengths, output_size=T)


# ------------------------------------------------------------------------------------------------
# eager baselines (vectorised PyTorch)
# ------------------------------------------------------------------------------------------------


def eager_policy_loss(logp, old_logp, adv, mask, ref_logp, seq_index, num_seqs: int, beta: float,
                      lo: float, hi: float, per_seq: bool):
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_tok = per_tok + beta * kl
    if per_seq:
        seq_sum = torch.zeros(num_seqs, device=logp.device).index_add(0, seq_index, per_tok * m)
        seq_cnt = torch.zeros(num_seqs, device=logp.device).index_add(0, seq_index, m)
        loss = (seq_sum / seq_cnt.clamp(min=1.0)).sum() / max(num_seqs, 1)
    else:
        loss = (per_tok * m).sum() / m.sum().clamp(min=1.0)
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        low = ((ratio < lo) & (adv < 0)).float()
        high = ((ratio > hi) & (adv > 0)).float()
        metrics = torch.stack([(low * m).sum(), (high * m).sum(), (ratio * m).sum(), (kl * m).sum()]) / n
    return loss, metrics


def eager_scatter(adv, seg, seq_index, num_instances):
    n_max = adv.shape[1]
    keep = torch.arange(n_max, device=adv.device)[None, :] < num_instances[:, None]
    fill = (adv * keep).sum(1) / num_instances.clamp(min=1)
    own = seg >= 0
    vals = adv[seq_index, seg.clamp(min=0)]
    return torch.where(own, vals, fill[seq_index])


_compiled = {}


def _compiled_fn(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _skip_unavailable(impl):
    if impl == "compile" and not CUDA:
        pytest.skip("torch.compile baseline is benchmarked on CUDA only")


# ------------------------------------------------------------------------------------------------
# policy_loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_policy_loss_fwd_bwd(benchmark, impl, reduction, T):
    _skip_unavailable(impl)
    gen = torch.Generator().manual_seed(0)
    cu = _layout(T)
    old = (-torch.rand(T, generator=gen) * 4).to(DEVICE)
    logp0 = old + 0.2 * torch.randn(T, generator=gen).to(DEVICE)
    ref = old + 0.1 * torch.randn(T, generator=gen).to(DEVICE)
    adv = torch.randn(T, generator=gen).to(DEVICE)
    mask = (torch.rand(T, generator=gen) < 0.9).to(DEVICE)
    logp = logp0.clone().requires_grad_(True)
    beta, eps, eps_high = 0.04, 0.2, 0.28
    objective = bcr_kernels.Objective(reduction=reduction, beta=beta, epsilon=eps, epsilon_high=eps_high)

    if impl == "bcr":
        def step():
            loss, _ = bcr_kernels.policy_loss(logp, old, adv, mask, cu, objective, ref_logp=ref)
            loss.backward()
            logp.grad = None
            _sync()
    else:
        fn = eager_policy_loss if impl == "eager" else _compiled_fn(f"pl-{reduction}", eager_policy_loss)
        S = cu.numel() - 1
        per_seq = reduction == "seq_mean_token_mean"

        def step():
            seq_index = _seq_index(cu, T)
            loss, _ = fn(logp, old, adv, mask, ref, seq_index, S, beta, 1 - eps, 1 + eps_high, per_seq)
            loss.backward()
            logp.grad = None
            _sync()
            return loss.detach()

        # the baseline computes the same loss as the op
        expected, _ = bcr_kernels.reference.policy_loss(logp0, old, adv, mask, cu, objective, ref_logp=ref)
        torch.testing.assert_close(step(), expected, rtol=1e-4, atol=1e-6)

    step()  # warm-up: compilation / autotuning outside the timing
    benchmark.group = f"policy_loss fwd+bwd {reduction} T={T} ({DEVICE})"
    benchmark(step)


# ------------------------------------------------------------------------------------------------
# scatter_instance_advantages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_scatter_fwd_bwd(benchmark, impl, T):
    _skip_unavailable(impl)
    gen = torch.Generator().manual_seed(1)
    cu = _layout(T, seed=1)
    S = cu.numel() - 1
    num_instances = torch.randint(1, N_MAX + 1, (S,), generator=gen).to(DEVICE)
    seq_index = _seq_index(cu, T)
    seg = torch.randint(-1, N_MAX, (T,), generator=gen).to(DEVICE)
    seg = torch.where(seg < num_instances[seq_index], seg, torch.full_like(seg, -1))
    adv = torch.randn(S, N_MAX, generator=gen).to(DEVICE).requires_grad_(True)
    upstream = torch.randn(T, generator=gen).to(DEVICE)

    if impl == "bcr":
        def step():
            out = bcr_kernels.scatter_instance_advantages(
                adv, seg, cu, num_instances=num_instances, validate=False
            )
            out.backward(upstream)
            adv.grad = None
            _sync()
    else:
        fn = eager_scatter if impl == "eager" else _compiled_fn("scatter", eager_scatter)

        def step():
            out = fn(adv, seg, _seq_index(cu, T), num_instances)
            out.backward(upstream)
            adv.grad = None
            _sync()
            return out.detach()

        expected = bcr_kernels.reference.scatter_instance_advantages(adv, seg, cu, num_instances=num_instances)
        torch.testing.assert_close(step(), expected)

    step()
    benchmark.group = f"scatter_instance_advantages fwd+bwd T={T} ({DEVICE})"
    benchmark(step)
