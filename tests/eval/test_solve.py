"""bcr.eval.solve (``bcr solve``) with a tiny random HF model (its answers are garbage; what is tested is
that every problem gets exactly one line, in order, whatever N and the file length; that an answer is
complete by its answer line and a retry replaces only a worse one; that a run killed anywhere resumes to
the file an uninterrupted run writes, and a resume with other settings or references is refused; that
the default budget fits the model; ``n=auto`` from a ``bcr eval`` summary; and that bad input is one
clear line)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcr import cli
from bcr.data.bundling import bundle_sequential
from bcr.data.problems import DataError
from bcr.eval.scaling import stable_seed
from bcr.eval.solve import SolveConfig, _answer_records, _better, _needs_retry, choose_n, solve
from bcr.models.rollout import Generation, make_engine
from bcr.runtime.dataclass_cli import ConfigError
from bcr.task.prompts import PromptTemplate, render_prompt
from bcr.task.synthetic import make_arithmetic_problems

REPO = Path(__file__).resolve().parents[2]
FAST = {"per_problem_budget": 8, "progress": False, "temperature": 1.0, "top_p": 1.0}


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _write_problems(path, problems, answers=True):
    rows = [{"id": p.id, "problem": p.problem, **({"answer": p.answer} if answers else {})} for p in problems]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model and its tokenizer saved as an HF directory (what users pass as model=)."""
    from bcr.models.tiny import build_tokenizer, tiny_model

    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("solve") / "model"
    tiny_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("n,count", [(1, 3), (2, 5), (3, 7), (4, 4), (5, 3)])
def test_one_line_per_problem_in_order_for_any_n(tmp_path, tiny_qwen2, tiny_tokenizer, n, count):
    problems = make_arithmetic_problems(count, seed=n)
    out = tmp_path / "answers.jsonl"
    result = solve(tiny_qwen2, problems, output=out, tokenizer=tiny_tokenizer, n=n, retry=False, batch_size=2, **FAST)
    lines = _lines(out)
    assert [r["id"] for r in lines] == [p.id for p in problems]
    sizes = [len(b) for b in bundle_sequential(problems, n)]
    assert [r["bundle_index"] for r in lines] == [i // n for i in range(count)]
    assert [r["bundle_size"] for r in lines] == [sizes[i // n] for i in range(count)]  # the last bundle short
    for r in lines:
        assert r["extraction"] in ("strict", "flexible", "none") and (r["answer"] is None) == (r["extraction"] == "none")
        assert 0 <= r["section_tokens"] <= r["bundle_tokens"] <= 8 * r["bundle_size"]
        assert isinstance(r["correct"], bool) and r["retried"] is False
    for b in range(len(sizes)):  # sections never hold more tokens than their completion
        assert sum(r["section_tokens"] for r in lines if r["bundle_index"] == b) <= lines[b * n]["bundle_tokens"]
    assert result["problems"] == count and result["answered_now"] == count and result["retried"] == 0
    assert result["accuracy"] == sum(r["correct"] for r in lines) / count
    # a second run has nothing left to do and leaves the file as it was
    before = out.read_bytes()
    again = solve(tiny_qwen2, problems, output=out, tokenizer=tiny_tokenizer, n=n, retry=False, **FAST)
    assert again["answered_now"] == 0 and out.read_bytes() == before


def test_without_answers_no_correctness_and_same_answers(tmp_path, model_dir):
    """An input without an answer column is answered all the same; `reference` and `correct` are only there
    with a reference."""
    problems = make_arithmetic_problems(5, seed=3)
    with_ref = solve(model_dir, _write_problems(tmp_path / "a.jsonl", problems), output=tmp_path / "a.out", n=2,
                     **FAST)
    without = solve(model_dir, _write_problems(tmp_path / "b.jsonl", problems, answers=False),
                    output=tmp_path / "b.out", n=2, **FAST)
    a, b = _lines(tmp_path / "a.out"), _lines(tmp_path / "b.out")
    assert all("correct" in r for r in a) and not any("correct" in r or "reference" in r for r in b)
    assert [r["reference"] for r in a] == [p.answer for p in problems]
    assert [{k: v for k, v in r.items() if k not in ("correct", "reference")} for r in a] == b
    assert with_ref["with_reference"] == 5 and with_ref["accuracy"] is not None
    assert without["with_reference"] == 0 and without["accuracy"] is None


def test_missing_answers_are_retried_alone_once(tmp_path, tiny_qwen2, tiny_tokenizer):
    """Every problem of a bundle left without a strict answer is asked again alone with its own seed; the
    retry is the real N = 1 completion, and its answer is kept only when it ranks higher."""
    problems = make_arithmetic_problems(7, seed=5)
    opts = dict(tokenizer=tiny_tokenizer, n=3, **FAST)
    plain = _lines(solve(tiny_qwen2, problems, output=tmp_path / "plain.jsonl", retry=False, **opts)["output"])
    result = solve(tiny_qwen2, problems, output=tmp_path / "retry.jsonl", **opts)
    retried = _lines(tmp_path / "retry.jsonl")
    expected = [r["bundle_size"] > 1 and _needs_retry(r) for r in plain]
    assert any(expected)  # a random model at 8 tokens per problem leaves answers missing
    assert [r["retried"] for r in retried] == expected
    assert result["retried"] == sum(expected)

    engine = make_engine("hf", tiny_qwen2, tiny_tokenizer)
    cfg = SolveConfig(**FAST)
    for p, first, final in zip(problems, plain, retried):
        for key in ("bundle_index", "bundle_size", "section_tokens", "bundle_tokens"):
            assert final[key] == first[key]  # the bundle's part is the same completion
        if not final["retried"]:
            assert final == first
            continue
        (gen,), = engine.generate([render_prompt([p], tiny_tokenizer, PromptTemplate())], num_generations=1,
                                  max_new_tokens=8, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=[stable_seed(0, "solve-retry", p.id) & 0x7FFFFFFF])
        assert final["retry_tokens"] == len(gen.completion_ids)
        (second,) = _answer_records([p], gen, tiny_tokenizer, cfg)
        assert final["answer_from"] == ("retry" if _better(second, first) else "bundle")
        kept = second if final["answer_from"] == "retry" else first
        assert (final["answer"], final["extraction"]) == (kept["answer"], kept["extraction"])

    off = solve(tiny_qwen2, problems, output=tmp_path / "off.jsonl", retry=False, **opts)
    assert off["retried"] == 0


def _records(text, problems, tokenizer, truncated=True):
    """The answer records `bcr solve` makes of one real completion text (tokenised by the real tokenizer)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _answer_records(problems, Generation([], ids, text, truncated), tokenizer, SolveConfig(**FAST))


B = "\\boxed"
# completions of a bundle of two problems, cut by the budget before, inside and right after problem 2's answer line
CUTS = [
    ("before_the_answer_line", f"Answer 1: {B}{{3}}\nFor problem 2, 4*2 = 8 and", "none", True),
    ("inside_the_box", f"Answer 1: {B}{{3}}\nAnswer 2: {B}{{8", "none", True),
    ("inside_a_plain_value", f"Answer 1: {B}{{3}}\nAnswer 2: 8", "none", True),
    ("right_after_the_box", f"Answer 1: {B}{{3}}\nAnswer 2: {B}{{8}}", "strict", False),
    ("right_after_a_plain_line", f"Answer 1: {B}{{3}}\nAnswer 2: 8\n", "strict", False),
    ("after_the_box_on_its_line", f"Answer 1: {B}{{3}}\nAnswer 2: {B}{{8}} because 4*2", "strict", False),
]


@pytest.mark.parametrize("text,extraction,cut_off", [c[1:] for c in CUTS], ids=[c[0] for c in CUTS])
def test_an_answer_is_complete_by_its_answer_line(tiny_tokenizer, text, extraction, cut_off):
    """A completion cut by the budget right after a complete answer line has answered: no retry; one cut
    before or inside the line has not, and is retried."""
    problems = make_arithmetic_problems(2, seed=11)
    first, second = _records(text, problems, tiny_tokenizer)
    assert (first["extraction"], first["cut_off"], _needs_retry(first)) == ("strict", False, False)
    assert (second["extraction"], second["cut_off"], _needs_retry(second)) == (extraction, cut_off, cut_off)
    if extraction == "strict":
        assert second["answer"] == "8"


def test_a_retry_replaces_only_a_worse_answer(tiny_tokenizer):
    """Ranks, from real completions: strict > flexible > none, and of one kind uncut > cut; a tie keeps the
    bundle's answer, so a retry never loses a complete one."""
    (p,) = make_arithmetic_problems(1, seed=12)

    def one(text, truncated):
        return _records(text, [p], tiny_tokenizer, truncated)[0]

    strict_cut_text = one(f"so {B}{{8}}", True)  # the budget ended the text right after the box
    strict = one(f"so {B}{{8}}", False)
    flexible = one("4*2 gives 8.\n", False)
    flexible_cut = one("4*2 gives 8.\nthen", True)
    none = one("no idea", False)
    none_cut = one("no idea, but", True)
    assert (strict_cut_text["extraction"], strict_cut_text["cut_off"]) == ("strict", False)
    assert (flexible["extraction"], flexible["cut_off"], flexible_cut["extraction"], flexible_cut["cut_off"]) == (
        "flexible", False, "flexible", True)
    ladder = [none_cut, none, flexible_cut, flexible, strict]
    for i, worse in enumerate(ladder):
        for better in ladder[i + 1:]:
            assert _better(better, worse) and not _better(worse, better)
    for record in ladder:
        assert not _better(dict(record), record)  # a tie keeps the bundle's
    assert not _better(none, strict_cut_text)  # the issue's case: an uncut retry without an answer


# ------------------------------------------------------------------------------------------ resume

RESUME = dict(n=2, batch_size=2, **FAST)  # a batch: 2 bundles of 2 problems, 4 lines


def _cut_points(text: str) -> dict[str, str]:
    """What a kill leaves of the answers file at several points of a run with RESUME's settings."""
    lines = text.splitlines(keepends=True)
    return {
        "nothing": "",
        "between_batches": "".join(lines[:4]),
        "between_bundles_of_a_batch": "".join(lines[:6]),
        "inside_a_bundle": "".join(lines[:5]),
        "inside_a_line": "".join(lines[:4]) + lines[4][:17],
        "inside_the_last_line": text[:-5],
    }


def test_resume_from_any_cut_point_writes_the_uninterrupted_file(tmp_path, tiny_qwen2, tiny_tokenizer):
    """Whatever a kill leaves (a whole batch, part of one, a torn line), the next run ends with the file an
    uninterrupted run writes, byte for byte; a budget of auto takes the one recorded with the output."""
    problems = make_arithmetic_problems(11, seed=7)
    whole = Path(solve(tiny_qwen2, problems, output=tmp_path / "whole.jsonl", tokenizer=tiny_tokenizer,
                       **RESUME)["output"])
    settings = Path(f"{whole}.settings.json").read_text()
    kept = {"nothing": 0, "between_batches": 4, "between_bundles_of_a_batch": 4, "inside_a_bundle": 4,
            "inside_a_line": 4, "inside_the_last_line": 8}
    for name, left in _cut_points(whole.read_text()).items():
        out = tmp_path / f"{name}.jsonl"
        out.write_text(left)
        Path(f"{out}.settings.json").write_text(settings)
        budget = "auto" if kept[name] else 8  # with nothing kept, auto would be a new choice (1024 here)
        result = solve(tiny_qwen2, problems, output=out, tokenizer=tiny_tokenizer,
                       **{**RESUME, "per_problem_budget": budget})
        assert out.read_bytes() == whole.read_bytes(), name
        assert result["answered_now"] == 11 - kept[name] and result["problems"] == 11, name
        assert Path(f"{out}.settings.json").read_text() == settings


# a `bcr solve` child that SIGKILLs itself while appending its `call`-th batch, after `lines` lines of it
# (a fraction: inside a line; 0: before writing any of it)
_KILLED_CHILD = r"""
import os, signal, sys
import bcr.eval.solve as solve
from bcr import cli

call, lines = int(sys.argv[1]), float(sys.argv[2])
calls = []
append = solve.append_records

def append_then_die(path, records):
    if len(calls) == call:
        scratch = f"{path}.scratch"  # the bytes the real append writes, then part of them
        if os.path.exists(scratch):
            os.remove(scratch)
        append(scratch, records)
        text = open(scratch, encoding="utf-8").read().splitlines(keepends=True)
        whole = int(lines)
        part = text[whole][: int(len(text[whole]) * (lines - whole))] if lines > whole else ""
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(text[:whole]) + part)
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(call)
    append(path, records)

solve.append_records = append_then_die
sys.exit(cli.main(["solve", *sys.argv[3:]]))
"""


@pytest.mark.slow
def test_resume_after_real_kills_equals_an_uninterrupted_run(tmp_path, model_dir):
    """A real `bcr solve` process killed with SIGKILL three times, each kill placed while it appends a batch
    (after its last whole batch, between the two lines of a bundle, inside a line), resumed each time by the
    same command: the file it ends with is the one an uninterrupted run (in this process, one thread as the
    children) writes, byte for byte."""
    data = _write_problems(tmp_path / "problems.jsonl", make_arithmetic_problems(13, seed=7))
    args = [f"model={model_dir}", f"input={data}", "n=2", "batch_size=2", "per_problem_budget=6", "temperature=1.0",
            "top_p=1.0", "progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1): the uninterrupted run, in this process
    try:
        assert cli.main(["solve", *args, f"output={whole}"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "killed.jsonl"
    lines_after = []
    # (append call of this run to die in, lines of that batch written): batch 1 before any of it; the batch
    # after the 4 lines kept, after one line of its first bundle; a batch again, inside its second line
    for call, lines in [(1, 0), (1, 1), (0, 1.5)]:
        child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(call), str(lines), *args, f"output={out}"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert child.returncode == -signal.SIGKILL, child.stderr
        lines_after.append(out.read_text().count("\n"))
    assert lines_after == [4, 9, 9]  # 4 + 4 + 1 line of a bundle; then 8 kept + 1 line and a torn one
    assert not out.read_text().endswith("\n")
    done = subprocess.run([sys.executable, "-m", "bcr", "solve", *args, f"output={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole.read_bytes()


def _refusal(call) -> str:
    with pytest.raises((ConfigError, DataError)) as err:
        call()
    return str(err.value)


def test_a_resume_with_other_settings_or_references_is_refused(tmp_path, tiny_qwen2, tiny_llama, tiny_tokenizer):
    """A partial output is continued only with the settings and reference answers it was made with: any other
    is refused in one message naming the difference, and the file and its settings stay as they were."""
    problems = make_arithmetic_problems(6, seed=8)
    out = tmp_path / "answers.jsonl"
    solve(tiny_qwen2, problems, output=out, tokenizer=tiny_tokenizer, **RESUME)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:4]))
    before, settings = out.read_bytes(), Path(f"{out}.settings.json").read_bytes()

    def resume(model=tiny_qwen2, items=problems, **changes):
        return lambda: solve(model, items, output=out, tokenizer=tiny_tokenizer, **{**RESUME, **changes})

    other_reference = [dataclasses.replace(problems[0], answer="-1"), *problems[1:]]
    cases = {
        "n 2 -> 3": resume(n=3),
        "seed 0 -> 1": resume(seed=1),
        "temperature 1.0 -> 0.5": resume(temperature=0.5),
        "top_p 1.0 -> 0.9": resume(top_p=0.9),
        "per_problem_budget 8 -> 6": resume(per_problem_budget=6),
        "budget_mode 'per_problem' -> 'per_prompt'": resume(budget_mode="per_prompt"),
        "retry True -> False": resume(retry=False),
        "numbered_single False -> True": resume(numbered_single=True),
        "model '<Qwen2ForCausalLM>' -> '<LlamaForCausalLM>'": resume(model=tiny_llama),
        f"judged against the reference {problems[0].answer!r}, the input now gives '-1'": resume(items=other_reference),
        f"answers {problems[0].id!r}, but problem 1 of the input is 'synth-9-0'":
            resume(items=make_arithmetic_problems(6, seed=9)),
    }
    for difference, call in cases.items():
        message = _refusal(call)
        assert difference in message and "cannot be continued" in message and "resume=new_file" in message, message
        assert "\n" not in message
        assert out.read_bytes() == before and Path(f"{out}.settings.json").read_bytes() == settings
    Path(f"{out}.settings.json").unlink()
    assert "no settings record" in _refusal(resume())
    assert out.read_bytes() == before


def test_new_file_and_afresh_on_request(tmp_path, tiny_qwen2, tiny_tokenizer):
    """resume=new_file leaves an output it cannot continue as it is and writes (then continues) the next
    numbered file; resume=false starts the output afresh."""
    problems = make_arithmetic_problems(6, seed=10)
    opts = dict(tokenizer=tiny_tokenizer, **RESUME)
    out = tmp_path / "answers.jsonl"
    solve(tiny_qwen2, problems, output=out, **opts)
    first = out.read_bytes()
    fresh = solve(tiny_qwen2, problems, output=tmp_path / "seed1.jsonl", **{**opts, "seed": 1})["output"]
    result = solve(tiny_qwen2, problems, output=out, resume="new_file", **{**opts, "seed": 1})
    assert result["output"] == str(tmp_path / "answers.2.jsonl") and result["answered_now"] == 6
    assert Path(result["output"]).read_bytes() == Path(fresh).read_bytes() and out.read_bytes() == first
    again = solve(tiny_qwen2, problems, output=out, resume="new_file", **{**opts, "seed": 1})
    assert again["output"] == result["output"] and again["answered_now"] == 0  # continues answers.2.jsonl
    third = solve(tiny_qwen2, problems, output=out, resume="new_file", **{**opts, "seed": 2})
    assert third["output"] == str(tmp_path / "answers.3.jsonl")
    over = solve(tiny_qwen2, problems, output=out, resume=False, **{**opts, "seed": 1})
    assert over["output"] == str(out) and out.read_bytes() == Path(fresh).read_bytes()
    assert json.loads(Path(f"{out}.settings.json").read_text())["settings"]["seed"] == 1


# ------------------------------------------------------------------------------------------ budget


def test_auto_budget_fits_the_context_and_is_printed(tmp_path, tiny_tokenizer, capsys):
    """With the default budget (auto), a model whose context is too small for 1024 tokens per problem is
    answered with the most that fits its longest prompt (printed), not refused; a number that does not fit is."""
    from bcr.models.tiny import tiny_model

    problems = make_arithmetic_problems(5, seed=13)
    template = PromptTemplate()
    longest = max(len(tiny_tokenizer(render_prompt(b, tiny_tokenizer, template), add_special_tokens=False)
                      ["input_ids"]) for b in bundle_sequential(problems, 2))
    context = longest + 2 * 12 + 1  # room for 12 new tokens per problem (and one to spare)
    model = tiny_model(tiny_tokenizer, seed=0, max_position_embeddings=context)
    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    result = solve(model, problems, output=out, tokenizer=tiny_tokenizer, n=2, progress=False)
    printed = capsys.readouterr().err
    line = (f"budget: 12 new tokens per problem, 24 for a prompt of 2 (auto: the most up to 1024 that fits; "
            f"the model holds {context} tokens, the longest prompt has {longest})")
    assert line in printed and result["budget"] == line
    assert all(r["bundle_tokens"] <= 12 * r["bundle_size"] and r["retry_tokens"] <= 12 for r in _lines(out))
    assert json.loads(Path(f"{out}.settings.json").read_text())["settings"]["per_problem_budget"] == 12
    message = _refusal(lambda: solve(model, problems, output=tmp_path / "b.jsonl", tokenizer=tiny_tokenizer, n=2,
                                     per_problem_budget=13, progress=False))
    assert f"does not fit the model's context: its prompt ({longest} tokens) and budget (26 new tokens)" in message
    assert "lower n, or lower per_problem_budget (auto: 12)" in message and not (tmp_path / "b.jsonl").exists()
    per_prompt = solve(model, problems, output=tmp_path / "c.jsonl", tokenizer=tiny_tokenizer, n=2, progress=False,
                       budget_mode="per_prompt")
    assert per_prompt["budget"].startswith(f"budget: {context - longest} new tokens per prompt (auto")


# ------------------------------------------------------------------------------------------ the input


def test_the_whole_input_is_checked_before_anything_is_written(tmp_path, model_dir):
    """A bad row or a repeated id anywhere in a streamed input is refused before the output is created."""
    problems = make_arithmetic_problems(7, seed=14)
    data = _write_problems(tmp_path / "problems.jsonl", problems)
    out = tmp_path / "answers.jsonl"
    with open(data, "a") as f:
        f.write('{"id": "last", "problem": \n')
    assert "problems.jsonl:8" in _refusal(lambda: solve(model_dir, data, output=out, **FAST)) and not out.exists()
    _write_problems(data, [*problems, problems[3]])
    message = _refusal(lambda: solve(model_dir, data, output=out, **FAST))
    assert f"{problems[3].id!r} repeats" in message and not out.exists()


def _summary(folder, accuracy, model_paths):
    """A `bcr eval` run directory as `bcr eval` writes it: summary.json rows and eval_config.json's models."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"model": name, "n_problems": n, "accuracy": acc} for name, accs in accuracy.items() for n, acc in accs.items()]
    (folder / "summary.json").write_text(json.dumps({"config": {"budget_mode": "per_problem", "per_problem_budget": 100},
                                                     "models": list(accuracy), "rows": rows}))
    (folder / "eval_config.json").write_text(json.dumps({"models": {k: str(Path(v).resolve()) for k, v in model_paths.items()}}))
    return folder


def test_choose_n_largest_within_the_drop(tmp_path):
    me, other = tmp_path / "me", tmp_path / "other"
    me.mkdir(), other.mkdir()
    run = _summary(tmp_path / "run", {"base": {1: 0.9, 2: 0.5}, "bcr": {1: 0.80, 2: 0.79, 4: 0.775, 6: 0.70}},
                   {"base": other, "bcr": me})
    assert choose_n(run, model=me)["n"] == 2  # N = 4 lost 2.5 points
    choice = choose_n(run / "summary.json", model=me, max_accuracy_drop=3)
    assert choice["n"] == 4 and choice["model"] == "bcr" and choice["accuracy"][6] == pytest.approx(70.0)
    assert choose_n(run, model=me, max_accuracy_drop=0)["n"] == 1
    assert choose_n(run, model=tmp_path, eval_model="base", max_accuracy_drop=50)["n"] == 2
    with pytest.raises(ConfigError, match="not .*run `bcr eval` on this model"):
        choose_n(run, model=tmp_path)
    with pytest.raises(ConfigError, match="no summary.json"):
        choose_n(tmp_path / "nowhere", model=me)
    (tmp_path / "odd.json").write_text(json.dumps({"rows": [{"model": "bcr", "n_problems": 1}]}))
    with pytest.raises(ConfigError, match="is not a `bcr eval` summary"):
        choose_n(tmp_path / "odd.json", model=me)


@pytest.mark.slow
def test_n_auto_from_a_real_eval_run(tmp_path, model_dir, capsys):
    """`bcr eval` of the model, then `bcr solve n=auto` on its run directory: the choice is printed with its
    numbers and used."""
    data = _write_problems(tmp_path / "problems.jsonl", make_arithmetic_problems(4, seed=9))
    run = tmp_path / "eval"
    assert cli.main(["eval", f"model={model_dir}", f"benchmark={data}", "n_values=[1,2,4]", "budget_mode=per_problem",
                     "per_problem_budget=6", f"output_dir={run}", "progress=false", "plots=false",
                     "n_bootstrap=50"]) == 0
    accuracy = {r["n_problems"]: 100 * r["accuracy"] for r in json.loads((run / "summary.json").read_text())["rows"]}
    expected = max(n for n, acc in accuracy.items() if accuracy[1] - acc <= 2)
    capsys.readouterr()
    out = tmp_path / "answers.jsonl"
    assert cli.main(["solve", f"model={model_dir}", f"input={data}", f"output={out}", "n=auto", f"eval_summary={run}",
                     "per_problem_budget=6", "progress=false"]) == 0
    captured = capsys.readouterr()
    assert f"n=auto chose N = {expected}" in captured.err and "N=1:" in captured.err
    assert [r["bundle_index"] for r in _lines(out)] == [i // expected for i in range(4)]
    assert f"at N = {expected}" in captured.out


def _one_error_line(capsys, argv):
    rc = cli.main(["solve", *argv, "progress=false"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # one line, the last one (transformers' weight-loading bar may come before it), no traceback
    assert rc == 2 and "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def test_bad_input_is_one_clear_line(tmp_path, model_dir, capsys):
    good = _write_problems(tmp_path / "good.jsonl", make_arithmetic_problems(2, seed=1))
    out = tmp_path / "answers.jsonl"
    common = [f"model={model_dir}", f"output={out}"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "problem": "2+2"}\n{"id": 2, "problem": \n')
    assert "bad.jsonl" in _one_error_line(capsys, [*common, f"input={bad}"])
    assert "no such file" in _one_error_line(capsys, [*common, f"input={tmp_path / 'missing.jsonl'}"])
    assert "unknown.dir" in _one_error_line(capsys, [f"model={tmp_path / 'unknown.dir'}", f"input={good}",
                                                     f"output={out}"])
    err = _one_error_line(capsys, [*common, f"input={good}", "per_problem_budget=5000"])  # the model holds 4096
    assert "does not fit the model's context" in err and "synth-1-0" in err
    assert "lower n" in _one_error_line(capsys, [*common, f"input={good}", "n=2", "per_problem_budget=2040"])
    assert "expected a whole number" in _one_error_line(capsys, [*common, f"input={good}", "n=0"])
    assert "eval_summary" in _one_error_line(capsys, [*common, f"input={good}", "n=auto"])
    assert "is a directory" in _one_error_line(capsys, [f"model={model_dir}", f"input={good}", f"output={tmp_path}"])
    assert not out.exists()  # nothing was written
    out.write_text("my notes\n")  # an output that is not an answers file is neither continued nor cut
    assert "not an answers file" in _one_error_line(capsys, [*common, f"input={good}"])
    assert out.read_text() == "my notes\n"

    assert cli.main(["solve", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("model", "input", "output", "n ", "eval_summary", "max_accuracy_drop", "retry", "resume",
                   "batch_size", "per_problem_budget", "engine"):
        assert option in help_text
