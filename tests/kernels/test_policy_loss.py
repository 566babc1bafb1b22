"""policy_loss: Triton and PyTorch paths against the reference (loss, d loss / d logp, metrics)."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bcr_kernels
from bcr_kernels import _policy_loss as loss_mod
from bcr_kernels import reference
from bcr_kernels._dispatch import interpreting
from kernel_checks import LaunchRecorder, two_gpus, with_objective

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or interpreting()
REDUCTIONS = reference.REDUCTIONS
METRIC_KEYS = {
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "ratio_mean",
    "kl",
}


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


def _inputs(lengths, seed=0, spread=0.3, p_mask=0.8, same_frac=0.0, dtype=torch.float32):
    """Random packed inputs; ``same_frac`` of the tokens get logp == old_logp exactly (ratio 1)."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    old = -torch.rand(T, generator=gen) * 5
    logp = old + spread * torch.randn(T, generator=gen)
    same = torch.rand(T, generator=gen) < same_frac
    logp = torch.where(same, old, logp)
    adv = torch.randn(T, generator=gen)
    mask = torch.rand(T, generator=gen) < p_mask
    ref = old + 0.2 * torch.randn(T, generator=gen)

    def to(t):
        return t.to(DEVICE)

    return to(logp).to(dtype), to(old), to(adv), to(mask), to(ref), _cu(lengths)


def _run(fn, logp, *args, **kw):
    lp = logp.detach().clone().requires_grad_(True)
    loss, metrics = fn(lp, *args, **with_objective(kw))
    loss.backward()
    grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
    return loss.detach(), grad, metrics


def _check(logp, old, adv, mask, cu, atol=1e-6, rtol=1e-5, **kw):
    loss, grad, metrics = _run(bcr_kernels.policy_loss, logp, old, adv, mask, cu, **kw)
    rloss, rgrad, rmetrics = _run(reference.policy_loss, logp, old, adv, mask, cu, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, rloss, atol=atol, rtol=rtol, equal_nan=True)
    assert grad.dtype == logp.dtype
    torch.testing.assert_close(grad, rgrad, atol=atol, rtol=rtol, equal_nan=True)
    assert set(metrics) == set(rmetrics) == METRIC_KEYS
    for k in METRIC_KEYS:
        assert metrics[k].dtype == torch.float32 and metrics[k].dim() == 0
        assert not metrics[k].requires_grad, k
        torch.testing.assert_close(metrics[k], rmetrics[k], atol=atol, rtol=rtol, equal_nan=True, msg=k)
    return loss, grad, metrics


LENGTHS = [7, 0, 12, 1, 30, 0, 5]


def test_public_export_is_the_kernel_module():
    assert bcr_kernels.policy_loss is loss_mod.policy_loss
    assert bcr_kernels.policy_loss is not reference.policy_loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_matches_reference(backend, reduction, beta, epsilon_high):
    logp, old, adv, mask, ref, cu = _inputs(LENGTHS, seed=1, same_frac=0.2)
    _check(logp, old, adv, mask, cu, ref_logp=ref, beta=beta, epsilon_high=epsilon_high, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normalizer_and_max_completion_length(backend, reduction):
    logp, old, adv, mask, _ref, cu = _inputs(LENGTHS, seed=2)
    _check(logp, old, adv, mask, cu, reduction=reduction, normalizer=37.0)
    _check(logp, old, adv, mask, cu, reduction=reduction, normalizer=torch.tensor(5.0, device=DEVICE))
    _check(logp, old, adv, mask, cu, reduction=reduction, max_completion_length=64)


def test_token_mean_known_value(backend):
    # ratio 1 everywhere: loss = -mean(A) over masked tokens, d loss / d logp = -A * m / sum(m)
    adv = torch.tensor([1.0, -2.0, 3.0, 4.0], device=DEVICE)
    mask = torch.tensor([True, True, False, True], device=DEVICE)
    logp = torch.full((4,), -1.5, device=DEVICE)
    loss, grad, metrics = _check(logp, logp.clone(), adv, mask, _cu([2, 2]))
    torch.testing.assert_close(loss, torch.tensor(-1.0, device=DEVICE))
    torch.testing.assert_close(grad, torch.tensor([-1.0, 2.0, 0.0, -4.0], device=DEVICE) / 3)
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0, device=DEVICE))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ratio_exactly_one_gives_full_gradient(backend, reduction):
    # logp == old_logp (first iteration): min() ties, clamp is the identity; gradient must total -A * m / D.
    logp, old, adv, mask, _ref, cu = _inputs(LENGTHS, seed=3, same_frac=1.0)
    assert torch.equal(logp, old)
    _loss, grad, _ = _check(logp, old, adv, mask, cu, reduction=reduction)
    if reduction == "token_mean":
        expected = -adv * mask / mask.sum()
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("epsilon, epsilon_high", [(0.0, 0.0), (0.0, 0.2), (0.2, 0.0)])
def test_ratio_on_the_clip_boundary_passes_gradient(backend, epsilon, epsilon_high):
    # ratio == 1 == 1 - epsilon (or 1 + epsilon_high): torch.clamp passes the gradient on the closed
    # interval, so the clipped branch keeps its half of the tied minimum.
    logp, old, adv, mask, _ref, cu = _inputs(LENGTHS, seed=3, same_frac=1.0)
    _, grad, _ = _check(logp, old, adv, mask, cu, epsilon=epsilon, epsilon_high=epsilon_high)
    torch.testing.assert_close(grad, -adv * mask / mask.sum())


def test_clip_regions_and_metrics(backend):
    # hand-built ratios on both sides of the clip range with both advantage signs
    old = torch.zeros(8, device=DEVICE)
    logp = torch.log(torch.tensor([0.5, 0.5, 1.5, 1.5, 1.1, 0.9, 1.25, 0.75], device=DEVICE))
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0, 2.0, -2.0, 1.0, -1.0], device=DEVICE)
    mask = torch.ones(8, dtype=torch.bool, device=DEVICE)
    _, grad, metrics = _check(logp, old, adv, mask, _cu([8]), epsilon=0.2, epsilon_high=0.28)
    # clipped (no gradient): ratios 0.5 and 0.75 with A<0, ratio 1.5 with A>0; 1.25 < 1.28 is inside
    assert grad[0].item() == 0.0 and grad[2].item() == 0.0 and grad[7].item() == 0.0
    assert grad[1].item() != 0.0 and grad[3].item() != 0.0 and grad[6].item() != 0.0
    torch.testing.assert_close(metrics["clip_ratio/low_mean"], torch.tensor(2 / 8, device=DEVICE))
    torch.testing.assert_close(metrics["clip_ratio/high_mean"], torch.tensor(1 / 8, device=DEVICE))
    torch.testing.assert_close(metrics["clip_ratio/region_mean"], torch.tensor(3 / 8, device=DEVICE))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked(backend, reduction):
    logp, old, adv, _, ref, cu = _inputs(LENGTHS, seed=4)
    mask = torch.zeros_like(logp, dtype=torch.bool)
    loss, grad, metrics = _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.1, reduction=reduction)
    assert loss.item() == 0.0 and not grad.any()
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lengths", [[1], [0, 0, 1, 0], [1, 1, 1], [0, 3, 0, 0, 2]], ids=str)
def test_tiny_and_empty_sequences(backend, reduction, lengths):
    logp, old, adv, mask, ref, cu = _inputs(lengths, seed=5, p_mask=0.7)
    _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.1, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=str)
def test_no_tokens(backend, reduction, lengths):
    logp, old, adv, mask, _ref, cu = _inputs(lengths)
    loss, _grad, _metrics = _check(logp, old, adv, mask, cu, reduction=reduction)
    assert loss.item() == 0.0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_log_prob_differences(backend, reduction):
    # ratio overflows to inf / underflows to 0; the reference is the oracle (NaN gradients included).
    logp, old, adv, mask, ref, cu = _inputs(LENGTHS, seed=6, spread=40.0)
    _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.01, reduction=reduction, rtol=1e-4)
    # every token counts: the loss is finite or +-inf, not a NaN from a masked 0 * inf
    logp, old, adv, mask, ref, cu = _inputs(LENGTHS, seed=6, spread=40.0, p_mask=1.0)
    adv = adv.abs()  # overflowing ratios with A > 0 are clipped: finite loss, NaN-free except 0 * inf grads
    loss, _, _ = _check(logp, old, adv, mask, cu, reduction=reduction, rtol=1e-4)
    assert torch.isfinite(loss)
    # large but finite ratios
    logp, old, adv, mask, ref, cu = _inputs(LENGTHS, seed=7, spread=8.0)
    loss, grad, _ = _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.01, reduction=reduction, rtol=1e-4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_fractional_mask_weights(backend):
    logp, old, adv, _, _ref, cu = _inputs(LENGTHS, seed=8)
    mask = torch.rand(logp.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for reduction in REDUCTIONS:
        _check(logp, old, adv, mask, cu, reduction=reduction)


def test_low_precision_inputs(backend):
    logp, old, adv, mask, ref, cu = _inputs(LENGTHS, seed=9, dtype=torch.bfloat16)
    _check(logp, old.bfloat16(), adv.half(), mask, cu, ref_logp=ref.bfloat16(), beta=0.1, atol=1e-3, rtol=1e-2)


def test_beta_without_ref_logp_has_no_kl(backend):
    logp, old, adv, mask, ref, cu = _inputs(LENGTHS, seed=10)
    _, _, metrics = _check(logp, old, adv, mask, cu, beta=0.5)
    assert metrics["kl"].item() == 0.0
    _, _, metrics = _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.0)
    assert metrics["kl"].item() == 0.0


def test_kl_gradient(backend):
    # with A = 0 only the KL term contributes: d/dlogp beta * kl = beta * (1 - exp(ref - logp)) * m / D
    logp, old, _, mask, ref, cu = _inputs(LENGTHS, seed=11)
    adv = torch.zeros_like(logp)
    _, grad, metrics = _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.3)
    m = mask.float()
    expected = 0.3 * (1 - torch.exp(ref - logp)) * m / m.sum()
    torch.testing.assert_close(grad, expected)
    assert metrics["kl"].item() > 0


def test_only_logp_gets_a_gradient(backend):
    logp, old, adv, mask, _ref, cu = _inputs(LENGTHS, seed=12)
    old = old.clone().requires_grad_(True)
    lp = logp.clone().requires_grad_(True)
    loss, _ = bcr_kernels.policy_loss(lp, old, adv, mask, cu)
    loss.backward()
    assert lp.grad is not None
    assert old.grad is None  # documented: old_logp / ref_logp / advantages are constants


def test_deterministic(backend):
    logp, old, adv, mask, _ref, cu = _inputs([900, 400, 1700], seed=13)
    runs = [_run(bcr_kernels.policy_loss, logp, old, adv, mask, cu, reduction="seq_mean_token_mean") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_multi_block(backend):
    # more tokens than one Triton block, sequences straddling block edges
    logp, old, adv, mask, ref, cu = _inputs([1000, 1, 1500, 0, 700], seed=14, same_frac=0.3)
    for reduction in REDUCTIONS:
        _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.05, reduction=reduction, epsilon_high=0.3)


def test_argument_errors(backend):
    logp, old, adv, mask, _ref, cu = _inputs([3, 2])
    with pytest.raises(ValueError, match="reduction='dapo': must be one of"):
        bcr_kernels.policy_loss(logp, old, adv, mask, cu, bcr_kernels.Objective(reduction="dapo"))
    with pytest.raises(ValueError, match=r"advantages must be \[T\] = \[5\]"):
        bcr_kernels.policy_loss(logp, old, adv[:4], mask, cu)


def test_dispatch_takes_the_requested_path(backend, monkeypatch):
    calls = []
    real = loss_mod._PolicyLoss.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(loss_mod._PolicyLoss, "apply", spy)
    logp, old, adv, mask, _ref, cu = _inputs([3, 2])
    bcr_kernels.policy_loss(logp, old, adv, mask, cu)
    assert bool(calls) == (backend == "triton")


def test_returns_the_named_pair(backend):
    logp, old, adv, mask, _ref, cu = _inputs([3, 2])
    out = bcr_kernels.policy_loss(logp, old, adv, mask, cu)
    assert isinstance(out, bcr_kernels.PolicyLossOutput) and out.loss.dim() == 0 and set(out.metrics) == METRIC_KEYS


def test_backward_is_once_differentiable(backend):
    if backend != "triton":
        pytest.skip("the PyTorch path is plain autograd (twice differentiable)")
    logp, old, adv, mask, ref, cu = _inputs([6, 3], seed=3)
    lp = logp.clone().requires_grad_(True)
    loss, _ = bcr_kernels.policy_loss(lp, old, adv, mask, cu, bcr_kernels.Objective(beta=0.1), ref_logp=ref)
    w = torch.tensor(1.5, device=DEVICE, requires_grad=True)  # an upstream gradient that has a graph
    (g,) = torch.autograd.grad(loss * w, lp, create_graph=True)
    # d2 loss / d logp2 is not zero (the KL term): a clear error, not a silently missing term
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_launches_run_on_the_tensors_device(backend, monkeypatch):
    if backend != "triton":
        pytest.skip("only the Triton path launches kernels")
    rec = LaunchRecorder(monkeypatch, loss_mod, ["_policy_loss_fwd_kernel", "_policy_loss_bwd_kernel"])
    logp, old, adv, mask, ref, cu = _inputs([6, 3], seed=4)
    _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.1, reduction="seq_mean_token_mean")
    rec.check(["_policy_loss_fwd_kernel", "_policy_loss_bwd_kernel"])


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    torch.cuda.set_device(0)
    logp, old, adv, mask, ref, cu = (t.to("cuda:1") for t in _inputs([6, 3], seed=5))
    _check(logp, old, adv, mask, cu, ref_logp=ref, beta=0.1, reduction="seq_mean_token_mean")


# ------------------------------------------------------------------------------------------------
# TRL's GRPO loss, written in its padded [B, L] layout, as a peer check of the packed aggregation
# ------------------------------------------------------------------------------------------------


def _pad(x, lengths, fill=0.0):
    out = torch.full((len(lengths), max(lengths, default=0)), fill, dtype=x.dtype, device=x.device)
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n] = x[start : start + n]
        start += n
    return out


def _trl_padded_loss(logp, old, adv, mask, ref, beta, eps_low, eps_high, trl_loss_type, max_len, n_items):
    """TRL GRPOTrainer's per-token surrogate and aggregation on [B, L] tensors (masked padding)."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = mask.float()
    if trl_loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if trl_loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    if trl_loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)
    if trl_loss_type == "dapo":
        return (per_token_loss * m).sum() / n_items
    raise AssertionError(trl_loss_type)


# TRL loss_type -> (kernel reduction, uses normalizer)
_TRL_MAP = {
    "grpo": ("seq_mean_token_mean", False),
    "bnpo": ("token_mean", False),
    "dr_grpo": ("seq_mean_token_sum_norm", False),
    "dapo": ("token_mean", True),
}


@pytest.mark.parametrize("trl_loss_type", list(_TRL_MAP))
def test_matches_trl_formula_in_padded_layout(backend, trl_loss_type):
    lengths = [6, 9, 1, 4]  # TRL rows are never empty
    logp, old, adv_tok, mask, ref, cu = _inputs(lengths, seed=15, same_frac=0.2)
    seq_adv = torch.randn(len(lengths), device=DEVICE)  # one advantage per sequence, as in TRL
    adv_tok = torch.repeat_interleave(seq_adv, torch.tensor(lengths, device=DEVICE))
    max_len, n_items = 16, 40.0
    kernel_type, uses_norm = _TRL_MAP[trl_loss_type]
    lp = logp.clone().requires_grad_(True)
    loss, _ = bcr_kernels.policy_loss(
        lp, old, adv_tok, mask, cu, ref_logp=ref, normalizer=n_items if uses_norm else None,
        **with_objective(dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, reduction=kernel_type,
                              max_completion_length=max_len)),
    )
    loss.backward()
    lp_pad = _pad(logp, lengths).requires_grad_(True)
    trl = _trl_padded_loss(
        lp_pad, _pad(old, lengths), seq_adv[:, None], _pad(mask, lengths, False), _pad(ref, lengths),
        0.04, 0.2, 0.28, trl_loss_type, max_len, n_items,
    )
    trl.backward()
    torch.testing.assert_close(loss.detach(), trl.detach(), atol=1e-6, rtol=1e-5)
    grad_pad = _pad(lp.grad, lengths)
    torch.testing.assert_close(grad_pad, lp_pad.grad, atol=1e-6, rtol=1e-5)


def test_matches_installed_trl_compute_loss(backend):
    """Peer check against the installed TRL's own GRPOTrainer._compute_loss (padded layout)."""
    trl = pytest.importorskip("trl", reason="trl is a dev dependency: pip install -e '.[dev]'")
    from trl import GRPOTrainer

    fn = GRPOTrainer._compute_loss
    assert list(inspect.signature(fn).parameters)[:3] == ["self", "model", "inputs"], trl.__version__

    lengths = [5, 3, 7]
    logp, old, _, mask, _ref, cu = _inputs(lengths, seed=16, same_frac=0.2)
    seq_adv = torch.randn(len(lengths), device=DEVICE)
    adv_tok = torch.repeat_interleave(seq_adv, torch.tensor(lengths, device=DEVICE))
    L = max(lengths)
    lp_pad = _pad(logp, lengths)
    for trl_loss_type, (kernel_type, _uses_norm) in _TRL_MAP.items():
        fake = types.SimpleNamespace(
            beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type=trl_loss_type, max_completion_length=L,
            temperature=1.0, importance_sampling_level="token", top_entropy_quantile=1.0, use_vllm=False,
            vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
            model=types.SimpleNamespace(training=True),
            args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
            _metrics={"train": __import__("collections").defaultdict(list)}, off_policy_mask_threshold=None,
            aux_loss_enabled=False, _entropy_bonus_enabled=False,
            accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                              reduce=lambda x, **k: x, num_processes=1),
        )
        fake._get_per_token_logps_and_entropies = lambda *a, **k: (lp_pad, torch.zeros_like(lp_pad), None)
        inputs = {
            "prompt_ids": torch.zeros(len(lengths), 1, dtype=torch.long, device=DEVICE),
            "prompt_mask": torch.ones(len(lengths), 1, dtype=torch.long, device=DEVICE),
            "completion_ids": torch.zeros(len(lengths), L, dtype=torch.long, device=DEVICE),
            "completion_mask": _pad(mask, lengths, False).long(),
            "advantages": seq_adv,
            "old_per_token_logps": _pad(old, lengths),
            "num_items_in_batch": mask.sum(),
        }
        trl_loss = fn(fake, None, inputs)  # TRL 1.16 (the dev pin); every loss type: tests/rl/test_trl_parity.py
        ours, _ = bcr_kernels.policy_loss(
            logp, old, adv_tok, mask, cu, normalizer=float(mask.sum()) if trl_loss_type == "dapo" else None,
            **with_objective(dict(epsilon=0.2, epsilon_high=0.28, reduction=kernel_type, max_completion_length=L)),
        )
        torch.testing.assert_close(ours, trl_loss.float(), atol=1e-6, rtol=1e-5, msg=trl_loss_type)


# ------------------------------------------------------------------------------------------------
# Hypothesis: random packed layouts
# ------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    S = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 30), min_size=S, max_size=S))
    return {
        "lengths": lengths,
        "seed": draw(st.integers(0, 2**16)),
        "spread": draw(st.sampled_from([0.0, 0.05, 0.3, 2.0])),
        "p_mask": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "same_frac": draw(st.sampled_from([0.0, 0.5])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "beta": draw(st.sampled_from([0.0, 0.1])),
        "epsilon": draw(st.sampled_from([0.1, 0.2])),
        "epsilon_high": draw(st.sampled_from([None, 0.28])),
        "normalizer": draw(st.sampled_from([None, 13.0])),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_random_layouts(backend, case):
    logp, old, adv, mask, ref, cu = _inputs(
        case["lengths"], seed=case["seed"], spread=case["spread"], p_mask=case["p_mask"],
        same_frac=case["same_frac"],
    )
    _check(
        logp, old, adv, mask, cu, ref_logp=ref, beta=case["beta"], epsilon=case["epsilon"],
        epsilon_high=case["epsilon_high"], reduction=case["reduction"], normalizer=case["normalizer"],
        rtol=1e-4, atol=1e-5,
    )
