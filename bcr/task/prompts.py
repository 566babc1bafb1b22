r"""Prompts for N problems in one context (N = 1 is the ordinary single-problem prompt).

One code path serves the baseline (N = 1) and BCR (N > 1): :func:`format_prompt` builds the user
text, :func:`build_messages` wraps it as chat messages, :func:`render_prompt` applies a tokenizer's
chat template (``add_generation_prompt=True``) when it has one.

The default format (the contract with :mod:`bcr.task.parsing`)
----------------------------------------------------------

Prompt, N > 1 (``PromptTemplate.layout`` = ``"{instruction}\n\n{problems}"``)::

    Solve the following 3 problems. Answer every problem, in order. For each problem k, start a
    section with the header line "### Problem k", show your work, and end the section with the
    line "Answer k: \boxed{...}" holding its final answer.

    Problem 1: <text of problem 1>

    Problem 2: <text of problem 2>

    Problem 3: <text of problem 3>

(the instruction is one line; problems are listed as ``PROBLEM_HEADER_FORMAT`` = ``"Problem {k}:"``
followed by a space and the text, separated by a blank line).

Expected completion, N > 1 — one section per problem, in order, k = 1..N::

    ### Problem 1
    <work>
    Answer 1: \boxed{<answer 1>}

    ### Problem 2
    <work>
    Answer 2: \boxed{<answer 2>}
    ...

* header line: ``HEADER_FORMAT`` = ``"### Problem {k}"`` (k is 1-based);
* answer line: ``ANSWER_FORMAT`` = ``"Answer {k}: \\boxed{{{answer}}}"`` i.e. ``Answer 2: \boxed{17}``;
  it is the last line of problem k's section.

Prompt, N = 1 (``single_layout`` = ``"{problem}\n\n{instruction}"``; no "Problem 1:" label)::

    <text of the problem>

    Please reason step by step, and put your final answer within \boxed{}.

With ``PromptTemplate(numbered_single=True)`` N = 1 uses the N > 1 format instead (instruction for
"1 problem", ``Problem 1:``, and a ``### Problem 1`` ... ``Answer 1: \boxed{...}`` completion).

Expected completion, N = 1: no header; the answer is the *last* ``\boxed{...}`` in the completion.
Targets built here (:func:`format_solution`) end with ``SINGLE_ANSWER_FORMAT`` =
``"Answer: \\boxed{{{answer}}}"``, i.e. ``Answer: \boxed{17}``.

All format strings use :meth:`str.format` syntax (literal braces doubled). Lenient regular
expressions for parsers: :data:`HEADER_REGEX` (group 1 = k) and :data:`ANSWER_PREFIX_REGEX` (group 1 =
k, match ends just after ``\boxed{``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bcr.data.problems import Problem

__all__ = [
    "ANSWER_FORMAT",
    "ANSWER_PREFIX_REGEX",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_SINGLE_INSTRUCTION",
    "HEADER_FORMAT",
    "HEADER_REGEX",
    "PROBLEM_HEADER_FORMAT",
    "SINGLE_ANSWER_FORMAT",
    "PromptTemplate",
    "build_messages",
    "bundle_solution",
    "format_prompt",
    "format_solution",
    "render_prompt",
]

#: Header the model writes before its work on problem k (k is 1-based).
HEADER_FORMAT = "### Problem {k}"
#: Final line of problem k's section.
ANSWER_FORMAT = "Answer {k}: \\boxed{{{answer}}}"
#: Final line of an N = 1 target completion (any last ``\boxed{}`` is accepted for N = 1).
SINGLE_ANSWER_FORMAT = "Answer: \\boxed{{{answer}}}"
#: How problem k is labelled inside an N > 1 prompt.
PROBLEM_HEADER_FORMAT = "Problem {k}:"
#: Lenient pattern for a header line (use with re.MULTILINE); group 1 = k.
HEADER_REGEX = r"^[ \t]*#{1,6}[ \t]*Problem[ \t]+(\d+)[ \t]*:?[ \t]*$"
#: Lenient pattern for the start of an answer line; group 1 = k; the match ends after ``\boxed{``.
ANSWER_PREFIX_REGEX = r"Answer[ \t]*(\d+)[ \t]*:[ \t]*\\boxed[ \t]*\{"

DEFAULT_INSTRUCTION = (
    "Solve the following {n} problem{s}. Answer every problem, in order. For each problem k, start a "
    'section with the header line "{header}", show your work, and end the section with the line '
    '"{answer}" holding its final answer.'
)
DEFAULT_SINGLE_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{{}}."

ProblemLike = Problem | str


@dataclass
class PromptTemplate:
    """Every piece of text the prompt and the expected completion are made of.

    Format fields use :meth:`str.format` placeholders (double literal braces):

    * ``instruction`` (N > 1): ``{n}`` = number of problems, ``{header}`` / ``{answer}`` = the header
      and answer line with ``k`` and ``...`` filled in (so the instruction follows the formats).
      ``{s}`` is ``"s"`` for n > 1 and empty for n = 1 (``"{n} problem{s}"``).
    * ``single_instruction`` (N = 1): no placeholders by default (``{header}``/``{answer}`` allowed).
    * ``problem_header``: how problem k is labelled in an N > 1 prompt (``{k}``).
    * ``solution_header``: the header line the model writes for problem k (``{k}``).
    * ``answer_format``: problem k's final line (``{k}``, ``{answer}``).
    * ``single_answer_format``: the final line of an N = 1 target (``{answer}``).
    * ``layout`` / ``single_layout``: how instruction and problems are joined (``{instruction}``,
      ``{problems}`` / ``{problem}``).
    * ``numbered_single``: False (default) gives N = 1 the ordinary single-problem prompt and target;
      True gives N = 1 the numbered format of N > 1 (``instruction`` with n = 1, ``Problem 1:``,
      ``### Problem 1`` ... ``Answer 1: \\boxed{..}``), so the format costs the same tokens per
      problem at every N (a task-scaling sweep then compares like with like).
    * ``problem_separator``: between listed problems; ``section_separator``: between completion
      sections; ``system_prompt``: optional system message (``build_messages`` argument overrides).
    """

    instruction: str = DEFAULT_INSTRUCTION
    problem_header: str = PROBLEM_HEADER_FORMAT
    single_instruction: str = DEFAULT_SINGLE_INSTRUCTION
    solution_header: str = HEADER_FORMAT
    answer_format: str = ANSWER_FORMAT
    single_answer_format: str = SINGLE_ANSWER_FORMAT
    layout: str = "{instruction}\n\n{problems}"
    single_layout: str = "{problem}\n\n{instruction}"
    problem_separator: str = "\n\n"
    section_separator: str = "\n\n"
    system_prompt: str | None = None
    numbered_single: bool = False

    # -- pieces ---------------------------------------------------------------------------------
    def header(self, k: int) -> str:
        """The header line the model writes for problem ``k`` (1-based)."""
        return self.solution_header.format(k=k)

    def answer_line(self, k: int | None, answer: str) -> str:
        """Problem ``k``'s answer line; ``k=None`` gives the N = 1 final line."""
        if k is None:
            return self.single_answer_format.format(answer=answer)
        return self.answer_format.format(k=k, answer=answer)

    def plain_single(self, n: int) -> bool:
        """Whether a bundle of ``n`` problems uses the plain single-problem format."""
        return n == 1 and not self.numbered_single

    def instruction_text(self, n: int) -> str:
        """The instruction for ``n`` problems (``single_instruction`` for a plain N = 1 prompt)."""
        fields = {"n": n, "s": "" if n == 1 else "s", "header": self.solution_header.format(k="k"),
                  "answer": self.answer_format.format(k="k", answer="...")}
        if self.plain_single(n):
            fields["answer"] = self.single_answer_format.format(answer="...")
            return self.single_instruction.format(**fields)
        return self.instruction.format(**fields)


_DEFAULT = PromptTemplate()


def _as_list(problems: Sequence[ProblemLike] | ProblemLike) -> list[ProblemLike]:
    if isinstance(problems, (Problem, str)):
        return [problems]
    items = list(problems)
    if not items:
        raise ValueError("a prompt needs at least one problem; got an empty list")
    for p in items:
        if not isinstance(p, (Problem, str)):
            raise TypeError(f"problems must be Problem objects or strings, got {type(p).__name__}")
    return items


def _text(p: ProblemLike) -> str:
    return (p.problem if isinstance(p, Problem) else p).strip()


def format_prompt(problems: Sequence[ProblemLike] | ProblemLike, template: PromptTemplate | None = None) -> str:
    """Plain-text user prompt for a bundle: instruction + numbered problems (N = 1: the ordinary
    single-problem prompt). Accepts :class:`Problem` objects or problem strings."""
    t = template or _DEFAULT
    items = _as_list(problems)
    n = len(items)
    instruction = t.instruction_text(n)
    if t.plain_single(n):
        return t.single_layout.format(problem=_text(items[0]), instruction=instruction)
    listed = t.problem_separator.join(
        f"{t.problem_header.format(k=k)} {_text(p)}" for k, p in enumerate(items, 1)
    )
    return t.layout.format(instruction=instruction, problems=listed, n=n)


def build_messages(
    problems: Sequence[ProblemLike] | ProblemLike,
    template: PromptTemplate | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages (``[{"role", "content"}]``): an optional system message, then the user prompt."""
    t = template or _DEFAULT
    system = system_prompt if system_prompt is not None else t.system_prompt
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": format_prompt(problems, t)})
    return messages


def render_prompt(
    problems: Sequence[ProblemLike] | ProblemLike,
    tokenizer: Any = None,
    template: PromptTemplate | None = None,
) -> str:
    """The string given to the model: the tokenizer's chat template applied to
    :func:`build_messages` (with the generation prompt) when the tokenizer has one, else the plain
    :func:`format_prompt` text (preceded by the template's system prompt, if any)."""
    t = template or _DEFAULT
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(build_messages(problems, t), tokenize=False,
                                            add_generation_prompt=True)
        if not isinstance(out, str):  # some versions return a list for batched input
            out = out[0]
        return out
    text = format_prompt(problems, t)
    if t.system_prompt:
        text = f"{t.system_prompt}\n\n{text}"
    return text


# ------------------------------------------------------------------------------ target completions
def _work_lines(problem: Problem) -> str:
    """The worked solution of a problem without its final answer line.

    ``meta["steps"]`` (a list of lines, as :mod:`bcr.task.synthetic` writes; an empty list is no work
    at all) when present, else the text of ``meta["solution"]`` (e.g. a GSM8K rationale), else empty.
    """
    steps = problem.meta.get("steps") if problem.meta else None
    if steps is not None:
        return "\n".join(str(s) for s in steps)
    sol = problem.meta.get("solution") if problem.meta else None
    return str(sol).strip() if sol else ""


def format_solution(problem: Problem, k: int | None = None, template: PromptTemplate | None = None) -> str:
    """Target text for one problem: with ``k`` (1-based) its full section (header, work,
    ``Answer k: \\boxed{..}``); with ``k=None`` the N = 1 completion (work, ``Answer: \\boxed{..}``)."""
    t = template or _DEFAULT
    lines = []
    if k is not None:
        lines.append(t.header(k))
    work = _work_lines(problem)
    if work:
        lines.append(work)
    lines.append(t.answer_line(k, problem.answer))
    return "\n".join(lines)


def bundle_solution(problems: Sequence[Problem] | Problem, template: PromptTemplate | None = None) -> str:
    """The whole target completion of a bundle in the prompt's format (for SFT): for N = 1
    ``format_solution(p)``; for N > 1 the N sections joined by ``section_separator``."""
    t = template or _DEFAULT
    items = [problems] if isinstance(problems, Problem) else list(problems)
    if not items:
        raise ValueError("bundle_solution needs at least one problem")
    if t.plain_single(len(items)):
        return format_solution(items[0], None, t)
    return t.section_separator.join(format_solution(p, k, t) for k, p in enumerate(items, 1))
