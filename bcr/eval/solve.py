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
    correct        only for a problem with a reference answer: whether the answer matches it

Tokens per problem, counting retries, is ``sum(bundle_tokens / bundle_size + retry_tokens) / lines``.

Left running
------------
Lines are appended (flushed and fsynced) after every generate call of ``batch_size`` bundles and
their retries, so a run stopped by Ctrl-C or ``kill -9`` loses at most the batch in flight; run the
same command again and it reads ``output`` (dropping a torn last line, as the evaluator does), skips
the problems already answered and answers the rest: none twice, none lost. ``resume=false`` starts
afresh. Mistakes a user can make (a bad input file, an unknown model, a problem that does not fit
the model's context, an ``output`` that answers another input) are refused before anything is
written.

``n=auto`` reads a ``bcr eval`` run of the same model (``eval_summary``: its ``output_dir`` or its
``summary.json``) and takes the largest N whose strict accuracy is within ``max_accuracy_drop``
percentage points of its accuracy at N = 1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcr.data.bundling import bundle_sequential
from bcr.data.problems import load_problems
from bcr.eval.scaling import stable_seed
from bcr.eval.sweep import (
    CONFIG_FILE,
    _model_identity,
    _open_engine,
    _tokenizer_for,
    append_records,
    bundle_seed,
    read_results,
)
from bcr.models.loading import DTYPES, resolve_model_source
from bcr.runtime.dataclass_cli import ConfigError, check_fields, parse_cli
from bcr.runtime.io import atomic_write_text, check_output_dir
from bcr.runtime.metrics import progress_bar
from bcr.task.parsing import completion_segment_ids, parse_completion
from bcr.task.prompts import PromptTemplate, render_prompt
from bcr.task.scoring import score_completion
from bcr.task.verify import warm_up

EXTRACTION_RANK = {"none": 0, "flexible": 1, "strict": 2}


def _help(text: str) -> dict:
    return {"help": text}


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
    per_problem_budget: int = field(default=1024, metadata=_help("new tokens per problem (per_problem mode)"))
    max_completion_length: int = field(default=2048, metadata=_help("new tokens per prompt (per_prompt mode)"))
    numbered_single: bool = field(
        default=False, metadata=_help("N = 1 prompts (and retries) use the numbered format of N > 1")
    )
    temperature: float = field(default=0.6, metadata=_help("sampling temperature"))
    top_p: float = field(default=0.95, metadata=_help("nucleus sampling top-p"))
    seed: int = field(default=0, metadata=_help("sampling seed; same seed, same answers"))
    engine: str = field(default="auto", metadata=_help("generation engine: auto (vllm where installed with a GPU, "
                                                       "else hf), hf or vllm"))
    engine_kwargs: dict = field(default_factory=dict, metadata=_help("extra keyword arguments for make_engine"))
    batch_size: int = field(default=8, metadata=_help("bundles (prompts) per generate call"))
    retry: bool = field(default=True, metadata=_help("ask a problem again alone when it has no strict answer"))
    resume: bool = field(default=True, metadata=_help("continue a partial output; false starts it afresh"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    verify_timeout: float = field(default=2.0, metadata=_help("seconds allowed to check one answer"))

    def __post_init__(self):
        check_fields(self)
        if isinstance(self.n, str) and self.n.strip().lower() == "auto":
            self.n = "auto"
        else:
            try:
                ok = not isinstance(self.n, bool) and float(self.n).is_integer() and int(float(self.n)) >= 1
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"n={self.n!r}: expected a whole number >= 1, or auto")
            self.n = int(float(self.n))
        if self.budget_mode not in ("per_prompt", "per_problem"):
            raise ConfigError(f"budget_mode must be 'per_prompt' or 'per_problem', got {self.budget_mode!r}")
        if self.model_dtype not in DTYPES:
            raise ConfigError(f"model_dtype must be one of {list(DTYPES)}, got {self.model_dtype!r}")
        if self.engine not in ("auto", "hf", "vllm"):
            raise ConfigError(f"engine must be auto, hf or vllm, got {self.engine!r}")
        for name in ("batch_size", "per_problem_budget", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not self.verify_timeout > 0:
            raise ConfigError(f"verify_timeout must be > 0 seconds, got {self.verify_timeout!r}")
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop!r}")

    def max_new_tokens(self, n_actual: int) -> int:
        """The completion budget of a prompt holding ``n_actual`` problems."""
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


# ----------------------------------------------------------------------------- one batch


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
            record["correct"] = bool(score.correct[k])
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


def solve_batch(engine, tokenizer, batch: Sequence[tuple[int, list]], cfg: SolveConfig, template, n: int) -> list[dict]:
    """Answer ``batch`` (``(bundle_index, problems)`` pairs) and retry what needs it; one record per
    problem, in order. Each record carries its generation tokens under ``"_tokens"`` for throughput."""
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
    again = [r for r in records if cfg.retry and r["bundle_size"] > 1 and _needs_retry(r)]
    if again:
        singles = [[by_id[r["id"]]] for r in again]
        gens = engine.generate([render_prompt(s, tokenizer, template) for s in singles], num_generations=1,
                               max_new_tokens=cfg.max_new_tokens(1), temperature=cfg.temperature, top_p=cfg.top_p,
                               seed=[stable_seed(cfg.seed, "solve-retry", r["id"]) & 0x7FFFFFFF for r in again])
        for record, single, (gen,) in zip(again, singles, gens):
            (second,) = _answer_records(single, gen, tokenizer, cfg)
            record.update(retried=True, retry_tokens=len(gen.completion_ids))
            if _better(second, record):
                record.update(answer=second["answer"], extraction=second["extraction"], cut_off=second["cut_off"],
                              answer_from="retry")
                if "correct" in second:
                    record["correct"] = second["correct"]
    keys = ("id", "answer", "extraction", "bundle_index", "bundle_size", "section_tokens", "bundle_tokens", "cut_off",
            "retried", "retry_tokens", "answer_from", "correct")
    return [{k: r[k] for k in keys if k in r} for r in records]


# ----------------------------------------------------------------------------- the run


def _problem_tokens(record: Mapping) -> float:
    return record["bundle_tokens"] / record["bundle_size"] + record["retry_tokens"]


def summarize_answers(records: Sequence[Mapping]) -> dict:
    """Counts, accuracy (over the problems with a reference) and tokens per problem of answer records."""
    graded = [r for r in records if "correct" in r]
    kinds = Counter(r["extraction"] for r in records)
    return {
        "problems": len(records),
        "strict": kinds["strict"],
        "flexible": kinds["flexible"],
        "unanswered": kinds["none"],
        "cut_off": sum(r["cut_off"] for r in records),
        "retried": sum(r["retried"] for r in records),
        "answered_by_retry": sum(r["answer_from"] == "retry" for r in records),
        "with_reference": len(graded),
        "accuracy": sum(r["correct"] for r in graded) / len(graded) if graded else None,
        "tokens_per_problem": sum(map(_problem_tokens, records)) / len(records) if records else 0.0,
    }


def _check_fits(engine, tokenizer, bundles: Sequence[tuple[int, list]], cfg: SolveConfig, template) -> None:
    """Refuse, before anything is written, a prompt plus its budget longer than the model's context."""
    model = getattr(engine, "model", None)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not context:
        return  # vLLM checks its own context

    def need(problems) -> int:
        ids = tokenizer(render_prompt(problems, tokenizer, template), add_special_tokens=False)["input_ids"]
        return len(ids) + cfg.max_new_tokens(len(problems))

    for _, bundle in bundles:
        for p in bundle:
            if (tokens := need([p])) > context:
                raise ConfigError(
                    f"problem {p.id!r} does not fit the model's context: its prompt and answer budget need {tokens} "
                    f"tokens, the model holds {context}; shorten or remove it, or lower the budget "
                    f"({'per_problem_budget' if cfg.budget_mode == 'per_problem' else 'max_completion_length'})"
                )
    for index, bundle in bundles:
        if len(bundle) > 1 and (tokens := need(bundle)) > context:
            raise ConfigError(
                f"bundle {index} ({len(bundle)} problems from {bundle[0].id!r}) needs {tokens} tokens, more than the "
                f"model's context of {context}; lower n"
            )


def _read_output(path: Path, problems, cfg: SolveConfig) -> list[dict]:
    """Records of a partial ``output``, checked against the input; reads only (a torn last line, the
    trace of a kill mid-write, is dropped here and cut off the file just before the next append)."""
    if not cfg.resume or not path.exists():
        return []
    data = path.read_bytes()
    for number, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), 1):
        try:
            ok = not line.strip() or "id" in json.loads(line)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(f"output={str(path)!r} is not an answers file of bcr solve (line {number}); choose "
                              "another output, or resume=false to overwrite it")
    records = read_results(path, key=lambda r: r["id"])
    ids = {p.id for p in problems}
    foreign = [r["id"] for r in records if r["id"] not in ids]
    if foreign:
        raise ConfigError(f"output={str(path)!r} answers problems that are not in the input (e.g. {foreign[0]!r}); "
                          "choose another output, or resume=false to overwrite it")
    return records


def _load_problems(cfg: SolveConfig, problems):
    if problems is None:
        if not cfg.input:
            raise ConfigError("no problems: pass input=<problems.jsonl>")
        problems = load_problems(cfg.input, split=cfg.split, limit=cfg.limit, data_dir=cfg.data_dir,
                                 require_answer=False)
    else:
        problems = list(problems)[: cfg.limit] if cfg.limit else list(problems)
    if not problems:
        raise ConfigError(f"no problems to answer in {cfg.input!r}")
    seen = set()
    for p in problems:
        if p.id in seen:
            raise ConfigError(f"problem ids must be unique (answers are matched to problems by id); {p.id!r} repeats "
                              f"in {cfg.input!r}")
        seen.add(p.id)
    return problems


def _check_output(cfg: SolveConfig) -> Path:
    out = Path(cfg.output).expanduser()
    if out.is_dir():
        raise ConfigError(f"output={cfg.output!r} is a directory; pass a file path such as {out / 'answers.jsonl'}")
    check_output_dir(out.parent if str(out.parent) else ".", "output's directory")
    if cfg.input and out.exists() and Path(cfg.input).expanduser().resolve() == out.resolve():
        raise ConfigError("output is the input file; write the answers to another file")
    return out


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
        ``{"output", "n", "n_auto" (the choice, or None), "problems", "strict", "flexible", "unanswered",
        "cut_off", "retried", "answered_by_retry", "with_reference", "accuracy", "tokens_per_problem",
        "answered_now", "seconds", "problems_per_s"}``; the counts cover the whole output file,
        the last three this call only.
    """
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
    engine_name = cfg.engine
    if engine_name == "auto":
        engine_name = "vllm" if _vllm_usable() and isinstance(model, (str, os.PathLike)) else "hf"
    cfg = dataclasses.replace(cfg, engine=engine_name)

    out = _check_output(cfg)
    if isinstance(model, (str, os.PathLike)) and engine_name == "hf":
        resolve_model_source(model)  # an unknown model is one clear error, before anything loads
    if isinstance(tokenizer or cfg.tokenizer, (str, os.PathLike)) and not Path(tokenizer or cfg.tokenizer).exists():
        raise ConfigError(f"tokenizer path {str(tokenizer or cfg.tokenizer)!r} does not exist")
    problems = _load_problems(cfg, input)
    choice = None
    n = cfg.n
    if n == "auto":
        if not cfg.eval_summary:
            raise ConfigError("n=auto chooses N from a `bcr eval` run of this model: pass eval_summary=<its output_dir>")
        choice = choose_n(cfg.eval_summary, model=model, eval_model=cfg.eval_model,
                          max_accuracy_drop=cfg.max_accuracy_drop)
        n = choice["n"]
        print(describe_choice(choice), file=sys.stderr, flush=True)
    existing = _read_output(out, problems, cfg)
    done = {r["id"] for r in existing}
    bundles = [(i, [p for p in b if p.id not in done]) for i, b in enumerate(bundle_sequential(problems, n))]
    pending = [(i, b) for i, b in bundles if b]

    template = PromptTemplate(numbered_single=cfg.numbered_single)
    engine = tok = None
    if pending:
        warm_up()  # math-verify imports while the model loads
        tok = _tokenizer_for("model", model, tokenizer or cfg.tokenizer)
        engine = _open_engine("model", model, tok, cfg)
        _check_fits(engine, tok, pending, cfg, template)
    # every check passed: from here on the output is written
    if not cfg.resume:
        out.unlink(missing_ok=True)
    elif out.exists():
        read_results(out, repair=True, key=lambda r: r["id"])  # cut a torn last line (a kill mid-write) off
    answered_now = 0
    started = time.perf_counter()
    with progress_bar(cfg.progress and bool(pending), "{task.fields[info]}") as bar:
        task = bar.add_task(f"solve N={n}", total=len(problems), completed=len(done), info="")
        for start in range(0, len(pending), cfg.batch_size):
            records = solve_batch(engine, tok, pending[start:start + cfg.batch_size], cfg, template, n)
            append_records(out, records)
            existing.extend(records)
            answered_now += len(records)
            rate = answered_now / (time.perf_counter() - started)
            bar.update(task, advance=len(records), info=f"{rate:.2f} problems/s")
    seconds = time.perf_counter() - started

    order = {p.id: i for i, p in enumerate(problems)}
    ids = [r["id"] for r in existing]
    if ids != sorted(ids, key=order.get):  # only after a resume with another n: put the lines in input order
        existing.sort(key=lambda r: order[r["id"]])
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in existing))
    return {"output": str(out), "n": n, "n_auto": choice, **summarize_answers(existing),
            "answered_now": answered_now, "seconds": round(seconds, 3),
            "problems_per_s": answered_now / seconds if answered_now and seconds > 0 else None}


def _vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


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
