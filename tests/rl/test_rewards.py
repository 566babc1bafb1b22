"""Tests for bcr.rl.rewards: rewards from parsed completions, TRL-style reward function, advantages
against hand-computed values for both modes and all scalings, length-penalty baselines, and the
process-pool reward stage."""

from __future__ import annotations

import math

import pytest
import torch

from bcr.task.parsing import parse_completion
from bcr.rl.rewards import (
    accuracy_reward,
    compute_advantages,
    instance_rewards,
    length_penalty_rewards,
    score_completions,
)

EPS = 1e-4
R = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # G = 3, N = 2


def close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ rewards


def test_instance_rewards():
    texts = [
        "### Problem 1\nAnswer 1: \\boxed{4}\n### Problem 2\nAnswer 2: \\boxed{\\frac{1}{2}}",
        "Answer 2: 0.5\nAnswer 1: 5",
        "I don't know",
        "Answer 1: 4,000",
    ]
    parsed = [parse_completion(t, 2) for t in texts]
    r = instance_rewards(parsed, ["4", "0.5"])
    assert r.dtype == torch.float32 and r.shape == (4, 2)
    close(r, [[1, 1], [0, 1], [0, 0], [0, 0]])
    # per-completion references
    r2 = instance_rewards(parsed[:2], [["4", "1/2"], ["5", "1"]])
    close(r2, [[1, 1], [1, 0]])
    with pytest.raises(ValueError, match="n_problems"):
        instance_rewards(parsed, ["4", "0.5", "1"])
    with pytest.raises(ValueError, match="answer lists"):
        instance_rewards(parsed, [["4", "1"]])


def test_accuracy_reward_trl_style():
    completions = [
        "### Problem 1\nAnswer 1: \\boxed{3}\n### Problem 2\nAnswer 2: \\boxed{7}",
        [{"role": "assistant", "content": "Answer 1: \\boxed{3}\nAnswer 2: \\boxed{8}"}],
        "The answer is \\boxed{10}.",
        "Answer 1: \\boxed{3}\nAnswer 2: 7",
    ]
    answer = [["3", "7"], ["3", "7"], ["10"], ["3", "7"]]
    out = accuracy_reward(prompts=["p"] * 4, completions=completions, answer=answer,
                          truncated=[False, False, False, True])
    assert out == [[1.0, 1.0], [1.0, 0.0], [1.0], [1.0, 0.0]]
    assert accuracy_reward(None, ["\\boxed{2}"], ["2"]) == [[1.0]]
    with pytest.raises(ValueError, match="n_problems"):
        accuracy_reward(None, ["x"], [["1", "2"]], n_problems=[3])
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(None, ["x", "y"], [["1"]])


def test_score_completions_pool_matches_serial():
    texts = []
    answers = []
    for i in range(40):
        texts.append(f"### Problem 1\nAnswer 1: \\boxed{{{i}}}\n### Problem 2\nAnswer 2: \\boxed{{\\frac{{{i}}}{{2}}}}")
        answers.append([str(i if i % 3 else i + 1), f"{i / 2}"])
    p0, r0 = score_completions(texts, 2, answers, workers=0)
    p2, r2 = score_completions(texts, 2, answers, workers=2)
    assert torch.equal(r0, r2)
    assert [p.answers for p in p0] == [p.answers for p in p2]
    assert r0[:, 1].sum() == 40 and r0[:, 0].sum() == sum(1 for i in range(40) if i % 3)
    with pytest.raises(ValueError):
        score_completions(texts, 3, answers)


# ------------------------------------------------------------------------------ advantages

S3 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 1] and of [0, 0, 1]


def test_group_instance():
    (a,) = compute_advantages([R])
    close(a, [[(1 / 3) / (S3 + EPS), (-1 / 3) / (S3 + EPS)],
              [(-2 / 3) / (S3 + EPS), (-1 / 3) / (S3 + EPS)],
              [(1 / 3) / (S3 + EPS), (2 / 3) / (S3 + EPS)]])


def test_batch_instance():
    r2 = torch.tensor([[1.0], [1.0]])  # second prompt, G = 2, N = 1: zero advantage after centring
    a, b = compute_advantages([R, r2], scale_rewards="batch")
    # all 8 rewards [1,0,0,0,1,1,1,1]: mean 5/8, unbiased var = (5*(3/8)^2 + 3*(5/8)^2)/7
    std = math.sqrt((5 * (3 / 8) ** 2 + 3 * (5 / 8) ** 2) / 7)
    close(a, [[(1 / 3) / (std + EPS), (-1 / 3) / (std + EPS)],
              [(-2 / 3) / (std + EPS), (-1 / 3) / (std + EPS)],
              [(1 / 3) / (std + EPS), (2 / 3) / (std + EPS)]])
    close(b, [[0.0], [0.0]])


def test_none_instance():
    (a,) = compute_advantages([R], scale_rewards="none")
    close(a, [[1 / 3, -1 / 3], [-2 / 3, -1 / 3], [1 / 3, 2 / 3]])


def test_group_sequence():
    (a,) = compute_advantages([R], advantage_mode="sequence")
    # per-sample means [0.5, 0, 1]: centred [0, -0.5, 0.5], unbiased std 0.5
    close(a, [[0, 0], [-0.5 / (0.5 + EPS)] * 2, [0.5 / (0.5 + EPS)] * 2])


def test_batch_sequence_two_prompts():
    r2 = torch.tensor([[1.0], [0.0]])
    a, b = compute_advantages([R, r2], scale_rewards="batch", advantage_mode="sequence")
    # all per-sample means [0.5, 0, 1, 1, 0]: unbiased std = sqrt(1/4) = 0.5
    close(a, [[0, 0], [-0.5 / (0.5 + EPS)] * 2, [0.5 / (0.5 + EPS)] * 2])
    close(b, [[0.5 / (0.5 + EPS)], [-0.5 / (0.5 + EPS)]])


def test_none_sequence():
    (a,) = compute_advantages([R], scale_rewards="none", advantage_mode="sequence")
    close(a, [[0, 0], [-0.5, -0.5], [0.5, 0.5]])


def test_ragged_n_and_g1():
    a, b = compute_advantages([torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[0.0], [1.0]])])
    close(a, [[0.0, 0.0, 0.0]])  # G = 1: std taken as 0, advantage 0
    close(b, [[-0.5 / (math.sqrt(0.5) + EPS)], [0.5 / (math.sqrt(0.5) + EPS)]])


def test_constant_group_is_zero():
    (a,) = compute_advantages([torch.ones(4, 3)])
    close(a, torch.zeros(4, 3))


def test_matches_trl_formula():
    torch.manual_seed(0)
    r = torch.rand(8, 1)
    (a,) = compute_advantages([r])
    # TRL: (r - mean_grouped) / (std_grouped + eps) with torch.std (unbiased)
    close(a[:, 0], (r[:, 0] - r[:, 0].mean()) / (r[:, 0].std() + EPS))


def test_advantage_validation():
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages([R], scale_rewards="grp")
    with pytest.raises(ValueError, match="advantage_mode"):
        compute_advantages([R], advantage_mode="token")
    with pytest.raises(ValueError, match=r"\[G, N\]"):
        compute_advantages([torch.ones(3)])
    with pytest.raises(ValueError, match=r"\[G, N\]"):
        compute_advantages([torch.ones(0, 2)])
    with pytest.raises(TypeError, match="list"):
        compute_advantages(R)
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages([torch.tensor([[float("nan")], [1.0]])])
    with pytest.raises(ValueError, match="eps"):
        compute_advantages([R], eps=-1)
    assert compute_advantages([]) == []


# ------------------------------------------------------------------------------ length penalties


def test_kimi_length_reward():
    close(length_penalty_rewards([100, 200, 300], [1, 1, 0]), [0.5, 0.0, -0.5])
    close(length_penalty_rewards([100, 200, 300], [0, 0, 1]), [0.0, 0.0, -0.5])
    close(length_penalty_rewards([100, 150, 300], [True, True, True]), [0.5, 0.25, -0.5])
    close(length_penalty_rewards([7, 7], [1, 0]), [0.0, 0.0])


def test_linear_length_reward_charges_every_token_of_every_completion():
    close(length_penalty_rewards([100, 300, 0], [1, 0, 1], method="linear", alpha=1 / 200), [-0.5, -1.5, 0.0])


def test_l1_length_reward():
    close(length_penalty_rewards([100, 300], [1, 0], method="l1", target_length=200, alpha=0.001), [0.9, -0.1])
    with pytest.raises(ValueError, match="target_length"):
        length_penalty_rewards([1], [1], method="l1")
    with pytest.raises(ValueError, match="method"):
        length_penalty_rewards([1], [1], method="x")
    with pytest.raises(ValueError):
        length_penalty_rewards([1, 2], [1])
