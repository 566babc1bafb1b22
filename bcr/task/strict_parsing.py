r"""The strict parser: one completion that answers N problems -> per-instance answers and character spans.

The prompt (:mod:`bcr.task.prompts`) asks, for N > 1, for one section per problem::

    ### Problem k
    <work>
    Answer k: \boxed{<answer>}

and, for N = 1, for an ordinary solution whose last ``\boxed{...}`` is the answer. Real models
deviate from this in many ways, so :func:`parse_completion` is lenient and **never raises**. The
rules it applies, in order, are the specification (tests in ``tests/task/test_parsing.py`` pin them):

Think blocks (R1 style)
    If the text contains ``</think>`` and the text after the *last* ``</think>`` has any
    non-whitespace character (a "post-think section" exists), only the post-think section is
    parsed; everything from the start of the text to the end of that ``</think>`` is one shared span
    and answers inside it do **not** count (as DeepSeek-R1's graders strip the reasoning). If the
    post-think section is empty, or the block was never closed (e.g. the completion was cut off
    while thinking, or the chat template opened ``<think>`` in the prompt), the whole text is parsed.

Headers
    A header is a line such as ``### Problem 2``, ``**Problem 2:**``, ``Problem 2:``,
    ``## Question 2``, ``Problem #2.`` (case-insensitive; a bare "Problem 2 ..." line must carry
    a markdown marker, punctuation after the number, or nothing else, so prose such as
    "Problem 2 asks for" is not a header). Headers with k outside 1..N are plain text.

Answers
    *Labelled* answer: ``Answer k: <value>`` with variants ``**Answer k:**``, ``Final Answer k:``,
    ``Answer to Problem k:``, ``Answer (k):`` and a full-width colon. The value is the first
    ``\boxed{...}`` on the label's line (or on the next line when the label ends its line), else the
    rest of the line (markdown ``**``, ``$`` and a final period stripped; cut at a following label on
    the same line; a plain value without any letter, digit or backslash is no answer).
    *Free* answers: ``\boxed{...}`` not inside a labelled answer, and unnumbered
    ``Answer: <value>`` lines. ``\boxed`` content is read with balanced braces (``\{`` and ``\}`` are
    escaped, so ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``); an unclosed ``\boxed{`` is no answer.

Which answer wins (N > 1), per instance k
    1. the **last** labelled ``Answer k`` anywhere in the parsed section (graders for one problem
       take the last boxed answer; a restatement later in the text is the model's final word);
    2. else, when k has a header, the last free ``\boxed`` in k's header sections (a section runs
       to the next header), else the last unnumbered ``Answer:`` line there;
    3. else, when the completion has no labelled answers and no headers at all, the free answers
       (the ``\boxed`` ones if any exist, else the ``Answer:`` lines) are assigned in text order to
       instances 1, 2, ...; if there are more than N, the *last* N are used (a final summary line
       ``\boxed{a}, \boxed{b}, \boxed{c}`` after boxed intermediate results is the common case);
    4. else the instance is ``missing`` (answer ``None``).
    ``duplicate`` is set when the winning rule saw more than one candidate for k (the last won).

N = 1
    The last ``\boxed{...}`` anywhere in the parsed section wins (labelled or not); without any
    boxed answer, the last ``Answer:`` / ``Answer 1:`` line.

Segments (character spans, end exclusive)
    Instance k's segment starts at its header (the last header of k before its answer, or its first
    header when it has no answer); lacking a header, at the end of the previous answer line of any
    instance in text order, or at the last header of another instance before it, or at the start of
    the parsed section. It ends at the end of its answer line (or, when another label follows on the
    same line, where that label begins); an instance with a header but no answer runs to the next
    header or the end of the text. Overlaps (restatements, answers out of place) are resolved by
    sorting segments by start and cutting each one where the next begins; a segment cut to nothing
    becomes ``None``. Everything not in an instance segment is shared: ``shared_spans`` is the exact
    complement, with the think block as its own span, so instance spans and shared spans partition
    ``[0, len(text))``.

Truncation (``truncated=True``: the generation hit the token budget)
    An answer is complete when its answer line is: a plain (unboxed) labelled value on the
    unterminated last line is discarded (it may be cut mid-number), and an unclosed ``\boxed{`` is
    no answer (as always). An answer that is kept is complete wherever the text ends: a completion
    cut right after ``Answer 2: \boxed{8}``, or after the newline that ends ``Answer 2: 8``, has
    answered problem 2. Only an instance without an answer is flagged ``truncated`` (the one being
    worked on when the budget ran out): the one whose segment reaches the end of the text; when no
    segment does and non-blank text follows the last segment, the lowest-numbered instance with
    neither answer nor segment, which gets that text as its segment.

``out_of_order`` is set for instance k when its segment starts before that of some j < k or after
that of some j > k.

For models that ignore the format, :mod:`bcr.task.flexible_extraction` adds a fallback; token
attribution is :mod:`bcr.task.token_segments`; :mod:`bcr.task.parsing` gathers the three.
"""

from __future__ import annotations

import bisect
import operator
import re
from dataclasses import dataclass, field

from bcr.data.boxes import Box, find_boxes

__all__ = ["InstanceParse", "ParsedCompletion", "Span", "parse_completion"]

Span = tuple[int, int]


@dataclass
class InstanceParse:
    """What the parser found for one instance (problem) of a completion."""

    answer: str | None = None
    span: Span | None = None
    missing: bool = True
    duplicate: bool = False
    out_of_order: bool = False
    truncated: bool = False


@dataclass
class ParsedCompletion:
    """Per-instance parses plus the shared (unattributed) character spans."""

    instances: list[InstanceParse] = field(default_factory=list)
    shared_spans: list[Span] = field(default_factory=list)

    @property
    def answers(self) -> list[str | None]:
        return [inst.answer for inst in self.instances]

    @property
    def n_problems(self) -> int:
        return len(self.instances)

    @property
    def num_missing(self) -> int:
        return sum(inst.missing for inst in self.instances)


# ----------------------------------------------------------------------------------------------
# Lexical pieces
# ----------------------------------------------------------------------------------------------
#
# Every pattern runs in time linear in its input: runs of spaces and tabs are matched with
# possessive quantifiers (``*+``), which give back nothing, so a failed match never re-splits a long
# run between two adjacent ``[ \t]*``. Possessive and greedy agree on every match here because
# the element after each run can never start with a space or a tab.

_THINK_CLOSE = "</think>"

_HEADER_RE = re.compile(
    r"^[ \t]*+(?P<hash>\#{1,6}[ \t]*+)?(?P<bold>\*\*|__)?[ \t]*+(?:problem|question)[ \t]*+"
    r"(?:\#[ \t]*+)?\(?(?P<k>\d{1,4})\)?[ \t]*+(?P<bold2>\*\*|__)?[ \t]*+(?P<punct>[:：.)\]])?"
    r"(?P<rest>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)

# A label is ``(?:\*\*|__)?[ \t]*`` followed by this core; the optional lead-in is found by looking
# back from the core (see _find_labels) instead of being retried at every space of a long run.
# The core is ``\b(?:final[ \t]+)?answer...`` (case-insensitive) written to start with a plain
# character class, which the regex engine scans for quickly: only a, A, f, F fold to "a" / "f", and
# ``\b`` before a word character is "no word character before it".
_LABEL_CORE_RE = re.compile(
    r"[aAfF](?<!\w[aAfF])(?:(?<=[fF])(?i:inal)[ \t]++(?i:answer)|(?<=[aA])(?i:nswer))"
    r"(?i:[ \t]*+(?:(?:to|for|of)[ \t]++)?(?:(?:problem|question)[ \t]*+)?(?:\#[ \t]*+)?"
    r"(?:\(?(?P<k>\d{1,4})\)?)?[ \t]*+(?:\*\*|__)?[ \t]*+[:：][ \t]*+(?:\*\*|__)?)"
)


# a plain (unboxed) value needs a letter, digit or LaTeX command to count as an answer
_MEANINGFUL_RE = re.compile(r"[^\W_]|\\")

_LEAD_WRAP_RE = re.compile(r"(?:\s|\$\$?|\\\(|\\\[|\*\*)*")


class _Lines:
    """Line boundaries inside ``text[lo:hi]``.

    The scan asks about increasing positions (and, for the ends of nested boxes, decreasing ones),
    many of them on the same line; the last answer is remembered so that a long line holding
    thousands of labels or boxes is searched once, not once per label.
    """

    def __init__(self, text: str, lo: int, hi: int) -> None:
        self.text, self.lo, self.hi = text, lo, hi
        self._end_from = self._end = -1  # no newline in [_end_from, _end)
        self._start = self._start_to = -1  # no newline in [_start, _start_to)

    def end(self, pos: int) -> int:
        """Index of the newline ending the line of ``pos`` (``hi`` on the last line)."""
        if self._end_from <= pos <= self._end:
            return self._end
        if 0 <= pos < self._end_from and self.text.find("\n", pos, self._end_from) < 0:
            self._end_from = pos  # the same line, further left (the closing ends of nested boxes)
            return self._end
        e = self.text.find("\n", pos, self.hi)
        e = self.hi if e < 0 else e
        self._end_from, self._end = pos, e
        return e

    def start(self, pos: int) -> int:
        """Index of the first character of the line of ``pos`` (not before ``lo``)."""
        if self._start <= pos <= self._start_to:
            return self._start
        s = self.text.rfind("\n", self.lo, pos)
        s = self.lo if s < 0 else s + 1
        self._start, self._start_to = s, self.end(pos)
        return s


def _clean_plain(value: str) -> str:
    v = value.strip()
    for _ in range(3):
        v0 = v
        v = v.strip().strip("*_").strip()
        if v.endswith("."):
            v = v[:-1]
        if v.endswith(","):
            v = v[:-1]
        if len(v) >= 2 and v[0] == "$" and v[-1] == "$":
            v = v.strip("$")
        elif v.startswith("\\(") and v.endswith("\\)"):
            v = v[2:-2]
        elif v.startswith("\\[") and v.endswith("\\]"):
            v = v[2:-2]
        if v == v0:
            break
    return v.strip()


# ----------------------------------------------------------------------------------------------
# Stage 1: scan the parsed section for headers, labels and boxes
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cand:
    value: str | None  # a plain value; a boxed one is text[content[0]:content[1]].strip()
    start: int  # where the label (or the \boxed) begins
    line_start: int
    end: int  # end of the answer's line (exclusive), or where the next label begins
    boxed: bool
    k: int | None = None  # label number; None = free
    content: tuple[int, int] | None = None  # the boxed value's span

    @property
    def present(self) -> bool:
        """Whether the candidate holds a value (an empty box does)."""
        return self.value is not None or self.content is not None

    def answer(self, text: str) -> str | None:
        return text[self.content[0] : self.content[1]].strip() if self.content is not None else self.value


_START = operator.attrgetter("start")


@dataclass(slots=True)
class _Label:
    start: int  # including a ``**`` / ``__`` and blanks before the word "answer"
    end: int  # just past the colon (and blanks / ``**`` after it)
    k: int | None


@dataclass
class _Found:
    """What stage 1 found: the headers of instances 1..N as (k, start) in text order (a header with
    another k is plain text) and the answer candidates."""

    headers: list[tuple[int, int]]
    labelled: list[_Cand]  # numbered labels, in text order
    box_free: list[_Cand]  # free boxes and "Answer: \boxed{}" lines, by start
    plain_free: list[_Cand]  # unnumbered "Answer: value" lines, in text order


def _think_split(text: str) -> tuple[int, Span | None]:
    """Where the parsed section starts, and the think block's span when it is excluded."""
    close = text.rfind(_THINK_CLOSE)
    if close >= 0:
        post = close + len(_THINK_CLOSE)
        if text[post:].strip():
            return post, (0, post)
    return 0, None


def _find_headers(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """``(k, start)`` of every header line in ``text[lo:hi]`` (any k)."""
    headers = []
    for m in _HEADER_RE.finditer(text, lo, hi):
        rest = m.group("rest").strip()
        ok = (
            m.group("hash") or m.group("bold") or m.group("bold2") or m.group("punct") or not rest
            or (rest.endswith(":") and len(rest) <= 40)
        )
        if ok:
            headers.append((int(m.group("k")), m.start()))
    return headers


def _find_labels(text: str, lo: int, hi: int) -> list[_Label]:
    """Every ``Answer k:`` / ``Answer:`` label in ``text[lo:hi]``, in text order.

    Equal to scanning with ``(?:\\*\\*|__)?[ \\t]*`` + :data:`_LABEL_CORE_RE` at every position: a
    label starts at the earliest position, not before the previous label's end, from which blanks
    (and one ``**`` / ``__`` before them) lead to the core.
    """
    labels = []
    floor = lo
    for m in _LABEL_CORE_RE.finditer(text, lo, hi):
        start = m.start()
        if start > floor and text[start - 1] in " \t":
            start = floor + len(text[floor:start].rstrip(" \t"))
        if start - 2 >= floor and text[start - 2 : start] in ("**", "__"):
            start -= 2
        kk = m.group("k")
        floor = m.end()
        labels.append(_Label(start, floor, int(kk) if kk is not None else None))
    return labels


def _boxed_end(box_line_end: int, bend: int, val_limit: int, next_label: int) -> int:
    """Where a labelled boxed answer ends: its line's end (not before the label's value limit),
    or where the next label begins when that comes first (never inside the box)."""
    end = max(val_limit, box_line_end) if bend > val_limit else val_limit
    if next_label < end:
        end = max(next_label, bend)
    return end


def _label_value(
    text: str,
    label: _Label,
    next_label: int,
    boxes: list[Box],
    box_starts: list[int],
    lines: _Lines,
    truncated: bool,
) -> tuple[_Cand, int | None]:
    """The candidate a label gives, and the start of the box it consumed (None if none)."""
    hi = lines.hi
    le = lines.end(label.end)
    val_limit = min(le, next_label)
    j = bisect.bisect_left(box_starts, label.end)
    value: str | None = None
    content: tuple[int, int] | None = None
    end = val_limit
    boxed = False
    used: int | None = None
    if j < len(boxes) and boxes[j][0] < val_limit:
        # a \boxed on the label's line (before a following label)
        used = boxes[j][0]
        got = boxes[j][1]
        if got is not None:
            content, bend = got[:2], got[2]
            boxed = True
            end = _boxed_end(lines.end(bend), bend, val_limit, next_label)
    elif not text[label.end : val_limit].strip(" \t*_$") and le < hi and val_limit == le:
        # the label ends its line: accept a \boxed at the start of the next non-empty line
        p = _LEAD_WRAP_RE.match(text, le + 1, hi).end()
        if j < len(boxes) and boxes[j][0] == p:
            used = p
            got = boxes[j][1]
            if got is not None:
                content, bend = got[:2], got[2]
                boxed = True
                end = _boxed_end(lines.end(bend), bend, le, next_label)
    if used is None:
        v = _clean_plain(text[label.end : val_limit])
        cut = truncated and le >= hi  # unterminated last line of a truncated completion
        if v and not cut and _MEANINGFUL_RE.search(v):
            value = v
    if end <= label.start:
        end = val_limit
    return _Cand(value, label.start, lines.start(label.start), end, boxed, label.k, content), used


def _scan(text: str, lo: int, hi: int, truncated: bool, n: int) -> _Found:
    """Stage 1: headers, labelled answers and free answers inside ``text[lo:hi]`` (for N = ``n``)."""
    lines = _Lines(text, lo, hi)
    labels = _find_labels(text, lo, hi)
    boxes = find_boxes(text, lo, hi)
    box_starts = [start for start, _ in boxes]

    labelled: list[_Cand] = []
    plain_free: list[_Cand] = []
    consumed: set[int] = set()  # starts of boxes used as labelled values
    for idx, label in enumerate(labels):
        next_label = labels[idx + 1].start if idx + 1 < len(labels) else hi
        cand, used = _label_value(text, label, next_label, boxes, box_starts, lines, truncated)
        if used is not None:
            consumed.add(used)
        if cand.k is not None:
            labelled.append(cand)
        elif cand.present:
            plain_free.append(cand)  # "Answer: \boxed{..}" too: a free boxed answer starting at the label

    headers = [(k, s) for k, s in _find_headers(text, lo, hi) if 1 <= k <= n]  # others are plain text
    free = [(start, got) for start, got in boxes if got is not None and start not in consumed]
    box_free = [
        _Cand(None, start, lines.start(start), lines.end(got[2]), True, None, got[:2])
        for start, got in _last_per_section(free, [s for _, s in headers], max(n, 2))
    ]
    # unnumbered "Answer: \boxed{}" lines are boxed candidates; keep them with the free boxes
    box_free.extend(c for c in plain_free if c.boxed)
    box_free.sort(key=_START)
    plain_free = [c for c in plain_free if not c.boxed]
    return _Found(headers, labelled, box_free, plain_free)


def _last_per_section(boxes: list[Box], section_starts: list[int], keep: int) -> list[Box]:
    """The last ``keep`` of ``boxes`` (sorted by start) in every header section and before the first.

    Stage 2 reads no more of the free boxes than that (per section the last one and whether there
    are several; with no headers the last N), so a completion of thousands of boxes costs a few
    candidates per section instead of one per box.
    """
    if len(boxes) <= keep:
        return boxes
    starts = [start for start, _ in boxes]
    cuts = [bisect.bisect_left(starts, s) for s in section_starts] + [len(boxes)]
    kept: list[Box] = []
    begin = 0
    for cut in cuts:
        kept.extend(boxes[max(begin, cut - keep) : cut])
        begin = cut
    return kept


# ----------------------------------------------------------------------------------------------
# Stage 2: which answer wins, per instance
# ----------------------------------------------------------------------------------------------

# instance k -> (winning candidate, whether the winning rule saw more than one candidate)
_Winners = dict[int, tuple[_Cand, bool]]


def _last_of(cands: list[_Cand]) -> tuple[_Cand, bool]:
    return cands[-1], len(cands) > 1


def _winner_single(found: _Found) -> _Winners:
    """N = 1: the last boxed answer anywhere, else the last ``Answer:`` / ``Answer 1:`` line."""
    boxed = [c for c in found.labelled if c.k == 1 and c.boxed and c.present] + found.box_free
    if boxed:
        return {1: (max(boxed, key=_START), len(boxed) > 1)}  # starts are distinct
    plain = [c for c in found.labelled if c.k == 1 and c.present] + found.plain_free
    if plain:
        return {1: (max(plain, key=_START), len(plain) > 1)}
    return {}


def _by_section(cands: list[_Cand], headers: list[tuple[int, int]]) -> dict[int, list[_Cand]]:
    """Candidates grouped by the instance whose header section holds them (text order kept)."""
    starts = [s for _, s in headers]
    out: dict[int, list[_Cand]] = {}
    for c in cands:
        r = bisect.bisect_right(starts, c.start) - 1
        if r >= 0:
            out.setdefault(headers[r][0], []).append(c)
    return out


def _winners_multi(n: int, headers: list[tuple[int, int]], found: _Found) -> _Winners:
    """N > 1: rules 1-3 of the module docstring (labels, then header sections, then text order)."""
    labelled = [c for c in found.labelled if c.k is not None and 1 <= c.k <= n]
    by_k: dict[int, list[_Cand]] = {}
    for c in labelled:
        if c.present:
            by_k.setdefault(c.k, []).append(c)
    winners: _Winners = {k: _last_of(cs) for k, cs in by_k.items()}
    if headers:
        _add_section_winners(winners, n, headers, found)
    elif not labelled:
        pool = found.box_free if found.box_free else found.plain_free
        for i, c in enumerate(pool[-n:]):
            winners[i + 1] = (c, False)
    return winners


def _add_section_winners(winners: _Winners, n: int, headers: list[tuple[int, int]], found: _Found) -> None:
    """Rule 2: an instance without a labelled answer takes the last free answer of its sections."""
    sections = [_by_section(found.box_free, headers), _by_section(found.plain_free, headers)]
    header_ks = {k for k, _ in headers}
    for k in range(1, n + 1):
        if k in winners or k not in header_ks:
            continue
        for pool in sections:
            if k in pool:
                winners[k] = _last_of(pool[k])
                break


# ----------------------------------------------------------------------------------------------
# Stage 3: segments, flags and shared spans
# ----------------------------------------------------------------------------------------------


def _tentative_segments(
    n: int, headers: list[tuple[int, int]], winners: _Winners, lo: int, hi: int
) -> list[tuple[int, int, int]]:
    """``(start, end, k)`` per instance before overlaps are resolved, sorted."""
    hdr_starts = [s for _, s in headers]
    own: dict[int, list[int]] = {}
    for k, s in headers:
        own.setdefault(k, []).append(s)
    win_ends = sorted((c.end, k) for k, (c, _) in winners.items())
    tentative = []
    for k in range(1, n + 1):
        if k in winners:
            c = winners[k][0]
            mine = own.get(k, [])
            i = bisect.bisect_right(mine, c.line_start)
            if i > 0:
                s = mine[i - 1]  # the last header of k before its answer
            else:
                s = lo
                for e, kk in win_ends:
                    if kk != k and e <= c.start:
                        s = max(s, e)
                i = bisect.bisect_right(hdr_starts, c.line_start)
                if i > 0:  # the last header (of another instance) before the answer
                    s = max(s, hdr_starts[i - 1])
            e = c.end
        elif k in own:
            s = own[k][0]
            nxt = bisect.bisect_right(hdr_starts, s)
            e = hdr_starts[nxt] if nxt < len(hdr_starts) else hi
        else:
            continue
        s = max(lo, min(s, hi))
        e = max(lo, min(e, hi))
        if e > s:
            tentative.append((s, e, k))
    tentative.sort()
    return tentative


def _resolve_overlaps(tentative: list[tuple[int, int, int]]) -> dict[int, Span]:
    """Cut each segment where the next begins; a segment cut to nothing is dropped."""
    segs: list[list[int]] = []
    for s, e, k in tentative:
        if segs and segs[-1][1] > s:
            segs[-1][1] = s
            if segs[-1][1] <= segs[-1][0]:
                segs.pop()
        if segs and segs[-1][1] > s:  # still overlapping (equal starts after a pop): skip
            continue
        segs.append([s, e, k])
    return {k: (s, e) for s, e, k in segs}


def _instances(text: str, n: int, winners: _Winners, spans: dict[int, Span]) -> list[InstanceParse]:
    instances = [InstanceParse() for _ in range(n)]
    for k in range(1, n + 1):
        inst = instances[k - 1]
        c, dup = winners.get(k, (None, False))
        value = c.answer(text) if c is not None else None
        if value is not None and value != "":
            inst.answer = value
            inst.missing = False
        inst.duplicate = dup and not inst.missing
        inst.span = spans.get(k)
    return instances


def _mark_truncated(text: str, instances: list[InstanceParse], spans: dict[int, Span], lo: int) -> None:
    """Flag the instance being written when the budget ran out, never one with an answer (may give it
    the trailing text)."""
    hi = len(text)
    text_end = len(text.rstrip())
    reached = [k for k, (s, e) in spans.items() if e >= text_end and e > s]
    for k in reached:
        instances[k - 1].truncated = instances[k - 1].missing  # a kept answer's line is complete
    if reached:
        return
    last_end = max((e for (s, e) in spans.values()), default=lo)
    if not text[last_end:hi].strip():
        return
    for k, inst in enumerate(instances, start=1):
        if inst.missing and inst.span is None:
            inst.span = (last_end, hi)
            inst.truncated = True
            spans[k] = inst.span
            return


def _mark_out_of_order(instances: list[InstanceParse], spans: dict[int, Span]) -> None:
    starts = {k: s for k, (s, _) in spans.items()}
    for k, sk in starts.items():
        if any((j < k and sj > sk) or (j > k and sj < sk) for j, sj in starts.items()):
            instances[k - 1].out_of_order = True


def _shared_spans(spans: dict[int, Span], think_span: Span | None, length: int) -> list[Span]:
    """The complement of the instance spans in ``[0, length)``, the think block on its own."""
    shared: list[Span] = []
    pos = 0
    if think_span is not None:
        shared.append(think_span)
        pos = think_span[1]
    for s, e in sorted(spans.values()):
        if s > pos:
            shared.append((pos, s))
        pos = max(pos, e)
    if pos < length:
        shared.append((pos, length))
    return shared


def _parse_impl(text: str, n: int, truncated: bool) -> ParsedCompletion:
    lo, think_span = _think_split(text)
    found = _scan(text, lo, len(text), truncated, n)
    headers = found.headers
    winners = _winner_single(found) if n == 1 else _winners_multi(n, headers, found)
    spans = _resolve_overlaps(_tentative_segments(n, headers, winners, lo, len(text)))
    instances = _instances(text, n, winners, spans)
    if truncated:
        _mark_truncated(text, instances, spans, lo)
    _mark_out_of_order(instances, spans)
    return ParsedCompletion(instances, _shared_spans(spans, think_span, len(text)))


def parse_completion(text: str, n_problems: int, *, truncated: bool = False) -> ParsedCompletion:
    """Parse a completion answering ``n_problems`` problems (rules in the module docstring).

    Never raises: a non-string ``text`` is treated as empty, ``n_problems < 1`` gives no instances,
    and an internal error (a bug) degrades to "every instance missing, all text shared".
    """
    try:
        n = int(n_problems)
    except Exception:
        n = 0
    n = max(n, 0)
    if not isinstance(text, str):
        text = ""
    try:
        if n == 0:
            return ParsedCompletion([], [(0, len(text))] if text else [])
        return _parse_impl(text, n, bool(truncated))
    except Exception:  # pragma: no cover - defensive
        return ParsedCompletion([InstanceParse() for _ in range(n)], [(0, len(text))] if text else [])
