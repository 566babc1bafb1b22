"""The answers file of ``bcr solve``: what a run writes, what decided it, and what a resumed run keeps.

``answers.jsonl`` holds one JSON line per problem, in input order, appended a batch at a time
(flushed and fsynced). Beside it, ``answers.jsonl.settings.json`` records the settings that decided
the answers (:func:`bcr.eval.solve.answer_settings`); it is written before the first line, and the
file is cut back before it is (so no state on disk pairs lines with settings that did not make them).

A run that finds the file again continues it only when it agrees with the run:

* the settings: each recorded setting equal to the run's (a budget asked as ``auto`` takes the
  recorded one); a difference is named as ``key old -> new``;
* the lines: line i answers problem i of the input (its ``id``) and was judged against that
  problem's reference answer (its ``reference``, absent when the problem has none).

Of a file that agrees, the run keeps the answered lines up to the end of the last whole batch of
``batch_size`` bundles (all of them once every problem is answered) and cuts the rest off: a batch
cut short by a kill (some of its lines, a torn line) is answered again by the same generate calls,
so the file ends byte for byte as an uninterrupted run writes it. Reading is line by line against
the input read the same way: memory does not grow with the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bcr.runtime.dataclass_cli import ConfigError
from bcr.runtime.io import atomic_write_text

SETTINGS_SUFFIX = ".settings.json"


@dataclass
class Tally:
    """The counts of answer lines, added one at a time: a file's summary without holding its lines."""

    problems: int = 0
    kinds: Counter = field(default_factory=Counter)
    cut_off: int = 0
    retried: int = 0
    answered_by_retry: int = 0
    with_reference: int = 0
    correct: int = 0
    tokens: float = 0.0  # generated tokens: each bundle's shared by its problems, plus each retry's

    def add(self, record: Mapping) -> None:
        self.problems += 1
        self.kinds[record["extraction"]] += 1
        self.cut_off += bool(record["cut_off"])
        self.retried += bool(record["retried"])
        self.answered_by_retry += record["answer_from"] == "retry"
        if "correct" in record:
            self.with_reference += 1
            self.correct += bool(record["correct"])
        self.tokens += record["bundle_tokens"] / record["bundle_size"] + record["retry_tokens"]

    def copy(self) -> Tally:
        return dataclasses.replace(self, kinds=Counter(self.kinds))

    def summary(self) -> dict:
        return {
            "problems": self.problems,
            "strict": self.kinds["strict"],
            "flexible": self.kinds["flexible"],
            "unanswered": self.kinds["none"],
            "cut_off": self.cut_off,
            "retried": self.retried,
            "answered_by_retry": self.answered_by_retry,
            "with_reference": self.with_reference,
            "accuracy": self.correct / self.with_reference if self.with_reference else None,
            "tokens_per_problem": self.tokens / self.problems if self.problems else 0.0,
        }


def summarize_answers(records: Iterable[Mapping]) -> dict:
    """Counts, accuracy (over the problems with a reference) and tokens per problem of answer records."""
    tally = Tally()
    for record in records:
        tally.add(record)
    return tally.summary()


@dataclass
class Kept:
    """What a run keeps of an answers file: its first ``lines`` answers, ``offset`` bytes, their tally,
    and the settings recorded with them (None when nothing is kept)."""

    lines: int = 0
    offset: int = 0
    tally: Tally = field(default_factory=Tally)
    settings: dict | None = None


def settings_path(output: Path) -> Path:
    return output.with_name(output.name + SETTINGS_SUFFIX)


def read_settings(output: Path) -> dict | None:
    path = settings_path(output)
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["settings"])
    except (ValueError, KeyError, TypeError):
        return None


def differences(recorded: Mapping, settings: Mapping) -> list[str]:
    """``key old -> new`` for each setting that differs (a budget asked as ``auto`` takes the recorded one)."""
    keys = dict.fromkeys([*recorded, *settings])
    return [f"{key} {recorded.get(key)!r} -> {settings.get(key)!r}" for key in keys
            if settings.get(key) != "auto" and recorded.get(key) != settings.get(key)]


def _disagreement(record: Mapping, problem, number: int) -> str | None:
    """Why line ``number`` does not answer ``problem`` (None: it does)."""
    if problem is None:
        return f"it has more answers than the input has problems ({number - 1})"
    if record["id"] != problem.id:
        return f"its line {number} answers {record['id']!r}, but problem {number} of the input is {problem.id!r}"
    reference = problem.answer or None
    if record.get("reference") != reference:
        return (f"its answer to {problem.id!r} was judged against the reference {record.get('reference')!r}, "
                f"the input now gives {reference!r}")
    return None


def _answer(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "id" in record else None


def scan(output: Path, problems: Iterable, settings: Mapping, *, total: int, chunk: int) -> Kept | str:
    """What a run with ``settings`` keeps of ``output`` (module docstring), or why it cannot continue it.

    ``problems`` is the input (read again here), ``total`` its length, ``chunk`` the problems of one
    batch (``batch_size`` x ``n``).
    """
    kept = Kept()
    if not output.exists():
        return kept
    tally, lines, offset = Tally(), 0, 0
    inputs = iter(problems)
    with open(output, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a torn last line: the trace of a kill mid-write
            if raw.strip():
                record = _answer(raw)
                if record is None:  # a whole line: not a torn write
                    return f"its line {lines + 1} is not an answer of bcr solve, so it is not an answers file"
                if why := _disagreement(record, next(inputs, None), lines + 1):
                    return why
                tally.add(record)
                lines += 1
            offset += len(raw)
            if lines % chunk == 0 or lines == total:
                kept = Kept(lines, offset, tally.copy())
    if lines == 0:
        return Kept()
    recorded = read_settings(output)
    if recorded is None:
        return f"it holds {lines} answers but no settings record ({settings_path(output).name})"
    if diffs := differences(recorded, settings):
        return f"it was written with other settings ({', '.join(diffs)})"
    kept.settings = recorded
    return kept


def numbered(output: Path, k: int) -> Path:
    """``answers.jsonl`` -> ``answers.<k>.jsonl``."""
    return output.with_name(f"{output.stem}.{k}{output.suffix}")


def pick(output: Path, settings: Mapping, problems: Iterable, *, total: int, chunk: int,
         resume: bool | str) -> tuple[Path, Kept]:
    """The file a run writes and what it keeps of it: ``output`` continued (``resume=True``; one that
    cannot be continued is refused in one line naming why), started afresh (``resume=False``), or with
    ``resume="new_file"`` the first of ``output``, ``answers.2.jsonl``, ``answers.3.jsonl``, ... that it
    can continue or that does not exist yet."""
    if resume is False:
        return output, Kept()
    path = output
    for k in itertools.count(2):
        found = scan(path, problems, settings, total=total, chunk=chunk)
        if isinstance(found, Kept):
            return path, found
        if resume != "new_file":
            raise ConfigError(f"output={str(output)!r} cannot be continued: {found}; pass another output, "
                              f"resume=false to overwrite it, or resume=new_file to write {numbered(output, 2).name}")
        print(f"{path} cannot be continued ({found}); trying {numbered(output, k).name}", file=sys.stderr, flush=True)
        path = numbered(output, k)
    raise AssertionError("unreachable")  # pragma: no cover


def start(output: Path, kept: Kept, settings: Mapping) -> None:
    """Cut ``output`` back to what is kept, then record ``settings`` beside it (in that order: a kill
    between the two leaves kept lines under the settings that wrote them)."""
    with open(output, "ab") as f:
        f.truncate(kept.offset)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_text(settings_path(output), json.dumps({"written_by": "bcr solve", "settings": dict(settings)},
                                                        indent=2) + "\n")
