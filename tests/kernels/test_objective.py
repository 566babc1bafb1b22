"""``bcr_kernels.Objective``: keyword-only, frozen, checked once when built, the one options argument of
every policy-loss entry point; the old keyword form still works, with a FutureWarning."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import pytest
import torch

import bcr_kernels
from bcr_kernels import Objective, ObjectiveError, fused_linear_policy_loss, policy_loss, reference
from bcr_kernels.objective import IS_MODES, LEVELS, OBJECTIVES, check_rollout_correction

ENTRY_POINTS = [policy_loss, fused_linear_policy_loss, reference.policy_loss]


def test_exported_keyword_only_and_frozen():
    assert bcr_kernels.Objective is bcr_kernels.objective.Objective
    assert {"Objective", "ObjectiveError", "objective"} <= set(bcr_kernels.__all__)
    with pytest.raises(TypeError):
        Objective("sapo")  # positional: reordering the fields can never swap values silently
    o = Objective(kind="sapo", epsilon=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.epsilon = 0.3
    assert o == Objective(epsilon=0.1, kind="sapo") and hash(o) == hash(Objective(epsilon=0.1, kind="sapo"))
    assert Objective() == Objective(kind="clip", reduction="token_mean", epsilon=0.2, importance_sampling_clip_max=3.0)


def test_numbers_are_stored_as_floats():
    o = Objective(epsilon=1, beta=0, max_completion_length=8)
    assert type(o.epsilon) is float and type(o.beta) is float and o.max_completion_length == 8
    assert (o.lo, o.hi, o.eps_high) == (0.0, 2.0, 1.0)


@pytest.mark.parametrize("options,field", [
    ({"kind": "ppo"}, "kind"), ({"reduction": "dapo"}, "reduction"),
    ({"importance_sampling_level": "bundle"}, "importance_sampling_level"),
    ({"importance_sampling_mode": "seq"}, "importance_sampling_mode"),
    ({"importance_sampling_mode": "token_truncate", "importance_sampling_clip_max": None}, "importance_sampling_mode"),
    ({"kind": "vespo", "importance_sampling_mode": "sequence_mask"}, "importance_sampling_mode"),
    ({"importance_sampling_clip_min": 3.0}, "importance_sampling_clip_min"),
    ({"importance_sampling_clip_max": 0.0}, "importance_sampling_clip_max"),
    ({"sapo_temperature_pos": 0.0}, "sapo_temperature_pos"), ({"epsilon": -0.1}, "epsilon"),
    ({"epsilon_high": -0.1}, "epsilon_high"), ({"delta": 0.0}, "delta"), ({"vespo_k_neg": -1.0}, "vespo_k_neg"),
    ({"beta": -0.1}, "beta"), ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"), ({"top_entropy_quantile": -0.1}, "top_entropy_quantile"),
    ({"epsilon": math.nan}, "epsilon"), ({"entropy_coef": math.inf}, "entropy_coef"), ({"epsilon": "0.2"}, "epsilon"),
    ({"max_completion_length": 2.5}, "max_completion_length"), ({"max_completion_length": 0}, "max_completion_length"),
    ({"use_bias_correction_kl": 1}, "use_bias_correction_kl"), ({"kind": None}, "kind"),
])
def test_bad_options_fail_when_built_naming_the_option(options, field):
    with pytest.raises(ObjectiveError, match=f"^{field}=") as err:
        Objective(**options)
    assert err.value.field == field and isinstance(err.value, ValueError)


def test_the_allowed_values_and_the_rollout_check_alone():
    assert OBJECTIVES == ("clip", "cispo", "sapo", "vespo") and LEVELS == ("token", "sequence", "instance")
    assert len(IS_MODES) == 6 and all(Objective(importance_sampling_mode=m) for m in IS_MODES)
    check_rollout_correction("token_mask", None, None)  # mask modes need no bound
    with pytest.raises(ObjectiveError, match="clip_min or"):
        check_rollout_correction("sequence_truncate", None, None)


def test_every_entry_point_takes_tensors_then_one_objective():
    """The tensors are positional, then ``objective``; everything else is keyword-only, and the three
    entry points share their per-call keywords."""
    calls = []
    for op in ENTRY_POINTS:
        params = inspect.signature(op).parameters
        positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional[-1] == "objective", op.__qualname__
        keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert not keywords & {f.name for f in dataclasses.fields(Objective)}, op.__qualname__
        calls.append(keywords)
    shared = {"ref_logp", "segment_ids", "sampling_logp", "normalizer", "entropy_weight"}
    assert all(shared <= k for k in calls)
    assert len(calls[1]) <= 11  # fused: the per-call tensors and the LM head's options (was 26 keywords)


def _data():
    g = torch.Generator().manual_seed(0)
    T, H, V = 11, 6, 13
    old = -torch.rand(T, generator=g) * 3
    logp = old + 0.3 * torch.randn(T, generator=g)
    adv, mask = torch.randn(T, generator=g), (torch.rand(T, generator=g) < 0.8).float()
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    hidden, weight = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
    return logp, old, adv, mask, cu, hidden, weight, torch.randint(0, V, (T,), generator=g)


OLD_KEYWORDS = {"objective": "sapo", "epsilon": 0.1, "reduction": "seq_mean_token_mean", "beta": 0.0}
SAME = Objective(kind="sapo", epsilon=0.1, reduction="seq_mean_token_mean")


def test_old_keywords_warn_and_give_the_same_loss():
    logp, old, adv, mask, cu, hidden, weight, targets = _data()
    for op in (policy_loss, reference.policy_loss):
        with pytest.warns(FutureWarning, match="Objective"):
            got = op(logp, old, adv, mask, cu, **OLD_KEYWORDS)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            want = op(logp, old, adv, mask, cu, SAME)
        torch.testing.assert_close(got.loss, want.loss)
    with pytest.warns(FutureWarning, match="Objective"):
        got = fused_linear_policy_loss(hidden, weight, targets, adv, mask, cu, **OLD_KEYWORDS)
    want = fused_linear_policy_loss(hidden, weight, targets, adv, mask, cu, SAME)
    torch.testing.assert_close(got.loss, want.loss)
    assert not torch.allclose(want.loss, fused_linear_policy_loss(hidden, weight, targets, adv, mask, cu).loss)


def test_old_keywords_are_checked_too():
    logp, old, adv, mask, cu, *_ = _data()
    with pytest.raises(TypeError, match="not also"):
        policy_loss(logp, old, adv, mask, cu, SAME, epsilon=0.3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        policy_loss(logp, old, adv, mask, cu, epsilonn=0.3)
    with pytest.warns(FutureWarning), pytest.raises(ObjectiveError, match="epsilon"):
        policy_loss(logp, old, adv, mask, cu, epsilon=-1.0)
