"""Answer a file of problems N at a time: ``bcr solve``, the task-scaling law used as a throughput dial.

Python::

    from bcr import solve
    summary = solve("/ckpt/bcr", "problems.jsonl", output="answers.jsonl", n=4)

Command line::

    bcr solve model=/ckpt/bcr input=problems.jsonl output=answers.jsonl n=4
    bcr solve model=/ckpt/bcr input=problems.jsonl output=answers.jsonl n=auto eval_summary=runs/eval

What it does
------------
The problems (any schema :func:`bcr.data.problems.load_problems` reads; the ``answer`` column is
optional) are cut into consecutive bundles of ``n`` in input order (the last one may be shorter), and
each bundle is one prompt (:func:`bcr.task.prompts.render_prompt`) answered by one completion, sampled
as ``bcr eval`` samples (same seeds, so ``bcr solve`` at N gives the completions of a sweep's first
sample at N). The completion is parsed into its N answers as the sweep scores them
(:func:`bcr.task.scoring.score_completion`): the strict BCR answer line first, the flexible
extraction as a fallback. A strict answer is complete by its answer line (a closed ``\\boxed{}``, or a
plain value on a finished line), wherever the token budget ended the text. A problem left without
one is asked again alone (N = 1) once (``retry=true``, the default), so that a bundle never costs an
answer; the retry's answer replaces the bundle's only when it ranks higher (strict over flexible over
none; of one kind, one whose section the budget did not cut off over one it did; a tie keeps the
bundle's), so a retry never loses a complete answer. A problem that was alone in its prompt already
(n=1, or the last bundle holding one problem) is not asked again: that would be the same question.

The budget (``per_problem_budget``, or ``max_completion_length`` with ``budget_mode=per_prompt``) is
``auto`` by default: the most new tokens, up to 1024 per problem (2048 per prompt), with which every
prompt of the input fits the model's context (the engine's ``context_length``, else the HF model's
``max_position_embeddings``). A number is used as given; either way a prompt that would not fit is
refused before anything is written, and the chosen numbers are printed. (A retry's prompt is checked
when it is asked; one that would not fit, possible only for a prompt alone longer than the longest
bundle prompt, is not asked.)

Output (``output``, JSON Lines, one line per problem, in input order)::

    id             the problem's id
    answer         the extracted answer, or null
    extraction     "strict" (the BCR answer line), "flexible" (fallback), or "none"
    bundle_index   the index of its bundle of n in the input (0-based)
    bundle_size    problems in that bundle's prompt
    section_tokens completion tokens of its section of the bundle's completion
    bundle_tokens  completion tokens of the whole bundle (shared by its bundle_size problems)
    cut_off        the token budget ended its section before a complete answer line
    retried        it was asked again alone; retry_tokens: the tokens of that completion
    answer_from    "bundle" or "retry": whose answer this is
    reference      only for a problem with a reference answer: that answer
    correct        only for a problem with a reference answer: whether the answer matches it

Tokens per problem, counting retries, is ``sum(bundle_tokens / bundle_size + retry_tokens) / lines``.
The settings that decide the answers (:func:`answer_settings`) are recorded beside it, in
``<output>.settings.json``.

Large inputs, and runs left running
-----------------------------------
A JSON Lines input is read line by line and the answers are written a batch of ``batch_size``
bundles at a time, so memory does not grow with the file (other input formats are loaded whole).
Each batch is appended, flushed and fsynced; a run stopped by Ctrl-C or ``kill -9`` continues when the
same command is run again, and the file it ends with is the one an uninterrupted run writes, byte for
byte: the answers of whole batches are kept and a batch cut short (some of its lines, a torn line) is
answered again by the same generate calls (:mod:`bcr.eval.answers_file`). A run is only continued by
one with the same settings and the same reference answers; anything else is refused in one line
naming the difference, before anything is written. ``resume=false`` starts the file afresh;
``resume=new_file`` leaves a file it cannot continue as it is and writes (or continues)
``answers.2.jsonl``, ``answers.3.jsonl``, ... instead. Other mistakes (a bad input row, a repeated
id, an unknown model, a prompt that does not fit the model's context) are refused before anything is
written too.

``n=auto`` reads a ``bcr eval`` run of the same model (``eval_summary``: its ``output_dir`` or its
``summary.json``) and takes the largest N whose strict accuracy is within ``max_accuracy_drop``
percentage points of its accuracy at N = 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bcr.data.problems import iter_problems, load_problems
from bcr.eval import answers_file
from bcr.eval.answers_file import Kept, summarize_answers
from bcr.eval.scaling import stable_seed
from bcr.eval.sweep import (
    CONFIG_FILE,
    _model_identity,
    _open_engine,
    _tokenizer_for,
    append_records,
    bundle_seed,
)
from bcr.models.loading import DTYPES, resolve_model_source
from bcr.models.rollout import default_engine
from bcr.models.served import is_served
from bcr.runtime.dataclass_cli import ConfigError, check_fields, parse_cli
from bcr.runtime.io import check_output_dir
from bcr.runtime.metrics import progress_bar
from bcr.task.parsing import completion_segment_ids, parse_completion
from bcr.task.prompts import PromptTemplate, render_prompt
from bcr.task.scoring import score_completion
from bcr.task.verify import warm_up

__all__ = ["SolveConfig", "answer_settings", "choose_n", "solve", "summarize_answers"]

EXTRACTION_RANK = {"none": 0, "flexible": 1, "strict": 2}
AUTO_BUDGET = {"per_problem_budget": 1024, "max_completion_length": 2048}  # the most a budget of auto takes


def _help(text: str) -> dict:
    return {"help": text}


def _whole_or_auto(name: str, value) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        ok = not isinstance(value, bool) and float(value).is_integer() and int(float(value)) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected a whole number >= 1, or auto")
    return int(float(value))


@dataclass
class SolveConfig:
    """Settings of ``bcr solve``; every field is a ``key=value`` option."""

    model: str | None = field(default=None, metadata=_help("the model: an HF directory, a .gguf file or a Hub id"))
    input: str | None = field(
        default=None, metadata=_help("the problems: a .jsonl/.json/.csv/.parquet file (an 'answer' column is optional), "
                                     "a benchmark name or a dataset id")
    )
    output: str = field(default="answers.jsonl", metadata=_help("JSON Lines file of answers, one line per problem"))
    n: int | str = field(default=4, metadata=_help("problems per context, or auto (from eval_summary)"))
    eval_summary: str | None = field(
        default=None, metadata=_help("n=auto: a `bcr eval` run of this model (its output_dir or summary.json)")
    )
    eval_model: str | None = field(
        default=None, metadata=_help("n=auto: the model's name in that run (default: the one whose path is model=)")
    )
    max_accuracy_drop: float = field(
        default=2.0, metadata=_help("n=auto: accuracy points below N = 1 that a larger N may lose")
    )
    model_dtype: str = field(default="auto", metadata=_help("dtype the weights load in: auto, float32, bfloat16"))
    gguf_file: str | None = field(default=None, metadata=_help("with model=<directory>: the .gguf file inside it"))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer path (default: the model's own)"))
    split: str | None = field(default=None, metadata=_help("split of a benchmark name or dataset"))
    limit: int | None = field(default=None, metadata=_help("answer only the first `limit` problems"))
    data_dir: str | None = field(default=None, metadata=_help("directory holding <benchmark>/<split>.jsonl"))
    budget_mode: str = field(
        default="per_problem",
        metadata=_help("per_problem: per_problem_budget x problems per prompt; per_prompt: max_completion_length"),
    )
    per_problem_budget: int | str = field(
        default="auto", metadata=_help("new tokens per problem (per_problem mode); auto: the most, up to 1024, with "
                                       "which every prompt fits the model's context"))
    max_completion_length: int | str = field(
        default="auto", metadata=_help("new tokens per prompt (per_prompt mode); auto: the most, up to 2048, that fits"))
    numbered_single: bool = field(
        default=False, metadata=_help("N = 1 prompts (and retries) use the numbered format of N > 1")
    )
    temperature: float = field(default=0.6, metadata=_help("sampling temperature"))
    top_p: float = field(default=0.95, metadata=_help("nucleus sampling top-p"))
    seed: int = field(default=0, metadata=_help("sampling seed; same seed, same answers"))
    engine: str = field(default="auto", metadata=_help("generation engine: auto (vllm where installed and the "
                                                       "model is a path, else hf), hf or vllm"))
    engine_kwargs: dict = field(default_factory=dict, metadata=_help("extra keyword arguments for make_engine"))
    batch_size: int = field(default=8, metadata=_help("bundles (prompts) per generate call"))
    retry: bool = field(default=True, metadata=_help("ask a problem again alone when it has no strict answer"))
    resume: bool | str = field(
        default=True, metadata=_help("true: continue the output (refused when made with other settings or "
                                     "references); false: start it afresh; new_file: write answers.2.jsonl, ... "
                                     "when the output cannot be continued"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    verify_timeout: float = field(default=2.0, metadata=_help("seconds allowed to check one answer"))

    def __post_init__(self):
        check_fields(self)
        self.n = _whole_or_auto("n", self.n)
        self.per_problem_budget = _whole_or_auto("per_problem_budget", self.per_problem_budget)
        self.max_completion_length = _whole_or_auto("max_completion_length", self.max_completion_length)
        if self.resume not in (True, False, "new_file"):
            raise ConfigError(f"resume must be true, false or new_file, got {self.resume!r}")
        if self.budget_mode not in ("per_prompt", "per_problem"):
            raise ConfigError(f"budget_mode must be 'per_prompt' or 'per_problem', got {self.budget_mode!r}")
        if self.model_dtype not in DTYPES:
            raise ConfigError(f"model_dtype must be one of {list(DTYPES)}, got {self.model_dtype!r}")
        if self.engine not in ("auto", "hf", "vllm"):
            raise ConfigError(f"engine must be auto, hf or vllm, got {self.engine!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not self.verify_timeout > 0:
            raise ConfigError(f"verify_timeout must be > 0 seconds, got {self.verify_timeout!r}")
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop!r}")

    @property
    def budget_key(self) -> str:
        """The option that holds this mode's budget."""
        return "per_problem_budget" if self.budget_mode == "per_problem" else "max_completion_length"

    def max_new_tokens(self, n_actual: int) -> int:
        """The completion budget of a prompt holding ``n_actual`` problems (once the budget is a number)."""
        if self.budget_mode == "per_problem":
            return self.per_problem_budget * n_actual
        return self.max_completion_length


# ----------------------------------------------------------------------------- n=auto


def choose_n(eval_summary: str | os.PathLike, *, model=None, eval_model: str | None = None,
             max_accuracy_drop: float = 2.0) -> dict:
    """The largest N of a ``bcr eval`` run whose accuracy is within ``max_accuracy_drop`` points of N = 1.

    ``eval_summary`` is the run's ``output_dir`` or its ``summary.json``. The model's rows are those
    of ``eval_model``, else of the run's model whose path is ``model`` (from ``eval_config.json``),
    else of the run's only model. Returns ``{"n", "model", "summary", "accuracy": {N: accuracy %},
    "baseline", "max_accuracy_drop", "budget"}``.
    """
    path = Path(eval_summary)
    folder = path if path.is_dir() else path.parent
    summary_path = path / "summary.json" if path.is_dir() else path
    if not summary_path.is_file():
        raise ConfigError(f"eval_summary={str(eval_summary)!r}: no summary.json there; pass the output_dir of a "
                          "finished `bcr eval` run (or its summary.json)")
    try:
        summary = json.loads(summary_path.read_text())
        rows = [{"model": r["model"], "n_problems": int(r["n_problems"]), "accuracy": float(r["accuracy"])}
                for r in summary["rows"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{summary_path} is not a `bcr eval` summary ({err!r} missing or wrong); pass a "
                          "summary.json that `bcr eval` wrote") from None
    names = list(dict.fromkeys(r["model"] for r in rows))
    name = eval_model
    if name is None:
        config_path = folder / CONFIG_FILE
        identities = json.loads(config_path.read_text()).get("models", {}) if config_path.is_file() else {}
        mine = _model_identity(model) if isinstance(model, (str, os.PathLike)) else None
        same = [n for n, ident in identities.items() if mine is not None and ident == mine and n in names]
        if same:
            name = same[0]
        elif identities and mine is not None:
            raise ConfigError(f"{summary_path} evaluated {identities}, not {mine}; run `bcr eval` on this model, "
                              "or pass eval_model=<name> to use another model's numbers")
        elif len(names) == 1:
            name = names[0]
        else:
            raise ConfigError(f"{summary_path} holds several models {names}; pass eval_model=<one of them>")
    if name not in names:
        raise ConfigError(f"eval_model={name!r} is not in {summary_path} (models: {names})")
    accuracy = {r["n_problems"]: 100.0 * r["accuracy"] for r in rows if r["model"] == name}
    if 1 not in accuracy:
        raise ConfigError(f"{summary_path} has no N = 1 row for {name!r} to compare with; sweep n_values with 1 in it")
    fits = [n for n, acc in accuracy.items() if accuracy[1] - acc <= max_accuracy_drop + 1e-9]
    conf = summary.get("config", {})
    budget = (f"{conf.get('per_problem_budget')} tokens per problem" if conf.get("budget_mode") == "per_problem"
              else f"{conf.get('max_completion_length')} tokens per prompt") if conf else "unknown"
    return {"n": max(fits), "model": name, "summary": str(summary_path), "accuracy": dict(sorted(accuracy.items())),
            "baseline": accuracy[1], "max_accuracy_drop": max_accuracy_drop, "budget": budget}


def describe_choice(choice: Mapping) -> str:
    """One paragraph: the N chosen and the accuracies behind it."""
    rows = ", ".join(f"N={n}: {acc:.1f}%" for n, acc in choice["accuracy"].items())
    return (f"n=auto chose N = {choice['n']}: the largest N whose accuracy is within {choice['max_accuracy_drop']:g} "
            f"points of N = 1 ({choice['baseline']:.1f}%) for {choice['model']!r} in {choice['summary']} "
            f"({rows}; budget {choice['budget']})")


# ----------------------------------------------------------------------------- the input, streamed


class ProblemInput:
    """The problems of a run, read afresh on every pass over them: a JSON Lines file line by line
    (:func:`bcr.data.problems.iter_problems`), anything else loaded once and held."""

    def __init__(self, cfg: SolveConfig, problems: Iterable | None = None):
        self.cfg, self.items = cfg, None
        if problems is not None:
            items = list(problems)
            self.items = items[: cfg.limit] if cfg.limit else items
        elif not cfg.input:
            raise ConfigError("no problems: pass input=<problems.jsonl>")
        elif not self._streamed():
            self.items = load_problems(cfg.input, split=cfg.split, limit=cfg.limit, data_dir=cfg.data_dir,
                                       require_answer=False)

    def _streamed(self) -> bool:
        path = Path(self.cfg.input).expanduser()
        return path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson")

    def __iter__(self) -> Iterator:
        if self.items is not None:
            return iter(self.items)
        return iter_problems(self.cfg.input, limit=self.cfg.limit, require_answer=False)


def count_problems(problems: ProblemInput, where: str | None) -> int:
    """Read the whole input once, before anything is written: a bad row is refused here, and so is an
    id that repeats (answers are matched to problems by id). Holds 8 bytes per problem (its id's hash)."""
    hashes = array("q", (hash(p.id) for p in problems))
    if not hashes:
        raise ConfigError(f"no problems to answer in {where!r}")
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    clashes = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    seen = set()
    for p in problems if clashes else ():
        if hash(p.id) in clashes:
            if p.id in seen:
                raise ConfigError(f"problem ids must be unique (answers are matched to problems by id); {p.id!r} "
                                  f"repeats in {where!r}")
            seen.add(p.id)
    return len(hashes)


def bundles(problems: Iterable, n: int, start: int = 0) -> Iterator[tuple[int, list]]:
    """``(bundle index, problems)`` of consecutive bundles of ``n`` from problem ``start`` (a multiple of ``n``)."""
    bundle: list = []
    for i, p in enumerate(problems):
        if i >= start:
            bundle.append(p)
            if len(bundle) == n:
                yield i // n, bundle
                bundle = []
    if bundle:
        yield (i - len(bundle) + 1) // n, bundle


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- the model and its budget


def engine_name(model, cfg: SolveConfig) -> str:
    """``cfg.engine`` with ``auto`` resolved: ``bcr.models.rollout.default_engine`` for a model path (vLLM
    where installed), hf for a model object."""
    if cfg.engine != "auto":
        return cfg.engine
    return default_engine() if isinstance(model, (str, os.PathLike)) else "hf"


def open_engine(model, tokenizer, cfg: SolveConfig):
    """The rollout engine that answers and its tokenizer, for ``cfg.engine`` as :func:`engine_name`
    resolved it: the one place ``bcr solve`` makes an engine."""
    tok = _tokenizer_for("model", model, tokenizer or cfg.tokenizer)
    return _open_engine("model", model, tok, cfg), tok


def context_length(engine) -> int | None:
    """The most tokens (prompt + completion) ``engine`` holds: its ``context_length``, else its HF model's
    ``max_position_embeddings``; None when neither says."""
    length = getattr(engine, "context_length", None)
    if not length:
        length = getattr(getattr(getattr(engine, "model", None), "config", None), "max_position_embeddings", None)
    return int(length) if length else None


def longest_prompts(batch: Iterable[tuple[int, list]], tokenizer, template) -> dict[int, tuple[int, int, str]]:
    """Per bundle size, the longest prompt of ``batch``: ``{size: (tokens, bundle index, its first problem's id)}``."""
    longest: dict[int, tuple[int, int, str]] = {}
    for chunk in _chunks(batch, 256):
        prompts = [render_prompt(b, tokenizer, template) for _, b in chunk]
        for (index, bundle), ids in zip(chunk, tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            if len(ids) > longest.get(len(bundle), (-1,))[0]:
                longest[len(bundle)] = (len(ids), index, bundle[0].id)
    return longest


def fit_budget(cfg: SolveConfig, longest: Mapping[int, tuple[int, int, str]], context: int | None,
               recorded: Mapping | None = None) -> tuple[SolveConfig, str]:
    """``cfg`` with its budget a number, and the line that says which. ``auto`` takes the budget recorded
    with an output being continued, else the most (up to :data:`AUTO_BUDGET`) with which the longest
    prompt of each size fits ``context``; a number is kept. Refuses a budget a prompt does not fit."""
    key, per_problem = cfg.budget_key, cfg.budget_mode == "per_problem"
    asked = getattr(cfg, key)
    room = [(context - t) // (s if per_problem else 1) for s, (t, _, _) in longest.items()] if context else []
    most = min(room) if room else None
    if asked != "auto":
        budget, how = asked, "as set"
    elif recorded and recorded.get(key) is not None:
        budget, how = recorded[key], "auto: as recorded with the output it continues"
    elif most is None:
        budget, how = AUTO_BUDGET[key], f"auto: {AUTO_BUDGET[key]}, the model's context being unknown"
    else:
        budget, how = min(AUTO_BUDGET[key], most), f"auto: the most up to {AUTO_BUDGET[key]} that fits"
    for size, (tokens, index, first) in sorted(longest.items()) if context else ():
        need = tokens + (budget * size if per_problem else budget)
        if budget < 1 or need > context:
            what = f"problem {first!r}" if size == 1 else f"bundle {index} ({size} problems from {first!r})"
            fix = "shorten or remove it" if size == 1 else "lower n"
            if budget < 1:
                raise ConfigError(f"{what} does not fit the model's context: its prompt alone has {tokens} tokens, "
                                  f"the model holds {context}, no room is left for an answer; {fix}")
            fix += f", or lower {key}" + (f" (auto: {most})" if most and most >= 1 else "")
            raise ConfigError(f"{what} does not fit the model's context: its prompt ({tokens} tokens) and budget "
                              f"({need - tokens} new tokens) need {need}, the model holds {context}; {fix}")
    cfg = dataclasses.replace(cfg, **{key: budget})
    longest_tokens = max((tokens for tokens, _, _ in longest.values()), default=0)
    size = max(longest, default=1)
    held = f"the model holds {context} tokens" if context else "the model's context is unknown"
    per = (f"per problem, {cfg.max_new_tokens(size)} for a prompt of {size}" if per_problem and size > 1
           else "per problem" if per_problem else "per prompt")
    return cfg, f"budget: {budget} new tokens {per} ({how}; {held}, the longest prompt has {longest_tokens})"


def _identity(obj) -> str | None:
    """A path resolved, a Hub id as it is; an object by its class and the name it was loaded under."""
    if obj is None or isinstance(obj, (str, os.PathLike)):
        return None if obj is None else _model_identity(obj)
    name = getattr(obj, "name_or_path", None) or getattr(getattr(obj, "config", None), "_name_or_path", None)
    return f"<{type(obj).__name__}{' ' + str(name) if name else ''}>"


def answer_settings(cfg: SolveConfig, model, tokenizer, n: int) -> dict:
    """What decides the answers, recorded beside the output; a run continues it only with the same.
    The budget may still be ``auto`` (it then takes the recorded one)."""
    return {"model": _identity(model), "tokenizer": _identity(tokenizer or cfg.tokenizer),
            "model_dtype": cfg.model_dtype, "engine": cfg.engine, "n": n, "seed": cfg.seed,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "budget_mode": cfg.budget_mode,
            cfg.budget_key: getattr(cfg, cfg.budget_key), "numbered_single": cfg.numbered_single,
            "retry": cfg.retry, "extraction": "strict, else flexible"}


# ----------------------------------------------------------------------------- one batch

RECORD_KEYS = ("id", "answer", "extraction", "bundle_index", "bundle_size", "section_tokens", "bundle_tokens",
               "cut_off", "retried", "retry_tokens", "answer_from", "reference", "correct")


def _answer_records(bundle, gen, tokenizer, cfg: SolveConfig) -> list[dict]:
    """Parse one completion of ``bundle`` into one record per problem (without bundle bookkeeping)."""
    parsed = parse_completion(gen.text, len(bundle), truncated=gen.truncated)
    score = score_completion(parsed, [p.answer for p in bundle], text=gen.text, truncated=gen.truncated,
                             extraction="flexible", timeout=cfg.verify_timeout)
    segments = Counter(completion_segment_ids(tokenizer, gen.completion_ids, parsed))
    records = []
    for k, (problem, inst, answer) in enumerate(zip(bundle, parsed.instances, score.answers)):
        extraction = "strict" if inst.answer is not None else ("flexible" if answer is not None else "none")
        record = {
            "id": problem.id,
            "answer": answer,
            "extraction": extraction,
            "section_tokens": segments.get(k, 0),
            "cut_off": bool(inst.truncated or (gen.truncated and inst.answer is None)),
        }
        if problem.answer:
            record.update(reference=problem.answer, correct=bool(score.correct[k]))
        records.append(record)
    return records


def _rank(record: Mapping) -> tuple[int, bool]:
    """How good an answer is: strict (a complete answer line, wherever the budget ended the text) over
    flexible over none; between two of one kind, the one whose section the budget did not cut off."""
    return EXTRACTION_RANK[record["extraction"]], not record["cut_off"]


def _needs_retry(record: Mapping) -> bool:
    """A problem is asked again alone when its section has no complete answer line (no strict answer)."""
    return record["extraction"] != "strict"


def _better(retry: Mapping, first: Mapping) -> bool:
    """Whether the retry's answer replaces the bundle's: only when it ranks higher (a tie keeps the bundle's)."""
    return _rank(retry) > _rank(first)


def _fits(tokenizer, prompt: str, budget: int, context: int | None) -> bool:
    return not context or len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + budget <= context


def solve_batch(engine, tokenizer, batch: Sequence[tuple[int, list]], cfg: SolveConfig, template, n: int,
                context: int | None = None) -> list[dict]:
    """Answer ``batch`` (``(bundle_index, problems)`` pairs) and retry what needs it; one record per
    problem, in order. A retry whose prompt would not fit ``context`` is not asked."""
    prompts = [render_prompt(bundle, tokenizer, template) for _, bundle in batch]
    gens = engine.generate(prompts, num_generations=1, max_new_tokens=[cfg.max_new_tokens(len(b)) for _, b in batch],
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           seed=[bundle_seed(cfg.seed, n, b) for b, _ in batch])
    records, by_id = [], {}
    for (bundle_index, bundle), (gen,) in zip(batch, gens):
        for problem, record in zip(bundle, _answer_records(bundle, gen, tokenizer, cfg)):
            record.update(bundle_index=bundle_index, bundle_size=len(bundle), bundle_tokens=len(gen.completion_ids),
                          retried=False, retry_tokens=0, answer_from="bundle")
            records.append(record)
            by_id[problem.id] = problem
    again = [(r, render_prompt([by_id[r["id"]]], tokenizer, template)) for r in records
             if cfg.retry and r["bundle_size"] > 1 and _needs_retry(r)]
    again = [(r, prompt) for r, prompt in again if _fits(tokenizer, prompt, cfg.max_new_tokens(1), context)]
    if again:
        gens = engine.generate([prompt for _, prompt in again], num_generations=1, max_new_tokens=cfg.max_new_tokens(1),
                               temperature=cfg.temperature, top_p=cfg.top_p,
                               seed=[stable_seed(cfg.seed, "solve-retry", r["id"]) & 0x7FFFFFFF for r, _ in again])
        for (record, _), (gen,) in zip(again, gens):
            (second,) = _answer_records([by_id[record["id"]]], gen, tokenizer, cfg)
            record.update(retried=True, retry_tokens=len(gen.completion_ids))
            if _better(second, record):
                record.update(answer=second["answer"], extraction=second["extraction"], cut_off=second["cut_off"],
                              answer_from="retry")
                if "correct" in second:
                    record["correct"] = second["correct"]
    return [{k: r[k] for k in RECORD_KEYS if k in r} for r in records]


# ----------------------------------------------------------------------------- the run


@dataclass
class _Plan:
    """What a run does, decided before anything is written."""

    n: int
    total: int  # problems in the input
    output: Path
    kept: Kept  # what it keeps of the output
    choice: dict | None = None  # n=auto's choice
    budget_line: str | None = None


def _check_output(cfg: SolveConfig) -> Path:
    out = Path(cfg.output).expanduser()
    if out.is_dir():
        raise ConfigError(f"output={cfg.output!r} is a directory; pass a file path such as {out / 'answers.jsonl'}")
    check_output_dir(out.parent if str(out.parent) else ".", "output's directory")
    if cfg.input and out.exists() and Path(cfg.input).expanduser().resolve() == out.resolve():
        raise ConfigError("output is the input file; write the answers to another file")
    return out


def _config(model, input, output, config: SolveConfig | None, options: Mapping) -> tuple[SolveConfig, Any, Any]:
    """The run's config (``options`` over ``config``), its model and its in-memory problems (or None)."""
    fields = {f.name for f in dataclasses.fields(SolveConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"solve got unknown options {unknown}; see SolveConfig for the valid ones")
    cfg = dataclasses.replace(config or SolveConfig(), **options)
    if output is not None:
        cfg.output = os.fspath(output)
    if isinstance(input, (str, os.PathLike)):
        cfg.input, input = os.fspath(input), None
    model = model if model is not None else cfg.model
    if model is None:
        raise ConfigError("no model: pass model=<an HF directory, a .gguf file or a Hub id>")
    if cfg.gguf_file and isinstance(model, (str, os.PathLike)):
        model = str(Path(model) / cfg.gguf_file)
    return dataclasses.replace(cfg, engine=engine_name(model, cfg)), model, input


def _plan(cfg: SolveConfig, model, tokenizer, problems: ProblemInput) -> _Plan:
    """Every check that needs no model: the output, n, the input read once, and what the output keeps."""
    out = _check_output(cfg)
    if isinstance(model, (str, os.PathLike)) and cfg.engine == "hf" and not is_served(model):
        resolve_model_source(model)  # an unknown model is one clear error, before anything loads
    if isinstance(tokenizer or cfg.tokenizer, (str, os.PathLike)) and not Path(tokenizer or cfg.tokenizer).exists():
        raise ConfigError(f"tokenizer path {str(tokenizer or cfg.tokenizer)!r} does not exist")
    n, choice = cfg.n, None
    if n == "auto":
        if not cfg.eval_summary:
            raise ConfigError("n=auto chooses N from a `bcr eval` run of this model: pass eval_summary=<its output_dir>")
        choice = choose_n(cfg.eval_summary, model=model, eval_model=cfg.eval_model,
                          max_accuracy_drop=cfg.max_accuracy_drop)
        n = choice["n"]
        print(describe_choice(choice), file=sys.stderr, flush=True)
    total = count_problems(problems, cfg.input)
    settings = answer_settings(cfg, model, tokenizer, n)
    out, kept = answers_file.pick(out, settings, problems, total=total, chunk=cfg.batch_size * n, resume=cfg.resume)
    return _Plan(n, total, out, kept, choice)


def solve(model=None, input=None, *, output: str | os.PathLike | None = None, config: SolveConfig | None = None,
          tokenizer=None, **options) -> dict:
    """Answer the problems of ``input`` N at a time and write ``output`` (see the module docstring).

    Args:
        model: an HF model directory, a ``.gguf`` file or a Hub id; an in-memory HF model (then pass
            ``tokenizer``) or a ready rollout engine. Default: ``config.model``.
        input: a problems file / benchmark name, or a list of :class:`bcr.data.problems.Problem`.
            Default: ``config.input``.
        output: the answers file (default ``config.output``).
        config: a :class:`SolveConfig`; ``**options`` override its fields (``n``, ``retry``, ...).
        tokenizer: a tokenizer or its path (default: the model's own).

    Returns:
        ``{"output", "n", "n_auto" (the choice, or None), "budget" (the line printed, or None when
        nothing was left to answer), "problems", "strict", "flexible", "unanswered", "cut_off",
        "retried", "answered_by_retry", "with_reference", "accuracy", "tokens_per_problem",
        "answered_now", "seconds", "problems_per_s"}``; the counts cover the whole output file, the
        last three this call only.
    """
    cfg, model, items = _config(model, input, output, config, options)
    problems = ProblemInput(cfg, items)
    plan = _plan(cfg, model, tokenizer, problems)
    template = PromptTemplate(numbered_single=cfg.numbered_single)
    tally, answered_now, started = plan.kept.tally, 0, time.perf_counter()
    if plan.kept.lines < plan.total:
        warm_up()  # math-verify imports while the model loads
        engine, tok = open_engine(model, tokenizer, cfg)
        context = context_length(engine)
        longest = longest_prompts(bundles(problems, plan.n, plan.kept.lines), tok, template)
        cfg, plan.budget_line = fit_budget(cfg, longest, context, plan.kept.settings)
        print(plan.budget_line, file=sys.stderr, flush=True)
        # every check passed: from here on the output is written
        answers_file.start(plan.output, plan.kept, answer_settings(cfg, model, tokenizer, plan.n))
        started = time.perf_counter()
        with progress_bar(cfg.progress, "{task.fields[info]}") as bar:
            task = bar.add_task(f"solve N={plan.n}", total=plan.total, completed=plan.kept.lines, info="")
            for batch in _chunks(bundles(problems, plan.n, plan.kept.lines), cfg.batch_size):
                records = solve_batch(engine, tok, batch, cfg, template, plan.n, context)
                append_records(plan.output, records)
                for record in records:
                    tally.add(record)
                answered_now += len(records)
                rate = answered_now / (time.perf_counter() - started)
                bar.update(task, advance=len(records), info=f"{rate:.2f} problems/s")
    elif plan.output.stat().st_size > plan.kept.offset:
        answers_file.start(plan.output, plan.kept, plan.kept.settings)  # only a torn tail to cut off
    seconds = time.perf_counter() - started
    return {"output": str(plan.output), "n": plan.n, "n_auto": plan.choice, "budget": plan.budget_line,
            **tally.summary(), "answered_now": answered_now, "seconds": round(seconds, 3),
            "problems_per_s": answered_now / seconds if answered_now and seconds > 0 else None}


# ----------------------------------------------------------------------------- CLI


def cli_main(argv: Sequence[str]) -> int:
    """``bcr solve [--config FILE.yaml] [key=value ...]``; ``--help`` lists the options."""
    cfg = parse_cli(SolveConfig, argv, prog="bcr solve")
    if cfg is None:
        return 0
    result = solve(config=cfg)
    print(describe_result(result))
    return 0


def describe_result(result: Mapping[str, Any]) -> str:
    """What a finished ``bcr solve`` prints."""
    lines = [f"{result['problems']} problems answered in {result['output']} at N = {result['n']}: "
             f"{result['strict']} strict, {result['flexible']} flexible, {result['unanswered']} without an answer; "
             f"{result['retried']} retried alone ({result['answered_by_retry']} answered by the retry); "
             f"{result['tokens_per_problem']:.1f} tokens per problem"]
    if result["problems_per_s"]:
        lines.append(f"this run: {result['answered_now']} problems in {result['seconds']:.1f} s, "
                     f"{result['problems_per_s']:.2f} problems/s")
    if result["accuracy"] is not None:
        lines.append(f"accuracy: {100 * result['accuracy']:.1f}% of the {result['with_reference']} problems with a "
                     "reference answer")
    return "\n".join(lines)
