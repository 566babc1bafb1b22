"""packed_targets: Triton and PyTorch paths against the reference on generated segment layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcr_kernels import _dispatch, packed_targets
from bcr_kernels import _packed_targets as pt_mod
from bcr_kernels import reference as R
from kernel_checks import LaunchRecorder, two_gpus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _forbid(name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not run on this backend")

    return boom


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Selects a path and makes the other one fail loudly."""
    if request.param == "torch":
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")
        monkeypatch.setattr(pt_mod, "_packed_targets_triton", _forbid("triton path"))
    else:
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "auto")
        try:
            chosen = _dispatch.use_triton(torch.empty(1, device=DEVICE))
        except RuntimeError:
            chosen = False
        if not chosen:
            pytest.skip("Triton path not selected here (needs CUDA or TRITON_INTERPRET=1)")
        monkeypatch.setattr(pt_mod, "_packed_targets_torch", _forbid("torch path"))
        monkeypatch.setattr(pt_mod, "_BLOCK_T", 8)  # several programs even for short inputs
    return request.param


def _cu(lengths, dtype=torch.int32):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype, device=DEVICE)


def _check(lengths, *, ids_dtype=torch.long, cu_dtype=torch.int32, ignore_index=-100, gen=None):
    cu = _cu(lengths, cu_dtype)
    T = int(cu[-1])
    ids = torch.randint(0, 1000, (T,), generator=gen).to(device=DEVICE, dtype=ids_dtype)
    out = packed_targets(ids, cu, ignore_index=ignore_index)
    ref = R.packed_targets(ids, cu, ignore_index=ignore_index)
    assert out.dtype == ids.dtype and out.shape == ids.shape
    assert torch.equal(out, ref), (lengths, out.tolist(), ref.tolist())
    return ids, out


def test_hand_written_layout(backend):
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11], device=DEVICE)
    cu = torch.tensor([0, 3, 3, 4, 7], dtype=torch.int32, device=DEVICE)
    expected = [6, 7, -100, -100, 10, 11, -100]
    assert packed_targets(ids, cu).tolist() == expected


@pytest.mark.parametrize(
    "lengths",
    [[], [0], [1], [7], [1, 1, 1, 1], [0, 0, 0], [0, 3, 0, 0, 2, 0], [4, 1, 0, 9], [30, 2, 17]],
)
def test_layouts(backend, lengths):
    _, out = _check(lengths)
    # Ignored count = one per non-empty sequence.
    assert int((out == -100).sum()) == sum(1 for n in lengths if n > 0)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_dtypes_and_ignore_index(backend, ids_dtype, cu_dtype):
    _check([3, 0, 5, 1], ids_dtype=ids_dtype, cu_dtype=cu_dtype, ignore_index=-1)
    _check([2, 6], ids_dtype=ids_dtype, cu_dtype=cu_dtype)


def test_cu_not_covering_everything(backend):
    # cu_seqlens[0] > 0 and cu_seqlens[-1] < T: tokens outside every sequence are ignored.
    ids = torch.arange(10, device=DEVICE) + 100
    cu = torch.tensor([2, 5, 8], dtype=torch.int32, device=DEVICE)
    assert torch.equal(packed_targets(ids, cu), R.packed_targets(ids, cu))
    single = torch.tensor([4], dtype=torch.int32, device=DEVICE)  # S = 0: no sequences at all
    assert torch.equal(packed_targets(ids, single), torch.full_like(ids, -100))


def test_longer_input(backend):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 40, (60,), generator=gen).tolist()
    _check(lengths, gen=gen)


def test_errors(backend):
    with pytest.raises(ValueError, match="1-D"):
        packed_targets(torch.zeros(2, 3, dtype=torch.long, device=DEVICE), _cu([6]))
    with pytest.raises(TypeError, match="integer"):
        packed_targets(torch.zeros(4, device=DEVICE), _cu([4]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_targets(torch.zeros(4, dtype=torch.long, device=DEVICE), torch.zeros((), dtype=torch.int32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, 12)), min_size=0, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_generated_layouts(backend, lengths, seed):
    _check(lengths, gen=torch.Generator().manual_seed(seed))


def test_launches_run_on_the_tensors_device(backend, monkeypatch):
    if backend != "triton":
        pytest.skip("only the Triton path launches kernels")
    rec = LaunchRecorder(monkeypatch, pt_mod, ["_packed_targets_kernel"])
    _check([3, 1, 5])
    rec.check(["_packed_targets_kernel"])


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    torch.cuda.set_device(0)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device="cuda:1")
    ids = torch.randint(0, 1000, (9,), device="cuda:1")
    assert torch.equal(packed_targets(ids, cu).cpu(), R.packed_targets(ids.cpu(), cu.cpu()))
