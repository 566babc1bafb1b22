"""The embedded demo in miniature: every stage runs on tiny sizes, writes its outputs, and
``from_stage`` reuses the checkpoints of the stages before it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bcr.dataclass_cli import ConfigError
from bcr.demo import STAGE_FILE, DemoConfig, demo_summary, run_demo

TINY = {
    "num_train_problems": 96, "num_eval_problems": 8, "vocab_size": 400, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
    "num_kv_heads": 1, "sft_steps": 4, "sft_batch_size": 8, "rl_steps": 1, "bundles_per_step": 2, "num_generations": 2,
    "rl_n_values": [2, 3], "max_completion_length": 24, "length_max_completion_length": 16, "eval_n_values": [1, 2],
    "eval_batch_size": 8, "progress": False, "length_baseline": True,
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(output_dir=str(out), **TINY)
    records = run_demo(cfg)
    return cfg, out, records


def test_every_stage_writes_its_outputs(demo_run):
    cfg, out, records = demo_run
    assert list(records) == ["sft", "bcr", "length", "eval"]
    for stage in records:
        state = json.loads((out / stage / STAGE_FILE).read_text())
        assert state["stage"] == stage and state["seconds"] > 0
    # models are HF directories with their tokenizer
    for stage in ("sft", "bcr", "length"):
        model_dir = Path(records[stage]["model"])
        assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "sft" / "metrics.jsonl").read_text().count("\n") == cfg.sft_steps
    assert (out / "bcr" / "metrics.jsonl").read_text().count("\n") == cfg.rl_steps
    # the sweep: results for every model and N, a report, plots and the demo summary
    ev = out / "eval"
    assert (ev / "report.md").is_file() and (ev / "summary.json").is_file()
    assert list(ev.glob("*.png"))
    results = [json.loads(line) for line in (ev / "results.jsonl").read_text().splitlines()]
    assert {(r["model"], r["n_problems"]) for r in results} == {
        (m, n) for m in ("verbose-sft", "bcr", "length-penalty") for n in cfg.eval_n_values}
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["models"]) == {"verbose-sft", "bcr", "length-penalty"}
    assert [c["model"] for c in summary["free_lunch_n1"]] == ["bcr", "length-penalty"]
    for m in summary["models"].values():
        assert m["n"] == cfg.eval_n_values and len(m["tokens_per_problem"]) == len(cfg.eval_n_values)


def test_every_stage_uses_the_numbered_format_at_n1(demo_run):
    """numbered_single (the demo default) reaches the SFT targets, the RL config and the sweep's prompts."""
    from bcr.demo import _rl_config, make_task, sft_example
    from bcr.evaluation import prompt_hash
    from bcr.prompts import render_prompt
    from bcr.tokenizer_loading import load_tokenizer

    cfg, out, _ = demo_run
    assert cfg.numbered_single and cfg.template.numbered_single
    train, evals = make_task(cfg)
    tok = load_tokenizer(out / "tokenizer")
    ids, n_prompt = sft_example([train[0]], tok, cfg.template)
    assert tok.decode(ids[n_prompt:]).startswith("### Problem 1\n")
    assert _rl_config(cfg, out / "x", str(out / "sft" / "model")).numbered_single is True
    results = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    n1 = {r["problem_ids"][0]: r["prompt_sha256"] for r in results if r["n_problems"] == 1}
    by_id = {p.id: p for p in evals}
    assert n1 and all(h == prompt_hash(render_prompt([by_id[i]], tok, cfg.template)) for i, h in n1.items())


def test_from_stage_reuses_earlier_checkpoints(demo_run):
    cfg, out, records = demo_run
    sft_weights = out / "sft" / "model" / "model.safetensors"
    bcr_weights = out / "bcr" / "model.safetensors"
    before = {p: (_digest(p), p.stat().st_mtime_ns) for p in (sft_weights, bcr_weights)}
    eval_file = out / "eval" / STAGE_FILE
    eval_stat = (eval_file.stat().st_ino, eval_file.stat().st_mtime_ns)

    again = run_demo(cfg, from_stage="eval")
    assert list(again) == ["sft", "bcr", "length", "eval"]
    assert again["sft"] == records["sft"] and again["bcr"] == records["bcr"]  # read back, not re-run
    assert {p: (_digest(p), p.stat().st_mtime_ns) for p in before} == before
    # the eval stage did run again: its stage file was written anew (its text may be equal: same seconds)
    assert (eval_file.stat().st_ino, eval_file.stat().st_mtime_ns) != eval_stat
    # the same seeds and checkpoints give the same sweep
    assert again["eval"]["summary"] == records["eval"]["summary"]


def test_from_stage_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="stage 'sft' has no finished checkpoint"):
        run_demo(DemoConfig(output_dir=str(tmp_path), **{**TINY, "from_stage": "bcr"}))


def test_cli_parses_from_stage_flag(monkeypatch, tmp_path):
    from bcr import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda cfg: seen.setdefault("cfg", cfg))
    assert demo.cli_main(["--from-stage", "eval", f"output_dir={tmp_path}", "length_baseline=true"]) == 0
    assert seen["cfg"].from_stage == "eval" and seen["cfg"].length_baseline is True
    with pytest.raises(ConfigError):
        DemoConfig(from_stage="nope")
    with pytest.raises(ConfigError):
        DemoConfig(from_stage="eval", stop_after="sft")


def _row(model, n, tokens, acc):
    return {"model": model, "n_problems": n, "tokens_per_problem": tokens, "accuracy": acc}


def test_demo_summary_judges_the_acceptance_criteria():
    rows = [_row("verbose-sft", 1, 50.0, 0.80), _row("verbose-sft", 2, 52.0, 0.80), _row("verbose-sft", 3, 40.0, 0.7),
            _row("bcr", 1, 40.0, 0.79), _row("bcr", 2, 36.0, 0.80), _row("bcr", 3, 30.0, 0.75)]
    lunch = {"baseline": "verbose-sft", "comparisons": [{
        "model": "bcr", "tokens_per_problem": 40.0, "baseline_tokens_per_problem": 50.0, "token_reduction_pct": 20.0,
        "token_reduction_ci_low": 15.0, "token_reduction_ci_high": 25.0, "accuracy": 0.79, "baseline_accuracy": 0.80,
        "accuracy_diff": -0.01, "accuracy_diff_ci_low": -0.05, "accuracy_diff_ci_high": 0.03}]}
    result = demo_summary({"rows": rows, "free_lunch": lunch}, {("bcr", 1): 0.25})
    assert result["models"]["bcr"]["tokens_fall_monotonically"] is True
    assert result["models"]["verbose-sft"]["tokens_fall_monotonically"] is False
    assert result["models"]["verbose-sft"]["rises_at_n"] == [2]
    assert result["models"]["verbose-sft"]["clear_rises_at_n"] == []  # no fits given: nothing called clear
    fits = {"verbose-sft": {"clear_rises_n": [2]}}
    assert demo_summary({"rows": rows, "free_lunch": lunch, "fits": fits})["models"]["verbose-sft"][
        "clear_rises_at_n"] == [2]
    assert result["models"]["bcr"]["checks_per_problem"] == [0.25, None, None]
    (c,) = result["free_lunch_n1"]
    assert c["meets_15pct_fewer_tokens"] and c["meets_accuracy_within_3_points"]
    assert c["accuracy_diff_points"] == pytest.approx(-1.0)

    lunch["comparisons"][0].update(token_reduction_pct=10.0, accuracy_diff=-0.05)
    (c,) = demo_summary({"rows": rows, "free_lunch": lunch})["free_lunch_n1"]
    assert not c["meets_15pct_fewer_tokens"] and not c["meets_accuracy_within_3_points"]
