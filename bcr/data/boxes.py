r"""The brace-balanced ``\boxed{...}`` / ``\fbox{...}`` reader, shared by the problem loaders (a
reference solution's answer is its last box) and the completion parser (:mod:`bcr.task.parsing`).

A box's argument is ``{...}`` read with balanced braces, where a backslash escapes the next
character (``\{``, ``\}`` and ``\\`` do not count), or, for ``\boxed 5``, one token up to whitespace
or ``$``. A box whose braces never close is *unclosed*. Finding every box of a text costs time
linear in its length, also for thousands of unclosed or nested boxes.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["Box", "extract_boxed", "extract_last_boxed", "find_boxes", "find_complete_boxes"]

# the name and the blanks before the argument (a match ends where the argument begins)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)[ \t]*(?=[{ ])[ \t]*+")
_TOKEN_RE = re.compile(r"[^\s$]+")
# escapes that matter for brace matching (a backslash before any other character skips a character
# that is neither a brace nor a backslash); braces are matched with these pairs blanked out
_ESCAPE_RE = re.compile(r"\\[\\{}]")


def _closing_braces(text: str, opens: list[int], hi: int) -> list[int | None]:
    """For each ``{`` at the (increasing) indices ``opens``: the index just past its matching ``}``
    before ``hi``, or None when it is never closed. A backslash escapes the next character
    (``\\{``, ``\\}``, ``\\\\``).

    One vectorised pass over the braces, so N boxes cost O(len) rather than one scan to the end
    per box. The pairing of backslashes agrees with a scan starting at any ``{`` that is not preceded
    by a backslash (the only braces asked about: the arguments of ``\\boxed``).
    """
    if not opens:
        return []
    start = opens[0]
    blanked = _ESCAPE_RE.sub("\0\0", text[start:hi])
    codes = np.frombuffer(blanked.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    pos = np.flatnonzero((codes == 123) | (codes == 125))  # braces, relative to start
    depth = np.cumsum(np.where(codes[pos] == 123, 1, -1))  # nesting depth after each brace
    at = np.searchsorted(pos, np.asarray(opens, dtype=np.int64) - start)  # each open's brace index
    target = depth[at] - 1  # its match is the first later brace where the depth falls to this
    # braces sorted by (depth, index): the first entry >= (target, at + 1) is the match, if any
    order = np.lexsort((np.arange(len(pos)), depth))
    lowest = int(depth.min())
    width = len(pos) + 1
    keys = (depth[order] - lowest) * width + order
    loc = np.searchsorted(keys, (target - lowest) * width + at + 1)
    inside = loc < len(keys)
    hit = np.zeros(len(opens), dtype=bool)
    hit[inside] = depth[order[loc[inside]]] == target[inside]
    ends = pos[order[np.minimum(loc, len(keys) - 1)]] + start + 1
    return [int(e) if h else None for e, h in zip(ends.tolist(), hit.tolist())]


# a box: (start, argument) with the argument (content start, content end, box end), None if unclosed
Box = tuple[int, tuple[int, int, int] | None]


def find_boxes(text: str, lo: int, hi: int) -> list[Box]:
    """Every ``\\boxed`` / ``\\fbox`` in ``text[lo:hi]``, as :data:`Box` (the content is
    ``text[a:b].strip()``; it is cut out only when needed, as nested boxes would make copying every
    content quadratic).

    The argument is ``{...}`` read with balanced braces, or (``\\boxed 5``) a single token up to
    whitespace or ``$``.
    """
    names = [(m.start(), m.end()) for m in _BOXED_RE.finditer(text, lo, hi)]
    opens = [i for _, i in names if i < hi and text[i] == "{"]
    closes = dict(zip(opens, _closing_braces(text, opens, hi)))
    out: list[Box] = []
    for start, i in names:
        end = closes.get(i, 0)
        if end is None:  # unclosed
            out.append((start, None))
        elif end:
            out.append((start, (i + 1, end - 1, end)))
        else:
            token = _TOKEN_RE.match(text, i, hi)
            out.append((start, (i, token.end(), token.end()) if token is not None else None))
    return out


def extract_boxed(text: str) -> list[tuple[str, int, int]]:
    """All complete ``\\boxed{...}`` (and ``\\fbox``) in ``text``: (content, start, end)."""
    return [(text[a:b].strip(), start, end) for start, (a, b, end) in find_complete_boxes(text, 0, len(text))]


def find_complete_boxes(text: str, lo: int, hi: int) -> list[tuple[int, tuple[int, int, int]]]:
    """The complete boxes of :func:`find_boxes`."""
    return [(start, got) for start, got in find_boxes(text, lo, hi) if got is not None]


def extract_last_boxed(text: str) -> str | None:
    """Content of the last complete box in ``text``, or ``None``: ``\\boxed{\\frac{1}{2}}`` ->
    ``\\frac{1}{2}``, ``\\boxed 5`` -> ``5``; a last box that never closes is skipped in favour of the
    previous complete one."""
    boxes = extract_boxed(text or "")
    return boxes[-1][0] if boxes else None
