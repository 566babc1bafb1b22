"""The DAPO-Math-17k schema (verl's RL format): chat-message ``prompt``, ``reward_model.ground_truth``."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bcr.data.problems import DataError, load_problems

INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
REMINDER = '\n\nRemember to put your answer on its own line after "Answer:".'
ROWS = [
    {"data_source": "math_dapo",
     "prompt": [{"role": "user", "content": INSTRUCTION + "Find the sum of all $x$ with $x^2 = 49$." + REMINDER}],
     "ability": "MATH", "reward_model": {"ground_truth": "0", "style": "rule-lean"},
     "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"}},
    {"data_source": "math_dapo",
     "prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How many primes are below $20$?\n\nCount them."}],
     "ability": "MATH", "reward_model": {"ground_truth": 8, "style": "rule"}, "extra_info": {"index": 7}},
]


def _check(problems):
    assert [p.id for p in problems] == ["9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079", "7"]
    assert problems[0].problem == "Find the sum of all $x$ with $x^2 = 49$."  # DAPO's answer-format wrapper removed
    assert problems[1].problem == "How many primes are below $20$?\n\nCount them."  # no wrapper: kept whole
    assert [p.answer for p in problems] == ["0", "8"]
    assert problems[0].meta["data_source"] == "math_dapo" and problems[0].meta["ability"] == "MATH"


def test_dapo_rows_from_jsonl(tmp_path):
    path = tmp_path / "dapo-math-17k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check(load_problems(path))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="reading Parquet needs pyarrow")
def test_dapo_rows_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "reward_model": {**r["reward_model"], "ground_truth": str(r["reward_model"]["ground_truth"])},
             "extra_info": {"index": str(r["extra_info"]["index"])}} for r in ROWS]
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    _check(load_problems(path))


def test_dapo_row_without_ground_truth_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**ROWS[0], "reward_model": {"style": "rule"}}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'answer'"):
        load_problems(path)
