"""The demo's task and model: held-out arithmetic problems, SFT examples, the tokenizer and the tiny model.

Every distinct problem text is either a training or a held-out text (a fixed hash split, about one
text in ``task.held_out_every`` held out), so no evaluation problem is ever trained on. The
tokenizer is a byte-level BPE trained on prompts and worked solutions of every N the demo uses; the
model is a random-init Llama- or Qwen2-architecture one built from ``DemoConfig.model``
(:func:`build_tokenizer_and_model` is the one place both are made).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

from bcr.data.problems import Problem
from bcr.task.prompts import PromptTemplate, bundle_solution, format_prompt, render_prompt
from bcr.task.synthetic import check_styles, make_arithmetic_problems
from bcr.models.tiny import build_tokenizer, tiny_model
from bcr.models.loading import load_tokenizer

from .config import DemoConfig


def _held_out(text: str, seed: int, every: int) -> bool:
    """A fixed share (about one text in ``every``) of all problem texts is reserved for evaluation."""
    digest = hashlib.sha256(f"demo-held-out:{seed}:{text}".encode()).digest()
    return digest[0] % every == 0


def worked_only(cfg: DemoConfig) -> DemoConfig:
    """``cfg`` with every solution written in the steps style (the first SFT phase's data; the same problems;
    no direct answers, so no ``sft.direct_steps``)."""
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, styles={"steps": 1.0}, styles_by_steps={}),
                               sft=dataclasses.replace(cfg.sft, direct_steps=0))


def has_shorter_styles(cfg: DemoConfig) -> bool:
    """Whether ``task.styles`` (or ``task.styles_by_steps``) gives any problem a style other than steps."""
    mixes = [cfg.task.styles, *cfg.task.styles_by_steps.values()]
    return any(check_styles(weights)[0] != ["steps"] for weights in mixes)


def make_task(cfg: DemoConfig) -> tuple[list[Problem], list[Problem]]:
    """``(train_problems, eval_problems)``: training problems carry verbose worked solutions; the
    evaluation problems are distinct held-out texts."""
    task = cfg.task
    kw = {"steps": tuple(task.problem_steps), "digits": tuple(task.problem_digits), "operators": task.operators,
          "ordinals": task.ordinals, "phrasings": task.phrasings}
    train, size = [], task.num_train_problems
    while len(train) < task.num_train_problems and size < 50 * task.num_train_problems:
        size *= 2
        pool = make_arithmetic_problems(size, seed=cfg.seed, verify_loops=tuple(task.verify_loops),
                                        styles=task.styles, styles_by_steps=task.styles_by_steps, **kw)
        train = [p for p in pool if not _held_out(p.problem, cfg.seed, task.held_out_every)][: task.num_train_problems]
    evals, seen = [], set()
    for p in make_arithmetic_problems(task.num_eval_problems * 200, seed=cfg.seed + 10_007, **kw):
        if _held_out(p.problem, cfg.seed, task.held_out_every) and p.problem not in seen:
            seen.add(p.problem)
            evals.append(p)
            if len(evals) == task.num_eval_problems:
                break
    if len(train) < task.num_train_problems or len(evals) < task.num_eval_problems:
        raise RuntimeError(f"could not draw {task.num_train_problems} training and {task.num_eval_problems} "
                           "distinct held-out problems; lower task.num_eval_problems or widen "
                           "task.problem_steps/task.problem_digits")
    return train, evals


def tokenizer_corpus(problems: list[Problem], cfg: DemoConfig, limit: int = 1500) -> list[str]:
    """Prompts and target completions of bundles of every N the demo uses (the tokenizer's training text)."""
    rng = random.Random(f"demo-tokenizer:{cfg.seed}")
    ns = sorted(set(cfg.sft.n_values) | set(cfg.rl.n_values) | set(cfg.eval.n_values))
    texts = []
    subset = list(problems[:limit])
    for i in range(len(subset)):
        n = rng.choice(ns)
        bundle = [subset[(i + j) % len(subset)] for j in range(n)]
        texts.append(format_prompt(bundle, cfg.template))
        texts.append(bundle_solution(bundle, cfg.template))
        texts.append("user\nassistant\n")  # the chat template's role names
    return texts


def build_tokenizer_and_model(cfg: DemoConfig, train: list[Problem]):
    """The task tokenizer (trained on :func:`tokenizer_corpus`) and the seeded random-init model of ``cfg.model``."""
    m = cfg.model
    tokenizer = build_tokenizer(tokenizer_corpus(train, cfg), vocab_size=m.vocab_size)
    model = tiny_model(tokenizer, arch=m.arch, hidden_size=m.hidden_size, num_layers=m.num_layers,
                       num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, max_position_embeddings=2048,
                       seed=cfg.seed)
    return tokenizer, model


def bundle_solution_sample(problems: list[Problem], template: PromptTemplate | None = None) -> str:
    """A prompt and its worked solution for two problems (the text of the tokenizer round-trip check)."""
    return render_prompt(problems[:2], None, template) + "\n" + bundle_solution(problems[:2], template)


def check_tokenizer_roundtrip(tokenizer, model_dir: Path, text: str) -> None:
    """The trainer and the evaluator load the tokenizer with ``bcr.models.loading.load_tokenizer``;
    make sure that gives the very tokenization the model was trained with."""
    loaded = load_tokenizer(model_dir)
    a = tokenizer(text, add_special_tokens=False)["input_ids"]
    b = loaded(text, add_special_tokens=False)["input_ids"]
    if a != b:
        raise RuntimeError(f"the tokenizer saved in {str(model_dir)!r} loads as a {type(loaded).__name__} that "
                           "tokenizes differently from the tokenizer the model was trained with")


def sft_example(bundle: list[Problem], tokenizer, template: PromptTemplate | None = None) -> tuple[list[int], int]:
    """Token ids of prompt + target completion + EOS, and the number of prompt tokens."""
    prompt = tokenizer(render_prompt(bundle, tokenizer, template), add_special_tokens=False)["input_ids"]
    target = (tokenizer(bundle_solution(bundle, template), add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id])
    return prompt + target, len(prompt)
