"""bcr.eval.report: summary files, report.md and the PNG plots."""

from __future__ import annotations

import csv
import json
import zlib

import matplotlib.image as mpimg
import pytest

from bcr.runtime.io import atomic_write_text
from bcr.eval.report import PLOT_FILES, render_report, write_run_outputs
from bcr.eval.scaling import summarize_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records():
    ids = [f"p{i}" for i in range(8)]
    records = []
    for model, a, acc in (("base", 300.0, 0.75), ("bcr", 180.0, 0.8)):
        for n in (1, 2, 4):
            for b in range(0, 8, n):
                chunk = ids[b : b + n]
                correct = [zlib.crc32(f"{model}{n}{pid}".encode()) % 100 / 100 < acc for pid in chunk]
                flexible = [ok or zlib.crc32(f"flex{model}{n}{pid}".encode()) % 2 == 0 for ok, pid in zip(correct, chunk)]
                records.append({
                    "model": model, "n_problems": n, "bundle_index": b // n, "sample_index": 0,
                    "n_actual": len(chunk), "problem_ids": chunk, "completion_tokens": int(a * n ** -0.4 * len(chunk)),
                    "truncated": n == 4 and b == 0, "answered": [True] * len(chunk), "correct": correct,
                    "flexible_answers": ["1"] * len(chunk), "flexible_correct": flexible,
                    "timing": {"batch_index": b // n, "generate_s": 0.5},
                })
    return records


@pytest.fixture
def summary():
    return summarize_records(_records(), baseline="base", n_bootstrap=200)


def test_run_outputs_are_written_and_readable(tmp_path, summary):
    paths = write_run_outputs(tmp_path, summary)
    for name in ("summary.json", "summary.csv", "report.md", *PLOT_FILES):
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name

    # summary.json round-trips (NaN would not be valid JSON: it must not appear)
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["rows"][0]["model"] == "base"

    # summary.csv: one row per (model, N), timing columns prefixed
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["n_problems"]) for r in rows] == [(m, str(n)) for m in ("base", "bcr") for n in (1, 2, 4)]
    assert "timing.problems_per_s" in rows[0] and float(rows[0]["timing.problems_per_s"]) > 0
    assert float(rows[0]["tokens_per_problem"]) == pytest.approx(summary["rows"][0]["tokens_per_problem"], rel=1e-5)
    assert rows[2]["accuracy_by_position"].count(";") == 3  # N = 4: four positions
    # strict (accuracy) and flexible accuracy side by side
    for r, row in zip(rows, summary["rows"]):
        assert float(r["accuracy"]) == pytest.approx(row["accuracy"], rel=1e-5)
        assert float(r["flexible_accuracy"]) == pytest.approx(row["flexible_accuracy"], rel=1e-5)
        assert float(r["flexible_accuracy"]) >= float(r["accuracy"])

    # the plots are real PNGs that matplotlib reads back as images
    for name, file in PLOT_FILES.items():
        data = (tmp_path / file).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        image = mpimg.imread(tmp_path / file)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    # no temporary files left behind
    assert not list(tmp_path.glob("*.tmp"))


def test_report_md_holds_the_tables(tmp_path, summary):
    write_run_outputs(tmp_path, summary)
    md = (tmp_path / "report.md").read_text()
    assert "| model | N |" in md
    table_rows = [line for line in md.splitlines() if line.startswith(("| base |", "| bcr |"))]
    assert len(table_rows) >= 6 + 2 + 1  # 6 (model, N) rows, 2 fit rows, 1 free-lunch row
    first = summary["rows"][0]
    assert "accuracy % (strict)" in md and "flexible %" in md
    assert (f"| base | 1 | 8 | 8 | {100 * first['accuracy']:.1f} | [{100 * first['accuracy_ci_low']:.1f}, "
            f"{100 * first['accuracy_ci_high']:.1f}] | {100 * first['flexible_accuracy']:.1f} |") in md
    assert f"{first['tokens_per_problem']:.1f}" in md
    b = summary["fits"]["bcr"]["tokens_power_law"]["b"]
    assert f"{b:.3f}" in md
    assert "Free lunch at N = 1 (baseline: base)" in md
    for file in PLOT_FILES.values():
        assert f"]({file})" in md


def test_plots_are_deterministic(tmp_path, summary):
    write_run_outputs(tmp_path / "a", summary)
    write_run_outputs(tmp_path / "b", summary)
    for file in PLOT_FILES.values():
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_single_model_single_n_and_zero_tokens_do_not_break_the_report(tmp_path):
    rec = {"model": "only", "n_problems": 1, "bundle_index": 0, "sample_index": 0, "n_actual": 1,
           "problem_ids": ["x"], "completion_tokens": 0, "truncated": False, "answered": [False], "correct": [False],
           "timing": {"batch_index": 0, "generate_s": 0.0}}
    summary = summarize_records([rec])
    assert summary["fits"]["only"]["tokens_power_law"] is None
    assert summary["free_lunch"]["comparisons"] == []
    write_run_outputs(tmp_path, summary)
    md = render_report(summary)
    assert "| only | 1 |" in md and "Free lunch" not in md
    assert (tmp_path / PLOT_FILES["tokens"]).read_bytes().startswith(PNG_SIGNATURE)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "first version, long\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
