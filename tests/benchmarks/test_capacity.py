r"""``python -m benchmarks.capacity report`` on small synthetic runs: hand-made sweep records with
known right and wrong answers (and known error classes), three sizes whose ratio acc(N = 4) /
acc(N = 1) lies on a known line; and the token count of the SFT stream against its definition."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from bcr.demo.config import DemoConfig
from bcr.demo.sft import sft_batches
from bcr.demo.task import build_tokenizer_and_model, make_task, worked_only
from bcr.runtime.dataclass_cli import load_dataclass
from bcr.task.synthetic import solve_steps
from benchmarks import capacity

TASK = ["task.styles={steps: 1}", "task.num_train_problems=48", "task.num_eval_problems=12"]
NS = (1, 2, 3, 4, 6)
TOKENS = 1_000_000


def _section(k: int, problem, kind: str) -> str:
    """Problem ``k``'s section: right, or with one planted error (answer_copy, arithmetic, format)."""
    trace = solve_steps(problem.meta["start"], [tuple(o) for o in problem.meta["operations"]])
    steps = [[a, o, x, b] for a, o, x, b in trace]
    answer = steps[-1][3]
    if kind == "answer_copy":
        answer = steps[0][3]
    elif kind == "arithmetic":
        steps[-1][3] += 1
        answer = steps[-1][3]
    lines = [f"### Problem {k}"] + [f"Step {j}: {a} {o} {x} = {b}" for j, (a, o, x, b) in enumerate(steps, 1)]
    return "\n".join(lines + ([] if kind == "format" else [f"Answer {k}: \\boxed{{{answer}}}"]))


def _write_run(root, name: str, parameters: int, wrong_at_4: dict[int, str]) -> None:
    """A run folder: capacity.json and a sweep whose answers are all right except, at N = 4, the
    problems (by index in the held-out list) of ``wrong_at_4`` with their planted error, and at
    N = 2 problem 0 (a format error: N = 2 is no stand-in for N = 1)."""
    cfg = load_dataclass(DemoConfig, overrides=TASK)
    _, evals = make_task(cfg)
    records = []
    for n in NS:
        for b in range(len(evals) // n):
            bundle = list(range(b * n, (b + 1) * n))
            wrong = wrong_at_4 if n == 4 else {0: "format"} if n == 2 else {}
            kinds = [wrong.get(i, "right") for i in bundle]
            text = "\n\n".join(_section(k, evals[i], kind) for k, (i, kind) in enumerate(zip(bundle, kinds), 1))
            records.append({"model": "sft", "n_problems": n, "bundle_index": b, "sample_index": 0, "n_actual": n,
                            "problem_ids": [evals[i].id for i in bundle], "completion": text,
                            "completion_tokens": 30 * n, "truncated": False,
                            "correct": [kind == "right" for kind in kinds],
                            "answered": [kind != "format" for kind in kinds]})
    run = root / name
    (run / "capacity_eval").mkdir(parents=True)
    (run / "capacity_eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "capacity.json").write_text(json.dumps({
        "size": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1}, "parameters": parameters, "seed": 0,
        "steps": 10, "sft_wall_seconds": 60.0, "sft_cpu_seconds": 100.0, "threads": 1, "samples_per_bundle": 1,
        "tokens_trained": TOKENS, "overrides": TASK}))


# ratio acc(4) / acc(1) = 6/12, 8/12, 10/12 at 1e5, 1e6, 1e7 parameters: a line of 1/6 per decade
# through 0.5 at 1e5, which reaches 0.8 at 10 ** 6.8 parameters
PLANS = {
    "small": (10**5, {0: "answer_copy", 1: "answer_copy", 2: "answer_copy", 3: "arithmetic", 4: "arithmetic", 5: "format"}),
    "middle": (10**6, {0: "arithmetic", 5: "arithmetic", 6: "answer_copy", 11: "answer_copy"}),
    "large": (10**7, {3: "arithmetic", 7: "arithmetic"}),
}


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, (parameters, wrong) in PLANS.items():
        _write_run(root, name, parameters, wrong)
    out = tmp_path_factory.mktemp("out")
    figure = out / "docs" / "curve.png"
    assert capacity.main(["report", str(root), "--out", str(out), "--figure", str(figure)]) == 0
    return out, figure, json.loads((out / "capacity.json").read_text())


def test_accuracy_ratio_and_verdict_per_run(curve):
    _, _, result = curve
    runs = {r["run"]: r for r in result["runs"]}
    assert [r["run"] for r in result["runs"]] == ["small", "middle", "large"]  # by size
    for name, (parameters, wrong) in PLANS.items():
        r = runs[name]
        assert r["accuracy"]["1"][0] == 1.0 and r["accuracy"]["2"][0] == pytest.approx(11 / 12)
        acc4, lo, hi = r["accuracy"]["4"]
        assert acc4 == pytest.approx(1 - len(wrong) / 12) and lo <= acc4 <= hi
        assert r["ratio"] == pytest.approx(1 - len(wrong) / 12)
        assert r["ratio_ci"][0] <= r["ratio"] <= r["ratio_ci"][1]
        assert r["keeps_accuracy"] is (r["ratio"] >= 0.8)
        assert r["compute_flops"] == 6.0 * parameters * TOKENS
    assert [runs[n]["keeps_accuracy"] for n in PLANS] == [False, False, True]


def test_error_classes_per_n_count_the_planted_errors(curve):
    _, _, result = curve
    small = next(r for r in result["runs"] if r["run"] == "small")
    assert small["errors"]["4"] == {"right": 6, "format": 1, "other_problem": 0, "wrong_place": 0, "arithmetic": 2,
                                    "answer_copy": 3, "other": 0}
    assert small["errors"]["1"]["right"] == 12
    # the placebo classifies the same problems: the same totals, the same right answers
    for n, counts in small["errors"].items():
        placebo = small["errors_placebo"][n]
        assert sum(placebo.values()) == sum(counts.values()) == 12 and placebo["right"] == counts["right"]


def test_the_extrapolation_solves_the_fitted_line_for_the_bar(curve):
    _, _, result = curve
    fit = result["extrapolation"]
    assert "extrapolation" in fit["label"]
    assert fit["slope_per_decade"] == pytest.approx(1 / 6)
    assert math.log10(fit["parameters"]) == pytest.approx(6.8)
    assert fit["compute_flops"] == pytest.approx(6.0 * fit["parameters"] * TOKENS)
    lo, hi = fit["parameters_ci"]
    assert lo is not None and lo <= fit["parameters"] and (hi is None or fit["parameters"] <= hi)
    # at the largest run's FLOPs per CPU second (6e13 FLOPs in 100 s)
    assert fit["cpu_hours_at_measured_rate"] == pytest.approx(fit["compute_flops"] / 6e11 / 3600)


def test_a_line_that_does_not_rise_reaches_the_bar_at_no_size():
    rows = [{"run": name, "parameters": p, "ratio": y, "_ratio_draws": [y, y], "tokens_trained": TOKENS,
             "compute_flops": 6.0 * p * TOKENS, "sft_cpu_seconds": 10.0} for name, p, y in
            [("a", 10**5, 0.6), ("b", 10**6, 0.5)]]
    fit = capacity.extrapolate(rows, n_bootstrap=50)
    assert fit["parameters"] is None and fit["no_crossing_share"] == 1.0
    assert "at no size" in capacity.describe_fit(fit)
    assert "fewer than two sizes" in capacity.extrapolate(rows[:1])["reason"]


def test_report_files(curve):
    out, figure, _ = curve
    md = (out / "capacity.md").read_text()
    assert md.count("| h32 L1 ") == 3 and "extrapolation" in md and "| small | 4 | 6 |" in md
    assert (out / "capacity_curve.png").read_bytes() == figure.read_bytes()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokens_trained_is_the_token_count_of_the_sft_stream():
    cfg = load_dataclass(DemoConfig, overrides=[*TASK, "model.vocab_size=400", "model.hidden_size=32",
                                                "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1"])
    train, _ = make_task(worked_only(cfg))
    tokenizer, _ = build_tokenizer_and_model(cfg, train)
    expected = sum(len(ids) for batch in itertools.islice(sft_batches(train, tokenizer, cfg), 5) for ids, _ in batch)
    assert capacity.tokens_trained(cfg, tokenizer, 5) == expected


def test_the_placebo_matches_against_the_next_bundle_of_the_same_n():
    from bcr.data.problems import Problem

    def problem(pid, start, ops):
        answer = solve_steps(start, ops)[-1][3]
        return Problem(id=pid, problem=pid, answer=str(answer), meta={"start": start, "operations": [list(o) for o in ops]})

    # p1 copies p2's second operand (8) into its step 2; the next bundle (q1, q2) has no 8 there
    problems = {p.id: p for p in [problem("p1", 7, [("+", 5), ("-", 3)]), problem("p2", 5, [("-", 1), ("+", 8)]),
                                  problem("q1", 2, [("+", 2), ("+", 4)]), problem("q2", 3, [("+", 1), ("-", 2)])]}
    copied = "### Problem 1\nStep 1: 7 + 5 = 12\nStep 2: 12 - 8 = 4\nAnswer 1: \\boxed{4}\n\n### Problem 2\n" \
             "Step 1: 5 - 1 = 4\nStep 2: 4 + 8 = 12\nAnswer 2: \\boxed{12}"
    right = "### Problem 1\nStep 1: 2 + 2 = 4\nStep 2: 4 + 4 = 8\nAnswer 1: \\boxed{8}\n\n### Problem 2\n" \
            "Step 1: 3 + 1 = 4\nStep 2: 4 - 2 = 2\nAnswer 2: \\boxed{2}"
    records = [{"n_problems": 2, "bundle_index": 0, "problem_ids": ["p1", "p2"], "completion": copied,
                "truncated": False, "correct": [False, True]},
               {"n_problems": 2, "bundle_index": 1, "problem_ids": ["q1", "q2"], "completion": right,
                "truncated": False, "correct": [True, True]}]
    assert capacity.error_counts(records, problems)[2]["other_problem"] == 1
    placebo = capacity.error_counts(records, problems, placebo=True)[2]
    assert placebo["other_problem"] == 0 and placebo["other"] == 1 and placebo["right"] == 3
