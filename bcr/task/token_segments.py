"""Token attribution: which instance (problem) of a completion each of its tokens belongs to.

:func:`segment_ids_for_tokens` maps token character offsets to instance ids (0-based, -1 shared),
:func:`token_offsets` computes a tokenizer's character offsets by incremental decoding,
:func:`completion_segment_ids` glues the two for a parsed completion
(:func:`bcr.task.strict_parsing.parse_completion`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from bcr.task.strict_parsing import ParsedCompletion, Span

__all__ = ["completion_segment_ids", "segment_ids_for_tokens", "token_offsets"]


def segment_ids_for_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Span | None]
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


def _offsets_batched(tokenizer: Any, ids: list[int], full: str) -> list[tuple[int, int]] | None:
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


def _offsets_incremental(tokenizer: Any, ids: list[int], full: str) -> list[tuple[int, int]] | None:
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
