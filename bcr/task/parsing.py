"""The completion parser, in three jobs (one module each); every public name is importable from here.

- :mod:`bcr.task.strict_parsing`: the strict parser, :func:`parse_completion` (the BCR answer format:
  per-instance answers, flags and character spans; its module docstring is the specification);
- :mod:`bcr.task.flexible_extraction`: :func:`flexible_answers`, the fallback for models that ignore
  the format;
- :mod:`bcr.task.token_segments`: :func:`token_offsets`, :func:`segment_ids_for_tokens` and
  :func:`completion_segment_ids`, which attribute a completion's tokens to its instances.
"""

from __future__ import annotations

from bcr.data.boxes import extract_boxed
from bcr.task.flexible_extraction import flexible_answers
from bcr.task.strict_parsing import InstanceParse, ParsedCompletion, parse_completion
from bcr.task.token_segments import completion_segment_ids, segment_ids_for_tokens, token_offsets

__all__ = [
    "InstanceParse",
    "ParsedCompletion",
    "completion_segment_ids",
    "extract_boxed",
    "flexible_answers",
    "parse_completion",
    "segment_ids_for_tokens",
    "token_offsets",
]
