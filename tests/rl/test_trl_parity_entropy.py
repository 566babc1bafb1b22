"""Parity of TRL 1.16's entropy controls (``top_entropy_quantile``, the entropy bonus ``entropy_coef`` and
its adaptive control) with TRL's own ``GRPOTrainer._compute_loss``: loss and the LM head's gradients.

TRL's method runs on a stub trainer holding only the attributes it reads, in TRL's padded ``[B, L]``
layout, with the log-probs and entropies of materialised logits from TRL's own
``selective_log_softmax_and_entropy`` (differentiable, as TRL's fused LM head gives them). Ours runs the
trainer's two loss paths on the packed tokens with ``BCRConfig.policy_objective()``:
``fused_linear_policy_loss`` (``num_iterations == 1``: log-probs and entropies per chunk, never the
``[T, V]`` logits) and ``fused_linear_logprobs`` + ``policy_loss`` (``num_iterations > 1``: old log-probs),
with the normaliser the trainer gives each loss type on one process. The adaptive coefficient is driven
over several optimizer steps by ``bcr.rl.entropy_control`` on our side and by TRL's own controller inside
``_compute_loss`` on theirs.

trl is a dev dependency (``make test`` installs ``trl==1.16.0``); the test fails, not skips, if the
installed TRL cannot be driven this way.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import types

import pytest
import torch

import bcr_kernels
from bcr.rl.config import LOSS_TYPES, BCRConfig
from bcr.rl.entropy_control import EntropyControl
from bcr.rl.trainer import _bonus_entropy

trl = pytest.importorskip("trl", reason="trl is a dev dependency: pip install -e '.[dev]'")
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax_and_entropy  # noqa: E402

LENGTHS = [5, 3, 7, 1]  # TRL rows are never empty; a one-token completion
H, V = 8, 29
ENTROPY = {"mask": {"top_entropy_quantile": 0.3}, "bonus": {"entropy_coef": 0.05},
           "both": {"top_entropy_quantile": 0.5, "entropy_coef": 0.1}}


@pytest.fixture
def torch_path(monkeypatch):
    """The PyTorch path of the kernels: every loss type (``test_triton_path`` runs the head's Triton
    kernels on a case per plan; the loss-type logic is the same vector code on both paths)."""
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")


@pytest.fixture
def triton_path(monkeypatch):
    from bcr_kernels._dispatch import use_triton

    monkeypatch.setenv("BCR_KERNEL_BACKEND", "auto")
    if not use_triton(torch.empty(1)):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")


def _pad(x, fill=0.0):
    out = x.new_full((len(LENGTHS), max(LENGTHS), *x.shape[1:]), fill)
    start = 0
    for i, n in enumerate(LENGTHS):
        out[i, :n] = x[start : start + n]
        start += n
    return out


def _data(seed, scale=1.0):
    """The LM head's inputs and the loss's constants of one batch; ``scale`` sharpens the logits."""
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    head = (torch.randn(T, H, generator=g) * scale, torch.randn(V, H, generator=g) * 0.7,
            torch.randn(V, generator=g) * 0.2)
    targets = torch.randint(0, V, (T,), generator=g)
    mask = torch.rand(T, generator=g) < 0.85
    mask[T - 1] = True  # the one-token completion counts
    seq_adv = torch.randn(len(LENGTHS), generator=g)
    noise = torch.randn(3, T, generator=g)
    return head, targets, mask, seq_adv, noise


def _stub(cfg: BCRConfig, lp_pad, ent_pad):
    args = types.SimpleNamespace(
        delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl, steps_per_generation=1,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg, entropy_target=cfg.entropy_target,
        entropy_coef_delta=cfg.entropy_coef_delta, entropy_coef_min=cfg.entropy_coef_min,
        entropy_coef_max=cfg.entropy_coef_max,
    )
    identity = lambda x, **k: x  # noqa: E731  (one process: gather / reduce / pad are the identity)
    stub = types.SimpleNamespace(
        args=args, beta=cfg.beta, epsilon_low=cfg.epsilon,
        epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
        max_completion_length=cfg.max_completion_length, off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        top_entropy_quantile=cfg.top_entropy_quantile, entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=cfg.use_adaptive_entropy, _entropy_bonus_enabled=cfg.entropy_bonus,
        _last_world_entropy=float("inf"), _entropy_window_stats=None,
        use_vllm=False, vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        aux_loss_enabled=False, model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, reduce=identity,
                                          pad_across_processes=identity, num_processes=1, sync_gradients=True),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    stub.get_high_entropy_mask = functools.partial(GRPOTrainer.get_high_entropy_mask, stub)
    stub.set_inputs = lambda lp, ent: setattr(stub, "_get_per_token_logps_and_entropies",
                                              lambda *a, **k: (lp, ent, None))
    stub.set_inputs(lp_pad, ent_pad)
    return stub


def _theirs(stub, cfg: BCRConfig, head, targets, mask, seq_adv, old=None, ref=None):
    """TRL's loss on materialised logits, and the gradients of the head's leaves."""
    leaves = [t.clone().requires_grad_(True) for t in head]
    logits = torch.nn.functional.linear(_pad(leaves[0]), leaves[1], leaves[2])
    real = _pad(torch.ones(len(targets), dtype=torch.long))
    lp_pad, ent_pad = selective_log_softmax_and_entropy(logits, _pad(targets), temperature=cfg.temperature,
                                                        row_mask=real)
    stub.set_inputs(lp_pad, ent_pad)
    B, L = len(LENGTHS), max(LENGTHS)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, L, dtype=torch.long), "completion_mask": _pad(mask, False).long(),
              "advantages": seq_adv, "num_items_in_batch": mask.sum().float()}
    if old is not None:
        inputs["old_per_token_logps"] = _pad(old)
    if ref is not None:
        inputs["ref_per_token_logps"] = _pad(ref)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.detach().float(), [t.grad for t in leaves]


def _ours(cfg: BCRConfig, objective, head, targets, mask, seq_adv, old=None, ref=None):
    """The trainer's loss path (fused without old log-probs, else two passes): (loss, grads, metrics, entropy)."""
    leaves = [t.clone().requires_grad_(True) for t in head]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    adv = torch.repeat_interleave(seq_adv, torch.tensor(LENGTHS))
    m = mask.float()
    normalizer = float(m.sum()) if cfg.loss_type in ("dapo", "cispo", "vespo") else None  # BCRTrainer._normalizer
    if old is None:
        out = bcr_kernels.fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, m, cu, objective,
                                                   bias=leaves[2], ref_logp=ref, normalizer=normalizer,
                                                   temperature=cfg.temperature, chunk_tokens=5, return_entropy=True)
        loss, metrics, entropy = out.loss, out.metrics, out.entropy
    else:
        lp, entropy = bcr_kernels.fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2],
                                                        temperature=cfg.temperature, chunk_tokens=5,
                                                        return_entropy=True)
        loss, metrics = bcr_kernels.policy_loss(lp, old, adv, m, cu, objective, ref_logp=ref, entropy=entropy,
                                                normalizer=normalizer)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves], metrics, entropy.detach()


def _compare(cfg: BCRConfig, seed=0, two_pass=False):
    assert trl.__version__ == "1.16.0", f"parity is pinned to TRL 1.16.0, found {trl.__version__}"
    head, targets, mask, seq_adv, noise = _data(seed)
    with torch.no_grad():
        lp = bcr_kernels.reference.fused_linear_logprobs(*head[:2], targets, bias=head[2],
                                                         temperature=cfg.temperature).logp
    old = lp + 0.2 * noise[0] if two_pass else None
    ref = lp + 0.3 * noise[1] if cfg.beta else None
    theirs, their_grads = _theirs(_stub(cfg, None, None), cfg, head, targets, mask, seq_adv, old, ref)
    ours, our_grads, _, _ = _ours(cfg, cfg.policy_objective(), head, targets, mask, seq_adv, old, ref)
    what = f"{cfg.loss_type} level={cfg.importance_sampling_level} rho={cfg.top_entropy_quantile} " \
           f"coef={cfg.entropy_coef} beta={cfg.beta} two_pass={two_pass}"
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=what)
    for name, a, b in zip(("hidden", "weight", "bias"), our_grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"{name}: {what}")
    return ours


def _cfg(**kw):
    return BCRConfig(**{"max_completion_length": 8, "epsilon": 0.2, "epsilon_high": 0.28, "temperature": 0.7, **kw})


@pytest.mark.parametrize("terms", list(ENTROPY))
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_fused(torch_path, loss_type, terms):
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # CISPO's epsilon_high caps the IS weight itself
    level = "sequence" if loss_type == "luspo" else "token"
    _compare(_cfg(loss_type=loss_type, importance_sampling_level=level, epsilon_high=eps_high, **ENTROPY[terms]))


@pytest.mark.parametrize("terms", list(ENTROPY))
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "sapo", "vespo"])
def test_two_pass_with_old_logprobs_and_kl(torch_path, loss_type, terms):
    for level in ("token", "sequence"):
        _compare(_cfg(loss_type=loss_type, importance_sampling_level=level, beta=0.04, **ENTROPY[terms]), seed=1,
                 two_pass=True)
    _compare(_cfg(loss_type=loss_type, beta=0.04, **ENTROPY[terms]), seed=2)  # fused, KL: the chunk plan


def test_triton_path(triton_path):
    """The head's Triton kernels (entropies and their gradient per chunk): the bonus alone (upfront plan),
    with the KL term (chunk plan), the mask (two passes), and the two-pass trainer path."""
    _compare(_cfg(loss_type="dapo", entropy_coef=0.05))
    _compare(_cfg(loss_type="grpo", beta=0.04, **ENTROPY["both"]), seed=1)
    _compare(_cfg(loss_type="sapo", beta=0.04, entropy_coef=0.05), seed=2)
    _compare(_cfg(loss_type="vespo", beta=0.04, **ENTROPY["both"]), seed=3, two_pass=True)


def test_the_entropy_terms_change_the_loss(torch_path):
    """(The parity above can fail: each term moves the loss away from the plain one.)"""
    plain = _compare(_cfg(loss_type="dapo"))
    for terms in ENTROPY.values():
        assert not torch.allclose(_compare(_cfg(loss_type="dapo", **terms)), plain)


def test_adaptive_coefficient_over_steps(torch_path):
    """Five optimizer steps of adaptive control against TRL's own controller: the coefficient each step
    applies (none before the first measurement, none while the entropy is above the target), the loss,
    the gradients, and the coefficient logged as ``entropy_coef``. The batches alternate between soft
    and sharp logits, so the entropy crosses the target both ways."""
    cfg = _cfg(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.02, entropy_coef_delta=0.01,
               entropy_coef_max=0.025, entropy_target=2.0, top_entropy_quantile=0.5)
    control, stub = EntropyControl.from_config(cfg), _stub(cfg, None, None)
    applied, coefs = [], []
    for step, scale in enumerate([0.3, 3.0, 3.0, 0.3, 3.0]):  # soft logits: entropy ~3.3 nats; sharp: < 2
        head, targets, mask, seq_adv, _ = _data(10 + step, scale)
        theirs, their_grads = _theirs(stub, cfg, head, targets, mask, seq_adv)
        objective = dataclasses.replace(cfg.policy_objective(), entropy_coef=control.applied())
        ours, our_grads, metrics, entropy = _ours(cfg, objective, head, targets, mask, seq_adv)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=f"step {step}")
        for a, b in zip(our_grads, their_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"step {step}")
        control.update(*reversed(_bonus_entropy(objective, metrics, entropy, mask.float())))
        assert control.coef == pytest.approx(stub.entropy_coef, abs=1e-12)
        assert stub._metrics["train"]["entropy_coef"][-1] == pytest.approx(control.coef, abs=1e-12)
        assert control.last_entropy == pytest.approx(stub._last_world_entropy, rel=1e-5)
        applied.append(objective.entropy_coef)
        coefs.append(control.coef)
    assert applied == pytest.approx([0.0, 0.0, 0.02, 0.025, 0.0])
    assert coefs == pytest.approx([0.01, 0.02, 0.025, 0.015, 0.025])  # down, up, up to the cap, down, up
    assert not math.isinf(control.last_entropy)


def test_entropy_option_defaults_are_trls():
    from trl import GRPOConfig

    theirs = {f.name: f.default for f in GRPOConfig.__dataclass_fields__.values()}
    ours = BCRConfig()
    for name in ("top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "entropy_coef_min",
                 "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
        assert getattr(ours, name) == theirs[name], name
