"""bcr.eval.sweep: a real sweep with a tiny random HF model (its answers are garbage; the pipeline is
what is tested): every output is written, an interrupted sweep resumes to the same files, settings
are checked on resume, both budget modes, and the ``bcr eval`` command line."""

from __future__ import annotations

import csv
import json
from collections import Counter

import matplotlib.image as mpimg
import pytest

from bcr.runtime.dataclass_cli import ConfigError
from bcr.eval.sweep import EvalConfig, cli_main, evaluate_scaling, prompt_hash, read_results
from bcr.task.parsing import parse_completion
from bcr.eval.report import PLOT_FILES
from bcr.models.rollout import make_engine
from bcr.eval.scaling import strip_timing
from bcr.task.scoring import score_completion
from bcr.task.synthetic import make_arithmetic_problems

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FAST = {
    "samples_per_bundle": 2,
    "max_completion_length": 24,
    "temperature": 1.0,
    "top_p": 1.0,
    "batch_size": 2,
    "n_bootstrap": 200,
    "progress": False,
}


class CountingEngine:
    """The real HF engine, counting the prompts it is asked to generate for."""

    def __init__(self, model, tokenizer):
        self.inner = make_engine("hf", model, tokenizer)
        self.tokenizer = tokenizer
        self.prompts = 0

    def generate(self, prompts, **kw):
        self.prompts += len(prompts)
        return self.inner.generate(prompts, **kw)

    def sync_weights(self, model):
        self.inner.sync_weights(model)


class Stop(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models decode fastest on one thread; more only contend on a shared 2-core CI box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def problems():
    return make_arithmetic_problems(12, seed=0)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv_without_timing(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if not k.startswith("timing.")} for row in csv.DictReader(f)]


def test_sweep_writes_every_output(tmp_path, problems, tiny_qwen2, tiny_tokenizer):
    out = tmp_path / "run"
    summary = evaluate_scaling(
        tiny_qwen2, problems, tokenizer=tiny_tokenizer, n_values=[1, 2, 3, 5], output_dir=str(out), **FAST
    )
    for name in ("results.jsonl", "summary.json", "summary.csv", "report.md", "eval_config.json", *PLOT_FILES.values()):
        assert (out / name).is_file(), name

    records = _lines(out / "results.jsonl")
    bundles = {1: 12, 2: 6, 3: 4, 5: 3}  # N = 5: bundles of 5, 5 and a partial 2
    assert len(records) == 2 * sum(bundles.values())
    keys = [(r["model"], r["n_problems"], r["bundle_index"], r["sample_index"]) for r in records]
    assert len(set(keys)) == len(keys) and keys == sorted(keys, key=lambda k: ([1, 2, 3, 5].index(k[1]), k[2], k[3]))
    for n, count in bundles.items():
        recs = [r for r in records if r["n_problems"] == n]
        assert sorted({r["bundle_index"] for r in recs}) == list(range(count))
        # every problem is evaluated at every N, k = 2 times
        assert Counter(pid for r in recs for pid in r["problem_ids"]) == {p.id: 2 for p in problems}
    partial = [r for r in records if r["n_problems"] == 5 and r["bundle_index"] == 2]
    assert [r["n_actual"] for r in partial] == [2, 2] and partial[0]["problem_ids"] == [problems[10].id, problems[11].id]

    by_id = {p.id: p for p in problems}
    for r in records:
        assert r["n_actual"] == len(r["problem_ids"]) == len(r["parsed_answers"]) == len(r["correct"]) == len(r["answered"])
        assert r["references"] == [by_id[i].answer for i in r["problem_ids"]]
        assert 0 < r["completion_tokens"] <= 24 and r["max_new_tokens"] == 24
        assert r["truncated"] == (r["completion_tokens"] == 24 and r["truncated"])  # bool, consistent with budget
        assert isinstance(r["completion"], str) and len(r["prompt_sha256"]) == 16
        assert r["answered"] == [a is not None for a in r["parsed_answers"]]
        # flexible extraction keeps the strict answers and is scored by the same function
        parsed = parse_completion(r["completion"], r["n_actual"], truncated=r["truncated"])
        flexible = score_completion(parsed, r["references"], text=r["completion"], truncated=r["truncated"],
                                    extraction="flexible")
        assert (r["flexible_answers"], r["flexible_correct"]) == (flexible.answers, flexible.correct)
        assert all(f for s, f in zip(r["correct"], r["flexible_correct"]) if s)
        assert set(r["timing"]) == {"batch_index", "generate_s"} and r["timing"]["generate_s"] > 0
    # the two samples of a bundle are different draws (a real sampler, not a stub)
    texts = {}
    for r in records:
        texts.setdefault((r["n_problems"], r["bundle_index"]), []).append(r["completion"])
    assert any(a != b for a, b in texts.values())

    # summary numbers are recomputable from results.jsonl
    assert [(row["model"], row["n_problems"]) for row in summary["rows"]] == [("model", n) for n in (1, 2, 3, 5)]
    for row in summary["rows"]:
        recs = [r for r in records if r["n_problems"] == row["n_problems"]]
        assert row["tokens_per_problem"] == pytest.approx(sum(r["completion_tokens"] for r in recs) / (2 * 12))
        assert row["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in recs) / len(recs))
        assert len(row["accuracy_by_position"]) == row["n_problems"]
        assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
        assert row["flexible_accuracy_ci_low"] <= row["flexible_accuracy"] <= row["flexible_accuracy_ci_high"]
        assert row["flexible_accuracy"] >= row["accuracy"]
        flexible_answered = sum(a is not None for r in recs for a in r["flexible_answers"])
        assert row["flexible_answered_rate"] == pytest.approx(flexible_answered / (2 * 12))
        assert row["tokens_per_problem_ci_low"] <= row["tokens_per_problem"] <= row["tokens_per_problem_ci_high"]
        assert row["timing"]["problems_per_s"] > 0 and row["timing"]["tokens_per_s"] > 0
    fit = summary["fits"]["model"]
    assert set(fit) == {"tokens_power_law", "accuracy_linear", "non_monotonic_n", "clear_rises_n"}
    assert fit["tokens_power_law"]["num_points"] == 4
    assert json.loads((out / "summary.json").read_text())["rows"][0]["num_problems"] == 12

    md = (out / "report.md").read_text()
    assert "| model | N |" in md and "| model | 5 | 12 | 3 |" in md
    for file in PLOT_FILES.values():
        assert (out / file).read_bytes().startswith(PNG_SIGNATURE)
        assert mpimg.imread(out / file).ndim == 3


def test_interrupted_sweep_resumes_to_identical_files(tmp_path, problems, tiny_qwen2, tiny_tokenizer):
    opts = dict(n_values=[1, 2, 3], **FAST)

    # The reference run batches differently: records are keyed and seeded per bundle, so batching
    # (and later, sharding across ranks) must not change them.
    full = CountingEngine(tiny_qwen2, tiny_tokenizer)
    ref = evaluate_scaling({"tiny": full}, problems, output_dir=str(tmp_path / "ref"), **{**opts, "batch_size": 3})
    assert full.prompts == 12 + 6 + 4

    # 1) "kill" the sweep after 5 batches (10 bundles, 20 records) ...
    first = CountingEngine(tiny_qwen2, tiny_tokenizer)
    batches = []

    def stop_after_five(info):
        batches.append(info)
        if len(batches) == 5:
            raise Stop

    run = tmp_path / "run"
    with pytest.raises(Stop):
        evaluate_scaling({"tiny": first}, problems, output_dir=str(run), on_batch=stop_after_five, **opts)
    results = run / "results.jsonl"
    assert len(results.read_text().splitlines()) == 20 and not (run / "summary.json").exists()

    # 2) ... and tear the file inside batch 4: 13 whole lines (batch 4 has one of its 4 records) + half a line
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:13]) + lines[13][: len(lines[13]) // 2])
    assert len(read_results(results)) == 13  # the torn line is ignored on read

    # 3) resume, and get killed again after one batch: the torn line must have been cut off, not
    #    glued to the next record (which would corrupt the file for the next restart)
    second = CountingEngine(tiny_qwen2, tiny_tokenizer)

    def stop_now(info):
        raise Stop

    with pytest.raises(Stop):
        evaluate_scaling({"tiny": second}, problems, output_dir=str(run), on_batch=stop_now, **opts)
    assert second.prompts == 2  # batch 4 (bundles 6, 7) is regenerated as a whole ...
    assert len(read_results(results)) == 16  # ... but only its 3 missing records are written

    third = CountingEngine(tiny_qwen2, tiny_tokenizer)
    resumed = evaluate_scaling({"tiny": third}, problems, output_dir=str(run), **opts)
    assert third.prompts == 22 - 8  # finished bundles (0-7 at N = 1) are not redone

    assert [strip_timing(r) for r in _lines(results)] == [strip_timing(r) for r in _lines(tmp_path / "ref" / "results.jsonl")]
    assert strip_timing(resumed) == strip_timing(ref)
    assert strip_timing(json.loads((run / "summary.json").read_text())) == strip_timing(
        json.loads((tmp_path / "ref" / "summary.json").read_text())
    )
    assert _csv_without_timing(run / "summary.csv") == _csv_without_timing(tmp_path / "ref" / "summary.csv")
    for file in PLOT_FILES.values():
        assert (run / file).read_bytes() == (tmp_path / "ref" / file).read_bytes()

    # 4) a finished sweep reruns without generating anything
    idle = CountingEngine(tiny_qwen2, tiny_tokenizer)
    again = evaluate_scaling({"tiny": idle}, problems, output_dir=str(run), **opts)
    assert idle.prompts == 0 and strip_timing(again) == strip_timing(ref)

    # 5) changed generation settings are refused in the same directory, accepted with resume=False
    with pytest.raises(ConfigError, match="temperature"):
        evaluate_scaling({"tiny": idle}, problems, output_dir=str(run), **{**opts, "temperature": 0.5})
    fresh = evaluate_scaling(
        {"tiny": idle}, problems[:4], output_dir=str(run), **{**opts, "n_values": [1], "resume": False}
    )
    assert [r["n_problems"] for r in fresh["rows"]] == [1] and len(_lines(results)) == 4 * 2


def test_per_problem_budget_scales_with_bundle_size(tmp_path, tiny_qwen2, tiny_tokenizer):
    problems = make_arithmetic_problems(7, seed=1)
    opts = {**FAST, "samples_per_bundle": 1}
    evaluate_scaling(
        tiny_qwen2, problems, tokenizer=tiny_tokenizer, n_values=[1, 5], budget_mode="per_problem",
        per_problem_budget=4, output_dir=str(tmp_path), **opts,
    )
    records = _lines(tmp_path / "results.jsonl")
    assert [(r["n_problems"], r["n_actual"], r["max_new_tokens"]) for r in records] == (
        [(1, 1, 4)] * 7 + [(5, 5, 20), (5, 2, 8)]
    )
    assert all(r["completion_tokens"] <= r["max_new_tokens"] for r in records)
    assert EvalConfig(budget_mode="per_prompt", max_completion_length=99).max_new_tokens(5) == 99
    with pytest.raises(ConfigError, match="budget_mode"):
        EvalConfig(budget_mode="per_token")
    with pytest.raises(ConfigError, match="n_values"):
        EvalConfig(n_values=[0, 2])


def test_numbered_single_changes_the_n1_prompts_and_is_part_of_the_settings(tmp_path, tiny_qwen2, tiny_tokenizer):
    from bcr.task.prompts import PromptTemplate, render_prompt

    problems = make_arithmetic_problems(3, seed=2)
    opts = {**FAST, "samples_per_bundle": 1, "n_values": [1], "max_completion_length": 4}
    evaluate_scaling(tiny_qwen2, problems, tokenizer=tiny_tokenizer, output_dir=str(tmp_path), numbered_single=True,
                     **opts)
    numbered = PromptTemplate(numbered_single=True)
    hashes = [r["prompt_sha256"] for r in _lines(tmp_path / "results.jsonl")]
    assert hashes == [prompt_hash(render_prompt([p], tiny_tokenizer, numbered)) for p in problems]
    assert hashes[0] != prompt_hash(render_prompt([problems[0]], tiny_tokenizer))
    with pytest.raises(ConfigError, match="numbered_single"):
        evaluate_scaling(tiny_qwen2, problems, tokenizer=tiny_tokenizer, output_dir=str(tmp_path), **opts)


def test_cli_two_models_from_disk_with_free_lunch(tmp_path, tiny_tokenizer, capsys):
    from bcr.models.tiny import tiny_model

    for name, seed in (("base", 0), ("bcr", 1)):
        tiny_model(tiny_tokenizer, seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(
        json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n"
        for p in make_arithmetic_problems(6, seed=2)
    ))
    config = tmp_path / "eval.yaml"
    config.write_text("n_values: [1, 2]\nsamples_per_bundle: 1\nmax_completion_length: 16\nprogress: false\n")
    out = tmp_path / "out"
    rc = cli_main([
        "--config", str(config),
        f"models={{base: {tmp_path / 'base'}, bcr: {tmp_path / 'bcr'}}}",
        f"benchmark={data}", f"output_dir={out}", "baseline=base", "n_bootstrap=100",
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["base", "bcr"]
    assert [(r["model"], r["n_problems"]) for r in summary["rows"]] == [("base", 1), ("base", 2), ("bcr", 1), ("bcr", 2)]
    lunch = summary["free_lunch"]
    assert lunch["baseline"] == "base" and [c["model"] for c in lunch["comparisons"]] == ["bcr"]
    comparison = lunch["comparisons"][0]
    assert comparison["num_problems"] == 6 and comparison["token_reduction_pct"] is not None
    assert "Free lunch at N = 1 (baseline: base)" in (out / "report.md").read_text()
    assert "task-scaling sweep" in capsys.readouterr().out

    assert cli_main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("n_values", "samples_per_bundle", "budget_mode", "per_problem_budget", "batch_size", "baseline"):
        assert option in help_text
    with pytest.raises(ConfigError, match="does not exist"):
        cli_main([f"model={tmp_path / 'missing'}", f"benchmark={data}", f"output_dir={tmp_path / 'x'}", "progress=false"])
