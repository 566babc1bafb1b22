"""token_logprobs: Triton and PyTorch paths against the reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcr_kernels import LogprobsOutput, _dispatch, token_logprobs
from bcr_kernels import _token_logprobs as tlp_mod
from bcr_kernels import reference as R
from kernel_checks import LaunchRecorder, two_gpus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGN = -100

# (atol, rtol) for log-probs / entropy, and for gradients stored in the logits' dtype
# (both sides round the same fp32 value to the dtype, so they differ by at most ~1 ulp).
VAL_TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (5e-5, 1e-5), torch.float16: (5e-5, 1e-5)}
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1.6e-2), torch.float16: (1e-5, 2e-3)}


def _triton_would_run() -> bool:
    probe = torch.empty(1, device=DEVICE)
    try:
        return _dispatch.use_triton(probe)
    except RuntimeError:
        return False


def _forbid(name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not run on this backend")

    return boom


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Selects a path and makes the other one fail loudly, so each test checks the path it names."""
    if request.param == "torch":
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")
        monkeypatch.setattr(tlp_mod, "logprobs_fwd", _forbid("triton forward"))
        monkeypatch.setattr(tlp_mod, "_launch_bwd", _forbid("triton backward"))
    else:
        monkeypatch.setenv("BCR_KERNEL_BACKEND", "auto")
        if not _triton_would_run():
            pytest.skip("Triton path not selected here (needs CUDA or TRITON_INTERPRET=1)")
        monkeypatch.setattr(tlp_mod, "_fwd_torch", _forbid("torch forward"))
        monkeypatch.setattr(tlp_mod, "_torch_bwd_into", _forbid("torch backward"))
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """Many vocabulary blocks (Triton) and many row chunks (torch) even at small shapes."""
    monkeypatch.setattr(tlp_mod, "_MAX_BLOCK_V", 64)
    monkeypatch.setattr(tlp_mod, "_TORCH_CHUNK_ELEMS", 2500)


def _targets(T, V, ignored=(), gen=None):
    y = torch.randint(0, V, (T,), generator=gen)
    for i in ignored:
        y[i] = IGN
    return y.to(DEVICE)


def _compare(logits, targets, *, val_tol=None, grad_tol=None, ent_tol=None, **kw):
    """Runs ours and the reference on copies of ``logits``; compares log-probs, entropy, gradients."""
    dt = logits.dtype
    va, vr = val_tol or VAL_TOL[dt]
    ga, gr = grad_tol or GRAD_TOL[dt]
    ea, er = ent_tol or (1e-4, 1e-4)
    a = logits.detach().clone().requires_grad_(True)
    b = logits.detach().clone().requires_grad_(True)
    out = token_logprobs(a, targets, return_entropy=True, **kw)
    ref = R.token_logprobs(b, targets, return_entropy=True, **kw)
    logp, ent = out
    rlogp, rent = ref
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert ent.dtype == torch.float32 and ent.requires_grad  # differentiable: test_entropy_gradient
    torch.testing.assert_close(logp, rlogp, atol=va, rtol=vr)
    torch.testing.assert_close(ent, rent, atol=ea, rtol=er)
    g = torch.randn(targets.shape[0], device=logits.device)
    (logp * g).sum().backward()
    (rlogp * g).sum().backward()
    assert a.grad.dtype == logits.dtype and a.grad.shape == logits.shape
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=ga, rtol=gr)
    return logp, a.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_gradient(backend, small_blocks, dtype):
    """d (sum g * logp + sum u * entropy) / d logits against the reference's autograd, with a temperature,
    an ignored row and a row with -inf logits (probability 0: no NaN); a bonus on the entropy alone works."""
    gen = torch.Generator().manual_seed(11)
    T, V = 6, 1000
    x = torch.randn(T, V, generator=gen) * 3
    x[2, :100] = float("-inf")
    y = _targets(T, V, ignored=(4,), gen=gen)
    y[2] = 500  # a target of finite probability in the -inf row
    g, u = torch.randn(T, generator=gen).to(DEVICE), torch.randn(T, generator=gen).to(DEVICE)
    grads = []
    for fn, logits in ((token_logprobs, x), (R.token_logprobs, x.clamp(min=-1e4))):  # exp(-1e4) is 0 as well
        for both in (True, False):  # both outputs; the entropy alone (no log-prob gradient reaches the op)
            leaf = logits.to(DEVICE, dtype).requires_grad_(True)
            logp, ent = fn(leaf, y, temperature=0.8, return_entropy=True)
            ((logp * g).sum() + (ent * u).sum() if both else ent.sum()).backward()
            grads.append(leaf.grad.float())
    ga, gr = GRAD_TOL[dtype]
    for got, want in ((grads[0], grads[2]), (grads[1], grads[3])):
        assert torch.isfinite(got).all() and got[4].abs().sum() == 0 and got[2, :100].abs().sum() == 0
        torch.testing.assert_close(got, want, atol=ga, rtol=gr)
    assert grads[1].abs().sum() > 0.1 * grads[0].abs().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,V", [(1, 7), (5, 7), (1, 1000), (6, 1000)])
def test_matches_reference(backend, small_blocks, dtype, T, V):
    x = (torch.randn(T, V, device=DEVICE) * 4).to(dtype)
    _compare(x, _targets(T, V))


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature(backend, small_blocks, temperature):
    x = torch.randn(5, 300, device=DEVICE) * 3
    _compare(x, _targets(5, 300, ignored=[2]), temperature=temperature)
    xb = x.to(torch.bfloat16)
    _compare(xb, _targets(5, 300), temperature=temperature)


def test_ignored_rows(backend, small_blocks):
    T, V = 6, 200
    x = torch.randn(T, V, device=DEVICE)
    logp, grad = _compare(x, _targets(T, V, ignored=[0, 3, 5]))
    for i in (0, 3, 5):
        assert logp[i].item() == 0.0
        assert torch.count_nonzero(grad[i]) == 0
    assert torch.count_nonzero(grad[1]) == V  # non-ignored rows do get a dense gradient


def test_all_ignored(backend, small_blocks):
    T, V = 4, 150
    x = torch.randn(T, V, device=DEVICE, requires_grad=True)
    y = torch.full((T,), IGN, device=DEVICE)
    logp, ent = token_logprobs(x, y, return_entropy=True)
    assert torch.equal(logp, torch.zeros(T, device=DEVICE))
    assert torch.equal(ent, torch.zeros(T, device=DEVICE))
    logp.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_custom_ignore_index(backend, small_blocks):
    T, V = 5, 90
    y = _targets(T, V)
    y[1] = -1
    _compare(torch.randn(T, V, device=DEVICE), y, ignore_index=-1)


def test_row_strided_view(backend, small_blocks):
    T, V, pad = 5, 333, 21
    for dtype in (torch.float32, torch.bfloat16):
        big = torch.randn(T, V + pad, device=DEVICE).to(dtype)
        a = big.detach().clone().requires_grad_(True)
        b = big.detach().clone().requires_grad_(True)
        y = _targets(T, V, ignored=[3])
        va = a[:, pad:]
        assert va.stride(0) == V + pad and va.stride(1) == 1
        logp = token_logprobs(va, y, temperature=0.9).logp
        rlogp = R.token_logprobs(b[:, pad:], y, temperature=0.9).logp
        torch.testing.assert_close(logp, rlogp, atol=VAL_TOL[dtype][0], rtol=VAL_TOL[dtype][1])
        g = torch.randn(T, device=DEVICE)
        (logp * g).sum().backward()
        (rlogp * g).sum().backward()
        assert torch.count_nonzero(a.grad[:, :pad]) == 0
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])


def test_column_strided_input(backend, small_blocks):
    T, V = 4, 120
    x = torch.randn(V, T, device=DEVICE).t()  # stride(1) != 1
    assert x.stride(1) != 1
    _compare(x, _targets(T, V, ignored=[1]))


def test_extreme_logits(backend, small_blocks):
    T, V = 5, 400
    x = torch.randn(T, V, device=DEVICE)
    x[0] = torch.where(torch.rand(V, device=DEVICE) < 0.5, 1e4, -1e4)
    x[1] = torch.randn(V, device=DEVICE) * 1e4
    x[2, :] = -1e4
    x[2, 17] = 1e4
    x[3] = 1e4 + torch.randn(V, device=DEVICE)  # large offset: lse must not lose the small spread
    y = _targets(T, V)
    y[2] = 17
    # The reference's fp32 entropy (lse - sum p*x) loses ~1e-3 at |x| ~ 1e4 to cancellation.
    for dtype, grad_tol in ((torch.float32, (1e-4, 1e-3)), (torch.bfloat16, (1e-4, 1.6e-2))):
        logp, _ = _compare(x.to(dtype), y, val_tol=(2e-3, 1e-5), grad_tol=grad_tol, ent_tol=(5e-3, 1e-4))
        assert torch.isfinite(logp).all()
        assert abs(logp[2].item()) < 1e-6


def test_neg_inf_entries(backend, small_blocks):
    T, V = 5, 300
    x = torch.randn(T, V, device=DEVICE) * 2
    x[0, :150] = float("-inf")  # several whole blocks of -inf before any finite value
    x[1, 5::3] = float("-inf")
    x[2, :-1] = float("-inf")  # one finite entry: a one-hot distribution
    x[4, 200:] = float("-inf")
    y = _targets(T, V)
    y[0], y[2], y[4] = 160, V - 1, 3
    logp, grad = _compare(x, y, ent_tol=(1e-5, 1e-4))
    assert torch.isfinite(logp).all()
    assert torch.isfinite(grad).all()
    assert abs(logp[2].item()) < 1e-7
    for dtype in (torch.bfloat16, torch.float16):
        _compare(x.to(dtype), y, ent_tol=(1e-4, 1e-4))


def test_target_on_neg_inf_logit(backend, small_blocks):
    x = torch.randn(3, 50, device=DEVICE)
    x[1, 9] = float("-inf")
    y = torch.tensor([4, 9, IGN], device=DEVICE)
    logp = token_logprobs(x, y).logp
    assert logp[1].item() == float("-inf")
    torch.testing.assert_close(logp, R.token_logprobs(x, y).logp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_50257(backend, dtype):
    T, V = 3, 50257  # not a multiple of any power-of-two block
    x = (torch.randn(T, V, device=DEVICE) * 3).to(dtype)
    _compare(x, _targets(T, V, ignored=[1]), ent_tol=(5e-4, 1e-4))


@pytest.mark.parametrize("T", [1, 2])
def test_vocab_151936(backend, T):
    V = 151936
    x = (torch.randn(T, V, device=DEVICE) * 3).to(torch.bfloat16)
    _compare(x, _targets(T, V), temperature=0.8, ent_tol=(1e-3, 1e-4))


def test_empty_and_errors(backend):
    x = torch.randn(0, 11, device=DEVICE, requires_grad=True)
    y = torch.empty(0, dtype=torch.long, device=DEVICE)
    logp, ent = token_logprobs(x, y, return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    logp.sum().backward()
    with pytest.raises(ValueError, match="2-D"):
        token_logprobs(torch.randn(2, 3, 4, device=DEVICE), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(2, 4, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(torch.randn(2, 4, device=DEVICE), torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 4, device=DEVICE), torch.zeros(2, dtype=torch.long), temperature=0)


def test_default_outputs_and_int32_targets(backend, small_blocks):
    x = torch.randn(4, 77, device=DEVICE)
    y = _targets(4, 77, ignored=[0]).to(torch.int32)
    out = token_logprobs(x, y)
    # the same named pair with or without the entropy
    assert isinstance(out, LogprobsOutput) and out.entropy is None and len(out) == 2
    assert len(token_logprobs(x, y, return_entropy=True)) == 2
    torch.testing.assert_close(out.logp, R.token_logprobs(x, y.long()).logp, atol=2e-5, rtol=1e-5)


def test_no_grad_input(backend, small_blocks):
    x = torch.randn(3, 100, device=DEVICE)
    y = _targets(3, 100)
    with torch.no_grad():
        a = token_logprobs(x, y).logp
    torch.testing.assert_close(a, R.token_logprobs(x, y).logp, atol=2e-5, rtol=1e-5)
    assert not a.requires_grad


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    T=st.integers(1, 6),
    V=st.integers(1, 140),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_random_shapes(backend, small_blocks, T, V, temperature, seed, ignore_frac):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, V, generator=gen) * 3).to(DEVICE)
    y = torch.randint(0, V, (T,), generator=gen)
    y[torch.rand(T, generator=gen) < ignore_frac] = IGN
    _compare(x, y.to(DEVICE), temperature=temperature)


# ---- the launchers the fused LM-head ops build on -------------------------------------


@pytest.fixture(params=["triton", "torch"])
def launchers(request, monkeypatch):
    monkeypatch.setattr(tlp_mod, "_MAX_BLOCK_V", 64)
    monkeypatch.setattr(tlp_mod, "_TORCH_CHUNK_ELEMS", 1000)
    if request.param == "torch":
        return tlp_mod.logprobs_fwd_torch, tlp_mod.logprobs_bwd_inplace_torch
    if not (_dispatch.triton_available() and (torch.cuda.is_available() or _dispatch.interpreting())):
        pytest.skip("Triton launchers need CUDA or TRITON_INTERPRET=1")
    return tlp_mod.logprobs_fwd, tlp_mod.logprobs_bwd_inplace


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fwd_and_inplace_bwd_on_buffer_slice(launchers, dtype):
    fwd, bwd_inplace = launchers
    T, V, pad = 6, 250, 9
    temperature = 0.7
    buf = (torch.randn(T + 2, V + pad, device=DEVICE) * 3).to(dtype)
    keep = buf.clone()
    view = buf[1 : T + 1, :V]  # row-strided view inside a larger buffer
    y = _targets(T, V, ignored=[2])
    logp, lse, ent = fwd(view, y, temperature, IGN, True)
    ref_x = view.detach().clone().requires_grad_(True)
    rlogp, rent = R.token_logprobs(ref_x, y, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(logp, rlogp, atol=VAL_TOL[dtype][0], rtol=VAL_TOL[dtype][1])
    torch.testing.assert_close(ent, rent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, torch.logsumexp(view.float() / temperature, -1), atol=2e-5, rtol=1e-5)
    assert fwd(view, y, temperature, IGN, False)[2] is None

    g = torch.randn(T, device=DEVICE)
    (rlogp * g).sum().backward()
    bwd_inplace(view, y, lse, g, temperature, IGN)
    assert buf.dtype == dtype
    torch.testing.assert_close(view.float(), ref_x.grad.float(), atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    # Nothing outside the view was touched.
    assert torch.equal(buf[0], keep[0]) and torch.equal(buf[T + 1], keep[T + 1])
    assert torch.equal(buf[:, V:], keep[:, V:])


# ---- other implementations, when installed -----------------------------------------------------


def test_matches_trl_selective_log_softmax(backend):
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl not installed")
    x = torch.randn(2, 5, 300, device=DEVICE)
    y = torch.randint(0, 300, (2, 5), device=DEVICE)
    theirs = trl_utils.selective_log_softmax(x, y)
    ours = token_logprobs(x.reshape(-1, 300), y.reshape(-1)).logp.reshape(2, 5)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_matches_liger_cross_entropy(backend):
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger_kernel not installed")
    if not torch.cuda.is_available():
        pytest.skip("Liger's kernels need CUDA")
    T, V = 64, 1000
    x = torch.randn(T, V, device=DEVICE)
    y = _targets(T, V, ignored=[0, 5])
    logp = token_logprobs(x, y).logp
    # Liger may write its gradient into the logits' storage: give it a copy.
    loss = liger.LigerCrossEntropyLoss(ignore_index=IGN)(x.clone(), y)
    ours = -logp.sum() / (y != IGN).sum()
    torch.testing.assert_close(ours, loss, atol=1e-5, rtol=1e-5)


# ---- launches on the tensors' device -------------------------------------------------------------


def test_launches_run_on_the_tensors_device(backend, small_blocks, monkeypatch):
    if backend != "triton":
        pytest.skip("only the Triton path launches kernels")
    rec = LaunchRecorder(monkeypatch, tlp_mod, ["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"])
    _compare(torch.randn(5, 200, device=DEVICE), _targets(5, 200, ignored=[1]))
    rec.check(["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"])


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    torch.cuda.set_device(0)
    x = torch.randn(6, 300, device="cuda:1", requires_grad=True)
    y = torch.randint(0, 300, (6,), device="cuda:1")
    logp = token_logprobs(x, y).logp
    logp.sum().backward()
    ref_x = x.detach().cpu().requires_grad_(True)
    rlogp = R.token_logprobs(ref_x, y.cpu()).logp
    rlogp.sum().backward()
    torch.testing.assert_close(logp.cpu(), rlogp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.cpu(), ref_x.grad, atol=1e-6, rtol=1e-5)
