"""``benchmarks.study`` in miniature: one seed, bcr and one weight of each length penalty on tiny
sizes, end to end; the resume (only the deleted unit and the evaluation that reads it run again);
the refusal of changed settings; and the collapse rule on hand-made curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bcr.runtime.dataclass_cli import ConfigError, parse_cli
from benchmarks import study
from benchmarks.study import StudyConfig, collapse, moving_average, run_study

# the demo on tiny sizes (as tests/demo/test_demo.py), written as the study's command-line options
TINY = [
    "seeds=[0]", "kimi_weights=[1]", "linear_weights=[0.5]", "eval_problems=6", "progress=false",
    "demo.progress=false", "demo.task.num_train_problems=96", "demo.task.num_eval_problems=8",
    "demo.model.vocab_size=400", "demo.model.hidden_size=32", "demo.model.num_layers=1", "demo.model.num_heads=2",
    "demo.model.num_kv_heads=1", "demo.sft.steps=12", "demo.sft.style_steps=3", "demo.rl.max_steps=2",
    "demo.rl.bundles_per_step=2",
    "demo.rl.num_generations=2", "demo.rl.n_problems={2: 1, 3: 1}", "demo.rl.max_completion_length=24",
    "demo.eval.per_problem_budget=12", "demo.eval.batch_size=8",
]
METHODS = ["sft", "bcr", "kimi@1", "linear@0.5"]


def _tiny(out: Path, *more: str) -> StudyConfig:
    return parse_cli(StudyConfig, [f"output_dir={out}", *TINY, *more], prog="study")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / study.LOG_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    # the CPU user's kernels (PyTorch), not the Triton interpreter the suite may enable: the same numbers, faster
    mp = pytest.MonkeyPatch()
    mp.setenv("BCR_KERNEL_BACKEND", "torch")
    out = tmp_path_factory.mktemp("study")
    summary = run_study(_tiny(out))
    yield out, summary, mp
    mp.undo()


@pytest.mark.slow
def test_the_study_writes_its_outputs(study_run):
    out, summary, _ = study_run
    for name in ("study.json", "study.md", "study_config.json", "curves.png", "curves_bcr.png",
                 "curves_kimi@1.png", "curves_linear@0.5.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "study.json").read_text())
    assert list(saved["methods"]) == METHODS and saved["seeds"] == [0]
    for method, entry in saved["methods"].items():
        for key in ("accuracy", "tokens_per_problem"):
            assert set(entry[key]) == {"mean", "min", "max"}
            assert entry[key]["min"] <= entry[key]["mean"] <= entry[key]["max"]
        row = entry["per_seed"]["0"]
        assert row["num_problems"] == 6 and 0 <= row["accuracy"] <= 1 and row["tokens_per_problem"] > 0
        assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
        if method != "sft":
            assert entry["collapses"] in (0, 1)
            assert set(row["train"]) == {"collapsed", "peak", "final", "window"}
            assert row["curves"]["step"] == [1, 2] and len(row["curves"]["tokens_per_problem"]) == 2
    assert set(saved["units"]) == {"seed0/sft", "seed0/bcr", "seed0/kimi@1", "seed0/linear@0.5",
                                   *(f"seed0/eval/{m}" for m in METHODS)}
    assert all(t["seconds"] > 0 and not t["reused"] for t in saved["units"].values())
    assert saved["unit_seconds"] > 0 and saved["wall_seconds"] > 0
    # every RL run has its own demo stage directory, trained from the seed's SFT model
    for method in METHODS[1:]:
        stage = json.loads((out / "seed0" / method / "stage.json").read_text())
        assert stage["stage"] == method and stage["steps"] == 2
    text = (out / "study.md").read_text()
    assert all(f"| {m} |" in text for m in METHODS) and "![curves.png](curves.png)" in text


@pytest.mark.slow
def test_a_restart_reruns_only_what_is_missing(study_run):
    out, _, _ = study_run
    kept = out / "seed0" / "kimi@1" / "model.safetensors"
    before = kept.stat().st_mtime_ns
    start = len(_log(out))
    (out / "seed0" / "bcr" / study.UNIT_FILE).unlink()  # bcr never finished, as far as the study knows
    summary = run_study(_tiny(out))
    ran = {r["unit"] for r in _log(out)[start:] if r["action"] == "ran"}
    assert ran == {"seed0/bcr", "seed0/eval/bcr"}  # the run, and the evaluation of the model it replaced
    assert kept.stat().st_mtime_ns == before
    assert {n for n, t in summary["units"].items() if not t["reused"]} == ran


@pytest.mark.slow
def test_a_restart_with_other_settings_is_refused(study_run):
    out, _, _ = study_run
    with pytest.raises(ConfigError, match=r"other settings .*demo\.rl\.max_steps: 2 -> 3"):
        run_study(_tiny(out, "demo.rl.max_steps=3"))
    with pytest.raises(ConfigError, match=r"kimi_weights: \[1\.0\] -> \[0\.5\]"):
        run_study(_tiny(out, "kimi_weights=[0.5]"))
    run_study(_tiny(out, "progress=true"))  # how it is shown is not a setting: everything is reused


def test_options_the_study_sets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="demo.seed=3: the study sets this"):
        _tiny(tmp_path, "demo.seed=3")
    with pytest.raises(ConfigError, match="demo.length.method="):
        _tiny(tmp_path, "demo.length.method=linear")
    with pytest.raises(ConfigError, match="kimi_weights=.*repeats"):
        _tiny(tmp_path, "kimi_weights=[1, 1]")
    cfg = _tiny(tmp_path, "demo.sft.steps=7", "seeds=4")
    assert cfg.demo.sft.steps == 7 and cfg.seeds == [4] and cfg.methods == ["bcr", "kimi@1", "linear@0.5"]
    assert cfg.num_eval_problems == 6


def test_help_lists_study_and_demo_options(capsys):
    assert study.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "kimi_weights = [0.25, 0.5, 1.0]" in text and "demo.rl.max_steps = 100" in text
    assert "demo.seed =" not in text  # set by the study


def test_moving_average():
    assert moving_average([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]
    assert moving_average([1, 2], 1) == [1, 2]


def test_collapse_rule_on_hand_made_curves():
    rise = [i / 20 for i in range(20)]  # 0 .. 0.95, the peak at the end
    collapses = [*rise, *[0.9] * 10, *[0.05] * 20]  # peaks, then falls to near zero and stays there
    recovers = [*rise, *[0.9] * 10, *[0.05] * 10, *[0.85] * 10]  # dips as deep, then recovers
    never = [0.0] * 50  # never rises: no peak to fall from
    assert collapse(collapses)["collapsed"] is True
    assert collapse(recovers)["collapsed"] is False
    assert collapse(never)["collapsed"] is False
    assert collapse(rise)["collapsed"] is False
    info = collapse(collapses)
    assert info["window"] == 5 and info["peak"] == pytest.approx(0.91) and info["final"] == pytest.approx(0.05)
    # a dip that has not recovered by the last step counts; a single bad step inside the window does not
    assert collapse([*[0.8] * 45, *[0.3] * 5])["collapsed"] is True
    assert collapse([*[0.8] * 49, 0.0])["collapsed"] is False
    assert collapse([])["collapsed"] is False
