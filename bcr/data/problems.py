"""Problems and the loaders that read them.

A :class:`Problem` is one maths question with its reference final answer. :func:`load_problems`
reads problems from

* a file: JSON Lines (``.jsonl`` / ``.ndjson``), JSON (a list of records, or ``{"data": [...]}``),
  Parquet (needs ``pyarrow``) or CSV;
* a directory holding ``<split>.jsonl`` (or ``.json`` / ``.parquet`` / ``.csv``);
* a benchmark name (:data:`BENCHMARKS`: ``gsm8k``, ``math500``, ``aime24``, ``aime25``, ``amc23``,
  ``minerva``, ``olympiadbench``, ``math_train``) resolved to ``<data_dir>/<folder>/<split>.jsonl``;
* a Hugging Face dataset id such as ``"openai/gsm8k"`` (needs the ``datasets`` package and a network
  or a warm cache).

:func:`problems_from_records` reads the same schemas from memory: a ``datasets.Dataset``, a pandas
``DataFrame`` or any iterable of dict records (what a TRL user passes as ``train_dataset``).

Record schemas understood (field names are matched case-insensitively):

* the shared schema: ``{"id", "problem", "answer", ...extras}``; extras (``solution``, ``subject``,
  ``level``, ...) go to :attr:`Problem.meta`;
* GSM8K native: ``question`` + ``answer`` where the final answer follows ``####``; the rationale
  (calculator annotations ``<<...>>`` removed) goes to ``meta["solution"]`` and thousands separators
  are dropped from a purely numeric answer (``1,600`` -> ``1600``);
* MATH native: ``problem`` + ``solution`` (no ``answer``): the answer is the content of the *last*
  ``\\boxed{...}`` / ``\\fbox{...}`` in the solution (brace balanced, see :func:`bcr.data.boxes.extract_last_boxed`);
* OlympiadBench native: ``question`` + ``final_answer`` (a list is joined with ``", "``);
* DAPO-Math-17k (the verl RL schema): ``prompt`` is a list of chat messages whose last ``user``
  message holds the problem, ``reward_model`` is ``{"ground_truth": ...}`` and ``extra_info.index``
  the id. The instruction DAPO wraps around each problem (a first line asking for a last line
  ``Answer: $Answer`` and a closing ``Remember to put your answer on its own line ...``) is removed,
  since a BCR prompt states its own answer format;
* TRL's prompt-only datasets: ``prompt`` as a string, or as chat messages without ``reward_model``
  (the last ``user`` message is the problem), beside ``answer`` (or a MATH-style ``solution``). A BCR
  prompt is built from N problems, so the ``prompt`` column is read as the problem text, not sent as
  it is.

An id is taken from ``id`` / ``unique_id`` / ``idx`` / ``problem_id``; a row without one gets the
stable id ``"<label>-<row index>"`` where the label is the file stem (or ``<folder>-<stem>`` when the
stem is a bare split name such as ``test``).

Errors a user can cause raise :class:`DataError` (a ``ValueError``) naming the file and line (or
record), the problem, and the fix. :func:`iter_problems` gives the same problems one at a time, reading
a JSON Lines file line by line (memory does not grow with the file). With ``skip_invalid=True`` bad rows are skipped instead: a single
:class:`UserWarning` reports how many, and the returned list (a :class:`ProblemList`, a plain
``list`` subclass) carries a :class:`LoadReport` in its ``.report`` attribute with the counts and
the first error messages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcr.data.boxes import extract_last_boxed

__all__ = [
    "BENCHMARKS",
    "DataError",
    "LoadReport",
    "Problem",
    "ProblemList",
    "default_data_dirs",
    "extract_last_boxed",
    "iter_problems",
    "load_problems",
    "problem_from_record",
    "problems_from_records",
    "resolve_benchmark",
]


@dataclass
class Problem:
    """One problem: ``id`` (unique within a dataset), ``problem`` text, reference ``answer`` (LaTeX
    allowed, no ``\\boxed{}`` wrapper), the ``source`` it came from, and free-form ``meta``."""

    id: str
    problem: str
    answer: str
    source: str = ""
    meta: dict = field(default_factory=dict)


class DataError(ValueError):
    """A data file, row or dataset name the loader cannot use; the message names it and the fix."""


@dataclass
class LoadReport:
    """What one :func:`load_problems` call did.

    ``rows_read``: records looked at (blank lines excluded); ``loaded``: problems returned;
    ``skipped``: invalid records skipped (only non-zero with ``skip_invalid=True``); ``errors``: the
    first (up to 20) messages of skipped records; ``path``: the file or dataset read.
    """

    path: str = ""
    rows_read: int = 0
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


class ProblemList(list):
    """A ``list[Problem]`` that also carries the :class:`LoadReport` of the call that made it."""

    report: LoadReport

    def __init__(self, items: Iterable[Problem] = (), report: LoadReport | None = None):
        super().__init__(items)
        self.report = report if report is not None else LoadReport()


# name -> (folder under the data dir, default split)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "gsm8k": ("gsm8k", "test"),
    "math500": ("math500", "test"),
    "aime24": ("aime24", "test"),
    "aime25": ("aime25", "test"),
    "amc23": ("amc23", "test"),
    "minerva": ("minerva_math", "test"),
    "minerva_math": ("minerva_math", "test"),
    "olympiadbench": ("olympiadbench", "test"),
    "math_train": ("math_train", "train"),
}

_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
             ".csv": "csv", ".tsv": "csv"}
_SPLIT_STEMS = {"train", "test", "validation", "valid", "val", "dev", "eval"}
_ID_FIELDS = ("id", "unique_id", "idx", "problem_id")
_MAX_ERRORS_KEPT = 20


# ------------------------------------------------------------------------------------ records
def _lower_keys(rec: dict) -> dict[str, str]:
    """Map lower-cased field name -> the record's own key (first one wins)."""
    out: dict[str, str] = {}
    for k in rec:
        out.setdefault(str(k).lower(), k)
    return out


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return isinstance(v, (list, tuple)) and not v


def _answer_text(v: Any) -> str:
    """Normalise an answer value to a string (numbers, lists joined with ", ", boxed wrapper removed)."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return ", ".join(_answer_text(x) for x in v)
    s = str(v).strip()
    m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", s, flags=re.DOTALL)
    if m and extract_last_boxed(s) == m.group(1).strip():
        s = m.group(1).strip()
    return s


_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _gsm8k_split(answer: str) -> tuple[str, str]:
    """GSM8K ``answer`` field -> (final answer, rationale without calculator annotations)."""
    rationale, _, final = answer.rpartition("####")
    final = final.strip()
    if _THOUSANDS.fullmatch(final):
        final = final.replace(",", "")
    rationale = re.sub(r"<<[^<>]*>>", "", rationale).strip()
    return final, rationale


_DAPO_HEAD = re.compile(r"Solve the following math problem[^\n]*Answer:[^\n]*\n\n")
_DAPO_TAIL = re.compile(r"\n\nRemember to put your answer on its own line[^\n]*\Z")


def _user_message(prompt: Any) -> str | None:
    """The content of the last ``user`` message of a chat-message list, or None."""
    if not isinstance(prompt, (list, tuple)):
        return None
    users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) and users[-1].strip() else None


def _strip_dapo_instruction(text: str) -> str:
    return _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", text.strip(), count=1))


def problem_from_record(rec: dict, *, default_id: str, source: str = "", require_answer: bool = True) -> Problem:
    """Turn one record (shared, GSM8K, MATH, OlympiadBench, DAPO or TRL prompt schema) into a
    :class:`Problem`.

    Raises :class:`DataError` (without a location; the loader adds it) when the record lacks a
    problem text, or an answer while ``require_answer`` (without it a missing answer is ``""``).
    """
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object per row, got {type(rec).__name__}")
    keys = _lower_keys(rec)
    used: set[str] = set()

    def get(name: str) -> Any:
        k = keys.get(name)
        return None if k is None else rec[k]

    def take(name: str) -> Any:
        k = keys.get(name)
        if k is None:
            return None
        used.add(k)
        return rec[k]

    meta_extra: dict[str, Any] = {}
    # problem text
    if not _is_missing(get("problem")):
        text = take("problem")
    elif not _is_missing(get("question")):
        text = take("question")
    elif _user_message(get("prompt")) is not None:  # DAPO-Math-17k, TRL conversational
        text = _strip_dapo_instruction(_user_message(take("prompt")))
    elif isinstance(get("prompt"), str) and not _is_missing(get("prompt")):  # TRL standard (prompt-only)
        text = _strip_dapo_instruction(take("prompt"))
    else:
        present = ", ".join(map(str, rec)) or "none"
        raise DataError(
            f"missing field 'problem' (or 'question', or 'prompt'); fields present: {present}. "
            "Each row needs a problem text and an answer: {\"id\", \"problem\", \"answer\"}"
        )
    text = str(text).strip()

    # answer
    answer: str | None = None
    if not _is_missing(get("final_answer")):
        answer = _answer_text(take("final_answer"))  # OlympiadBench
        if "answer" in keys and keys["answer"] not in used and _is_missing(get("answer")):
            used.add(keys["answer"])
    elif not _is_missing(get("answer")):
        raw = take("answer")
        if isinstance(raw, str) and "####" in raw:  # GSM8K
            answer, rationale = _gsm8k_split(raw)
            if rationale and _is_missing(get("solution")):
                meta_extra["solution"] = rationale
        else:
            answer = _answer_text(raw)
    elif isinstance(get("reward_model"), dict) and not _is_missing(get("reward_model").get("ground_truth")):
        answer = _answer_text(take("reward_model")["ground_truth"])  # DAPO-Math-17k
    elif not _is_missing(get("solution")):  # MATH
        boxed = extract_last_boxed(str(get("solution")))
        if boxed is None and require_answer:
            raise DataError(
                "missing field 'answer' and the 'solution' has no \\boxed{...} to take it from; "
                "add an 'answer' field"
            )
        answer = boxed
    if _is_missing(answer) and not require_answer:
        answer = ""
    elif _is_missing(answer):
        present = ", ".join(map(str, rec)) or "none"
        raise DataError(
            f"missing field 'answer' (or 'final_answer', or a 'solution' with \\boxed{{}}); fields "
            f"present: {present}. Add the reference final answer as 'answer'"
        )

    # id
    pid = None
    for name in _ID_FIELDS:
        if not _is_missing(get(name)):
            pid = str(take(name))
            break
    extra = get("extra_info")
    if pid is None and isinstance(extra, dict) and not _is_missing(extra.get("index")):
        pid = str(extra["index"])  # DAPO-Math-17k
    if pid is None:
        pid = default_id

    meta = {k: v for k, v in rec.items() if k not in used}
    meta.update(meta_extra)
    return Problem(id=pid, problem=text, answer=str(answer), source=source, meta=meta)


# -------------------------------------------------------------------------------------- readers
def _label_for(path: Path) -> str:
    stem = path.stem
    if stem.lower() in _SPLIT_STEMS and path.parent.name:
        return f"{path.parent.name}-{stem}"
    return stem


def _not_utf8(e: UnicodeDecodeError, column: int) -> str:
    return (f"not UTF-8 (byte 0x{e.object[e.start]:02x} at column {column}); "
            "re-save the file as UTF-8")


def _read_utf8(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is a ``DataError`` naming its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: {_not_utf8(e, column)}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record-or-exception) for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", DataError(_not_utf8(e, e.start + 1))
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_utf8(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # really JSON Lines under a .json name
            yield from _iter_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); fix the file") from None
    if isinstance(obj, dict):
        if isinstance(obj.get("data"), list):
            obj = obj["data"]
        else:
            raise DataError(
                f"{path}: a JSON file must hold a list of records or {{\"data\": [...]}}; "
                f"found an object with keys {sorted(obj)[:10]}"
            )
    if not isinstance(obj, list):
        raise DataError(f"{path}: a JSON file must hold a list of records, found {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield f"{path}: record {i}", rec


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with io.StringIO(_read_utf8(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delim)
        if reader.fieldnames is None:
            return
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield f"{path}:{start}", DataError(f"invalid CSV ({e})")
                continue
            if None in row:  # more cells than header fields
                yield f"{path}:{start}", DataError(
                    f"row has {len(row) - 1 + len(row[None])} cells but the header has {len(row) - 1}")
                continue
            yield f"{path}:{start}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading Parquet ({path}) needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", rec


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}


def _collect(
    records: Iterable[tuple[str, Any]],
    *,
    label: str,
    source: str,
    limit: int | None,
    skip_invalid: bool,
    report: LoadReport,
    fix: str = "fix the row, or pass skip_invalid=True to skip bad rows",
    caller: str = "load_problems",
    require_answer: bool = True,
) -> ProblemList:
    out = ProblemList(report=report)
    if limit == 0:
        return out
    for index, (loc, rec) in enumerate(records):
        report.rows_read += 1
        try:
            if isinstance(rec, Exception):
                raise rec
            if isinstance(rec, Problem):  # from problems_from_records: kept as it is
                prob = rec
            else:
                prob = problem_from_record(rec, default_id=f"{label}-{index}", source=source,
                                           require_answer=require_answer)
        except DataError as e:
            msg = f"{loc}: {e}"
            if not skip_invalid:
                raise DataError(f"{msg} ({fix})") from None
            report.skipped += 1
            if len(report.errors) < _MAX_ERRORS_KEPT:
                report.errors.append(msg)
            continue
        out.append(prob)
        if limit is not None and len(out) >= limit:
            break
    report.loaded = len(out)
    if report.skipped:
        warnings.warn(
            f"{caller}: skipped {report.skipped} invalid row(s) of {report.rows_read} in "
            f"{report.path}; first: {report.errors[0]}",
            UserWarning,
            stacklevel=3,
        )
    ids: set[str] = set()
    dups = 0
    for p in out:
        dups += p.id in ids
        ids.add(p.id)
    if dups:
        warnings.warn(f"{caller}: {dups} duplicate id(s) in {report.path}", UserWarning, stacklevel=3)
    return out


def _read_file(path: Path, *, source: str, limit: int | None, skip_invalid: bool,
               require_answer: bool = True) -> ProblemList:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_SUFFIXES)} "
            "(JSON Lines is the project's format)"
        )
    report = LoadReport(path=str(path))
    return _collect(_READERS[kind](path), label=_label_for(path), source=source, limit=limit,
                    skip_invalid=skip_invalid, report=report, require_answer=require_answer)


# ---------------------------------------------------------------------------- in-memory records
def _record_items(records: Any, label: str) -> Iterator[tuple[str, Any]]:
    """(location, record) for each item; a ``Mapping`` item becomes a ``dict``, a :class:`Problem` stays."""
    for i, rec in enumerate(records):
        loc = f"{label} record {i}"
        if isinstance(rec, Problem) or isinstance(rec, dict):
            yield loc, rec
        elif isinstance(rec, Mapping):
            yield loc, dict(rec)
        elif isinstance(rec, str):
            yield loc, DataError(
                "a string, which has no reference answer to score against; pass "
                "{\"problem\": ..., \"answer\": ...} records or Problem objects")
        else:
            yield loc, DataError(f"a {type(rec).__name__}; expected a dict record or a Problem")


def problems_from_records(
    records: Any,
    *,
    label: str = "records",
    source: str = "",
    limit: int | None = None,
    skip_invalid: bool = False,
) -> ProblemList:
    """Problems from records held in memory, in any schema :func:`load_problems` reads.

    Args:
        records: a ``datasets.Dataset`` (one split), a pandas ``DataFrame``, or an iterable of dict
            records and/or :class:`Problem` objects (kept as they are).
        label: names the records in errors (``"<label> record <i>"``) and in default ids
            (``"<label>-<i>"`` for a record without an id field).
        source: :attr:`Problem.source` of the problems made from records.
        limit: keep only the first ``limit`` problems.
        skip_invalid: skip bad records (with one warning) instead of raising :class:`DataError`.

    Returns:
        A :class:`ProblemList` whose ``.report`` counts the records read, loaded and skipped.

    A record the schemas do not cover raises :class:`DataError` naming its index and the missing
    field. A ``datasets.DatasetDict`` (several splits), a single dict record, or a string / path
    raise one too, naming what to pass instead.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if isinstance(records, (str, bytes, os.PathLike)):
        raise DataError(f"{label}: got {type(records).__name__} {os.fsdecode(records)!r}, not records; to read a "
                        "file, benchmark or Hub dataset pass load_problems(...) instead")
    if isinstance(records, Mapping):
        splits = [k for k, v in records.items() if hasattr(v, "column_names")]
        if splits:  # datasets.DatasetDict
            raise DataError(f"{label}: a dataset with splits {splits}; pass one split, e.g. dataset[{splits[0]!r}]")
        raise DataError(f"{label}: got one dict (keys {list(records)[:10]}), not a list of records; wrap a single "
                        "record in a list")
    if hasattr(records, "iterrows") and hasattr(records, "to_dict"):  # pandas.DataFrame
        records = records.to_dict(orient="records")
    if not isinstance(records, Iterable):
        raise DataError(f"{label}: expected a datasets.Dataset or a list of records, got {type(records).__name__}")
    report = LoadReport(path=label)
    fix = "fix the record, or convert with bcr.problems_from_records(..., skip_invalid=True) to skip bad ones"
    return _collect(_record_items(records, label), label=label, source=source, limit=limit,
                    skip_invalid=skip_invalid, report=report, fix=fix, caller="problems_from_records")


# ------------------------------------------------------------------------------ name resolution
def default_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for benchmark folders, in order.

    ``data_dir`` when given (alone); else ``$BCR_DATA_DIR`` when set (alone); else ``../shared/data``
    relative to the current directory and relative to the repository root.
    """
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get("BCR_DATA_DIR")
    if env:
        return [Path(env).expanduser()]
    here = Path(__file__).resolve()
    cands = [Path.cwd() / ".." / "shared" / "data", here.parents[2] / "shared" / "data"]
    out: list[Path] = []
    for c in cands:
        c = c.resolve()
        if c not in out:
            out.append(c)
    return out


def _find_split_file(folder: Path, split: str) -> Path | None:
    for suf in (".jsonl", ".json", ".parquet", ".csv"):
        p = folder / f"{split}{suf}"
        if p.is_file():
            return p
    return None


def resolve_benchmark(name: str, split: str | None = None, *, data_dir=None) -> Path:
    """Path of benchmark ``name``'s ``split`` file (default split from :data:`BENCHMARKS`).

    Raises :class:`DataError` naming the directories searched and the fix when it is not there.
    """
    key = name.lower()
    if key not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known names: {', '.join(sorted(BENCHMARKS))}")
    folder, default_split = BENCHMARKS[key]
    split = split or default_split
    dirs = default_data_dirs(data_dir)
    for d in dirs:
        f = _find_split_file(d / folder, split)
        if f is not None:
            return f
    existing = [d / folder for d in dirs if (d / folder).is_dir()]
    if existing:
        avail = sorted(p.name for p in existing[0].iterdir() if p.suffix.lower() in _SUFFIXES)
        raise DataError(
            f"benchmark {name!r} has no split {split!r} in {existing[0]}; files there: {avail or 'none'}"
        )
    searched = ", ".join(str(d) for d in dirs)
    raise DataError(
        f"benchmark {name!r}: no folder {folder!r} under {searched}. Pass data_dir=..., set "
        f"BCR_DATA_DIR to the folder holding {folder}/{split}.jsonl, or give a file path"
    )


def _looks_like_hf_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s)) and Path(s).suffix.lower() not in _SUFFIXES


def _load_hf(name: str, split: str | None, *, limit, skip_invalid, require_answer: bool = True) -> ProblemList:
    try:
        import datasets  # type: ignore
    except ImportError:
        raise DataError(
            f"{name!r} is not a file or a known benchmark ({', '.join(sorted(BENCHMARKS))}); as a Hugging "
            "Face dataset id it needs the 'datasets' package (pip install datasets) and network access, "
            "or download it to a local JSONL file"
        ) from None
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        if split is None:
            dd = datasets.load_dataset(name, config)
            split = "test" if "test" in dd else ("train" if "train" in dd else next(iter(dd)))
            ds = dd[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing dataset, bad split...
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {e}") from e
    report = LoadReport(path=f"hf://{name}[{split}]")
    label = name.split("/")[-1] + f"-{split}"
    records = ((f"{name}[{split}] row {i}", dict(r)) for i, r in enumerate(ds))
    return _collect(records, label=label, source=name, limit=limit, skip_invalid=skip_invalid, report=report,
                    require_answer=require_answer)


def load_problems(
    source: str | os.PathLike,
    split: str | None = None,
    limit: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    require_answer: bool = True,
) -> ProblemList:
    """Load problems from a file, a directory, a benchmark name, or a Hugging Face dataset id.

    Args:
        source: a path (``.jsonl``/``.json``/``.parquet``/``.csv``), a directory holding
            ``<split>.<ext>``, a name in :data:`BENCHMARKS`, or ``"owner/dataset"`` (optionally
            ``"owner/dataset:config"``) for Hugging Face ``datasets``.
        split: the split of a benchmark name / directory / HF dataset (default: the benchmark's
            default, ``test`` for evaluation sets). Ignored for a file path.
        limit: keep only the first ``limit`` problems (in file order).
        data_dir: where benchmark folders live; default ``$BCR_DATA_DIR``, else ``../shared/data``.
        skip_invalid: skip bad rows (with one warning) instead of raising :class:`DataError`.
        require_answer: a row without a reference answer is an error; with False it loads with
            ``answer=""`` (``bcr solve`` answers problems whose answer nobody knows yet).

    Returns:
        A :class:`ProblemList` (a ``list[Problem]``) whose ``.report`` is a :class:`LoadReport`.
        ``Problem.source`` is the benchmark name, the HF id, or the file's label.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    path = Path(source).expanduser()
    text = os.fspath(source)
    if path.is_file():
        return _read_file(path, source=_label_for(path), limit=limit, skip_invalid=skip_invalid,
                          require_answer=require_answer)
    if path.is_dir():
        if split is None:
            found = [f for s in ("test", "train") if (f := _find_split_file(path, s)) is not None]
            if not found:
                raise DataError(f"{path} is a directory without test.jsonl or train.jsonl; pass split=... "
                                "or a file path")
            f = found[0]
        else:
            f = _find_split_file(path, split)
            if f is None:
                raise DataError(f"{path} has no {split}.jsonl (or .json/.parquet/.csv); pass an existing split")
        return _read_file(f, source=path.name, limit=limit, skip_invalid=skip_invalid,
                          require_answer=require_answer)
    if text.lower() in BENCHMARKS:
        f = resolve_benchmark(text, split, data_dir=data_dir)
        return _read_file(f, source=text.lower(), limit=limit, skip_invalid=skip_invalid,
                          require_answer=require_answer)
    if _looks_like_hf_id(text) and not text.startswith((".", "/", "~")):
        return _load_hf(text, split, limit=limit, skip_invalid=skip_invalid, require_answer=require_answer)
    raise DataError(
        f"no such file or directory: {text!r}, and it is not a known benchmark name "
        f"({', '.join(sorted(BENCHMARKS))}) or a Hugging Face dataset id ('owner/name'). "
        "Check the path, or use one of the names with data_dir=... / BCR_DATA_DIR"
    )


def iter_problems(
    source: str | os.PathLike,
    split: str | None = None,
    limit: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    require_answer: bool = True,
) -> Iterator[Problem]:
    """The problems :func:`load_problems` returns, one at a time, for inputs too large to hold.

    A JSON Lines file (``.jsonl`` / ``.ndjson``) is read line by line, so memory does not grow with it;
    any other source is loaded whole by :func:`load_problems` first. A bad row raises
    :class:`DataError` when it is reached (the rows before it have been yielded), so read once to
    validate before acting on the problems.
    """
    path = Path(source).expanduser()
    if not (path.is_file() and _SUFFIXES.get(path.suffix.lower()) == "jsonl"):
        yield from load_problems(source, split, limit, data_dir=data_dir, require_answer=require_answer)
        return
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    label = _label_for(path)
    for index, (loc, rec) in enumerate(_iter_jsonl(path)):
        if limit is not None and index >= limit:
            return
        try:
            if isinstance(rec, Exception):
                raise rec
            problem = problem_from_record(rec, default_id=f"{label}-{index}", source=label,
                                          require_answer=require_answer)
        except DataError as e:
            raise DataError(f"{loc}: {e} (fix the row)") from None
        yield problem
