"""scatter_instance_advantages: Triton and PyTorch paths against the reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bcr_kernels
from bcr_kernels import _scatter_instance_advantages as scatter_mod
from bcr_kernels import reference
from bcr_kernels._dispatch import interpreting
from kernel_checks import LaunchRecorder, two_gpus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or interpreting()


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "triton" and not TRITON_OK:
        pytest.skip("Triton path needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("BCR_KERNEL_BACKEND", request.param)
    return request.param


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _random_segments(lengths, n_per_seq, gen, p_shared=0.3):
    ids = []
    for length, n in zip(lengths, n_per_seq):
        for _ in range(length):
            if n == 0 or torch.rand((), generator=gen).item() < p_shared:
                ids.append(-1)
            else:
                ids.append(int(torch.randint(0, n, (), generator=gen)))
    return torch.tensor(ids, dtype=torch.long, device=DEVICE)


def _check(adv, seg, cu, num_instances=None, shared="mean", atol=1e-6, rtol=1e-5):
    """Compare forward and backward with the reference; return our output."""
    a1 = adv.detach().clone().requires_grad_(True)
    a2 = adv.detach().clone().requires_grad_(True)
    out = bcr_kernels.scatter_instance_advantages(a1, seg, cu, num_instances=num_instances, shared=shared)
    ref = reference.scatter_instance_advantages(a2, seg, cu, num_instances=num_instances, shared=shared)
    assert out.dtype == torch.float32 and out.shape == (seg.numel(),)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    upstream = torch.randn(seg.numel(), device=adv.device)
    out.backward(upstream)
    if ref.requires_grad:  # the reference's output is not attached to the graph when S == 0
        ref.backward(upstream)
    assert a1.grad is not None and a1.grad.dtype == adv.dtype and a1.grad.shape == adv.shape
    grad_ref = a2.grad if a2.grad is not None else torch.zeros_like(a2)
    torch.testing.assert_close(a1.grad, grad_ref, atol=atol, rtol=rtol)
    return out


def test_public_export_is_the_kernel_module():
    assert bcr_kernels.scatter_instance_advantages is scatter_mod.scatter_instance_advantages
    assert bcr_kernels.scatter_instance_advantages is not reference.scatter_instance_advantages


@pytest.mark.parametrize("shared", ["mean", "zero"])
def test_mixed_layout(backend, shared):
    lengths = [5, 0, 7, 1, 0, 9]
    n = [3, 2, 4, 1, 0, 2]
    gen = torch.Generator().manual_seed(1)
    seg = _random_segments(lengths, n, gen)
    adv = torch.randn(len(lengths), 4, device=DEVICE)
    _check(adv, seg, _cu(lengths), torch.tensor(n, device=DEVICE), shared)


def test_known_values(backend):
    # Two sequences; sequence 1 has N=2 of N_max=3, so its shared tokens average two advantages.
    adv = torch.tensor([[1.0, 2.0, 6.0], [-1.0, 3.0, 100.0]], device=DEVICE)
    seg = torch.tensor([0, -1, 2, 1, -1, 1, 0], device=DEVICE)
    cu = _cu([3, 4])
    out = bcr_kernels.scatter_instance_advantages(adv, seg, cu, num_instances=torch.tensor([3, 2]))
    expected = torch.tensor([1.0, 3.0, 6.0, 3.0, 1.0, 3.0, -1.0], device=DEVICE)
    torch.testing.assert_close(out, expected)
    out0 = bcr_kernels.scatter_instance_advantages(adv, seg, cu, num_instances=torch.tensor([3, 2]), shared="zero")
    torch.testing.assert_close(out0, torch.where(seg < 0, torch.zeros_like(expected), expected))


def test_known_gradient_spreads_shared_as_mean(backend):
    adv = torch.zeros(1, 4, device=DEVICE, requires_grad=True)
    seg = torch.tensor([-1, 0, -1, 1, 1], device=DEVICE)
    out = bcr_kernels.scatter_instance_advantages(adv, seg, _cu([5]), num_instances=torch.tensor([2]))
    out.backward(torch.tensor([2.0, 1.0, 4.0, 10.0, 20.0], device=DEVICE))
    # shared grads 2 + 4 = 6 spread over the 2 live instances; column 2, 3 are padding
    torch.testing.assert_close(adv.grad, torch.tensor([[1.0 + 3.0, 30.0 + 3.0, 0.0, 0.0]], device=DEVICE))


def test_empty_sequences_and_length_one(backend):
    lengths = [0, 0, 1, 0, 1, 1, 0]
    n = [2, 2, 2, 2, 2, 2, 2]
    seg = torch.tensor([1, -1, 0], device=DEVICE)
    adv = torch.randn(len(lengths), 2, device=DEVICE)
    _check(adv, seg, _cu(lengths), torch.tensor(n, device=DEVICE))


def test_tokens_outside_cu_seqlens_get_zero(backend):
    # cu_seqlens need not cover every token; the reference leaves the rest at 0 (and no gradient)
    adv = torch.randn(2, 3, device=DEVICE)
    seg = torch.tensor([-1, -1, 0, 1, -1, 2, -1, -1, -1], device=DEVICE)
    cu = torch.tensor([2, 5, 7], dtype=torch.int32, device=DEVICE)
    out = _check(adv, seg, cu)
    assert not out[[0, 1, 7, 8]].any()


def test_single_token(backend):
    adv = torch.randn(1, 3, device=DEVICE)
    for s in (-1, 0, 2):
        _check(adv, torch.tensor([s], device=DEVICE), _cu([1]))


def test_no_tokens(backend):
    adv = torch.randn(3, 2, device=DEVICE)
    _check(adv, torch.zeros(0, dtype=torch.long, device=DEVICE), _cu([0, 0, 0]))


def test_no_sequences(backend):
    adv = torch.zeros(0, 2, device=DEVICE)
    seg = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = bcr_kernels.scatter_instance_advantages(adv, seg, _cu([]))
    assert out.shape == (0,)


@pytest.mark.parametrize("shared", ["mean", "zero"])
def test_all_shared(backend, shared):
    lengths = [4, 3, 0, 5]
    seg = torch.full((12,), -1, device=DEVICE)
    adv = torch.randn(4, 3, device=DEVICE)
    _check(adv, seg, _cu(lengths), torch.tensor([3, 1, 2, 0], device=DEVICE), shared)


def test_int32_segment_ids_and_bf16_advantages(backend):
    lengths = [6, 2, 5]
    gen = torch.Generator().manual_seed(3)
    seg = _random_segments(lengths, [2, 2, 2], gen).to(torch.int32)
    adv = torch.randn(3, 2, device=DEVICE).to(torch.bfloat16)
    _check(adv, seg, _cu(lengths), atol=1e-2, rtol=1e-2)


def test_wide_n_max_and_long_sequences(backend):
    # N_max not a power of two and sequences longer than one backward block.
    lengths = [3000, 17, 1500]
    n = [37, 5, 0]
    gen = torch.Generator().manual_seed(4)
    seg = _random_segments(lengths, n, gen, p_shared=0.1)
    adv = torch.randn(3, 37, device=DEVICE)
    _check(adv, seg, _cu(lengths), torch.tensor(n, device=DEVICE), atol=1e-4, rtol=1e-5)


def test_non_contiguous_advantages(backend):
    base = torch.randn(5, 8, device=DEVICE)
    adv = base[:, ::2]  # [5, 4], stride 2 along N
    lengths = [3, 3, 3, 3, 3]
    gen = torch.Generator().manual_seed(5)
    seg = _random_segments(lengths, [4] * 5, gen)
    _check(adv, seg, _cu(lengths))


def test_backward_is_deterministic(backend):
    lengths = [700, 300, 1000]
    gen = torch.Generator().manual_seed(6)
    seg = _random_segments(lengths, [3, 3, 3], gen)
    cu = _cu(lengths)
    upstream = torch.randn(seg.numel(), device=DEVICE)
    grads = []
    for _ in range(2):
        adv = torch.ones(3, 3, device=DEVICE, requires_grad=True)
        bcr_kernels.scatter_instance_advantages(adv, seg, cu).backward(upstream)
        grads.append(adv.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "seg, n, match",
    [
        ([0, 2, -1], [2], r"sequence 0: segment_ids\[1\] = 2 must lie in \[-1, 2\)"),
        ([0, -2, -1], [2], r"segment_ids\[1\] = -2"),
        ([0, 0, 0], [0], r"sequence 0: segment_ids\[0\] = 0 must lie in \[-1, 0\)"),
    ],
)
def test_invalid_segment_ids_raise(backend, seg, n, match):
    adv = torch.randn(1, 3, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        bcr_kernels.scatter_instance_advantages(
            adv, torch.tensor(seg, device=DEVICE), _cu([3]), num_instances=torch.tensor(n, device=DEVICE)
        )


def test_invalid_segment_in_second_sequence_names_it(backend):
    adv = torch.randn(2, 3, device=DEVICE)
    seg = torch.tensor([2, 2, 0, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"sequence 1: segment_ids\[3\] = 1 must lie in \[-1, 1\)"):
        bcr_kernels.scatter_instance_advantages(adv, seg, _cu([2, 2]), num_instances=torch.tensor([3, 1]))


def test_validate_false_skips_the_check(backend):
    adv = torch.randn(1, 3, device=DEVICE)
    seg = torch.tensor([0, 2, -1], device=DEVICE)  # 2 >= num_instances = 2, but within N_max
    out = bcr_kernels.scatter_instance_advantages(
        adv, seg, _cu([3]), num_instances=torch.tensor([2], device=DEVICE), validate=False
    )
    assert out.shape == (3,)


@pytest.mark.parametrize("shared", ["zero", "mean"])
def test_validate_false_never_reads_past_the_row(backend, shared):
    # ids >= N_max would address the next row, or past the end of the tensor: they must read nothing
    # (give 0) and get no gradient. adv is a view into a larger buffer whose extra row holds a sentinel.
    base = torch.full((3, 3), 777.0, device=DEVICE)
    base[:2] = torch.randn(2, 3, device=DEVICE)
    adv = base[:2].detach().requires_grad_(True)  # a view: its storage goes on past row 1
    seg = torch.tensor([0, 3, -1, 5, 1], device=DEVICE)  # 3 == N_max (row 1's first entry), 5: past row 1
    cu = _cu([3, 2])
    out = bcr_kernels.scatter_instance_advantages(adv, seg, cu, shared=shared, validate=False)
    # the same as the valid layout with those two tokens shared, except that they get 0
    fixed = torch.tensor([0, -1, -1, -1, 1], device=DEVICE)
    ref_adv = adv.detach().clone().requires_grad_(True)
    ref = reference.scatter_instance_advantages(ref_adv, fixed, cu, shared=shared)
    ref = torch.where(seg >= 3, torch.zeros_like(ref), ref)
    torch.testing.assert_close(out, ref)
    assert out[1].item() == 0.0 and out[3].item() == 0.0
    upstream = torch.randn(5, device=DEVICE)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(adv.grad, ref_adv.grad)


def test_backward_is_once_differentiable(backend):
    if backend != "triton":
        pytest.skip("the PyTorch path is plain autograd (twice differentiable)")
    adv = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    out = bcr_kernels.scatter_instance_advantages(adv, torch.tensor([0, 1, -1, 2], device=DEVICE), _cu([2, 2]))
    w = torch.randn(4, device=DEVICE, requires_grad=True)  # an upstream gradient that itself has a graph
    (g,) = torch.autograd.grad((out * w).sum(), adv, create_graph=True)
    # a clear error, not a second derivative that silently misses the kernel's part
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_launches_run_on_the_tensors_device(backend, monkeypatch):
    if backend != "triton":
        pytest.skip("only the Triton path launches kernels")
    rec = LaunchRecorder(monkeypatch, scatter_mod, ["_scatter_fwd_kernel", "_scatter_bwd_kernel"])
    gen = torch.Generator().manual_seed(7)
    _check(torch.randn(3, 4, device=DEVICE), _random_segments([5, 0, 7], [4, 4, 4], gen), _cu([5, 0, 7]))
    rec.check(["_scatter_fwd_kernel", "_scatter_bwd_kernel"])


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(8)
    seg = _random_segments([9, 4], [3, 3], gen).to("cuda:1")
    adv = torch.randn(2, 3, device="cuda:1")
    cu = torch.tensor([0, 9, 13], dtype=torch.int32, device="cuda:1")
    _check(adv, seg, cu)


def test_argument_errors(backend):
    adv = torch.randn(2, 3, device=DEVICE)
    seg = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="shared must be"):
        bcr_kernels.scatter_instance_advantages(adv, seg, _cu([1, 1]), shared="max")
    with pytest.raises(ValueError, match="num_instances\\[1\\] = 4"):
        bcr_kernels.scatter_instance_advantages(adv, seg, _cu([1, 1]), num_instances=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="rows but cu_seqlens describes 3"):
        bcr_kernels.scatter_instance_advantages(adv, seg, _cu([1, 1, 0]))
    with pytest.raises(ValueError, match=r"\[S, N_max\]"):
        bcr_kernels.scatter_instance_advantages(adv[0], seg, _cu([1, 1]))


def test_dispatch_takes_the_requested_path(backend, monkeypatch):
    calls = []
    real = scatter_mod._ScatterInstanceAdvantages.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(scatter_mod._ScatterInstanceAdvantages, "apply", spy)
    adv = torch.randn(2, 2, device=DEVICE)
    bcr_kernels.scatter_instance_advantages(adv, torch.tensor([0, 1, -1], device=DEVICE), _cu([1, 2]))
    assert bool(calls) == (backend == "triton")


@st.composite
def _layouts(draw):
    S = draw(st.integers(0, 6))
    n_max = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, 40), min_size=S, max_size=S))
    n = draw(st.lists(st.integers(0, n_max), min_size=S, max_size=S))
    seg = []
    for length, ns in zip(lengths, n):
        pattern = draw(st.sampled_from(["random", "spans", "shared"]))
        if ns == 0 or pattern == "shared":
            seg += [-1] * length
        elif pattern == "spans":  # contiguous spans, as the parser produces
            ids = sorted(draw(st.lists(st.integers(-1, ns - 1), min_size=length, max_size=length)))
            seg += ids
        else:
            seg += draw(st.lists(st.integers(-1, ns - 1), min_size=length, max_size=length))
    shared = draw(st.sampled_from(["mean", "zero"]))
    give_n = draw(st.booleans()) or any(x != n_max for x in n)
    seed = draw(st.integers(0, 2**16))
    return S, n_max, lengths, n if give_n else None, seg, shared, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=_layouts())
def test_random_layouts(backend, layout):
    S, n_max, lengths, n, seg, shared, seed = layout
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(S, n_max, generator=gen).to(DEVICE)
    seg_t = torch.tensor(seg, dtype=torch.long, device=DEVICE)
    n_t = None if n is None else torch.tensor(n, device=DEVICE)
    _check(adv, seg_t, _cu(lengths), n_t, shared)
