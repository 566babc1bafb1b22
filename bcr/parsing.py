r"""Parse one completion that answers N problems into per-instance answers and character spans.

The prompt (:mod:`bcr.prompts`) asks, for N > 1, for one section per problem::

    ### Problem k
    <work>
    Answer k: \boxed{<answer>}

and, for N = 1, for an ordinary solution whose last ``\boxed{...}`` is the answer. Real models
deviate from this in many ways, so :func:`parse_completion` is lenient and **never raises**. The
rules it applies, in order, are the specification (tests in ``tests/test_parsing.py`` pin them):

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
    A plain (unboxed) labelled value on the unterminated last line is discarded (it may be cut
    mid-number). The instance whose segment reaches the end of the text is flagged ``truncated``;
    when no segment does and non-blank text follows the last segment, that text becomes the segment
    of the lowest-numbered instance with neither answer nor segment (the one being worked on), which
    is flagged ``truncated``.

``out_of_order`` is set for instance k when its segment starts before that of some j < k or after
that of some j > k.

Token attribution: :func:`segment_ids_for_tokens` maps token character offsets to instance ids
(0-based, -1 shared), :func:`token_offsets` computes a tokenizer's character offsets by incremental
decoding, :func:`completion_segment_ids` glues the two.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = [
    "InstanceParse",
    "ParsedCompletion",
    "completion_segment_ids",
    "extract_boxed",
    "parse_completion",
    "segment_ids_for_tokens",
    "token_offsets",
]

Span = tuple[int, int]


@dataclass
class InstanceParse:
    """What the parser found for one instance (problem) of a completion."""

    answer: Optional[str] = None
    span: Optional[Span] = None
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
    def answers(self) -> list[Optional[str]]:
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

_THINK_CLOSE = "</think>"

_HEADER_RE = re.compile(
    r"^[ \t]*(?P<hash>\#{1,6}[ \t]*)?(?P<bold>\*\*|__)?[ \t]*(?:problem|question)[ \t]*"
    r"(?:\#[ \t]*)?\(?(?P<k>\d{1,4})\)?[ \t]*(?P<bold2>\*\*|__)?[ \t]*(?P<punct>[:：.)\]])?"
    r"(?P<rest>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)

_LABEL_RE = re.compile(
    r"(?:\*\*|__)?[ \t]*\b(?:final[ \t]+)?answer[ \t]*"
    r"(?:(?:to|for|of)[ \t]+)?(?:(?:problem|question)[ \t]*)?(?:\#[ \t]*)?"
    r"(?:\(?(?P<k>\d{1,4})\)?)?[ \t]*(?:\*\*|__)?[ \t]*[:：][ \t]*(?:\*\*|__)?",
    re.IGNORECASE,
)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)[ \t]*(?=[{ ])")

# a plain (unboxed) value needs a letter, digit or LaTeX command to count as an answer
_MEANINGFUL_RE = re.compile(r"[^\W_]|\\")

_LEAD_WRAP_RE = re.compile(r"(?:\s|\$\$?|\\\(|\\\[|\*\*)*")


def _line_end(text: str, pos: int, limit: int) -> int:
    e = text.find("\n", pos, limit)
    return limit if e < 0 else e


def _line_start(text: str, pos: int, lo: int) -> int:
    s = text.rfind("\n", lo, pos)
    return lo if s < 0 else s + 1


def _read_braced(text: str, open_pos: int, limit: int) -> Optional[int]:
    """Index just past the ``}`` matching the ``{`` at ``open_pos`` (backslash escapes skipped)."""
    depth = 0
    i = open_pos
    while i < limit:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxed_at(text: str, m_end: int, limit: int) -> Optional[tuple[str, int]]:
    """Read the argument of a ``\\boxed`` whose name ends at ``m_end``: (content, end) or None."""
    i = m_end
    while i < limit and text[i] in " \t":
        i += 1
    if i >= limit:
        return None
    if text[i] == "{":
        end = _read_braced(text, i, limit)
        if end is None:
            return None
        return text[i + 1 : end - 1].strip(), end
    # ``\boxed 5``: a single token up to whitespace or ``$``
    m = re.compile(r"[^\s$]+").match(text, i, limit)
    if m is None:
        return None
    return m.group(0), m.end()


def extract_boxed(text: str) -> list[tuple[str, int, int]]:
    """All complete ``\\boxed{...}`` (and ``\\fbox``) in ``text``: (content, start, end)."""
    out = []
    for m in _BOXED_RE.finditer(text):
        got = _boxed_at(text, m.end(), len(text))
        if got is not None:
            out.append((got[0], m.start(), got[1]))
    return out


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


@dataclass
class _Cand:
    value: Optional[str]
    start: int  # where the label (or the \boxed) begins
    line_start: int
    end: int  # end of the answer's line (exclusive), or where the next label begins
    boxed: bool
    k: Optional[int] = None  # label number; None = free


def _scan(text: str, lo: int, hi: int, truncated: bool):
    """Headers, labelled answers and free answers inside ``text[lo:hi]``."""
    headers: list[tuple[int, int]] = []  # (k, start)
    for m in _HEADER_RE.finditer(text, lo, hi):
        rest = m.group("rest").strip()
        ok = (
            m.group("hash") or m.group("bold") or m.group("bold2") or m.group("punct") or not rest
            or (rest.endswith(":") and len(rest) <= 40)
        )
        if ok:
            headers.append((int(m.group("k")), m.start()))

    labels = list(_LABEL_RE.finditer(text, lo, hi))
    boxes = []
    for m in _BOXED_RE.finditer(text, lo, hi):
        got = _boxed_at(text, m.end(), hi)
        boxes.append((m.start(), got))  # got None = unclosed
    box_starts = [b[0] for b in boxes]

    labelled: list[_Cand] = []
    plain_free: list[_Cand] = []
    consumed: set[int] = set()  # starts of boxes used as labelled values
    for idx, m in enumerate(labels):
        kk = m.group("k")
        k = int(kk) if kk is not None else None
        le = _line_end(text, m.end(), hi)
        next_label = labels[idx + 1].start() if idx + 1 < len(labels) else hi
        val_limit = min(le, next_label)
        ls = _line_start(text, m.start(), lo)
        # boxed on the same line (before a following label)?
        j = bisect.bisect_left(box_starts, m.end())
        value: Optional[str] = None
        end = val_limit
        boxed = False
        found_box = False
        if j < len(boxes) and boxes[j][0] < val_limit:
            found_box = True
            got = boxes[j][1]
            consumed.add(boxes[j][0])
            if got is not None:
                value, bend = got
                boxed = True
                end = max(val_limit, _line_end(text, bend, hi)) if bend > val_limit else val_limit
                if next_label < end:
                    end = max(next_label, bend)
        elif not text[m.end():val_limit].strip(" \t*_$") and le < hi and val_limit == le:
            # label ends its line: accept a \boxed at the start of the next non-empty line
            k2 = le + 1
            while k2 < hi and text[k2] in " \t\n":
                k2 += 1
            lead = _LEAD_WRAP_RE.match(text, k2, hi)
            p = lead.end() if lead else k2
            if j < len(boxes) and boxes[j][0] == p:
                found_box = True
                consumed.add(boxes[j][0])
                got = boxes[j][1]
                if got is not None:
                    value, bend = got
                    boxed = True
                    end = _line_end(text, bend, hi)
                    if next_label < end:
                        end = max(next_label, bend)
        if not found_box:
            raw = text[m.end():val_limit]
            v = _clean_plain(raw)
            cut = truncated and le >= hi  # unterminated last line of a truncated completion
            if v and not cut and _MEANINGFUL_RE.search(v):
                value = v
        if end <= m.start():
            end = val_limit
        cand = _Cand(value, m.start(), ls, end, boxed, k)
        if k is not None:
            labelled.append(cand)
        elif value is not None and not boxed:
            plain_free.append(cand)
        elif value is not None and boxed:
            # "Answer: \boxed{..}" — a free boxed answer whose span starts at the label
            plain_free.append(cand)

    box_free: list[_Cand] = []
    for start, got in boxes:
        if start in consumed or got is None:
            continue
        value, bend = got
        box_free.append(
            _Cand(value, start, _line_start(text, start, lo), _line_end(text, bend, hi), True, None)
        )
    # unnumbered "Answer: \boxed{}" lines are boxed candidates; keep them with the free boxes
    for c in plain_free:
        if c.boxed:
            box_free.append(c)
    box_free.sort(key=lambda c: c.start)
    plain_free = [c for c in plain_free if not c.boxed]
    return headers, labelled, box_free, plain_free


def _region_of(pos: int, hdr_starts: list[int]) -> int:
    """Index of the header section containing ``pos`` (-1 before the first header)."""
    return bisect.bisect_right(hdr_starts, pos) - 1


def _parse_impl(text: str, n: int, truncated: bool) -> ParsedCompletion:
    L = len(text)
    lo, hi = 0, L
    think_span: Optional[Span] = None
    close = text.rfind(_THINK_CLOSE)
    if close >= 0:
        post = close + len(_THINK_CLOSE)
        if text[post:].strip():
            think_span = (0, post)
            lo = post

    headers, labelled, box_free, plain_free = _scan(text, lo, hi, truncated)
    headers = [(k, s) for k, s in headers if 1 <= k <= n]
    hdr_starts = [s for _, s in headers]
    hdr_ks = [k for k, _ in headers]

    winners: dict[int, _Cand] = {}
    dup: dict[int, bool] = {}
    if n == 1:
        boxed_all = sorted(
            [c for c in labelled if c.k == 1 and c.boxed and c.value is not None] + box_free,
            key=lambda c: c.start,
        )
        if boxed_all:
            winners[1] = boxed_all[-1]
            dup[1] = len(boxed_all) > 1
        else:
            plain = sorted(
                [c for c in labelled if c.k == 1 and c.value is not None] + plain_free,
                key=lambda c: c.start,
            )
            if plain:
                winners[1] = plain[-1]
                dup[1] = len(plain) > 1
    else:
        by_k: dict[int, list[_Cand]] = {}
        for c in labelled:
            if c.k is not None and 1 <= c.k <= n and c.value is not None:
                by_k.setdefault(c.k, []).append(c)
        for k, cs in by_k.items():
            winners[k] = cs[-1]
            dup[k] = len(cs) > 1
        any_label = any(c.k is not None and 1 <= c.k <= n for c in labelled)
        if headers:
            for k in range(1, n + 1):
                if k in winners or k not in hdr_ks:
                    continue
                for pool in (box_free, plain_free):
                    cs = [c for c in pool if (r := _region_of(c.start, hdr_starts)) >= 0 and hdr_ks[r] == k]
                    if cs:
                        winners[k] = cs[-1]
                        dup[k] = len(cs) > 1
                        break
        elif not any_label:
            pool = box_free if box_free else plain_free
            if len(pool) > n:
                pool = pool[-n:]
            for i, c in enumerate(pool):
                winners[i + 1] = c
                dup[i + 1] = False

    # ---- tentative segments
    win_ends = sorted((c.end, k) for k, c in winners.items())
    tentative: list[tuple[int, int, int]] = []  # (start, end, k)
    for k in range(1, n + 1):
        c = winners.get(k)
        if c is not None:
            own = [s for kk, s in headers if kk == k and s <= c.line_start]
            if own:
                s = own[-1]
            else:
                s = lo
                for e, kk in win_ends:
                    if kk != k and e <= c.start:
                        s = max(s, e)
                for kk, hs in headers:
                    if kk != k and hs <= c.line_start:
                        s = max(s, hs)
            e = c.end
        elif k in hdr_ks:
            s = hdr_starts[hdr_ks.index(k)]
            nxt = bisect.bisect_right(hdr_starts, s)
            e = hdr_starts[nxt] if nxt < len(hdr_starts) else hi
        else:
            continue
        s = max(lo, min(s, hi))
        e = max(lo, min(e, hi))
        if e > s:
            tentative.append((s, e, k))
    tentative.sort()
    segs: list[list[int]] = []
    for s, e, k in tentative:
        if segs and segs[-1][1] > s:
            segs[-1][1] = s
            if segs[-1][1] <= segs[-1][0]:
                segs.pop()
        if segs and segs[-1][1] > s:  # still overlapping (equal starts after a pop): skip
            continue
        segs.append([s, e, k])
    spans: dict[int, Span] = {k: (s, e) for s, e, k in segs}

    instances = [InstanceParse() for _ in range(n)]
    for k in range(1, n + 1):
        inst = instances[k - 1]
        c = winners.get(k)
        if c is not None and c.value is not None and c.value != "":
            inst.answer = c.value
            inst.missing = False
        inst.duplicate = bool(dup.get(k, False)) and not inst.missing
        inst.span = spans.get(k)

    if truncated:
        text_end = len(text.rstrip())
        reached = [k for k, (s, e) in spans.items() if e >= text_end and e > s]
        if reached:
            for k in reached:
                instances[k - 1].truncated = True
        else:
            last_end = max((e for (s, e) in spans.values()), default=lo)
            if text[last_end:hi].strip():
                for k in range(1, n + 1):
                    inst = instances[k - 1]
                    if inst.missing and inst.span is None:
                        inst.span = (last_end, hi)
                        inst.truncated = True
                        spans[k] = inst.span
                        break

    # ---- order flags
    starts = {k: s for k, (s, _) in spans.items()}
    for k, sk in starts.items():
        for j, sj in starts.items():
            if (j < k and sj > sk) or (j > k and sj < sk):
                instances[k - 1].out_of_order = True
                break

    # ---- shared spans: the complement of instance spans, think block on its own
    shared: list[Span] = []
    cuts = sorted(spans.values())
    pos = 0
    if think_span is not None:
        shared.append(think_span)
        pos = think_span[1]
    for s, e in cuts:
        if s > pos:
            shared.append((pos, s))
        pos = max(pos, e)
    if pos < L:
        shared.append((pos, L))
    return ParsedCompletion(instances, shared)


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


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------


def segment_ids_for_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Optional[Span]]
) -> list[int]:
    """Instance id (0-based) of each token, -1 for shared text.

    A token ``(a, b)`` belongs to the instance whose span covers the most of its characters, if
    that overlap is at least the token's overlap with shared text (ties between instances go to the
    earlier span); a zero-width token ``(a, a)`` (a special token, or the leading bytes of a
    character completed by a later token) belongs to the span containing position ``a``. Cost
    O(T log N).
    """
    items = sorted((s, e, k) for k, sp in enumerate(spans) if sp is not None for s, e in [sp] if e > s)
    starts = [s for s, _, _ in items]
    out: list[int] = []
    for a, b in offsets:
        a = int(a)
        b = int(b)
        if b <= a:
            i = bisect.bisect_right(starts, a) - 1
            out.append(items[i][2] if i >= 0 and items[i][0] <= a < items[i][1] else -1)
            continue
        i = max(bisect.bisect_right(starts, a) - 1, 0)
        best, best_ov, covered = -1, 0, 0
        while i < len(items) and items[i][0] < b:
            s, e, k = items[i]
            ov = min(b, e) - max(a, s)
            if ov > 0:
                covered += ov
                if ov > best_ov:
                    best, best_ov = k, ov
            i += 1
        shared = (b - a) - covered
        out.append(best if best >= 0 and best_ov >= shared else -1)
    return out


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _offsets_from_pieces(pieces: list[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def _offsets_batched(tokenizer: Any, ids: list[int], full: str) -> Optional[list[tuple[int, int]]]:
    """Fast path: each token's text in the context of its predecessor, in two batched decodes."""
    batch = getattr(tokenizer, "batch_decode", None)
    if batch is None or not ids:
        return None
    pairs = [ids[max(i - 1, 0) : i + 1] for i in range(len(ids))]
    prevs = [ids[max(i - 1, 0) : i] for i in range(len(ids))]
    d2 = batch(pairs, skip_special_tokens=True)
    d1 = batch(prevs, skip_special_tokens=True)
    pieces = []
    for a, b in zip(d1, d2):
        if not b.startswith(a) or "\ufffd" in a or "\ufffd" in b[len(a):]:
            return None
        pieces.append(b[len(a):])
    if "".join(pieces) != full:
        return None
    return _offsets_from_pieces(pieces)


def _offsets_incremental(tokenizer: Any, ids: list[int], full: str) -> Optional[list[tuple[int, int]]]:
    """Sequential incremental detokenisation with a small window (as streaming detokenisers do).

    Tokens that only produce part of a character (byte-level BPE) get a zero-width offset at the
    position where the character starts; the token completing the character gets the character.
    """
    pieces: list[str] = []
    pending: list[int] = []
    p = r = 0
    prefix_text = ""
    for i in range(len(ids)):
        new_text = _decode(tokenizer, ids[p : i + 1])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            if not new_text.startswith(prefix_text):
                return None
            for _ in pending:
                pieces.append("")
            pending = []
            pieces.append(new_text[len(prefix_text):])
            p, r = r, i + 1
            prefix_text = _decode(tokenizer, ids[p:r])
        else:
            pending.append(i)
    if pending:
        new_text = _decode(tokenizer, ids[p:])
        if not new_text.startswith(prefix_text):
            return None
        for _ in pending[:-1]:
            pieces.append("")
        pieces.append(new_text[len(prefix_text):])
    if "".join(pieces) != full:
        return None
    return _offsets_from_pieces(pieces)


def _offsets_exact(tokenizer: Any, ids: list[int], full: str) -> list[tuple[int, int]]:
    """Always-correct fallback: decode every prefix (O(T^2) characters). Ends are the common
    prefix length of the prefix's decode with the full text, made monotone."""
    out = []
    prev = 0
    for i in range(len(ids)):
        t = _decode(tokenizer, ids[: i + 1])
        n = 0
        m = min(len(t), len(full))
        # common prefix length, starting from the previous end as a hint
        n = min(prev, m)
        while n > 0 and t[:n] != full[:n]:
            n -= 1
        while n < m and t[n] == full[n]:
            n += 1
        end = max(prev, n)
        out.append((prev, end))
        prev = end
    if out and prev < len(full):
        out[-1] = (out[-1][0], len(full))
    return out


def token_offsets(tokenizer: Any, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character offsets ``(start, end)`` of each token within
    ``tokenizer.decode(token_ids, skip_special_tokens=True)``.

    Works for any tokenizer with ``decode`` (byte-level BPE, SentencePiece/Metaspace, WordPiece),
    trying three methods and keeping the first whose pieces concatenate to the full decode:

    1. batched: every token decoded together with its predecessor, two ``batch_decode`` calls
       (one Rust call each for fast tokenizers) — O(T);
    2. incremental: sequential windowed decoding (about two decodes of a few tokens per token) —
       O(T) decodes; handles tokens that carry part of a UTF-8 character (they get a zero-width
       offset; the token completing the character gets it) and special tokens (zero width);
    3. exact: decode every prefix — O(T^2) characters, only when 1 and 2 disagree with the full
       decode (e.g. ``clean_up_tokenization_spaces`` rewriting across tokens).

    Offsets are monotone, contiguous, and the last one ends at ``len(full text)``.
    """
    ids = [int(t) for t in token_ids]
    if not ids:
        return []
    full = _decode(tokenizer, ids)
    for method in (_offsets_batched, _offsets_incremental):
        try:
            got = method(tokenizer, ids, full)
        except Exception:
            got = None
        if got is not None:
            return got
    return _offsets_exact(tokenizer, ids, full)


def completion_segment_ids(tokenizer: Any, token_ids: Sequence[int], parsed: ParsedCompletion) -> list[int]:
    """Per-token instance ids (-1 shared) of a completion whose decoded text was parsed."""
    return segment_ids_for_tokens(token_offsets(tokenizer, token_ids), [i.span for i in parsed.instances])
