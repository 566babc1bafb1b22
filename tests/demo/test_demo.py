"""The embedded demo in miniature: every stage runs on tiny sizes (two RL seeds), writes its outputs,
the seeds' sweeps pool to their mean, worker processes compute what one process computes, and
``from_stage`` reuses the checkpoints of the stages before it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from bcr.runtime.dataclass_cli import ConfigError, load_dataclass, parse_cli
from bcr.demo import STAGE_FILE, DemoConfig, demo_summary, run_demo
from bcr.demo.plots import write_adaptive_plot
from bcr.demo.summary import (adaptive_table, budget_use, difficulty_label, law_verdict, pool_seeds, print_summary,
                              style_mix)

pytestmark = pytest.mark.slow  # end to end: a whole pipeline, a process group or a child script

# the demo's pipeline on tiny sizes, written as the command-line options a user would pass
TINY = [
    "task.num_train_problems=96", "task.num_eval_problems=8", "model.vocab_size=400", "model.hidden_size=32",
    "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "sft.steps=4", "sft.style_steps=3", "sft.batch_size=8",
    "rl.max_steps=1", "rl.bundles_per_step=2", "rl.num_generations=2", "rl.n_problems={2: 1, 3: 1}",
    "rl.max_completion_length=24", "length.max_completion_length=16", "eval.n_values=[1, 2]",
    "eval.per_problem_budget=16", "eval.batch_size=8", "progress=false", "length_baseline=true",
]


def _tiny(*more: str) -> DemoConfig:
    return load_dataclass(DemoConfig, overrides=[*TINY, *more])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SEEDS = ["rl_seeds=[0, 1]", "rl_workers=1"]  # two RL seeds, one after the other in the test's process
STAGE_DIRS = ["sft", "bcr", "length", "bcr-s1", "length-s1", "eval", "eval-s1"]  # in the order they run
MODELS = ("verbose-sft", "bcr", "length-penalty")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = _tiny(f"output_dir={out}", *SEEDS)
    records = run_demo(cfg)
    return cfg, out, records


def _records(path: Path) -> list[dict]:
    """A sweep's records without their timing (the part that may differ between equal runs)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "timing"} for r in rows]


def _training_log(stage_dir: Path) -> list[dict]:
    """An RL stage's metrics without the timings (which differ between equal runs)."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_second"} for r in rows]


def test_every_stage_writes_its_outputs(demo_run):
    cfg, out, records = demo_run
    assert list(records) == [*STAGE_DIRS, "pooled"]
    for stage in STAGE_DIRS:
        state = json.loads((out / stage / STAGE_FILE).read_text())
        assert state["stage"] == stage and state["seconds"] > 0
    # models are HF directories with their tokenizer
    for stage in ("sft", "bcr", "length", "bcr-s1", "length-s1"):
        model_dir = Path(records[stage]["model"])
        assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "sft" / "metrics.jsonl").read_text().count("\n") == cfg.sft.steps + cfg.sft.style_steps
    for stage in ("bcr", "bcr-s1", "length-s1"):
        assert (out / stage / "metrics.jsonl").read_text().count("\n") == cfg.rl.max_steps
    # each seed's sweep: results for every model and N, a report, plots and the seed's demo summary
    for ev in (out / "eval", out / "eval-s1"):
        assert (ev / "report.md").is_file() and (ev / "summary.json").is_file() and (ev / "demo_summary.json").is_file()
        assert list(ev.glob("*.png"))
        assert {(r["model"], r["n_problems"]) for r in _records(ev / "results.jsonl")} == {
            (m, n) for m in MODELS for n in cfg.eval.n_values}
    # the pooled summary, its report and plots
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary == json.loads(json.dumps(records["pooled"]["summary"], default=str))
    assert set(summary["models"]) == set(MODELS) and summary["rl_seeds"] == [0, 1]
    assert [c["model"] for c in summary["free_lunch_n1"]] == ["bcr", "length-penalty"]
    for m in summary["models"].values():
        assert m["n"] == cfg.eval.n_values and len(m["tokens_per_problem"]) == len(cfg.eval.n_values)
    assert set(summary["models"]["bcr"]["collapse"]) == {"0", "1"}
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["torch"]
    assert {"cpu_capability", "ATEN_CPU_CAPABILITY", "MKL_CBWR"} <= set(summary["machine"])
    assert (out / "pooled" / "report.md").is_file() and list((out / "pooled").glob("*.png"))


def test_the_rl_seeds_train_apart_and_pool_to_their_mean(demo_run):
    cfg, out, records = demo_run
    # each seed's RL run draws its own bundles and rollouts (one tiny step may leave the weights as they were)
    for stage in ("bcr", "length"):
        assert _training_log(out / stage) != _training_log(out / f"{stage}-s1")
    seeds = {r["seed"] for r in _records(out / "eval" / "results.jsonl")} & {
        r["seed"] for r in _records(out / "eval-s1" / "results.jsonl")}
    assert not seeds  # each seed's sweep samples with its own seeds
    pooled = records["pooled"]["summary"]
    per_seed = [records["eval"]["summary"], records["eval-s1"]["summary"]]
    for name in MODELS:
        m = pooled["models"][name]
        for i in range(len(m["n"])):
            # the same problems and samples per seed: the pooled numbers are the seeds' mean
            for key in ("accuracy", "tokens_per_problem"):
                values = [s["models"][name][key][i] for s in per_seed]
                assert m[key][i] == pytest.approx(sum(values) / 2)
                assert m[f"{key}_range"][i] == [min(values), max(values)]
                assert [m["per_seed"][s][key][i] for s in (0, 1)] == values
    lunch = pooled["free_lunch_n1"][0]
    assert set(lunch["per_seed"]) == {0, 1}


def test_worker_processes_compute_what_one_process_computes(demo_run, tmp_path):
    """rl_workers=2 (spawned processes) gives the models and sweeps of the fixture's run in the test's
    process (rl_workers=1); each RL-seed stage runs at one torch thread either way."""
    import shutil

    cfg, out, records = demo_run
    for name in ("sft", "tokenizer"):
        shutil.copytree(out / name, tmp_path / name)
    sft = json.loads((out / "sft" / STAGE_FILE).read_text())
    sft["model"] = str(tmp_path / "sft" / "model")
    (tmp_path / "sft" / STAGE_FILE).write_text(json.dumps(sft))
    again = run_demo(dataclasses.replace(cfg, output_dir=str(tmp_path), from_stage="bcr", rl_workers=2))
    for stage in ("bcr", "length", "bcr-s1", "length-s1"):
        assert _digest(tmp_path / stage / "model.safetensors") == _digest(out / stage / "model.safetensors")
    for ev in ("eval", "eval-s1"):
        assert _records(tmp_path / ev / "results.jsonl") == _records(out / ev / "results.jsonl")
    assert again["pooled"]["summary"]["models"] == records["pooled"]["summary"]["models"]


def test_every_stage_uses_the_numbered_format_at_n1(demo_run):
    """numbered_single (the demo default) reaches the SFT targets, the RL config and the sweep's prompts."""
    from bcr.demo.stages import eval_config, rl_config
    from bcr.demo.task import make_task, sft_example
    from bcr.eval.sweep import prompt_hash
    from bcr.task.prompts import render_prompt
    from bcr.models.loading import load_tokenizer

    cfg, out, _ = demo_run
    assert cfg.task.numbered_single and cfg.template.numbered_single
    train, evals = make_task(cfg)
    tok = load_tokenizer(out / "tokenizer")
    ids, n_prompt = sft_example([train[0]], tok, cfg.template)
    assert tok.decode(ids[n_prompt:]).startswith("### Problem 1\n")
    assert rl_config(cfg, out / "x", str(out / "sft" / "model")).numbered_single is True
    assert eval_config(cfg, out / "x").numbered_single is True
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
    assert list(again) == [*STAGE_DIRS, "pooled"]
    for stage in ("sft", "bcr", "length", "bcr-s1", "length-s1"):
        assert again[stage] == records[stage]  # read back, not re-run
    assert {p: (_digest(p), p.stat().st_mtime_ns) for p in before} == before
    # the eval stage did run again: its stage file was written anew (its text may be equal: same seconds)
    assert (eval_file.stat().st_ino, eval_file.stat().st_mtime_ns) != eval_stat
    # the same seeds and checkpoints give the same sweeps
    assert again["eval"]["summary"] == records["eval"]["summary"]
    assert again["pooled"]["summary"] == records["pooled"]["summary"]


def test_from_stage_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="stage 'sft' has no finished checkpoint"):
        run_demo(_tiny(f"output_dir={tmp_path}", "from_stage=bcr"))


def test_cli_parses_from_stage_flag(monkeypatch, tmp_path):
    from bcr.demo import cli_main, pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_demo", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli_main(["--from-stage", "eval", f"output_dir={tmp_path}", "length_baseline=true"]) == 0
    assert seen["cfg"].from_stage == "eval" and seen["cfg"].length_baseline is True
    with pytest.raises(ConfigError):
        DemoConfig(from_stage="nope")
    with pytest.raises(ConfigError):
        DemoConfig(from_stage="eval", stop_after="sft")


def test_config_file_written_by_the_run_reads_back(demo_run):
    cfg, out, _ = demo_run
    loaded = load_dataclass(DemoConfig, out / "demo_config.yaml")
    assert dataclasses.replace(loaded, from_stage=cfg.from_stage) == cfg  # a later test re-ran from eval


def test_nested_options_keep_the_demo_defaults():
    cfg = parse_cli(DemoConfig, ["rl.learning_rate=1e-3", "--eval.n_values", "[1, 3]", "sft.steps=7"], prog="bcr demo")
    default = DemoConfig()
    assert cfg.rl.learning_rate == 1e-3 and cfg.eval.n_values == [1, 3] and cfg.sft.steps == 7
    # every other field keeps the demo's value, not BCRConfig's / EvalConfig's own default
    assert dataclasses.replace(cfg.rl, learning_rate=default.rl.learning_rate) == default.rl
    assert dataclasses.replace(cfg.eval, n_values=default.eval.n_values) == default.eval
    assert cfg.rl.advantage_mode == "sequence" and cfg.eval.temperature == 1.0
    # a partial mapping (as in a YAML file) changes only the fields it names
    assert load_dataclass(DemoConfig, overrides=["rl={max_steps: 9}"]).rl == dataclasses.replace(default.rl, max_steps=9)


def test_the_stage_configs_of_the_defaults():
    """The numbers README reports come from these settings."""
    from bcr.demo.stages import eval_config, rl_config, seed_stage

    cfg = DemoConfig()
    bcr = rl_config(cfg, Path("runs/demo/bcr"), "runs/demo/sft/model")
    assert (bcr.n_problems, bcr.max_completion_length, bcr.max_steps, bcr.learning_rate, bcr.num_generations,
            bcr.bundles_per_step, bcr.advantage_mode, bcr.logging_steps, bcr.numbered_single, bcr.seed) == (
        {n: 1.0 for n in range(1, 7)}, 100, 100, 1e-4, 4, 8, "sequence", 10, True, 0)
    assert cfg.length.max_completion_length is None  # the length-penalty run trains like for like with bcr
    ev = eval_config(cfg, Path("runs/demo/eval"))
    assert (ev.n_values, ev.per_problem_budget, ev.budget_mode, ev.temperature, ev.top_p, ev.batch_size,
            ev.resume, ev.baseline) == ([1, 2, 3, 4, 5, 6], 100, "per_problem", 1.0, 1.0, 32, False, "verbose-sft")
    assert (cfg.task.styles, cfg.task.problem_steps, cfg.sft.steps, cfg.sft.style_steps) == (
        {"steps": 3.0, "direct": 1.0}, [2, 2], 3000, 500)
    # three RL seeds, two at a time; the demo's seed in the plain folders, the others in -s<seed> ones
    assert (cfg.seeds(), cfg.rl_workers) == ([0, 1, 2], None)  # None: one worker per core
    assert [seed_stage(cfg, "bcr", s) for s in cfg.seeds()] == ["bcr", "bcr-s1", "bcr-s2"]
    assert rl_config(cfg, Path("x"), "m", seed=2).seed == 2 and eval_config(cfg, Path("x"), 2).seed == 2
    other = load_dataclass(DemoConfig, overrides=["seed=5", "rl_seeds=[5, 0]"])
    assert other.seeds() == [5, 0] and [seed_stage(other, "eval", s) for s in other.seeds()] == ["eval", "eval-s0"]
    assert load_dataclass(DemoConfig, overrides=["seed=5"]).seeds() == [5, 6, 7]


@pytest.mark.parametrize("option, message", [
    ("rl.lerning_rate=1", "unknown option 'lerning_rate' in section 'rl'.*Did you mean learning_rate"),
    ("seed.value=1", "'seed' of DemoConfig has no sub-options"),
    ("rl.seed=3", r"rl.seed=3: the demo sets this for each stage \(seed\)"),
    ("eval.output_dir=/tmp/x", "eval.output_dir='/tmp/x': the demo sets this"),
    ("eval.n_values=[1, 200]", "task.num_eval_problems=120 is smaller than the largest N"),
    ("task.problem_steps=3", r"task.problem_steps=3: give an inclusive range"),
    ("rl.loss_type=nope", "loss_type='nope': must be one of"),
    ("task.styles={short: 1}", r"task.styles: unknown style\(s\) \['short'\]"),
    ("task.styles={steps: -1}", r"task.styles\['steps'\]=-1.*>= 0"),
    ("length.method=l2", r"length.method='l2': must be one of \['kimi', 'linear'\]"),
    ("task.styles_by_steps={0: {direct: 1}}", "task.styles_by_steps: 0 is not a number of operations"),
    ("task.styles_by_steps={1: {quick: 1}}", r"task.styles: unknown style\(s\) \['quick'\]"),
    ("task.held_out_every=1", "task.held_out_every=1: must be >= 2"),
    ("task.phrasings=0", "task.phrasings=0: must be >= 1"),
    ("task.phrasings=13", "task.phrasings=13: there are 12 wordings"),
    ("rl_seeds=[1, 1]", r"rl_seeds=\[1, 1\]: give distinct seeds"),
    ("rl_seeds=[]", "rl_seeds=.*at least one"),
    ("rl_workers=0", "rl_workers=0: must be >= 1"),
])
def test_bad_nested_options_fail_clearly(option, message):
    with pytest.raises(ConfigError, match=message):
        load_dataclass(DemoConfig, overrides=[option])


def test_old_flat_option_names_name_their_new_place(capsys):
    from bcr.demo import cli_main

    with pytest.raises(ConfigError, match="'rl_steps' of bcr demo is now rl.max_steps"):
        cli_main(["rl_steps=5"])
    with pytest.raises(ConfigError, match="'eval_n_values' of bcr demo is now eval.n_values"):
        cli_main(["--eval-n-values", "[1, 2]"])
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "  rl.learning_rate = 0.0001" in text and "  eval.n_values = [1, 2, 3, 4, 5, 6]" in text
    assert "  length_baseline = True" in text and "rl.seed" not in text.split("set by the demo")[0]


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


def _law_rows(model, tokens, accs, trunc=0.0):
    """Rows for N = 1..len(tokens), each token mean with a +-1 CI."""
    return [{"model": model, "n_problems": n, "tokens_per_problem": t, "tokens_per_problem_ci_low": t - 1,
             "tokens_per_problem_ci_high": t + 1, "accuracy": a, "truncation_rate": trunc}
            for n, (t, a) in enumerate(zip(tokens, accs), 1)]


def test_law_check_needs_disjoint_falls_an_unbound_budget_and_a_gentler_accuracy_loss():
    lunch = {"baseline": "verbose-sft", "comparisons": []}
    sft = _law_rows("verbose-sft", [40, 40, 40, 40, 40, 40], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # falls by 3 at four steps (disjoint +-1 CIs), by 1 at one (overlapping): 4 of 5 is enough
    bcr = _law_rows("bcr", [40, 37, 34, 33, 30, 27], [0.9, 0.9, 0.85, 0.8, 0.8, 0.7])
    use = {("bcr", n): 0.5 for n in range(1, 7)}
    law = demo_summary({"rows": sft + bcr, "free_lunch": lunch}, use=use)["models"]["bcr"]["law"]
    assert law["falls_with_disjoint_ci_at_n"] == [2, 3, 5, 6] and law["tokens_pass"]
    assert law["budget_not_binding"] and law["accuracy_pass"] and law["passes"]
    assert law["accuracy_loss_first_to_last_n"] == pytest.approx(0.2)
    assert law["baseline_accuracy_loss_first_to_last_n"] == pytest.approx(0.5)
    # two overlapping steps fail the token part
    bcr2 = _law_rows("bcr", [40, 37, 36, 33, 32, 29], [0.9] * 6)
    law = demo_summary({"rows": sft + bcr2, "free_lunch": lunch})["models"]["bcr"]["law"]
    assert law["falls_with_disjoint_ci_at_n"] == [2, 4, 6] and not law["tokens_pass"] and not law["passes"]
    # a point that uses more than 85% of its ceiling, or truncates more than 10%, is budget-bound
    use[("bcr", 6)] = 0.9
    law = demo_summary({"rows": sft + bcr, "free_lunch": lunch}, use=use)["models"]["bcr"]["law"]
    assert law["budget_bound_at_n"] == [6] and not law["passes"]
    bcr3 = _law_rows("bcr", [40, 37, 34, 31, 28, 25], [0.9] * 6, trunc=0.2)
    law = demo_summary({"rows": sft + bcr3, "free_lunch": lunch})["models"]["bcr"]["law"]
    assert law["budget_bound_at_n"] == [1, 2, 3, 4, 5, 6]
    # losing as much accuracy as the baseline fails the accuracy part
    bcr4 = _law_rows("bcr", [40, 37, 34, 31, 28, 25], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    law = demo_summary({"rows": sft + bcr4, "free_lunch": lunch})["models"]["bcr"]["law"]
    assert law["tokens_pass"] and not law["accuracy_pass"] and not law["passes"]
    assert law_verdict(law).startswith("FAIL: falls with disjoint 95% CIs at 5 of 5 steps")


def test_law_check_fails_a_collapsed_model_that_has_no_accuracy_left_to_lose():
    """The Intel demo's length-penalty model (10 % right at N = 1, tokens falling) passed the rule
    before it had a floor: its accuracy could not fall further than the SFT baseline's."""
    lunch = {"baseline": "verbose-sft", "comparisons": []}
    sft = _law_rows("verbose-sft", [39, 40, 40, 41, 38, 38], [0.717, 0.392, 0.258, 0.175, 0.142, 0.142])
    collapsed = _law_rows("length", [20, 16, 12, 8, 5, 2], [0.10, 0.025, 0.033, 0.025, 0.0, 0.033])
    law = demo_summary({"rows": sft + collapsed, "free_lunch": lunch})["models"]["length"]["law"]
    assert law["tokens_pass"] and law["budget_not_binding"]
    assert law["accuracy_loss_first_to_last_n"] < law["baseline_accuracy_loss_first_to_last_n"]
    assert law["first_n_accuracy_floor"] == pytest.approx(0.687)
    assert not law["first_n_accuracy_kept"] and not law["accuracy_pass"] and not law["passes"]
    assert "first-N accuracy below the baseline's minus 3 points (68.7 %)" in law_verdict(law)
    # at the floor exactly (baseline minus 3 points) the first N is kept
    kept = _law_rows("length", [20, 16, 12, 8, 5, 2], [0.687, 0.6, 0.6, 0.6, 0.6, 0.6])
    law = demo_summary({"rows": sft + kept, "free_lunch": lunch})["models"]["length"]["law"]
    assert law["first_n_accuracy_kept"] and law["passes"]


def test_budget_use_is_the_mean_fraction_of_each_ceiling():
    recs = [{"model": "m", "n_problems": 2, "completion_tokens": 50, "max_new_tokens": 100},
            {"model": "m", "n_problems": 2, "completion_tokens": 100, "max_new_tokens": 100}]
    assert budget_use(recs) == {("m", 2): pytest.approx(0.75)}


def test_style_mix_counts_each_problem_by_its_section_style_with_its_accuracy():
    steps = "### Problem 1\nStep 1: 1 + 2 = 3\nStep 2: 3 + 1 = 4\nAnswer 1: \\boxed{4}"
    recs = [{"model": "m", "n_problems": 2, "n_actual": 2, "correct": [True, False],
             "completion": steps + "\n\n### Problem 2\nMerged: 2 + 2 - 1 = 3\nAnswer 2: \\boxed{3}"},
            {"model": "m", "n_problems": 2, "n_actual": 2, "correct": [False, False],
             "completion": "### Problem 1\nAnswer 1: \\boxed{5}"},  # problem 2 never written
            {"model": "m", "n_problems": 1, "n_actual": 1, "correct": [True], "completion": steps}]
    mix = style_mix(recs)
    assert mix[("m", 2)] == {"direct": [0.25, 0.0], "merged": [0.25, 0.0], "missing": [0.25, 0.0],
                             "steps": [0.25, 1.0]}
    assert mix[("m", 1)] == {"steps": [1.0, 1.0]}
    rows = [_row("m", 1, 30.0, 1.0), _row("m", 2, 20.0, 0.25)]
    result = demo_summary({"rows": rows, "free_lunch": {}}, styles=mix)
    assert result["models"]["m"]["styles"] == [mix[("m", 1)], mix[("m", 2)]]


def test_style_mix_by_difficulty_splits_each_problem_by_its_label_and_feeds_the_adaptive_table(tmp_path):
    easy_direct = "### Problem 1\nAnswer 1: \\boxed{9}"
    hard_steps = "### Problem 2\nStep 1: 4 + 5 = 9\nStep 2: 9 - 1 = 8\nAnswer 2: \\boxed{8}"
    recs = [{"model": "m", "n_problems": 2, "n_actual": 2, "problem_ids": ["e1", "h1"], "correct": [True, True],
             "completion": easy_direct + "\n\n" + hard_steps},
            {"model": "m", "n_problems": 2, "n_actual": 2, "problem_ids": ["e2", "h2"], "correct": [False, True],
             "completion": "### Problem 1\nStep 1: 4 + 5 = 9\nAnswer 1: \\boxed{1}\n\n" + hard_steps}]
    difficulty = {"e1": "1 op", "e2": "1 op", "h1": "2 ops", "h2": "2 ops"}
    mix = style_mix(recs, difficulty)
    assert mix[("m", 2, "1 op")] == {"direct": [0.5, 1.0], "steps": [0.5, 0.0]}
    assert mix[("m", 2, "2 ops")] == {"steps": [1.0, 1.0]}
    assert style_mix(recs)[("m", 2)] == {"direct": [0.25, 1.0], "steps": [0.75, 2 / 3]}
    result = demo_summary({"rows": [_row("m", 2, 20.0, 0.75)], "free_lunch": {}}, styles_by_difficulty=mix)
    assert result["models"]["m"]["styles_by_difficulty"] == [{"1 op": mix[("m", 2, "1 op")],
                                                              "2 ops": mix[("m", 2, "2 ops")]}]
    table = adaptive_table(result)
    assert [c.header for c in table.columns] == ["N", "m 1 op", "m 2 ops"]
    assert list(table.columns[1].cells) == ["50% direct (100/0)"] and list(table.columns[2].cells) == ["0% direct (-/100)"]
    assert adaptive_table(demo_summary({"rows": [_row("m", 2, 20.0, 0.75)], "free_lunch": {}})) is None
    write_adaptive_plot(result, tmp_path / "adaptive.png")
    assert (tmp_path / "adaptive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_difficulty_label_counts_the_operations():
    from bcr.task.synthetic import make_arithmetic_problems

    one, two = (make_arithmetic_problems(1, steps=(k, k))[0] for k in (1, 2))
    assert difficulty_label(one) == "1 op" and difficulty_label(two) == "2 ops"


def _seed_summary(tokens: list[float], accs: list[float], bcr_cut: float) -> dict:
    """A demo summary of one seed's sweep (SFT fixed, BCR's numbers given) at N = 1, 2."""
    rows = _law_rows("verbose-sft", [40, 40], [0.8, 0.5]) + _law_rows("bcr", tokens, accs)
    lunch = {"baseline": "verbose-sft", "comparisons": [{
        "model": "bcr", "tokens_per_problem": tokens[0], "baseline_tokens_per_problem": 40.0,
        "token_reduction_pct": bcr_cut, "token_reduction_ci_low": 0.0, "token_reduction_ci_high": 0.0,
        "accuracy": accs[0], "baseline_accuracy": 0.8, "accuracy_diff": accs[0] - 0.8,
        "accuracy_diff_ci_low": 0.0, "accuracy_diff_ci_high": 0.0}]}
    return demo_summary({"rows": rows, "free_lunch": lunch}, use={})


def test_pool_seeds_adds_each_seeds_numbers_their_range_and_the_collapses():
    from rich.console import Console

    seeds = {0: _seed_summary([36.0, 30.0], [0.9, 0.8], 10.0), 1: _seed_summary([34.0, 26.0], [0.7, 0.7], 15.0)}
    pooled_in = _seed_summary([35.0, 28.0], [0.8, 0.75], 12.5)
    collapses = {"bcr": {0: {"collapsed": False}, 1: {"collapsed": True}}}
    pooled = pool_seeds(pooled_in, seeds, collapses)
    assert pooled_in["models"]["bcr"].get("per_seed") is None  # the input is left as it was
    bcr = pooled["models"]["bcr"]
    assert bcr["tokens_per_problem_range"] == [[34.0, 36.0], [26.0, 30.0]]
    assert bcr["accuracy_range"] == [[0.7, 0.9], [0.7, 0.8]]
    assert bcr["per_seed"][1] == {"tokens_per_problem": [34.0, 26.0], "accuracy": [0.7, 0.7],
                                  "law_passes": seeds[1]["models"]["bcr"]["law"]["passes"]}
    assert bcr["collapse"] == collapses["bcr"] and "collapse" not in pooled["models"]["verbose-sft"]
    assert pooled["free_lunch_n1"][0]["per_seed"] == {0: {"token_reduction_pct": 10.0, "accuracy_diff_points": pytest.approx(10.0)},
                                                      1: {"token_reduction_pct": 15.0, "accuracy_diff_points": pytest.approx(-10.0)}}
    assert pooled["rl_seeds"] == [0, 1]
    console = Console(record=True, width=400)
    print_summary(pooled, {"sft": 1.0, "bcr": 2.0}, console, wall_seconds=2.5)
    text = console.export_text()
    assert "pooled over the RL seeds [0, 1]" in text and "range over the RL seeds [0, 1]" in text
    assert "34.0-36.0 (70.0-90.0)" in text
    assert "training collapsed in 1 of 2 RL runs (seed 1)" in text and "law per seed: " in text
    assert "(per seed: 10.0..15.0% fewer, -10.0..+10.0 points)" in text
    assert "(sum 3 s, wall 2 s)" in text or "(sum 3 s, wall 3 s)" in text
    with pytest.raises(ValueError, match="other N"):
        pool_seeds(pooled_in, {0: _seed_summary([36.0, 30.0, 20.0], [0.9, 0.8, 0.7], 1.0)})
