"""Tests for bcr.task.scoring: the one scoring function, and that rewards and the pool worker agree with it."""

from __future__ import annotations

import random

import pytest
import torch

from bcr.task.parsing import parse_completion
from bcr.rl.rewards import accuracy_reward, instance_rewards, score_completions
from bcr.task.scoring import CompletionScore, score_completion

CANONICAL = (
    "### Problem 1\n2+3=5\nAnswer 1: \\boxed{5}\n\n### Problem 2\nhalf\nAnswer 2: \\boxed{0.5}\n\n"
    "### Problem 3\nno idea\n"
)


def test_strict_scores_the_answer_format():
    pc = parse_completion(CANONICAL, 3)
    score = score_completion(pc, ["5", "\\frac{1}{2}", "7"])
    assert score == CompletionScore(["5", "0.5", None], [True, True, False])
    assert score.rewards == [1.0, 1.0, 0.0]
    assert score_completion(pc, ["6", "0.5", "7"]).correct == [False, True, False]


def test_flexible_reads_models_that_ignore_the_format():
    text = "4 + 6 = 10, so the final answer is 10."
    pc = parse_completion(text, 1)
    assert score_completion(pc, ["10"]).correct == [False]
    flexible = score_completion(pc, ["10"], text=text, extraction="flexible")
    assert flexible == CompletionScore(["10"], [True])


def test_bad_arguments_name_the_fix():
    pc = parse_completion(CANONICAL, 3)
    with pytest.raises(ValueError, match="extraction must be one of"):
        score_completion(pc, ["5", "1", "2"], extraction="lenient")
    with pytest.raises(ValueError, match="pass text="):
        score_completion(pc, ["5", "1", "2"], extraction="flexible")
    with pytest.raises(ValueError, match="parsed for 3 problems but has 2"):
        score_completion(pc, ["5", "1"])
    with pytest.raises(ValueError, match="pass texts="):
        instance_rewards([pc], ["5", "1", "2"], extraction="flexible")


def _completions(seed: int, count: int, n: int) -> tuple[list[str], list[list[str]], list[bool]]:
    rng = random.Random(seed)
    texts, refs, truncated = [], [], []
    for _ in range(count):
        values = [str(rng.randint(0, 9)) for _ in range(n)]
        parts = []
        for k, v in enumerate(values, start=1):
            style = rng.random()
            if style < 0.4:
                parts.append(f"### Problem {k}\nAnswer {k}: \\boxed{{{v}}}\n")
            elif style < 0.7:
                parts.append(f"### Problem {k}\nso the answer is {rng.choice([v, '3'])}.\n")
            elif style < 0.85:
                parts.append(f"### Problem {k}\nwe get {v} and {rng.randint(0, 9)}\n")
        text = "".join(parts)
        cut = rng.random() < 0.2
        texts.append(text[: rng.randint(0, len(text))] if cut else text)
        truncated.append(cut)
        refs.append(values)
    return texts, refs, truncated


@pytest.mark.parametrize("extraction", ["strict", "flexible"])
def test_every_reward_path_scores_through_score_completion(extraction):
    n = 3
    texts, refs, truncated = _completions(0, 200, n)
    parsed = [parse_completion(t, n, truncated=tr) for t, tr in zip(texts, truncated)]
    expected = torch.tensor(
        [score_completion(p, r, text=t, truncated=tr, extraction=extraction).rewards
         for p, r, t, tr in zip(parsed, refs, texts, truncated)]
    )
    got = instance_rewards(parsed, refs, extraction=extraction, texts=texts, truncated=truncated)
    assert torch.equal(got, expected)
    rows = accuracy_reward(None, texts, refs, truncated=truncated, extraction=extraction)
    assert torch.equal(torch.tensor(rows), expected)
    pcs, rewards = score_completions(texts, n, refs, truncated=truncated, extraction=extraction)
    assert torch.equal(rewards, expected)
    assert [p.answers for p in pcs] == [p.answers for p in parsed]
    if extraction == "strict":
        assert torch.equal(instance_rewards(parsed, refs), expected)  # the default stays strict


def test_flexible_finds_at_least_what_strict_finds():
    n = 3
    texts, refs, truncated = _completions(1, 300, n)
    parsed = [parse_completion(t, n, truncated=tr) for t, tr in zip(texts, truncated)]
    strict = instance_rewards(parsed, refs)
    flexible = instance_rewards(parsed, refs, extraction="flexible", texts=texts, truncated=truncated)
    assert bool((flexible >= strict).all())
    assert flexible.sum() > strict.sum()  # the corpus has "answer is" and last-number sections
