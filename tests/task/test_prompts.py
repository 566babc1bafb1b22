"""Tests for bcr.task.prompts: N = 1 and N = 3 prompts, plain and through a local chat template."""

from __future__ import annotations

import re

import pytest

from bcr.data.problems import Problem
from bcr.task.prompts import (
    ANSWER_FORMAT,
    ANSWER_PREFIX_REGEX,
    HEADER_FORMAT,
    HEADER_REGEX,
    SINGLE_ANSWER_FORMAT,
    PromptTemplate,
    build_messages,
    bundle_solution,
    format_prompt,
    format_solution,
    render_prompt,
)

PROBS = [
    Problem("a", "What is 2 + 3?", "5"),
    Problem("b", "Compute $\\frac{1}{2} + \\frac{1}{2}$.", "1"),
    Problem("c", "What is 7 * 6?", "42", meta={"solution": "7 * 6 = 42"}),
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["Solve the following problems What is 2 + 3 ?"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def plain_tokenizer(chat_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.backend_tokenizer, unk_token="<unk>")


def test_format_constants():
    assert HEADER_FORMAT.format(k=2) == "### Problem 2"
    assert ANSWER_FORMAT.format(k=2, answer="17") == "Answer 2: \\boxed{17}"
    assert SINGLE_ANSWER_FORMAT.format(answer="17") == "Answer: \\boxed{17}"
    assert re.search(HEADER_REGEX, "intro\n### Problem 12\nwork", re.MULTILINE).group(1) == "12"
    m = re.search(ANSWER_PREFIX_REGEX, "x\nAnswer 3: \\boxed{7}")
    assert m.group(1) == "3" and m.end() == len("x\nAnswer 3: \\boxed{")


def test_single_problem_prompt_is_ordinary():
    text = format_prompt(PROBS[:1])
    assert text == "What is 2 + 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert "Problem 1" not in text and "###" not in text
    assert format_prompt(PROBS[0]) == text == format_prompt(["What is 2 + 3?"])


def test_three_problem_prompt():
    text = format_prompt(PROBS)
    instruction, rest = text.split("\n\n", 1)
    assert instruction.startswith("Solve the following 3 problems.")
    assert '"### Problem k"' in instruction and '"Answer k: \\boxed{...}"' in instruction
    assert rest.split("\n\n") == [
        "Problem 1: What is 2 + 3?",
        "Problem 2: Compute $\\frac{1}{2} + \\frac{1}{2}$.",
        "Problem 3: What is 7 * 6?",
    ]


def test_custom_template():
    t = PromptTemplate(instruction="Do these {n}. Headers like {header}; end with {answer}.",
                       problem_header="Q{k})", solution_header="## Q{k}", answer_format="A{k} = \\boxed{{{answer}}}")
    text = format_prompt(PROBS[:2], t)
    assert text.startswith("Do these 2. Headers like ## Qk; end with Ak = \\boxed{...}.\n\n")
    assert "Q1) What is 2 + 3?" in text and "Q2) Compute" in text
    assert bundle_solution(PROBS[:2], t).split("\n\n")[1] == "## Q2\nA2 = \\boxed{1}"


def test_messages_and_system_prompt():
    msgs = build_messages(PROBS)
    assert msgs == [{"role": "user", "content": format_prompt(PROBS)}]
    msgs = build_messages(PROBS[:1], system_prompt="You are helpful.")
    assert msgs[0] == {"role": "system", "content": "You are helpful."} and msgs[1]["role"] == "user"
    t = PromptTemplate(system_prompt="SYS")
    assert build_messages(PROBS, t)[0]["content"] == "SYS"
    assert build_messages(PROBS, t, system_prompt="OVR")[0]["content"] == "OVR"


@pytest.mark.parametrize("n", [1, 3])
def test_render_with_chat_template(chat_tokenizer, n):
    out = render_prompt(PROBS[:n], chat_tokenizer)
    assert out == f"<|im_start|>user\n{format_prompt(PROBS[:n])}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("n", [1, 3])
def test_render_without_chat_template(plain_tokenizer, n):
    assert not getattr(plain_tokenizer, "chat_template", None)
    assert render_prompt(PROBS[:n], plain_tokenizer) == format_prompt(PROBS[:n])
    assert render_prompt(PROBS[:n]) == format_prompt(PROBS[:n])
    assert render_prompt(PROBS[:n], template=PromptTemplate(system_prompt="S")) == "S\n\n" + format_prompt(PROBS[:n])


def test_format_solution_and_bundle():
    assert format_solution(PROBS[2]) == "7 * 6 = 42\nAnswer: \\boxed{42}"
    assert format_solution(PROBS[2], k=3) == "### Problem 3\n7 * 6 = 42\nAnswer 3: \\boxed{42}"
    assert format_solution(PROBS[0], k=1) == "### Problem 1\nAnswer 1: \\boxed{5}"
    assert bundle_solution(PROBS) == (
        "### Problem 1\nAnswer 1: \\boxed{5}\n\n### Problem 2\nAnswer 2: \\boxed{1}\n\n"
        "### Problem 3\n7 * 6 = 42\nAnswer 3: \\boxed{42}"
    )
    assert bundle_solution(PROBS[:1]) == "Answer: \\boxed{5}"


def test_bad_inputs():
    with pytest.raises(ValueError):
        format_prompt([])
    with pytest.raises(TypeError):
        format_prompt([1, 2])
    with pytest.raises(ValueError):
        bundle_solution([])


def test_numbered_single_gives_n1_the_multi_problem_format():
    from bcr.task.parsing import parse_completion

    t = PromptTemplate(numbered_single=True)
    text = format_prompt(PROBS[:1], t)
    instruction, listed = text.split("\n\n", 1)
    assert instruction.startswith("Solve the following 1 problem. ")  # singular, same instruction otherwise
    assert instruction[len("Solve the following 1 problem"):] == format_prompt(PROBS[:2]).split("\n\n")[0][
        len("Solve the following 2 problems"):]
    assert listed == "Problem 1: What is 2 + 3?"
    target = bundle_solution(PROBS[2:3], t)
    assert target == "### Problem 1\n7 * 6 = 42\nAnswer 1: \\boxed{42}"
    assert parse_completion(target, 1).answers == ["42"]
    # N > 1 is the same with or without the option, and the default N = 1 stays the plain prompt
    assert format_prompt(PROBS, t) == format_prompt(PROBS)
    assert bundle_solution(PROBS, t) == bundle_solution(PROBS)
    assert "Problem 1" not in format_prompt(PROBS[:1]) and bundle_solution(PROBS[:1]) == "Answer: \\boxed{5}"
