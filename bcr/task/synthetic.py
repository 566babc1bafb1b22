r"""Synthetic multi-step integer arithmetic: a task a tiny model can learn in minutes.

A problem reads ``"Start with 7. Add 12. Multiply by 3. Subtract 5. What is the result?"`` and its
answer is the exact integer (``"52"``). Its worked solution (``meta["steps"]``, one line per step)
uses a fixed format::

    Step 1: 7 + 12 = 19
    Step 2: 19 * 3 = 57
    Step 3: 57 - 5 = 52

and ``meta["solution"]`` is the N = 1 target completion: those lines plus ``Answer: \boxed{52}``.
For a bundle use :func:`bcr.task.prompts.bundle_solution` (re-exported here), which renders the
``### Problem k`` sections with ``Answer k: \boxed{..}`` lines, as the BCR prompt asks.

``styles`` weighs the three ways a worked solution can be written, drawn per problem (from a
stream of its own, so the problems themselves never change):

- ``"steps"`` (the default, alone): one line per operation, as above, plus the redundant checks;
- ``"merged"``: the whole chain on one line, read left to right, no intermediate results, no checks::

      Merged: 7 + 12 * 3 - 5 = 52

- ``"direct"``: no work at all, only the answer line.

Each style is shorter than the one before and, for a small model, less accurate on problems of two
or more operations (it must carry the intermediate values in its head). ``meta["style"]`` says which
style a problem got. A model fine-tuned on a mix of styles has a length-accuracy trade-off to make,
so how many tokens it spends per problem becomes a choice.

``verify_loops=(lo, hi)`` inserts lo..hi (uniform) redundant re-check lines such as
``Check: 7 + 12 = 19. Correct.`` after a random step, each re-checking a step already done: the
"metacognitive loops" a verbose reasoner writes and BCR training should learn to drop.

Number ranges (kept small): the start value and every ``+``/``-`` operand have a digit count drawn
uniformly from ``digits`` (1-digit numbers are 1..9); ``*`` uses a 1-digit multiplier 2..9 and is
only chosen while the product stays below ``10 ** (digits[1] + 1)``; ``-`` is only chosen when the
result stays non-negative; ``/`` (off by default) divides exactly by a 2..9 divisor. When the drawn
operator is not allowed, another allowed operator is drawn; if none is, the drawn one is used
anyway (negative or larger values are then possible).

Generation is deterministic: problem ``i`` depends only on ``(seed, i)`` (so a longer list extends a
shorter one), and the verification lines use a separate stream, so ``verify_loops`` and
``with_solution`` never change the problems themselves. Ids are ``"synth-<seed>-<i>"``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping

from bcr.data.problems import Problem
from bcr.task.prompts import PromptTemplate, bundle_solution, format_solution

__all__ = ["OPERATORS", "ORDINALS", "PHRASINGS", "STYLES", "bundle_solution", "check_styles", "check_styles_by_steps",
           "format_solution",
           "make_arithmetic_problems", "section_styles", "solve_steps"]

#: operator symbol -> its phrase in the problem text (the symbol itself is written in solutions)
OPERATORS = {"+": "Add {x}.", "-": "Subtract {x}.", "*": "Multiply by {x}.", "/": "Divide by {x}."}
#: the words that name an operation's place with ``ordinals=True``
ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth", "Ninth")
#: (opening, question) pairs of the problem text; ``phrasings=k`` draws one of the first k per problem
#: (the first is the only one by default). The numbers sit in the same places in every pair, so a fact
#: trained in one wording can be recognised in another: a held-out text is then a new wording of a
#: fact, not a new fact (the one-operation facts are few: 126 with one digit and ``+-``).
PHRASINGS = (
    ("Start with {x}.", "What is the result?"),
    ("Begin with {x}.", "What do you get?"),
    ("Take {x}.", "What is the answer?"),
    ("You have {x}.", "What number is it now?"),
    ("Think of {x}.", "What is the result?"),
    ("Start with {x}.", "What do you get?"),
    ("Begin with {x}.", "What is the answer?"),
    ("Take {x}.", "What number is it now?"),
    ("You have {x}.", "What is the result?"),
    ("Think of {x}.", "What do you get?"),
    ("Start with {x}.", "What is the answer?"),
    ("Begin with {x}.", "What number is it now?"),
)
#: the ways a worked solution can be written, longest (and most reliable for a small model) first
STYLES = ("steps", "merged", "direct")


def _check_range(name: str, r, lo_min: int) -> tuple[int, int]:
    try:
        lo, hi = (int(r[0]), int(r[1]))
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{name} must be a (low, high) pair of ints, got {r!r}") from None
    if lo < lo_min or hi < lo:
        raise ValueError(f"{name}={r!r}: need {lo_min} <= low <= high (inclusive range)")
    return lo, hi


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10**d - 1)


def check_styles(styles: Mapping[str, float] | None) -> tuple[list[str], list[float]]:
    """``(names, weights)`` of a ``styles`` mapping, in the order of :data:`STYLES`."""
    if styles is None:
        return ["steps"], [1.0]
    if not isinstance(styles, Mapping) or not styles:
        raise ValueError(f"styles={styles!r}: give a mapping of style -> weight, e.g. {{'steps': 1, 'merged': 1}}")
    unknown = [k for k in styles if k not in STYLES]
    if unknown:
        raise ValueError(f"styles: unknown style(s) {unknown}; the styles are {list(STYLES)}")
    for name, w in styles.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"styles[{name!r}]={w!r}: a weight must be a finite number >= 0")
    names = [k for k in STYLES if styles.get(k, 0) > 0]
    if not names:
        raise ValueError(f"styles={dict(styles)!r}: at least one weight must be > 0")
    return names, [float(styles[k]) for k in names]


def check_styles_by_steps(styles_by_steps: Mapping[int, Mapping[str, float]] | None) -> dict:
    """``{number of operations: (names, weights)}`` of a ``styles_by_steps`` mapping (see :func:`check_styles`)."""
    out = {}
    for k, weights in (styles_by_steps or {}).items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"styles_by_steps: {k!r} is not a number of operations (an int >= 1)")
        out[k] = check_styles(weights)
    return out


#: the first work line of each written-out style (a direct section starts with its answer line)
_WORK_PREFIX = {"Step ": "steps", "Merged:": "merged"}


def section_styles(completion: str, template: PromptTemplate | None = None) -> list[str]:
    """The style of each section of a completion, in order: ``"steps"``, ``"merged"`` or ``"direct"``
    by the section's first line after its header (``"other"`` for anything else, ``"empty"`` for a
    section with no line). A completion without any header line of ``template`` is one section
    (the plain N = 1 format)."""
    t = template or PromptTemplate()
    header = t.solution_header.split("{k}")[0]
    # an answer line, whatever index it carries: "Answer " or "Answer: \boxed{" with the default template
    answers = (os.path.commonprefix([t.answer_line(1, "\0"), t.answer_line(2, "\0")]),
               t.answer_line(None, "\0").split("\0")[0])
    lines = [line for line in completion.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    sections = [lines[a + 1: b] for a, b in zip(starts, starts[1:] + [len(lines)])] if starts else [lines]
    out = []
    for work in sections:
        first = work[0] if work else ""
        style = next((style for prefix, style in _WORK_PREFIX.items() if first.startswith(prefix)), None)
        out.append(style or ("direct" if work and first.startswith(answers) else "other" if work else "empty"))
    return out


def solve_steps(start: int, operations: list[tuple[str, int]]) -> list[tuple[int, str, int, int]]:
    """Apply ``operations`` to ``start``: ``[(before, op, operand, after), ...]`` (exact integers)."""
    out = []
    cur = start
    for op, x in operations:
        if op == "+":
            nxt = cur + x
        elif op == "-":
            nxt = cur - x
        elif op == "*":
            nxt = cur * x
        elif op == "/":
            if x == 0 or cur % x:
                raise ValueError(f"{cur} / {x} is not an exact integer division")
            nxt = cur // x
        else:
            raise ValueError(f"unknown operator {op!r}")
        out.append((cur, op, x, nxt))
        cur = nxt
    return out


def _draw_operation(rng: random.Random, cur: int, operators: str, digits: tuple[int, int], cap: int):
    first = rng.choice(operators)

    def candidate(op: str):
        """An operand for ``op`` from ``cur`` that keeps the rules, or None."""
        if op == "+":
            return _number(rng, digits)
        if op == "-":
            x = _number(rng, digits)
            return x if x <= cur else None
        if op == "*":
            x = rng.randint(2, 9)
            return x if abs(cur * x) < cap else None
        if op == "/":
            divs = [d for d in range(2, 10) if cur and cur % d == 0]
            return rng.choice(divs) if divs else None
        raise AssertionError(op)

    x = candidate(first)
    if x is not None:
        return first, x
    others = [o for o in operators if o != first]
    rng.shuffle(others)
    for op in others:
        x = candidate(op)
        if x is not None:
            return op, x
    # nothing fits: use the drawn operator anyway
    if first == "+" or first == "-":
        return first, _number(rng, digits)
    if first == "*":
        return first, rng.randint(2, 9)
    return first, 1


def make_arithmetic_problems(
    n: int,
    *,
    seed: int = 0,
    steps: tuple[int, int] = (2, 4),
    digits: tuple[int, int] = (1, 2),
    operators: str = "+-*",
    with_solution: bool = True,
    verify_loops: tuple[int, int] = (0, 0),
    styles: Mapping[str, float] | None = None,
    ordinals: bool = False,
    styles_by_steps: Mapping[int, Mapping[str, float]] | None = None,
    phrasings: int = 1,
) -> list[Problem]:
    """``n`` multi-step integer arithmetic problems (``source="synthetic"``).

    Args:
        n: how many problems.
        seed: generation seed (problem i depends only on (seed, i)).
        steps: inclusive range of the number of operations per problem.
        digits: inclusive range of the digit count of the start value and the +/- operands.
        operators: any of ``"+-*/"``.
        with_solution: fill ``meta["steps"]`` (work lines) and ``meta["solution"]`` (N = 1 target).
        verify_loops: inclusive range of redundant ``Check: ...`` lines inserted into the work.
        styles: weights of the solution styles of :data:`STYLES` (default ``{"steps": 1}``), e.g.
            ``{"steps": 1, "merged": 1, "direct": 1}``; each problem draws one.
        ordinals: name each operation's place in the problem text (``"Start with 7. First, add 12.
            Second, multiply by 3."``), so step k of the work has a word of its own to copy from.
        styles_by_steps: style weights for the problems of a given number of operations, in place of
            ``styles`` for them, e.g. ``{1: {"steps": 1, "direct": 1}}``: direct answers on one-operation
            problems only.

    ``meta`` always has ``"start"``, ``"operations"`` (list of ``[op, operand]``),
    ``"num_verify_loops"`` (0 when ``with_solution`` is False) and ``"style"``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    steps_r = _check_range("steps", steps, 1)
    if ordinals and steps_r[1] > len(ORDINALS):
        raise ValueError(f"steps={steps!r}: with ordinals at most {len(ORDINALS)} operations per problem")
    digits_r = _check_range("digits", digits, 1)
    loops_r = _check_range("verify_loops", verify_loops, 0)
    if not operators or any(o not in OPERATORS for o in operators):
        raise ValueError(f"operators={operators!r}: use a non-empty string of {''.join(OPERATORS)!r}")
    if isinstance(phrasings, bool) or not isinstance(phrasings, int) or not 1 <= phrasings <= len(PHRASINGS):
        raise ValueError(f"phrasings={phrasings!r}: must be an int in 1..{len(PHRASINGS)}")
    style_names, style_weights = check_styles(styles)
    by_steps = check_styles_by_steps(styles_by_steps)
    ops = "".join(dict.fromkeys(operators))  # unique, order kept
    cap = 10 ** (digits_r[1] + 1)

    problems = []
    for i in range(n):
        rng = random.Random(f"bcr-synthetic:{seed}:{i}")
        start = _number(rng, digits_r)
        operations: list[tuple[str, int]] = []
        cur = start
        for _ in range(rng.randint(*steps_r)):
            op, x = _draw_operation(rng, cur, ops, digits_r, cap)
            operations.append((op, x))
            cur = solve_steps(cur, [(op, x)])[0][3]
        trace = solve_steps(start, operations)
        answer = str(trace[-1][3])
        phrases = [OPERATORS[o].format(x=x) for o, x in operations]
        if ordinals:
            phrases = [f"{ORDINALS[j]}, {p[0].lower()}{p[1:]}" for j, p in enumerate(phrases)]
        opening, question = PHRASINGS[random.Random(f"bcr-synthetic-phrasing:{seed}:{i}").randrange(phrasings)
                                      if phrasings > 1 else 0]
        text = " ".join([opening.format(x=start), *phrases, question])
        names, weights = by_steps.get(len(operations), (style_names, style_weights))
        style = random.Random(f"bcr-synthetic-style:{seed}:{i}").choices(names, weights)[0]
        meta: dict = {"start": start, "operations": [[o, x] for o, x in operations], "num_verify_loops": 0,
                      "style": style}
        prob = Problem(id=f"synth-{seed}-{i}", problem=text, answer=answer, source="synthetic", meta=meta)
        if with_solution and style == "direct":
            meta["steps"] = []
        elif with_solution and style == "merged":
            chain = " ".join([str(start)] + [f"{o} {x}" for o, x in operations])
            meta["steps"] = [f"Merged: {chain} = {answer}"]
        elif with_solution:
            step_lines = [f"{a} {o} {x} = {b}" for a, o, x, b in trace]
            vrng = random.Random(f"bcr-synthetic-verify:{seed}:{i}")
            k = vrng.randint(*loops_r)
            # (insert after step p, re-check step q <= p), sorted so lines appear in step order
            checks = sorted((p, vrng.randint(1, p)) for p in (vrng.randint(1, len(trace)) for _ in range(k)))
            lines = []
            ci = 0
            for s, line in enumerate(step_lines, 1):
                lines.append(f"Step {s}: {line}")
                while ci < len(checks) and checks[ci][0] == s:
                    lines.append(f"Check: {step_lines[checks[ci][1] - 1]}. Correct.")
                    ci += 1
            meta["steps"] = lines
            meta["num_verify_loops"] = k
        if with_solution:
            meta["solution"] = format_solution(prob)
        problems.append(prob)
    return problems
