"""The data a TRL user passes: a ``datasets.Dataset`` or dict records, under TRL's keyword names
(``train_dataset=``, ``eval_dataset=``, ``reward_funcs=``) or bcr's, on a tiny random Qwen2."""

from __future__ import annotations

import json

import pytest
import torch

from bcr.data.problems import DataError, Problem
from bcr.rl.config import BCRConfig
from bcr.rl.trainer import BCRTrainer

PAIRS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 6 * 2?", "12"), ("What is 9 + 1?", "10")]


def _cfg(tmp_path, **kw) -> BCRConfig:
    base = {"output_dir": str(tmp_path / "run"), "n_problems": 2, "num_generations": 2, "max_completion_length": 16,
            "bundles_per_step": 1, "max_steps": 1, "learning_rate": 1e-2, "disable_progress_bar": True,
            "save_total_limit": 1, "save_steps": 0}
    base.update(kw)
    return BCRConfig(**base)


def _records(form: str):
    if form == "problem_answer":
        return [{"problem": q, "answer": a} for q, a in PAIRS]
    if form == "prompt_answer":  # TRL's standard prompt-only format, plus the reference answer
        return [{"prompt": q, "answer": a} for q, a in PAIRS]
    if form == "dataset":
        datasets = pytest.importorskip("datasets")
        return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q, _ in PAIRS],
                                           "answer": [a for _, a in PAIRS]})
    raise ValueError(form)


def even_token_reward(completion_ids, **kw):
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


@pytest.mark.parametrize("form", ["dataset", "problem_answer", "prompt_answer"])
def test_a_step_from_what_a_trl_user_passes(tmp_path, tiny_tokenizer, tiny_qwen2, form):
    """Each of these raised ``TypeError: problems must be Problem objects or strings, got dict``."""
    seen: dict[str, list] = {"prompts": [], "answer": []}

    def reward(prompts, completions, answer, **kw):
        seen["prompts"].extend(prompts)
        seen["answer"].extend(answer)
        return even_token_reward(**kw)

    before = {k: v.detach().clone() for k, v in tiny_qwen2.named_parameters()}
    cfg = _cfg(tmp_path)
    trainer = BCRTrainer(model=tiny_qwen2, reward_funcs=[reward], config=cfg, tokenizer=tiny_tokenizer,
                         train_dataset=_records(form))
    assert all(isinstance(p, Problem) for p in trainer.bundles.bundler.problems)
    metrics = trainer.train()
    assert metrics["skipped_updates"] == 0
    # the problems' texts reach the rendered prompts and their answers reach the reward function
    (prompt, *_), (answers, *_) = seen["prompts"], seen["answer"]
    shown = [(q, a) for q, a in PAIRS if q in prompt]
    assert len(shown) == cfg.n_problems and sorted(answers) == sorted(a for _, a in shown)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_eval_dataset_is_evaluated(tmp_path, tiny_tokenizer, tiny_qwen2):
    datasets = pytest.importorskip("datasets")
    evals = datasets.Dataset.from_list([{"question": q, "answer": f"so #### {a}"} for q, a in PAIRS[:2]])
    trainer = BCRTrainer(tiny_qwen2, _records("problem_answer"), _cfg(tmp_path, eval_steps=1, n_problems=1),
                         tokenizer=tiny_tokenizer, eval_dataset=evals)
    assert [(p.problem, p.answer) for p in trainer.eval_problems] == [(q, a) for q, a in PAIRS[:2]]
    trainer.train()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert any("eval/accuracy/n1" in r for r in rows)


@pytest.mark.parametrize("bcr_name,trl_name", [("train_problems", "train_dataset"), ("eval_problems", "eval_dataset"),
                                               ("reward_fn", "reward_funcs")])
def test_both_names_of_one_argument_is_an_error(tmp_path, bcr_name, trl_name):
    given = {"train_problems": _records("problem_answer"), "eval_problems": _records("problem_answer"),
             "reward_fn": even_token_reward}[bcr_name]
    kw = {"train_dataset": _records("problem_answer")} if bcr_name != "train_problems" else {}
    # the model path does not exist: the argument error comes first
    with pytest.raises(TypeError, match=f"both {bcr_name}= and {trl_name}=.*pass only one"):
        BCRTrainer(str(tmp_path / "no-model"), config=_cfg(tmp_path), **kw, **{bcr_name: given, trl_name: given})


def test_bad_data_fails_before_the_model_loads(tmp_path):
    records = _records("prompt_answer")
    records[2] = {"prompt": "What is 1 + 1?", "solution": "two"}
    with pytest.raises(DataError, match=r"^train_dataset record 2: missing field 'answer'"):
        BCRTrainer(str(tmp_path / "no-model"), config=_cfg(tmp_path), train_dataset=records)
    with pytest.raises(DataError, match=r"^train_problems record 0: a string, which has no reference answer"):
        BCRTrainer(str(tmp_path / "no-model"), ["What is 1 + 1?"], _cfg(tmp_path))


def test_missing_arguments_are_named(tmp_path):
    records = _records("problem_answer")
    with pytest.raises(TypeError, match=r"needs config=BCRConfig"):
        BCRTrainer(str(tmp_path / "no-model"), train_dataset=records)
    with pytest.raises(TypeError, match=r"needs training problems: train_dataset="):
        BCRTrainer(str(tmp_path / "no-model"), config=_cfg(tmp_path))
    with pytest.raises(TypeError, match=r"reward_funcs\[0\] is str 'my-org/reward-model', not a function"):
        BCRTrainer(str(tmp_path / "no-model"), config=_cfg(tmp_path), train_dataset=records,
                   reward_funcs="my-org/reward-model")
