r"""Flexible extraction: answers for models that ignore the BCR answer format (the strict parser's
fallback, as lm-evaluation-harness' ``flexible-extract`` is the fallback of its strict match).

:func:`flexible_answers` keeps every strict answer of :func:`bcr.task.strict_parsing.parse_completion` and
searches the section of each instance left without one.
"""

from __future__ import annotations

import re
from collections import deque

from bcr.data.boxes import find_complete_boxes
from bcr.task.strict_parsing import _HEADER_RE, _MEANINGFUL_RE, ParsedCompletion, _clean_plain, _Lines, _think_split

__all__ = ["flexible_answers"]

# "answer is <value>" (the "final answer is", "so the answer is: ..." of instruct models)
_ANSWER_IS_RE = re.compile(r"[aA](?<!\w[aA])(?i:nswer)[ \t]++(?i:is)\b[ \t:]*+")
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*+(?:\.\d+)?(?:/\d+)?")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|[,;](?:\s)|\s+(?:since|because|which|as)\b")
_UNIT_AFTER_NUMBER_RE = re.compile(r"(-?\$?\d+(?:,\d{3})*+(?:\.\d+)?%?)[ \t]+[^\W\d_]")


def _last_match(pattern: re.Pattern[str], s: str) -> re.Match[str] | None:
    return next(iter(deque(pattern.finditer(s), maxlen=1)), None)


def _answer_is_value(section: str) -> str | None:
    """The value after the last "answer is" in ``section``: to the end of its sentence, cleaned;
    a number followed by a word ("10 apples") gives the number."""
    last = _last_match(_ANSWER_IS_RE, section)
    if last is None:
        return None
    rest = section[last.end() : _Lines(section, 0, len(section)).end(last.end())]
    cut = _SENTENCE_END_RE.search(rest)
    value = _clean_plain(rest[: cut.start()] if cut else rest)
    unit = _UNIT_AFTER_NUMBER_RE.match(value)
    if unit:
        value = unit.group(1)
    return value if value and _MEANINGFUL_RE.search(value) else None


def _flexible_in(section: str) -> str | None:
    boxes = find_complete_boxes(section, 0, len(section))
    if boxes:
        a, b, _ = boxes[-1][1]
        return section[a:b].strip() or None
    value = _answer_is_value(section)
    if value is not None:
        return value
    last = _last_match(_NUMBER_RE, section)
    return last.group(0) if last is not None else None


def flexible_answers(text: str, parsed: ParsedCompletion, *, truncated: bool = False) -> list[str | None]:
    r"""Answers for models that ignore the BCR format, one per instance of ``parsed`` (the
    :func:`parse_completion` of ``text``).

    An instance keeps its strict answer when it has one. Otherwise its *section* is searched: its
    segment, or for N = 1 without a segment the parsed section (after a think block). In it the
    last complete ``\boxed{}`` wins, else the value after the last "answer is", else the last number
    (as lm-evaluation-harness' ``flexible-extract`` takes the last number); a header line opening the
    section is not searched. Of a ``truncated``
    completion, "answer is" values and numbers on the unterminated last line are ignored (they may
    be cut off). Instances with N > 1 and no segment stay without an answer. Never raises.
    """
    strict = parsed.answers
    try:
        if not isinstance(text, str):
            return list(strict)
        lo, _ = _think_split(text)
        out: list[str | None] = []
        for inst in parsed.instances:
            span = inst.span if inst.span is not None else ((lo, len(text)) if len(strict) == 1 else None)
            if inst.answer is not None or span is None:
                out.append(inst.answer)
                continue
            section = text[span[0] : span[1]]
            header = _HEADER_RE.match(section)
            if header is not None:  # "Problem 2" is not an answer
                section = section[header.end() :]
            found = _flexible_in(section)
            if found is not None and truncated and span[1] == len(text) and not find_complete_boxes(section, 0, len(section)):
                section = section[: section.rfind("\n") + 1]  # drop the line the budget cut
                found = _flexible_in(section)
            out.append(found)
        return out
    except Exception:  # pragma: no cover - defensive, like parse_completion
        return list(strict)
