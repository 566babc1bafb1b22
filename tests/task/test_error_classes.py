r"""Error classes of the synthetic task (bcr.task.error_classes) on hand-written completions: one
per class, the precedence rules of the module docstring, and the placebo ``others=``."""

from __future__ import annotations

import pytest

from bcr.data.problems import Problem
from bcr.task.error_classes import ERROR_CLASSES, classify_completion
from bcr.task.prompts import PromptTemplate, bundle_solution
from bcr.task.synthetic import make_arithmetic_problems, solve_steps

NUMBERED = PromptTemplate(numbered_single=True)
WORDS = {"+": "Add", "-": "Subtract"}


def _problem(pid: str, start: int, ops: list[tuple[str, int]]) -> Problem:
    trace = solve_steps(start, ops)
    text = " ".join([f"Start with {start}.", *(f"{WORDS[o]} {x}." for o, x in ops), "What is the result?"])
    return Problem(id=pid, problem=text, answer=str(trace[-1][3]), source="synthetic",
                   meta={"start": start, "operations": [[o, x] for o, x in ops]})


# numbers: P1 {7, 5, 3} (results 12, 9); P2 {5, 1, 6} (4, 10); P3 {9, 1, 8} (10, 18)
P1 = _problem("p1", 7, [("+", 5), ("-", 3)])
P2 = _problem("p2", 5, [("-", 1), ("+", 6)])
P3 = _problem("p3", 9, [("+", 1), ("+", 8)])
BUNDLE = [P1, P2, P3]


def _section(k: int, work: list[str], answer: str | None) -> str:
    lines = [f"### Problem {k}", *work] + ([f"Answer {k}: \\boxed{{{answer}}}"] if answer is not None else [])
    return "\n".join(lines)


RIGHT = {1: ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 9"], 2: ["Step 1: 5 - 1 = 4", "Step 2: 4 + 6 = 10"],
         3: ["Step 1: 9 + 1 = 10", "Step 2: 10 + 8 = 18"]}


def _bundle_with(k: int, work: list[str] | None, answer: str | None) -> str:
    """The right completion of BUNDLE with problem ``k``'s section replaced (``work=None``: left out)."""
    sections = []
    for j, p in enumerate(BUNDLE, 1):
        if j != k:
            sections.append(_section(j, RIGHT[j], p.answer))
        elif work is not None:
            sections.append(_section(j, work, answer))
    return "\n\n".join(sections)


def _label(k: int, work: list[str] | None, answer: str | None, **kw) -> str:
    labels = classify_completion(_bundle_with(k, work, answer), BUNDLE, **kw)
    assert [lab for j, lab in enumerate(labels, 1) if j != k] == ["right", "right"]
    return labels[k - 1]


def test_the_target_solutions_of_generated_problems_are_all_right():
    problems = make_arithmetic_problems(6, seed=3, steps=(2, 2), digits=(1, 1), operators="+-", verify_loops=(0, 3))
    assert classify_completion(bundle_solution(problems, NUMBERED), problems) == ["right"] * 6
    assert classify_completion(problems[0].meta["solution"], problems[:1]) == ["right"]  # plain N = 1 format


@pytest.mark.parametrize("k, work, answer, label", [
    # format: a work line that is not a step, no answer line, no section at all
    (1, ["Step 1: 7 plus 5 is 12", "Step 2: 12 - 3 = 9"], "12", "format"),
    (2, ["Step 1: 5 - 1 = 4", "Step 2: 4 + 6 = 11"], None, "format"),
    (2, None, None, "format"),
    # other_problem: the number or operator at the same place of another problem
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 8 = 4"], "4", "other_problem"),   # P3's second operand
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 6 = 6"], "6", "other_problem"),   # P2's second operand
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 4 - 3 = 1"], "1", "other_problem"),    # P2's result after step 1
    (1, ["Step 1: 9 + 5 = 14", "Step 2: 14 - 3 = 11"], "11", "other_problem"),  # P3's start
    (3, ["Step 1: 9 + 1 = 10", "Step 2: 10 - 8 = 2"], "2", "other_problem"),   # P1's second operator
    # wrong_place: a value from another place of the right problem
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 5 = 7"], "7", "wrong_place"),     # step 1's operand
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 7 - 3 = 4"], "4", "wrong_place"),      # the start, not the result
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 + 3 = 15"], "15", "wrong_place"),   # step 1's operator
    (1, ["Step 1: 7 + 7 = 14", "Step 2: 14 - 3 = 11"], "11", "wrong_place"),   # the start as operand
    # arithmetic; answer_copy
    (1, ["Step 1: 7 + 5 = 13", "Step 2: 13 - 3 = 10"], "10", "arithmetic"),
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 8"], "8", "arithmetic"),
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 9"], "12", "answer_copy"),
    # other: a number from nowhere at that place, a step left out or one too many, no work at all
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 1 = 11"], "11", "other"),         # 1 is P2's/P3's at step 1 only
    (1, ["Step 1: 7 + 5 = 12"], "12", "other"),
    (1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 9", "Step 3: 9 + 1 = 10"], "10", "other"),
    (1, [], "4", "other"),
])
def test_each_class_on_a_hand_written_section(k, work, answer, label):
    assert label in ERROR_CLASSES
    assert _label(k, work, answer) == label


def test_precedence_the_problem_itself_before_another_problem():
    # 5 is both P1's own operand (another place) and P2's start (the same place): wrong_place wins
    assert _label(1, ["Step 1: 5 + 5 = 10", "Step 2: 10 - 3 = 7"], "7") == "wrong_place"


def test_precedence_the_earliest_faulty_step_decides():
    # step 1 takes its operand from the wrong place, step 2 then also adds up wrong: one cause, step 1's
    assert _label(1, ["Step 1: 7 + 3 = 10", "Step 2: 10 - 3 = 6"], "6") == "wrong_place"
    # step 1 adds up wrong; step 2 carries that result on (its first operand is not 12): step 1's cause
    assert _label(1, ["Step 1: 7 + 5 = 11", "Step 2: 11 - 3 = 8"], "8") == "arithmetic"


def test_check_lines_are_skipped_and_a_right_answer_is_right_whatever_the_work():
    assert _label(1, ["Step 1: 7 + 5 = 12", "Check: 7 + 5 = 12. Correct.", "Step 2: 12 - 3 = 9"], "12") == "answer_copy"
    assert _label(1, ["Step 1: 7 + 5 = 12", "Check: 7 + 5 = 13. Correct.", "Step 2: 12 - 3 = 9"], "9") == "right"
    assert _label(1, ["Step 1: 7 + 8 = 15", "Step 2: 15 - 6 = 9"], "9") == "right"


def test_the_plain_n1_format_has_no_other_problem_to_copy_from():
    text = "Step 1: 7 + 5 = 12\nStep 2: 12 - 8 = 4\nAnswer: \\boxed{4}"
    assert classify_completion(text, [P1]) == ["other"]
    assert classify_completion(text.replace("12 - 8 = 4", "12 - 5 = 7").replace("{4}", "{7}"), [P1]) == ["wrong_place"]


def test_others_replaces_the_bundle_for_a_placebo():
    text = _bundle_with(1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 8 = 4"], "4")
    outside_with_8 = [_problem("q1", 2, [("+", 2), ("+", 8)])]
    outside_without = [_problem("q2", 2, [("+", 2), ("+", 4)])]
    assert classify_completion(text, BUNDLE, others=outside_with_8)[0] == "other_problem"
    assert classify_completion(text, BUNDLE, others=outside_without)[0] == "other"


def test_given_correctness_is_used_and_checked():
    text = _bundle_with(1, ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 9"], "12")
    assert classify_completion(text, BUNDLE) == ["answer_copy", "right", "right"]
    # the flags win over the parser's answers: problem 2's right work and answer, flagged wrong, is 'other'
    assert classify_completion(text, BUNDLE, correct=[True, False, True]) == ["right", "other", "right"]
    with pytest.raises(ValueError, match="2 correctness flags for a bundle of 3"):
        classify_completion(text, BUNDLE, correct=[True, True])
    with pytest.raises(ValueError, match="meta"):
        classify_completion(text, [Problem(id="x", problem="?", answer="1")] * 3)
