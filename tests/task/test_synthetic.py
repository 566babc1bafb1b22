"""Tests for bcr.task.synthetic: determinism, correctness (recomputed from the text), verify loops."""

from __future__ import annotations

import re

import pytest

from bcr.task.prompts import PromptTemplate, bundle_solution
from bcr.task.synthetic import PHRASINGS, STYLES, make_arithmetic_problems, section_styles

_STEP = {"Add": "+", "Subtract": "-", "Multiply by": "*", "Divide by": "/"}


def _evaluate_text(text: str) -> tuple[int, list[tuple[str, int]]]:
    """Independently parse and evaluate a problem's text."""
    m = re.fullmatch(r"Start with (\d+)\.((?: (?:Add|Subtract|Multiply by|Divide by) \d+\.)+) What is the result\?", text)
    assert m, text
    value = int(m.group(1))
    ops = [(_STEP[w], int(x)) for w, x in re.findall(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.", m.group(2))]
    for op, x in ops:
        if op == "+":
            value += x
        elif op == "-":
            value -= x
        elif op == "*":
            value *= x
        else:
            assert value % x == 0
            value //= x
    return value, ops


def test_deterministic_and_seed_dependent():
    a = make_arithmetic_problems(50, seed=3)
    b = make_arithmetic_problems(50, seed=3)
    c = make_arithmetic_problems(50, seed=4)
    assert a == b
    assert [p.problem for p in a] != [p.problem for p in c]
    # a longer list extends a shorter one
    assert make_arithmetic_problems(20, seed=3) == a[:20]


def test_ids_and_source():
    ps = make_arithmetic_problems(30, seed=7)
    assert [p.id for p in ps] == [f"synth-7-{i}" for i in range(30)]
    assert all(p.source == "synthetic" for p in ps)
    assert make_arithmetic_problems(0) == []


@pytest.mark.parametrize("kw", [
    {},
    {"steps": (1, 1), "digits": (1, 1)},
    {"steps": (3, 6), "digits": (2, 3), "operators": "+-*/"},
    {"operators": "*"},
    {"operators": "-"},
    {"operators": "/+"},
])
def test_answers_are_correct_and_in_range(kw):
    ps = make_arithmetic_problems(200, seed=11, **kw)
    lo_s, hi_s = kw.get("steps", (2, 4))
    lo_d, hi_d = kw.get("digits", (1, 2))
    ops_allowed = set(kw.get("operators", "+-*"))
    for p in ps:
        value, ops = _evaluate_text(p.problem)
        assert p.answer == str(value)
        assert lo_s <= len(ops) <= hi_s
        assert {o for o, _ in ops} <= ops_allowed
        for o, x in ops:
            if o in "*/":
                assert 1 <= x <= 9
            else:
                assert 1 <= x < 10**hi_d
        start = int(re.match(r"Start with (\d+)", p.problem).group(1))
        assert 10 ** (lo_d - 1) <= start < 10**hi_d


def test_numbers_stay_small_by_default():
    ps = make_arithmetic_problems(500, seed=0)
    assert all(0 <= int(p.answer) < 1000 + 3 * 99 for p in ps)  # * capped below 1000, then +
    # all default operators occur
    text = " ".join(p.problem for p in ps)
    assert "Add" in text and "Subtract" in text and "Multiply by" in text


def test_solution_steps_match_and_end_with_boxed_answer():
    for p in make_arithmetic_problems(100, seed=5):
        _, ops = _evaluate_text(p.problem)
        step_lines = [ln for ln in p.meta["steps"] if ln.startswith("Step ")]
        assert len(step_lines) == len(ops)
        cur = int(re.match(r"Start with (\d+)", p.problem).group(1))
        for s, (line, (op, x)) in enumerate(zip(step_lines, ops), 1):
            a, o, b, r = re.fullmatch(rf"Step {s}: (-?\d+) ([-+*/]) (\d+) = (-?\d+)", line).groups()
            assert (int(a), o, int(b)) == (cur, op, x)
            cur = int(r)
        assert str(cur) == p.answer
        assert p.meta["solution"] == "\n".join(p.meta["steps"]) + f"\nAnswer: \\boxed{{{p.answer}}}"
        assert p.meta["num_verify_loops"] == 0
        assert not any(ln.startswith("Check:") for ln in p.meta["steps"])


@pytest.mark.parametrize("loops", [(1, 1), (0, 3), (2, 5)])
def test_verify_loops_in_range_and_recheck_done_steps(loops):
    ps = make_arithmetic_problems(200, seed=2, verify_loops=loops)
    counts = set()
    for p in ps:
        checks = [i for i, ln in enumerate(p.meta["steps"]) if ln.startswith("Check:")]
        counts.add(len(checks))
        assert loops[0] <= len(checks) <= loops[1]
        assert len(checks) == p.meta["num_verify_loops"]
        done: list[str] = []
        for ln in p.meta["steps"]:
            if ln.startswith("Step "):
                done.append(ln.split(": ", 1)[1])
            else:
                m = re.fullmatch(r"Check: (.*)\. Correct\.", ln)
                assert m and m.group(1) in done, (ln, done)
        assert not p.meta["steps"][0].startswith("Check:")
    assert counts == set(range(loops[0], loops[1] + 1))  # every count in the range occurs


def test_verify_loops_and_with_solution_do_not_change_problems():
    base = make_arithmetic_problems(40, seed=9)
    loopy = make_arithmetic_problems(40, seed=9, verify_loops=(1, 4))
    bare = make_arithmetic_problems(40, seed=9, with_solution=False)
    assert [(p.problem, p.answer) for p in base] == [(p.problem, p.answer) for p in loopy]
    assert [(p.problem, p.answer) for p in base] == [(p.problem, p.answer) for p in bare]
    assert all("solution" not in p.meta and "steps" not in p.meta for p in bare)
    assert loopy == make_arithmetic_problems(40, seed=9, verify_loops=(1, 4))


def test_bundle_solution_format():
    ps = make_arithmetic_problems(3, seed=1)
    text = bundle_solution(ps)
    sections = text.split("\n\n")
    assert len(sections) == 3
    for k, (sec, p) in enumerate(zip(sections, ps), 1):
        lines = sec.split("\n")
        assert lines[0] == f"### Problem {k}"
        assert lines[1:-1] == p.meta["steps"]
        assert lines[-1] == f"Answer {k}: \\boxed{{{p.answer}}}"
    assert bundle_solution(ps[:1]) == ps[0].meta["solution"]


@pytest.mark.parametrize("kw", [
    {"steps": (0, 2)}, {"steps": (3, 2)}, {"digits": (0, 1)}, {"operators": "+%"}, {"operators": ""},
    {"verify_loops": (-1, 0)}, {"verify_loops": (2, 1)}, {"steps": 3}, {"styles": {"steps": -1}},
    {"styles": {"merged": True}}, {"styles": {"short": 1}}, {"styles": {}}, {"styles": {"steps": 0}},
    {"styles": {"steps": float("nan")}}, {"styles": [("steps", 1)]},
])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        make_arithmetic_problems(3, **kw)
    with pytest.raises(ValueError):
        make_arithmetic_problems(-1)


def _chain_value(chain: str) -> int:
    tokens = chain.split()
    value = int(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):  # read left to right
        value = value + int(x) if op == "+" else value - int(x)
    return value


def test_styles_change_only_how_the_work_is_written():
    kw = {"steps": (1, 4), "verify_loops": (0, 3), "operators": "+-"}
    plain = make_arithmetic_problems(600, seed=5, **kw)
    mixed = make_arithmetic_problems(600, seed=5, styles={"steps": 1, "merged": 1, "direct": 1}, **kw)
    # the problems themselves never change; the style of each is its own draw
    assert [(p.problem, p.answer) for p in plain] == [(p.problem, p.answer) for p in mixed]
    assert {p.meta["style"] for p in plain} == {"steps"}
    by_style = {s: [p for p in mixed if p.meta["style"] == s] for s in STYLES}
    assert all(150 < len(ps) < 250 for ps in by_style.values()), {s: len(ps) for s, ps in by_style.items()}
    for p in by_style["merged"]:
        (line,) = p.meta["steps"]
        chain, result = line.removeprefix("Merged: ").split(" = ")
        assert result == p.answer == str(_chain_value(chain))
        assert len(chain.split()) == 1 + 2 * len(p.meta["operations"])
        assert p.meta["num_verify_loops"] == 0 and "Check" not in p.meta["solution"]
    for p in by_style["direct"]:
        assert p.meta["steps"] == [] and p.meta["solution"] == f"Answer: \\boxed{{{p.answer}}}"
        assert p.meta["num_verify_loops"] == 0
        # in a bundle the section is the header and the answer line, nothing else
        assert bundle_solution([p, p]).split("\n\n")[1] == f"### Problem 2\nAnswer 2: \\boxed{{{p.answer}}}"
    # a problem written out in the mixed list is written exactly as in the plain one
    for a, b in zip(plain, mixed):
        if b.meta["style"] == "steps":
            assert a.meta["solution"] == b.meta["solution"]
    # each style is shorter than the one before it
    mean_len = {s: sum(len(p.meta["solution"]) for p in ps) / len(ps) for s, ps in by_style.items()}
    assert mean_len["steps"] > mean_len["merged"] > mean_len["direct"]
    assert all(p.meta["style"] == "merged" for p in make_arithmetic_problems(20, styles={"merged": 1.0}))
    weighted = make_arithmetic_problems(1000, styles={"steps": 3, "direct": 1, "merged": 0})
    assert 650 < sum(p.meta["style"] == "steps" for p in weighted) < 850
    assert {p.meta["style"] for p in weighted} == {"steps", "direct"}


def test_section_styles_read_back_the_style_of_every_generated_section():
    ps = make_arithmetic_problems(30, seed=2, styles={"steps": 1, "merged": 1, "direct": 1}, verify_loops=(0, 2))
    for n in (1, 2, 5):
        for i in range(0, 30 - n, n):
            bundle = ps[i: i + n]
            assert section_styles(bundle_solution(bundle)) == [p.meta["style"] for p in bundle]
    assert section_styles(ps[0].meta["solution"]) == [ps[0].meta["style"]]  # the plain N = 1 format
    assert section_styles("### Problem 1\nThe answer is 4.\n\n### Problem 2\n") == ["other", "empty"]
    assert section_styles("") == ["empty"]


def test_ordinals_name_each_operation_and_change_nothing_else():
    plain = make_arithmetic_problems(50, seed=3, steps=(1, 4))
    named = make_arithmetic_problems(50, seed=3, steps=(1, 4), ordinals=True)
    for a, b in zip(plain, named):
        assert (a.answer, a.meta, a.id) == (b.answer, b.meta, b.id)
        words = [w for w in b.problem.split() if w.rstrip(",") in ("First", "Second", "Third", "Fourth")]
        assert [w.rstrip(",") for w in words] == ["First", "Second", "Third", "Fourth"][: len(b.meta["operations"])]
        # without the ordinals the text is the plain one
        assert re.sub(r"(First|Second|Third|Fourth), (\w)", lambda m: m.group(2).upper(), b.problem) == a.problem
    with pytest.raises(ValueError, match="with ordinals at most 9"):
        make_arithmetic_problems(2, steps=(1, 10), ordinals=True)


def _middle(problem, pair):
    """The text of ``problem`` between the opening and the question of wording ``pair`` (None: another wording)."""
    opening, question = pair[0].format(x=problem.meta["start"]), pair[1]
    ok = problem.problem.startswith(opening + " ") and problem.problem.endswith(" " + question)
    return problem.problem[len(opening): -len(question)] if ok else None


def test_phrasings_reword_the_text_and_change_nothing_else():
    plain = make_arithmetic_problems(200, seed=4, steps=(1, 3))
    assert plain == make_arithmetic_problems(200, seed=4, steps=(1, 3), phrasings=1)  # the default
    for k in (2, 5, len(PHRASINGS)):
        worded = make_arithmetic_problems(200, seed=4, steps=(1, 3), phrasings=k)
        used = set()
        for a, b in zip(plain, worded):
            assert (a.answer, a.meta, a.id) == (b.answer, b.meta, b.id)  # numbers, solution, style
            pair = next(j for j, p in enumerate(PHRASINGS) if _middle(b, p) is not None)
            assert pair < k
            used.add(PHRASINGS[pair])
            # between the opening and the question the text is the plain one
            assert _middle(b, PHRASINGS[pair]) == _middle(a, PHRASINGS[0])
        assert len(used) == k  # 200 draws cover every allowed wording
    for bad in (0, len(PHRASINGS) + 1, True, 2.0):
        with pytest.raises(ValueError, match="phrasings"):
            make_arithmetic_problems(2, phrasings=bad)


def test_section_styles_follow_the_template_headers_and_answer_lines():
    t = PromptTemplate(solution_header="## Q{k}", answer_format="Final {k}: \\boxed{{{answer}}}",
                       numbered_single=True)
    ps = make_arithmetic_problems(9, seed=4, styles={"steps": 1, "merged": 1, "direct": 1})
    text = bundle_solution(ps, t)
    assert "### Problem" not in text
    assert section_styles(text, t) == [p.meta["style"] for p in ps]
    assert section_styles(text) == ["other"]  # read with the default template: no header, one section


def test_styles_by_steps_sets_the_style_of_each_difficulty_and_leaves_the_problems_alone():
    plain = make_arithmetic_problems(300, seed=4, steps=(1, 2))
    mixed = make_arithmetic_problems(300, seed=4, steps=(1, 2), styles_by_steps={1: {"steps": 1, "direct": 1}})
    assert [p.problem for p in mixed] == [p.problem for p in plain]
    one = [p for p in mixed if len(p.meta["operations"]) == 1]
    two = [p for p in mixed if len(p.meta["operations"]) == 2]
    assert {p.meta["style"] for p in two} == {"steps"}  # styles (default: steps) for the others
    assert 0.3 < sum(p.meta["style"] == "direct" for p in one) / len(one) < 0.7
    with pytest.raises(ValueError, match="styles_by_steps: 'one' is not a number of operations"):
        make_arithmetic_problems(2, styles_by_steps={"one": {"direct": 1}})
    with pytest.raises(ValueError, match="unknown style"):
        make_arithmetic_problems(2, styles_by_steps={1: {"shortcut": 1}})
