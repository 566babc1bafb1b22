"""Score a parsed completion against its references: the one place where an answer becomes 0 / 1.

Training rewards (:mod:`bcr.rl.rewards`), evaluation (:mod:`bcr.eval.sweep`) and the demo all call
:func:`score_completion`, so "correct" means the same everywhere:

* ``extraction="strict"`` (the default, and the training reward): the answers of
  :func:`bcr.task.parsing.parse_completion`, i.e. the BCR answer format (``Answer k: \\boxed{..}``, or the
  last ``\\boxed{}`` for N = 1). The format is part of the task.
* ``extraction="flexible"``: :func:`bcr.task.parsing.flexible_answers`, for models that ignore the
  format: an instance without a strict answer takes, in its section, the last ``\\boxed{}``, the value
  after "answer is", or the last number (lm-evaluation-harness reports GSM8K ``strict-match`` beside
  ``flexible-extract`` the same way). It needs the completion text.

An answer is correct when :func:`bcr.task.verify.answers_match` says it equals the reference (a missing
answer never is). :func:`score_chunk` parses and scores a batch; it is the worker of
:func:`bcr.rl.rewards.score_completions`' process pool and imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bcr.task.parsing import ParsedCompletion, flexible_answers, parse_completion
from bcr.task.verify import answers_match

__all__ = ["EXTRACTIONS", "CompletionScore", "check_extraction", "score_chunk", "score_completion"]

#: The answer extractions :func:`score_completion` knows.
EXTRACTIONS = ("strict", "flexible")


@dataclass(frozen=True)
class CompletionScore:
    """The answers that were compared (one per instance, None = no answer) and their correctness."""

    answers: list[str | None]
    correct: list[bool]

    @property
    def rewards(self) -> list[float]:
        """Per-instance accuracy rewards: 1.0 correct, 0.0 wrong or missing (no format bonus)."""
        return [1.0 if ok else 0.0 for ok in self.correct]


def check_extraction(extraction: str, name: str = "extraction") -> str:
    """``extraction`` if it is one of :data:`EXTRACTIONS`, else a ValueError naming ``name``."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"{name} must be one of {list(EXTRACTIONS)}, got {extraction!r}")
    return extraction


def score_completion(
    parsed: ParsedCompletion,
    references: Sequence[str],
    *,
    text: str | None = None,
    truncated: bool = False,
    extraction: str = "strict",
    timeout: float = 2.0,
) -> CompletionScore:
    """Score the N instances of ``parsed`` against the N ``references``.

    Args:
        parsed: :func:`bcr.task.parsing.parse_completion` of the completion, for N = ``len(references)``.
        references: the reference answers, in instance order.
        text: the completion text (needed by ``extraction="flexible"``).
        truncated: whether the generation hit its token budget (flexible extraction then ignores
            values on the cut last line).
        extraction: ``"strict"`` (the BCR format) or ``"flexible"``; see the module docstring.
        timeout: seconds :func:`bcr.task.verify.answers_match` may spend on one comparison.
    """
    check_extraction(extraction)
    refs = [str(r) for r in references]
    if len(refs) != parsed.n_problems:
        raise ValueError(
            f"score_completion: the completion was parsed for {parsed.n_problems} problems but has "
            f"{len(refs)} reference answers; parse with n_problems = the number of references"
        )
    if extraction == "strict":
        answers = parsed.answers
    elif text is None:
        raise ValueError("score_completion: extraction='flexible' reads the completion: pass text=")
    else:
        answers = flexible_answers(text, parsed, truncated=truncated)
    correct = [a is not None and answers_match(a, r, timeout=timeout) for a, r in zip(answers, refs)]
    return CompletionScore(answers, correct)


def score_chunk(
    items: Sequence[tuple[str, int, Sequence[str], bool, float, str]],
) -> list[tuple[ParsedCompletion, list[float]]]:
    """Parse and score ``(text, n_problems, references, truncated, timeout, extraction)`` items:
    ``(parsed, rewards)`` per item."""
    out = []
    for text, n, refs, truncated, timeout, extraction in items:
        parsed = parse_completion(text, n, truncated=truncated)
        score = score_completion(
            parsed, refs, text=text, truncated=truncated, extraction=extraction, timeout=timeout
        )
        out.append((parsed, score.rewards))
    return out
