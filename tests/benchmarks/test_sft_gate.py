"""benchmarks/sft_gate.py on a tiny demo: the SFT model's answers counted by difficulty and style."""

from __future__ import annotations

import json

import pytest

from bcr.demo import run_demo
from bcr.demo.config import DemoConfig
from bcr.runtime.dataclass_cli import load_dataclass
from benchmarks import sft_gate

pytestmark = pytest.mark.slow  # a whole (tiny) SFT stage

TASK = ["task.problem_steps=[1,2]", "task.held_out_every=2", "task.num_train_problems=64", "task.num_eval_problems=6"]
TINY = [*TASK, "model.vocab_size=400", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=1", "sft.steps=4", "sft.style_steps=2", "sft.batch_size=4", "progress=false",
        "eval.per_problem_budget=12", "stop_after=sft"]


def test_gate_counts_every_sample_by_difficulty_and_style(tmp_path, capsys):
    run_demo(load_dataclass(DemoConfig, overrides=[f"output_dir={tmp_path}", *TINY]))
    assert sft_gate.main([str(tmp_path), *TASK, "eval.per_problem_budget=12", "--samples", "3"]) == 0
    gate = json.loads((tmp_path / "sft_gate" / "sft_gate.json").read_text())
    assert gate["samples"] == 3 and sum(gate["problems"].values()) == 6
    per = gate["by_n"]["1"]
    assert set(per) <= {"1 op", "2 ops"} and set(per) == set(gate["problems"])
    for label, styles in per.items():
        # every sample of every problem of that difficulty is counted once, in some style
        assert sum(k for _, _, k in styles.values()) == 3 * gate["problems"][label]
        assert sum(share for share, _, _ in styles.values()) == pytest.approx(1.0)
        assert all(0.0 <= acc <= 1.0 for _, acc, _ in styles.values())
    assert "N = 1," in capsys.readouterr().out


def test_direct_recall_measures_trained_and_held_out_texts_and_training_raises_recall(tmp_path, capsys):
    """benchmarks/direct_recall.py: every one-operation text counted once, on the demo's split; training
    on the training texts' direct answers raises their recall."""
    from benchmarks import direct_recall

    task = ["task.problem_steps=[1,2]", "task.phrasings=3", "task.num_train_problems=64", "task.num_eval_problems=6"]
    tiny = [*task, *TINY[len(TASK):]]
    run_demo(load_dataclass(DemoConfig, overrides=[f"output_dir={tmp_path}", *tiny]))
    assert direct_recall.main([str(tmp_path), *task, "--train-steps", "100", "--lr", "1e-2"]) == 0
    result = json.loads((tmp_path / "direct_recall.json").read_text())
    cfg = load_dataclass(DemoConfig, overrides=task)
    train, held = direct_recall.one_operation_texts(cfg)
    # one-digit + and - facts: 81 + 45, each in up to 3 wordings, split by the demo's own hash
    assert (result["training_texts"], result["held_out_texts"]) == (len(train), len(held))
    assert 126 < len(train) + len(held) <= 3 * 126 and held and not {p.problem for p in train} & {p.problem for p in held}
    first, last = result["rows"][0], result["rows"][-1]
    assert [r["step"] for r in result["rows"]] == [0, 100]
    assert last["training"] > first["training"] + 0.05  # 0 -> 0.11 for this 1-layer, width-32 model
    assert "held-out" in capsys.readouterr().out
