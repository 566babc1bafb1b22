"""Tests for bcr.data.problems: shared data files, native schemas, errors, formats, name resolution."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest

from bcr.data.problems import (
    BENCHMARKS,
    DataError,
    Problem,
    ProblemList,
    extract_last_boxed,
    iter_problems,
    load_problems,
    resolve_benchmark,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"

# (benchmark name, split, file relative to the data dir, rows per data/README.md)
SHARED_FILES = [
    ("gsm8k", "train", "gsm8k/train.jsonl", 7473),
    ("gsm8k", "test", "gsm8k/test.jsonl", 1319),
    ("math_train", "train", "math_train/train.jsonl", 4500),
    ("math500", "test", "math500/test.jsonl", 500),
    ("aime24", "test", "aime24/test.jsonl", 30),
    ("aime25", "test", "aime25/test.jsonl", 30),
    ("amc23", "test", "amc23/test.jsonl", 40),
    ("minerva", "test", "minerva_math/test.jsonl", 272),
    ("olympiadbench", "test", "olympiadbench/test.jsonl", 675),
]


def _write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return path


# ------------------------------------------------------------------------------- shared data
@pytest.mark.parametrize("name,split,rel,rows", SHARED_FILES, ids=[r[2] for r in SHARED_FILES])
def test_shared_file_loads_with_readme_row_count(name, split, rel, rows):
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared data file {path} absent")
    probs = load_problems(path)
    assert len(probs) == rows
    assert isinstance(probs, ProblemList) and probs.report.loaded == rows and probs.report.skipped == 0
    assert all(isinstance(p, Problem) and p.problem and p.answer for p in probs)
    assert len({p.id for p in probs}) == rows
    # by name with an explicit data dir: the same problems, source = benchmark name
    by_name = load_problems(name, split=split, data_dir=SHARED, limit=5)
    assert [p.id for p in by_name] == [p.id for p in probs[:5]]
    assert all(p.source == name for p in by_name)


def test_shared_extras_go_to_meta():
    path = SHARED / "math500" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data file {path} absent")
    p = load_problems(path, limit=1)[0]
    assert {"solution", "subject", "level"} <= set(p.meta)
    assert "answer" not in p.meta and "problem" not in p.meta and "id" not in p.meta


def test_default_resolution_finds_shared_data(monkeypatch):
    if not (SHARED / "aime24" / "test.jsonl").is_file():
        pytest.skip("shared data absent")
    monkeypatch.delenv("BCR_DATA_DIR", raising=False)
    assert len(load_problems("aime24")) == 30
    assert len(load_problems("AIME24")) == 30


# ---------------------------------------------------------------------------- native schemas
def test_gsm8k_native(tmp_path):
    f = _write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "He has 3+4=<<3+4=7>>7.\n#### 7"},
        {"question": "Big?", "answer": "1000+600=<<1000+600=1600>>1600\n#### 1,600"},
    ])
    a, b = load_problems(f)
    assert a.problem.startswith("Tom") and a.answer == "7"
    assert a.meta["solution"] == "He has 3+4=7."
    assert b.answer == "1600"
    assert a.id == "gsm-0" and b.id == "gsm-1"


def test_math_native_last_boxed(tmp_path):
    sol = r"First $\boxed{1}$ then finally $\boxed{\frac{1}{2}}$."
    f = _write_jsonl(tmp_path / "math.jsonl", [{"problem": "P", "solution": sol, "level": "Level 3", "type": "Algebra"}])
    (p,) = load_problems(f)
    assert p.answer == r"\frac{1}{2}"
    assert p.meta["solution"] == sol and p.meta["level"] == "Level 3" and p.meta["type"] == "Algebra"


def test_math_native_without_box_is_an_error(tmp_path):
    f = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "P", "solution": "no box here"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1.*boxed"):
        load_problems(f)


def test_olympiadbench_native(tmp_path):
    f = _write_jsonl(tmp_path / "ob.jsonl", [
        {"id": 7, "question": "Q1", "final_answer": ["$3$", "$5$"], "unit": None},
        {"id": 8, "question": "Q2", "final_answer": ["$x=1$"]},
    ])
    a, b = load_problems(f)
    assert a.answer == "$3$, $5$" and a.id == "7" and b.answer == "$x=1$"


def test_hf_style_capitalised_fields_and_numeric_answer(tmp_path):
    f = _write_jsonl(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "P", "Answer": 204, "Solution": "s"}])
    (p,) = load_problems(f)
    assert (p.id, p.problem, p.answer) == ("2024-I-1", "P", "204")
    assert p.meta == {"Solution": "s"}


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{42}", "42"),
    (r"a \boxed{1} b \boxed{2}", "2"),
    (r"\boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\fbox{7}", "7"),
    (r"so \boxed 5$.", "5"),
    (r"\boxed{3} then \boxed{unclosed", "3"),
    ("no box", None),
    ("", None),
])
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


# ----------------------------------------------------------------------------- errors, skipping
def test_missing_field_names_file_line_and_field(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "problem": "P", "answer": "1"},
        "",
        {"id": "b", "problem": "P2"},
    ])
    with pytest.raises(DataError) as ei:
        load_problems(f)
    msg = str(ei.value)
    assert f"{f}:3" in msg and "'answer'" in msg and "skip_invalid" in msg


def test_missing_problem_field(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "answer": "1"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'problem'"):
        load_problems(f)


def test_bad_json_names_file_line(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "P", "answer": "1"}, '{"problem": "x", ', "[1, 2]"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_problems(f)


def test_skip_invalid_counts_and_warns(tmp_path):
    f = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"problem": "P0", "answer": "0"},
        "not json",
        {"problem": "P2"},
        {"problem": "P3", "answer": "3"},
        [1, 2],
    ])
    with pytest.warns(UserWarning, match="skipped 3 invalid row"):
        probs = load_problems(f, skip_invalid=True)
    assert [p.answer for p in probs] == ["0", "3"]
    assert probs.report.skipped == 3 and probs.report.rows_read == 5 and probs.report.loaded == 2
    assert len(probs.report.errors) == 3 and "mixed.jsonl:2" in probs.report.errors[0]
    # the generated ids follow the row index, so they stay stable when bad rows are skipped
    assert [p.id for p in probs] == ["mixed-0", "mixed-3"]


def test_no_warning_when_nothing_skipped(tmp_path):
    f = _write_jsonl(tmp_path / "ok.jsonl", [{"problem": "P", "answer": "1"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_problems(f, skip_invalid=True)) == 1


def test_bad_path_lists_known_names():
    with pytest.raises(DataError) as ei:
        load_problems("/nonexistent/nothing.jsonl")
    msg = str(ei.value)
    assert "/nonexistent/nothing.jsonl" in msg
    for name in ("gsm8k", "math500", "aime25", "olympiadbench"):
        assert name in msg


def test_unknown_suffix(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        load_problems(f)


def test_hf_id_without_datasets_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install datasets"):
        load_problems("someone/some-dataset")


def test_parquet_without_pyarrow_is_clear(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        f = tmp_path / "x.parquet"
        f.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_problems(f)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = tmp_path / "x.parquet"
        pq.write_table(pa.table({"problem": ["P"], "answer": ["1"], "id": ["q"]}), f)
        assert [(p.id, p.answer) for p in load_problems(f)] == [("q", "1")]


# ----------------------------------------------------------------------------- other formats
def test_csv(tmp_path):
    f = tmp_path / "probs.csv"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "problem", "answer", "level"])
        w.writerow(["c1", "What is 1+1?", "2", "1"])
        w.writerow(["c2", "Multi\nline, with comma", "3", "2"])
        w.writerow(["c3", "No answer", "", "2"])
    with pytest.raises(DataError, match=r"probs\.csv:5: missing field 'answer'"):
        load_problems(f)
    with pytest.warns(UserWarning):
        probs = load_problems(f, skip_invalid=True)
    assert [p.id for p in probs] == ["c1", "c2"]
    assert probs[1].problem == "Multi\nline, with comma" and probs[0].meta == {"level": "1"}


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_and_data_wrapper(tmp_path, wrap):
    rows = [{"problem": "P0", "answer": 1}, {"problem": "P1", "answer": "x"}]
    f = tmp_path / "rows.json"
    f.write_text(json.dumps({"data": rows} if wrap else rows))
    probs = load_problems(f)
    assert [(p.id, p.answer) for p in probs] == [("rows-0", "1"), ("rows-1", "x")]


def test_json_errors(tmp_path):
    f = tmp_path / "obj.json"
    f.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="list of records"):
        load_problems(f)
    g = tmp_path / "broken.json"
    g.write_text('[{"problem": "P", "answer": "1"},\n {"problem": ]')
    with pytest.raises(DataError, match=r"broken\.json:2: invalid JSON"):
        load_problems(g)
    h = tmp_path / "rec.json"
    h.write_text(json.dumps([{"problem": "P", "answer": "1"}, {"problem": "Q"}]))
    with pytest.raises(DataError, match=r"rec\.json: record 1: missing field 'answer'"):
        load_problems(h)


def test_limit(tmp_path):
    f = _write_jsonl(tmp_path / "many.jsonl", [{"problem": f"P{i}", "answer": str(i)} for i in range(10)]
                     + ["garbage after the limit"])
    assert [p.answer for p in load_problems(f, limit=3)] == ["0", "1", "2"]
    assert load_problems(f, limit=0) == []
    with pytest.raises(ValueError):
        load_problems(f, limit=-1)


# ------------------------------------------------------------------------------ name resolution
def _fake_data_dir(root: Path) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    _write_jsonl(root / "gsm8k" / "test.jsonl", [{"id": "t0", "problem": "P", "answer": "1"}])
    _write_jsonl(root / "gsm8k" / "train.jsonl", [{"id": "r0", "problem": "P", "answer": "1"},
                                                  {"id": "r1", "problem": "Q", "answer": "2"}])
    (root / "minerva_math").mkdir()
    _write_jsonl(root / "minerva_math" / "test.jsonl", [{"id": "m0", "problem": "P", "answer": "1"}])
    return root


def test_named_benchmark_with_data_dir(tmp_path):
    d = _fake_data_dir(tmp_path / "data")
    assert [p.id for p in load_problems("gsm8k", data_dir=d)] == ["t0"]
    assert [p.id for p in load_problems("gsm8k", split="train", data_dir=d)] == ["r0", "r1"]
    assert [p.id for p in load_problems("minerva", data_dir=d)] == ["m0"]
    assert resolve_benchmark("minerva", data_dir=d) == d / "minerva_math" / "test.jsonl"
    with pytest.raises(DataError, match="no split 'validation'"):
        load_problems("gsm8k", split="validation", data_dir=d)
    with pytest.raises(DataError, match="BCR_DATA_DIR"):
        load_problems("aime25", data_dir=d)


def test_named_benchmark_with_env(tmp_path, monkeypatch):
    d = _fake_data_dir(tmp_path / "envdata")
    monkeypatch.setenv("BCR_DATA_DIR", str(d))
    assert [p.id for p in load_problems("gsm8k", split="train")] == ["r0", "r1"]
    # an explicit data_dir wins over the environment
    other = tmp_path / "other"
    (other / "gsm8k").mkdir(parents=True)
    _write_jsonl(other / "gsm8k" / "test.jsonl", [{"id": "o0", "problem": "P", "answer": "1"}])
    assert [p.id for p in load_problems("gsm8k", data_dir=other)] == ["o0"]


def test_directory_source(tmp_path):
    d = _fake_data_dir(tmp_path / "data")
    assert [p.id for p in load_problems(d / "gsm8k")] == ["t0"]
    assert [p.id for p in load_problems(d / "gsm8k", split="train")] == ["r0", "r1"]


def test_benchmark_table_has_the_contract_names():
    assert {"gsm8k", "math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "math_train"} <= set(BENCHMARKS)


@pytest.mark.parametrize("suffix,line", [("jsonl", 3), ("json", 3), ("csv", 3)])
def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path, suffix, line):
    path = tmp_path / f"latin1.{suffix}"
    if suffix == "csv":
        text = 'problem,answer\n"1 + 1",2\n"caf\xe9 costs 3",3\n'
    else:
        rows = [{"problem": "1 + 1", "answer": "2"}, {"problem": "caf\xe9 costs 3", "answer": "3"}]
        text = ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n" if suffix == "json"
                else "\n" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    path.write_bytes(text.encode("latin-1"))
    column = text.splitlines()[line - 1].index("\xe9") + 1
    with pytest.raises(DataError, match=rf"^{path}:{line}: not UTF-8 \(byte 0xe9 at column {column}\)"):
        load_problems(path)


def test_skip_invalid_skips_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "3"}\n'
                     b'{"problem": "2 + 2", "answer": "4"}\n')
    with pytest.warns(UserWarning, match="mixed.jsonl:2: not UTF-8"):
        loaded = load_problems(path, skip_invalid=True)
    assert [p.answer for p in loaded] == ["2", "4"]


def test_an_empty_training_file_is_named(tmp_path):
    from bcr.rl.config import BCRConfig
    from bcr.rl.train_cli import load_train_problems

    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=rf"^{path}: holds no problems \(train_data="):
        load_train_problems(BCRConfig(train_data=str(path)))


def test_iter_problems_streams_what_load_problems_returns(tmp_path):
    """iter_problems gives load_problems' problems one at a time (default ids, limit, other formats), and a bad
    row is the same one-line DataError once it is reached."""
    path = tmp_path / "test.jsonl"
    rows = [{"problem": "1+1", "answer": "2"}, {}, {"id": "x", "question": "2+2", "answer": "4", "level": 3}]
    path.write_text("\n".join("" if not r else json.dumps(r) for r in rows) + "\n" + json.dumps(rows[0]) + "\n")
    stream = iter_problems(path)
    assert next(stream) == load_problems(path)[0]
    assert list(stream) == load_problems(path)[1:] and len(load_problems(path)) == 3
    assert list(iter_problems(path, limit=2)) == load_problems(path, limit=2)
    assert [p.id for p in iter_problems(path)] == [f"{tmp_path.name}-test-0", "x", f"{tmp_path.name}-test-2"]
    as_json = tmp_path / "all.json"
    as_json.write_text(json.dumps([rows[0], rows[2]]))
    assert list(iter_problems(as_json)) == load_problems(as_json)
    path.write_text(json.dumps(rows[0]) + "\n{\"problem\": \n")
    stream = iter_problems(path)
    assert next(stream).problem == "1+1"
    with pytest.raises(DataError, match=r"test.jsonl:2: invalid JSON"):
        next(stream)
