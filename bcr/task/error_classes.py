r"""Why a problem of a bundle went wrong: error classes for the synthetic task's worked solutions.

:func:`classify_completion` reads one completion of a bundle of synthetic problems
(:mod:`bcr.task.synthetic`, whose ``meta`` holds each problem's ``start`` and ``operations``) and
labels every problem with one of :data:`ERROR_CLASSES`:

``right``          the answer is correct (as the sweep scores it: the strict BCR format);
``format``         no section for the problem, no answer line, or a work line that is not a step
                   (``Step j: a op b = c``; ``Check:`` lines are the redundant re-checks and are skipped);
``other_problem``  a step's number or operator is the one *at the same place* of another problem of
                   the bundle (its start, its operation j, or its true intermediate result feeding step j);
``wrong_place``    a step's number or operator comes from another place of the right problem (step 2
                   adding the start or step 1's operand, ``Subtract`` read where ``Add`` stands);
``arithmetic``     the step's operands are the right ones, its result is not ``a op b``;
``answer_copy``    every step is right, but the answer line is not the last step's result;
``other``          anything else: a number found nowhere in the bundle, a step left out or one too
                   many, a section with an answer line and no work at all (a direct answer, the
                   ``direct`` style: there is no work to find a cause in).

Precedence, when several apply (each rule is tried in this order, the first that fits wins):

1. ``right`` whatever the work looks like (the sweep scores the answer only);
2. ``format`` (a malformed section has no steps to judge);
3. the **earliest faulty step** decides: the steps are walked in order and the first step that
   differs from the problem's decides the class, since a later step builds on it (one slip is
   counted once, whatever follows from it). Within a step, its first operand is checked, then its
   operand, then its operator, then its result (``arithmetic``);
4. a wrong value found at another place of the problem itself is ``wrong_place`` even when another
   problem also holds it at that place (the nearer source);
5. a step count that differs from the operations (all written steps right), then ``answer_copy``.

Chance: the default task's numbers are one-digit, so a wrong digit matches the same place of one of
the N - 1 other problems by chance fairly often (about ``1 - (8/9) ** (N - 1)`` for a uniformly
random wrong digit). ``others=`` lets a caller match against problems from *outside* the bundle
instead, a placebo that measures that chance rate (``python -m benchmarks.capacity report`` does).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bcr.data.problems import Problem
from bcr.task.parsing import parse_completion
from bcr.task.prompts import HEADER_REGEX
from bcr.task.scoring import score_completion
from bcr.task.synthetic import solve_steps

__all__ = ["ERROR_CLASSES", "WRONG_CLASSES", "classify_completion"]

#: every label, ``right`` first; the wrong ones in precedence order after ``format``
ERROR_CLASSES = ("right", "format", "other_problem", "wrong_place", "arithmetic", "answer_copy", "other")
#: the labels of a wrong problem
WRONG_CLASSES = ERROR_CLASSES[1:]

_STEP_RE = re.compile(r"^Step\s+\d+\s*:\s*(-?\d+)\s+([-+*/])\s+(-?\d+)\s*=\s*(-?\d+)\s*$")
_HEADER_RE = re.compile(HEADER_REGEX)
_ANSWER_RE = re.compile(r"^\s*(?:\*\*)?\s*(?:final\s+)?answer\b", re.IGNORECASE)
_CHECK_PREFIX = "Check:"


def _operations(problem: Problem) -> tuple[int, list[tuple[str, int]]]:
    meta = problem.meta or {}
    if "start" not in meta or "operations" not in meta:
        raise ValueError(f"problem {problem.id!r} has no meta['start'] / meta['operations']: "
                         "error classes need the synthetic task's problems (bcr.task.synthetic)")
    return int(meta["start"]), [(str(op), int(x)) for op, x in meta["operations"]]


def _apply(a: int, op: str, b: int) -> int | None:
    try:
        return solve_steps(a, [(op, b)])[0][3]
    except ValueError:  # an inexact or zero division
        return None


def _work_lines(section: str) -> list[str]:
    """The section's lines that are neither blank, header, answer nor ``Check:`` lines."""
    return [line.strip() for line in section.splitlines()
            if line.strip() and not _HEADER_RE.match(line) and not _ANSWER_RE.match(line)
            and not line.strip().startswith(_CHECK_PREFIX)]


def _place_values(problem: Problem, j: int) -> tuple[int, str, int]:
    """What step ``j`` (0-based) of ``problem`` reads: (first operand, operator, operand), from the
    true values (the start, or the true result of step j - 1)."""
    start, ops = _operations(problem)
    first = start if j == 0 else solve_steps(start, ops)[j - 1][3]
    return first, ops[j][0], ops[j][1]


def _source(value, own: set, others: Sequence[Problem], j: int, part: int) -> str:
    """Where a wrong ``value`` of step ``j`` came from: ``own`` holds the problem's values at its other
    places; ``part`` indexes (first operand, operator, operand) of the other problems' step j."""
    if value in own:
        return "wrong_place"
    same_place = {_place_values(p, j)[part] for p in others if j < len(_operations(p)[1])}
    return "other_problem" if value in same_place else "other"


def _step_error(step: tuple[int, str, int, int], expected_first: int, problem: Problem, j: int,
                others: Sequence[Problem]) -> str | None:
    """The class of step ``j``'s first difference from the problem, or None when the step is right."""
    a, op, b, c = step
    start, ops = _operations(problem)
    numbers = {start} | {x for _, x in ops}
    if a != expected_first:
        return _source(a, numbers - ({start} if j == 0 else set()), others, j, 0)
    if b != ops[j][1]:
        return _source(b, {start} | {x for i, (_, x) in enumerate(ops) if i != j}, others, j, 2)
    if op != ops[j][0]:
        return _source(op, {o for i, (o, _) in enumerate(ops) if i != j}, others, j, 1)
    return "arithmetic" if _apply(a, op, b) != c else None


def _wrong_class(section: str, answer: str, problem: Problem, others: Sequence[Problem]) -> str:
    """The class of a wrong problem whose section and answer exist (rules 2-5 of the module docstring)."""
    work = _work_lines(section)
    if not work:
        return "other"  # an answer line alone: a direct answer, no work to find a cause in
    matches = [_STEP_RE.match(line) for line in work]
    if not all(matches):
        return "format"
    steps = [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in matches]
    start, ops = _operations(problem)
    carried = start
    for j, step in enumerate(steps):
        if j >= len(ops):
            return "other"  # a step more than the problem has
        cause = _step_error(step, carried, problem, j, others)
        if cause:
            return cause
        carried = step[3]
    if len(steps) < len(ops):
        return "other"  # a step left out
    return "answer_copy" if answer.strip() != str(carried) else "other"


def classify_completion(completion: str, problems: Sequence[Problem], *, truncated: bool = False,
                        correct: Sequence[bool] | None = None,
                        others: Sequence[Problem] | None = None) -> list[str]:
    """One label of :data:`ERROR_CLASSES` per problem of the bundle, in order.

    Args:
        completion: the model's completion for the bundle ``problems`` (any N, the numbered format or
            the plain N = 1 one: the sections are the parser's, :func:`bcr.task.parsing.parse_completion`).
        problems: the bundle's synthetic problems, in prompt order.
        truncated: whether the generation hit its budget (as the parser needs it).
        correct: per problem, whether it was scored right (a sweep record's ``correct``); None
            scores the parser's answers with :func:`bcr.task.scoring.score_completion`.
        others: the problems an operand is matched against for ``other_problem``; None (the
            default) means, for each problem, the bundle's other problems. A placebo passes
            problems from outside the bundle.
    """
    parsed = parse_completion(completion, len(problems), truncated=truncated)
    if correct is None:
        correct = score_completion(parsed, [p.answer for p in problems]).correct
    if len(correct) != len(problems):
        raise ValueError(f"{len(correct)} correctness flags for a bundle of {len(problems)} problems")
    labels = []
    for k, (problem, inst, ok) in enumerate(zip(problems, parsed.instances, correct)):
        if ok:
            labels.append("right")
        elif inst.span is None or inst.answer is None:
            labels.append("format")
        else:
            rest = list(others) if others is not None else [p for i, p in enumerate(problems) if i != k]
            labels.append(_wrong_class(completion[inst.span[0]: inst.span[1]], inst.answer, problem, rest))
    return labels
