"""Task-scaling-law evaluation: sweep N (problems per context) over a benchmark, for one or several
models, and write a run directory with every completion, the summaries, a report and plots.

Python::

    from bcr import evaluate_scaling
    summary = evaluate_scaling({"base": "/ckpt/base", "bcr": "/ckpt/bcr"}, "gsm8k",
                               n_values=[1, 2, 4, 8], samples_per_bundle=4, output_dir="runs/eval")

Command line::

    bcr eval model=/ckpt/bcr benchmark=gsm8k n_values=[1,2,4] output_dir=runs/eval
    bcr eval --config eval.yaml 'models={base: /ckpt/base, bcr: /ckpt/bcr}' baseline=base

What is measured
----------------
Every problem is evaluated at every N: the problem list is cut into consecutive bundles of N
(:func:`bcr.data.bundling.bundle_sequential`, order kept, the last partial bundle kept and recorded with
its real size ``n_actual``), each bundle is rendered as one prompt and sampled ``samples_per_bundle``
(k) times. Accuracy is pass@1 averaged over the k samples. The statistics are defined in
:mod:`bcr.eval.scaling`.

Completion budget (``budget_mode``):

- ``per_prompt``: every prompt gets ``max_completion_length`` new tokens whatever its N, so the N
  problems share one fixed budget (the BCR training setting: the shared budget is the implicit
  length pressure, and at large N it can truncate).
- ``per_problem``: a prompt with ``n_actual`` problems gets ``per_problem_budget * n_actual`` new
  tokens, so each problem keeps the same budget as at N = 1 (isolates the effect of the shared
  context from that of a tighter budget).

Run directory (``output_dir``)
------------------------------
- ``results.jsonl``: one line per (model, N, bundle index, sample index) with the problem ids and
  reference answers, a hash of the prompt, the completion text and token count, truncation, the
  parsed answers and per-instance correctness, both ``strict`` (the BCR answer format: ``answered``,
  ``correct``) and ``flexible`` (``flexible_answers``, ``flexible_correct``: last ``\\boxed{}``,
  "answer is ...", or last number per section; see :mod:`bcr.task.scoring`). Non-deterministic fields
  (wall time) sit under the ``"timing"`` key. Lines are appended and fsynced after every generate
  call (a *batch* of ``batch_size`` bundles); an interrupted sweep restarted with the same settings
  reads the finished keys, drops a torn last line and generates only what is missing. Each bundle's sampling seed
  depends only on (seed, N, bundle index) and the engine makes every completion a function of its
  own prompt and seed, so a resumed sweep - or one whose batches are split across ranks and merged
  by key - writes the same records as an uninterrupted one. Batches are a fixed partition of the
  bundle indices. When the sweep finishes, the file is rewritten in key order.
- ``results.rank<r>.jsonl`` (only while a ``torchrun`` sweep runs): with several processes each rank
  takes every world-th pending batch (``pending[rank::world]``) and appends to its own shard file;
  after a barrier rank 0 merges the shards into ``results.jsonl`` (by key, in canonical order) and
  writes the summaries, so the run directory is identical to a single-process run with the same
  seed. Shards left by a crashed run are merged at the next start (at any world size).
- ``eval_config.json``: the settings that give records their meaning; a restart with different
  settings in the same directory is refused (use a new ``output_dir`` or ``resume=false``).
- ``summary.json`` / ``summary.csv`` / ``report.md`` / PNG plots: see :mod:`bcr.eval.report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcr.data.bundling import bundle_sequential
from bcr.data.problems import load_problems
from bcr.eval.report import write_run_outputs
from bcr.eval.scaling import TIMING_KEY, power_law_label, stable_seed, summarize_records
from bcr.models.loading import DTYPES, load_model, load_tokenizer, resolve_model_source
from bcr.models.rollout import make_engine
from bcr.models.served import ServedEngine, check_server, is_served, served_name, served_tokenizer
from bcr.runtime.dataclass_cli import ConfigError, check_fields, parse_cli
from bcr.runtime.distributed import (
    RankFailedError,
    barrier,
    broadcast_object,
    dist_info,
    fail_together,
    init_distributed,
    maybe_inject_failure,
    teardown_distributed,
)
from bcr.runtime.io import atomic_write_text, check_output_dir
from bcr.runtime.metrics import progress_bar
from bcr.task.parsing import parse_completion
from bcr.task.prompts import PromptTemplate, render_prompt
from bcr.task.scoring import score_completion
from bcr.task.verify import warm_up

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "eval_config.json"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class EvalConfig:
    """Settings of a task-scaling sweep (``bcr eval``); every field is a ``key=value`` option."""

    model: str | None = field(
        default=None, metadata=_help("one model: an HF directory, a .gguf file or a Hub id (or use models=)")
    )
    model_dtype: str = field(
        default="auto", metadata=_help("dtype the weights load in: auto (the checkpoint's; fp32 on the CPU), float32, bfloat16")
    )
    gguf_file: str | None = field(default=None, metadata=_help("with model=<directory>: the .gguf file inside it"))
    models: dict = field(
        default_factory=dict, metadata=_help("several models by name, e.g. {base: /p1, bcr: /p2}")
    )
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer path (default: each model's own)"))
    benchmark: str = field(
        default="gsm8k",
        metadata=_help("benchmark name (gsm8k, math500, aime24, aime25, amc23, minerva, olympiadbench) or a data file"),
    )
    split: str | None = field(default=None, metadata=_help("data split (default: the benchmark's test split)"))
    limit: int | None = field(default=None, metadata=_help("evaluate only the first `limit` problems"))
    data_dir: str | None = field(default=None, metadata=_help("directory holding <benchmark>/<split>.jsonl"))
    n_values: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 8], metadata=_help("the Ns to sweep"))
    samples_per_bundle: int = field(default=1, metadata=_help("k samples per bundle; accuracy is pass@1 averaged over k"))
    budget_mode: str = field(
        default="per_prompt",
        metadata=_help("per_prompt: max_completion_length per prompt; per_problem: per_problem_budget x N"),
    )
    max_completion_length: int = field(default=2048, metadata=_help("new-token budget per prompt (per_prompt mode)"))
    per_problem_budget: int = field(default=1024, metadata=_help("new tokens per problem (per_problem mode)"))
    numbered_single: bool = field(
        default=False,
        metadata=_help("N = 1 prompts use the numbered format of N > 1 ('Problem 1:' ... 'Answer 1:'), "
                       "so every N pays the same format tokens per problem"),
    )
    temperature: float = field(default=0.6, metadata=_help("sampling temperature"))
    top_p: float = field(default=0.95, metadata=_help("nucleus sampling top-p"))
    seed: int = field(default=0, metadata=_help("sampling and bootstrap seed; same seed, same files"))
    engine: str = field(default="hf", metadata=_help("generation engine: hf or vllm"))
    engine_kwargs: dict = field(default_factory=dict, metadata=_help("extra keyword arguments for make_engine"))
    batch_size: int = field(default=8, metadata=_help("bundles (prompts) per generate call"))
    output_dir: str = field(default="runs/eval", metadata=_help("run directory"))
    baseline: str | None = field(default=None, metadata=_help("model the free-lunch comparison is against (default: first)"))
    ci_method: str = field(default="bootstrap", metadata=_help("accuracy CI: bootstrap (over problems) or normal"))
    confidence: float = field(default=0.95, metadata=_help("confidence level of the intervals"))
    n_bootstrap: int = field(default=1000, metadata=_help("bootstrap draws"))
    resume: bool = field(default=True, metadata=_help("continue from results.jsonl in output_dir; false starts afresh"))
    plots: bool = field(default=True, metadata=_help("write PNG plots"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    verify_timeout: float = field(default=2.0, metadata=_help("seconds allowed to check one answer"))
    distributed_timeout: float = field(
        default=1800.0, metadata=_help("torchrun: seconds a rank waits for the others before the job fails")
    )

    def __post_init__(self):
        if self.models is None:
            self.models = {}
        if not isinstance(self.n_values, (list, tuple)):
            self.n_values = [self.n_values]
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        if not self.n_values or any(n < 1 for n in self.n_values) or len(set(self.n_values)) != len(self.n_values):
            raise ConfigError(f"n_values must be distinct positive integers, got {self.n_values!r}")
        if self.budget_mode not in ("per_prompt", "per_problem"):
            raise ConfigError(f"budget_mode must be 'per_prompt' or 'per_problem', got {self.budget_mode!r}")
        if self.model_dtype not in DTYPES:
            raise ConfigError(f"model_dtype must be one of {list(DTYPES)}, got {self.model_dtype!r}")
        if self.ci_method not in ("bootstrap", "normal"):
            raise ConfigError(f"ci_method must be 'bootstrap' or 'normal', got {self.ci_method!r}")
        for name in ("samples_per_bundle", "batch_size", "max_completion_length", "per_problem_budget", "n_bootstrap"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (sampling needs a positive temperature), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        for name in ("verify_timeout", "distributed_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")

    def max_new_tokens(self, n_actual: int) -> int:
        """The completion budget of a prompt holding ``n_actual`` problems."""
        if self.budget_mode == "per_problem":
            return self.per_problem_budget * n_actual
        return self.max_completion_length


# ----------------------------------------------------------------------------- results.jsonl I/O


def record_key(record: Mapping) -> tuple[str, int, int, int]:
    """Records are keyed by (model, N, bundle index, sample index); shards merge on this key."""
    return (record["model"], int(record["n_problems"]), int(record["bundle_index"]), int(record["sample_index"]))


def read_results(path: str | Path, *, repair: bool = False, key: Callable[[Mapping], Any] = record_key) -> list[dict]:
    """Records of a ``results.jsonl``; a torn last line (no newline, or not valid JSON) is dropped.

    With ``repair=True`` the file is truncated to its last complete line so that appends continue
    cleanly. A corrupt line *before* the last one raises ``ValueError`` (that is not a crash
    artefact, and silently skipping it would hide lost results). Duplicate keys (``key``: the
    sweep's record key; ``bcr solve`` keys its answers by problem id) keep the first.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: dict[tuple, dict] = {}
    good_end = 0
    pos = 0
    line_no = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line_no += 1
        if nl == -1:  # torn tail: the writer died mid-line
            break
        line = data[pos:nl]
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                if data[nl + 1 :].strip():
                    raise ValueError(f"{path}:{line_no} is not valid JSON ({err}); the results file is corrupt") from err
                break  # a garbled last line is a torn write too
            records.setdefault(key(rec), rec)
        pos = nl + 1
        good_end = pos
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return list(records.values())


def shard_path(out: str | Path, rank: int) -> Path:
    """The results file rank ``rank`` appends to during a multi-process sweep."""
    return Path(out) / f"results.rank{rank}.jsonl"


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("results.rank*.jsonl"))


def merge_shards(out: str | Path, *, models: Sequence[str], n_values: Sequence[int]) -> list[dict]:
    """Fold every ``results.rank*.jsonl`` of ``out`` into ``results.jsonl`` (sorted, atomic) and delete
    the shards; returns all records. A no-op rewrite-free read when there are no shards."""
    out = Path(out)
    results = out / RESULTS_FILE
    shards = _shard_files(out)
    records = read_results(results, repair=True)
    if not shards:
        return records
    seen = {record_key(r) for r in records}
    for shard in shards:
        for r in read_results(shard):
            if record_key(r) not in seen:
                seen.add(record_key(r))
                records.append(r)
    write_results_sorted(results, records, models=models, n_values=n_values)
    for shard in shards:
        shard.unlink()
    return records


def append_records(path: str | Path, records: Iterable[Mapping]) -> None:
    """Append records as JSON lines, then flush and fsync: what returns is on disk."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_results_sorted(path: str | Path, records: Sequence[Mapping], *, models: Sequence[str], n_values: Sequence[int]) -> None:
    """Rewrite ``results.jsonl`` atomically in canonical order: model order, N order, bundle, sample."""
    model_rank = {m: i for i, m in enumerate(models)}
    n_rank = {n: i for i, n in enumerate(n_values)}

    def order(r):
        model, n, b, s = record_key(r)
        return (model_rank.get(model, len(model_rank)), model, n_rank.get(n, len(n_rank)), n, b, s)

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(records, key=order)))


# ----------------------------------------------------------------------------- the sweep plan


@dataclass(frozen=True)
class BatchSpec:
    """One generate call: ``bundle_indices`` of the bundles of N for ``model``.

    ``batch_index`` counts batches within (model, N); batches are a fixed partition of the bundle
    indices (consecutive runs of ``batch_size``), so a batch means the same thing in every run.
    """

    model: str
    n_problems: int
    batch_index: int
    bundle_indices: tuple[int, ...]


def plan_batches(models: Sequence[str], n_values: Sequence[int], num_bundles: Mapping[int, int], batch_size: int) -> list[BatchSpec]:
    """Every batch of the sweep, in order (model, N, batch). Issue 9's eval sharding assigns these
    to ranks (e.g. ``plan[rank::world]``) and merges the records by key."""
    plan = []
    for model in models:
        for n in n_values:
            total = num_bundles[n]
            for bi, start in enumerate(range(0, total, batch_size)):
                plan.append(BatchSpec(model, n, bi, tuple(range(start, min(start + batch_size, total)))))
    return plan


def bundle_seed(seed: int, n_problems: int, bundle_index: int) -> int:
    """Sampling seed of one bundle (its k samples derive from it inside the engine).

    It depends on nothing but (seed, N, bundle index): not on the model (common random numbers
    across models, which tightens the paired comparisons), nor on which bundles share a generate
    call or ran before (so batching, resume and sharding do not change a sample).
    """
    return stable_seed(seed, "eval", n_problems, bundle_index) & 0x7FFFFFFF


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- models and engines


def _is_engine(obj) -> bool:
    """A RolloutEngine (generate + sync_weights); HF models have .generate but no .sync_weights."""
    return hasattr(obj, "generate") and hasattr(obj, "sync_weights")


def _normalize_models(models) -> dict[str, Any]:
    if isinstance(models, Mapping):
        if not models:
            raise ConfigError("no model to evaluate: pass model=/path or models={name: /path}")
        return {str(k): v for k, v in models.items()}
    if isinstance(models, (str, os.PathLike)):
        name = served_name(models) if is_served(models) else (Path(str(models)).name or "model")
        return {name: str(models)}
    return {"model": models}


def _tokenizer_for(name: str, model, tokenizer):
    if isinstance(tokenizer, Mapping):
        tokenizer = tokenizer.get(name)
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if tokenizer is not None:
        return tokenizer
    if is_served(model):
        return served_tokenizer(model)  # of the model the server reports (several models: pass tokenizer=)
    if isinstance(model, (str, os.PathLike)):
        return load_tokenizer(model)
    if _is_engine(model):
        return getattr(model, "tokenizer", None)
    raise ConfigError(f"model {name!r} is an in-memory model: pass its tokenizer (tokenizer=...)")


def _open_engine(name: str, model, tokenizer, cfg: EvalConfig):
    """A RolloutEngine for ``model`` (an engine, an HF model, or a path)."""
    if _is_engine(model):
        return model
    if is_served(model):  # model=http://host:port/v1: an OpenAI-compatible server
        return ServedEngine(model, tokenizer, **dict(cfg.engine_kwargs))
    if isinstance(model, (str, os.PathLike)) and cfg.engine == "hf":
        model, _ = load_model(model, dtype=cfg.model_dtype, with_tokenizer=False)
    elif isinstance(model, os.PathLike):
        model = str(model)
    return make_engine(cfg.engine, model, tokenizer, **dict(cfg.engine_kwargs))


def _check_paths(models: Mapping[str, Any], tokenizer, cfg: EvalConfig) -> None:
    """Every path the sweep needs, checked before anything is loaded or written."""

    check_output_dir(cfg.output_dir)
    for model in models.values():
        if is_served(model):
            check_server(model)  # a server that does not answer fails here, before anything is written
        elif isinstance(model, (str, os.PathLike)) and cfg.engine == "hf":  # vLLM resolves its own names
            resolve_model_source(model)  # a directory, a .gguf file or a Hub id; a clear error otherwise
    paths = tokenizer.values() if isinstance(tokenizer, Mapping) else [tokenizer]
    for tok in paths:
        if isinstance(tok, (str, os.PathLike)) and not Path(str(tok)).exists():
            raise ConfigError(f"tokenizer path {str(tok)!r} does not exist; pass a local tokenizer directory")


def _release_memory() -> None:
    """Free the last model before the next one loads (matters on a GPU)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _model_identity(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        path = Path(str(model))
        return str(path.resolve()) if path.exists() else str(model)  # a Hub id stays an id
    return f"<{type(model).__name__}>"


# ----------------------------------------------------------------------------- resume bookkeeping


def _fingerprint(cfg: EvalConfig, problems, models: Mapping[str, Any]) -> dict:
    """What gives existing records their meaning; a restart must match it to reuse them."""
    ids = "\n".join(f"{p.id}\t{p.answer}" for p in problems)
    fingerprint = {
        "problems_sha256": hashlib.sha256(ids.encode("utf-8")).hexdigest(),
        "num_problems": len(problems),
        "samples_per_bundle": cfg.samples_per_bundle,
        "budget_mode": cfg.budget_mode,
        "max_completion_length": cfg.max_completion_length if cfg.budget_mode == "per_prompt" else None,
        "per_problem_budget": cfg.per_problem_budget if cfg.budget_mode == "per_problem" else None,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "engine": cfg.engine,
        "models": {name: _model_identity(m) for name, m in models.items()},
    }
    if cfg.numbered_single:  # only when set, so run directories written before the option still resume
        fingerprint["numbered_single"] = True
    if cfg.model_dtype != "auto":  # likewise
        fingerprint["model_dtype"] = cfg.model_dtype
    return fingerprint


def _check_resume(out: Path, fingerprint: dict, cfg: EvalConfig) -> None:
    """Refuse to mix records made under different settings; record the settings for next time."""
    path = out / CONFIG_FILE
    if cfg.resume and path.exists():
        old = json.loads(path.read_text())
        diffs = [k for k in {**old, **fingerprint} if k != "models" and old.get(k) != fingerprint.get(k)]
        old_models = old.get("models", {})
        diffs += [
            f"models.{name}"
            for name, ident in fingerprint["models"].items()
            if name in old_models and old_models[name] != ident and not ident.startswith("<")
        ]
        if diffs:
            raise ConfigError(
                f"{out} holds results made with different settings ({', '.join(diffs)}); "
                "use a new output_dir, or resume=false to discard them"
            )
        fingerprint = {**fingerprint, "models": {**old_models, **fingerprint["models"]}}
    atomic_write_text(path, json.dumps(fingerprint, indent=2) + "\n")


# ----------------------------------------------------------------------------- the sweep


def run_batch(engine, tokenizer, spec: BatchSpec, bundles, cfg: EvalConfig, done: set = frozenset(),
              template=None) -> list[dict]:
    """Generate, parse and verify one batch; returns the records whose keys are not in ``done``.

    ``template``: the prompt template (default: the standard one with ``cfg.numbered_single``); the
    trainer passes its own so that its periodic evaluation renders prompts as its training does."""

    k = cfg.samples_per_bundle
    chosen = [bundles[b] for b in spec.bundle_indices]
    template = template or PromptTemplate(numbered_single=cfg.numbered_single)
    prompts = [render_prompt(bundle, tokenizer, template) for bundle in chosen]
    budgets = [cfg.max_new_tokens(len(bundle)) for bundle in chosen]
    started = time.perf_counter()
    generations = engine.generate(
        prompts,
        num_generations=k,
        max_new_tokens=budgets,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=[bundle_seed(cfg.seed, spec.n_problems, b) for b in spec.bundle_indices],
    )
    elapsed = time.perf_counter() - started
    if len(generations) != len(prompts) or any(len(g) != k for g in generations):
        raise RuntimeError(f"engine returned {[len(g) for g in generations]} generations for {len(prompts)} prompts x {k}")

    records = []
    for bundle_index, bundle, prompt, budget, samples in zip(spec.bundle_indices, chosen, prompts, budgets, generations):
        for sample_index, gen in enumerate(samples):
            key = (spec.model, spec.n_problems, bundle_index, sample_index)
            if key in done:
                continue
            parsed = parse_completion(gen.text, len(bundle), truncated=gen.truncated)
            refs = [p.answer for p in bundle]
            strict = score_completion(parsed, refs, timeout=cfg.verify_timeout)
            flexible = score_completion(parsed, refs, text=gen.text, truncated=gen.truncated,
                                        extraction="flexible", timeout=cfg.verify_timeout)
            answers = list(strict.answers)
            records.append(
                {
                    "model": spec.model,
                    "n_problems": spec.n_problems,
                    "bundle_index": bundle_index,
                    "sample_index": sample_index,
                    "n_actual": len(bundle),
                    "problem_ids": [p.id for p in bundle],
                    "references": [p.answer for p in bundle],
                    "seed": bundle_seed(cfg.seed, spec.n_problems, bundle_index),
                    "prompt_sha256": prompt_hash(prompt),
                    "prompt_tokens": len(gen.prompt_ids),
                    "max_new_tokens": budget,
                    "completion": gen.text,
                    "completion_tokens": len(gen.completion_ids),
                    "truncated": bool(gen.truncated),
                    "parsed_answers": answers,
                    "answered": [a is not None for a in answers],
                    "correct": strict.correct,
                    "flexible_answers": flexible.answers,
                    "flexible_correct": flexible.correct,
                    TIMING_KEY: {"batch_index": spec.batch_index, "generate_s": round(elapsed, 6)},
                }
            )
    return records


def evaluate_scaling(
    models=None,
    problems=None,
    *,
    config: EvalConfig | None = None,
    tokenizer=None,
    on_batch: Callable[[dict], None] | None = None,
    **options,
) -> dict:
    """Run (or resume) a task-scaling sweep and write the run directory; returns the summary.

    Args:
        models: ``{name: model}`` or one model; a model is an HF model directory, a ``.gguf`` file or
            a Hub id (see :func:`bcr.models.loading.load_model`), an in-memory HF model (then pass
            ``tokenizer``), or a ready :class:`bcr.models.rollout.RolloutEngine`.
            Default: ``config.models`` / ``config.model``.
        problems: a list of :class:`bcr.data.problems.Problem`, a benchmark name or a data file
            (see :func:`bcr.data.problems.load_problems`). Default: ``config.benchmark``.
        config: an :class:`EvalConfig`; ``**options`` override its fields
            (``n_values``, ``samples_per_bundle``, ``budget_mode``, ``temperature``, ``top_p``,
            ``seed``, ``engine``, ``batch_size``, ``output_dir``, ``baseline`` ...).
        tokenizer: a tokenizer (shared), a path, or ``{name: tokenizer}``; default: each model's own.
        on_batch: called after each batch is durably written with
            ``{"model", "n_problems", "batch_index", "records"}``; an exception from it stops the
            sweep, leaving a resumable run directory.

    Returns:
        the summary dict also written to ``summary.json`` (see :func:`bcr.eval.scaling.summarize_records`).
    """
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"evaluate_scaling got unknown options {unknown}; see EvalConfig for the valid ones")
    cfg = dataclasses.replace(config or EvalConfig(), **options)
    if models is None:
        if cfg.models and cfg.model:
            raise ConfigError("give either model=/path or models={name: /path}, not both")
        if cfg.gguf_file and not cfg.model:
            raise ConfigError("gguf_file goes with model=<directory>; with models= give each .gguf file's path")
        model = str(Path(cfg.model) / cfg.gguf_file) if cfg.model and cfg.gguf_file else cfg.model
        models = dict(cfg.models) or (model and _normalize_models(model))
        if not models:
            raise ConfigError("no model to evaluate: pass model=/path or models={name: /path}")
    if tokenizer is None and cfg.tokenizer:
        tokenizer = cfg.tokenizer
    models = _normalize_models(models)
    if cfg.baseline is not None and cfg.baseline not in models:
        raise ConfigError(f"baseline {cfg.baseline!r} is not one of the models {list(models)}")
    _check_paths(models, tokenizer, cfg)  # a model that cannot load fails here, before anything is written
    warm_up()  # math-verify imports while the models load
    problems = _load(problems if problems is not None else cfg.benchmark, cfg)


    bundles = {n: bundle_sequential(problems, n) for n in cfg.n_values}
    plan = plan_batches(list(models), cfg.n_values, {n: len(b) for n, b in bundles.items()}, cfg.batch_size)


    rank, world = dist_info()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    with fail_together("evaluation setup"):
        if rank == 0:
            if not cfg.resume:
                for stale in [results_path, *_shard_files(out)]:
                    stale.unlink(missing_ok=True)
            _check_resume(out, _fingerprint(cfg, problems, models), cfg)
            merge_shards(out, models=list(models), n_values=cfg.n_values)  # shards of an interrupted run
        barrier()
    # every rank reads the same merged file, so every rank computes the same pending list
    existing = read_results(results_path, repair=world == 1)
    done = {record_key(r) for r in existing}
    barrier()
    with fail_together("evaluation"):
        _sweep(models, cfg, tokenizer, on_batch, plan, bundles, existing, done, rank, world)
        barrier()
        summary = None
        if rank == 0:
            existing = merge_shards(out, models=list(models), n_values=cfg.n_values)
            summary = _finish(out, existing, models, problems, cfg)
    return broadcast_object(summary)


def _sweep(models, cfg: EvalConfig, tokenizer, on_batch, plan, bundles, existing, done, rank, world):
    """This rank's share of the pending batches, appended to its results file."""

    out = Path(cfg.output_dir)
    target = out / RESULTS_FILE if world == 1 else shard_path(out, rank)

    def keys_of(spec: BatchSpec):
        return [(spec.model, spec.n_problems, b, s) for b in spec.bundle_indices for s in range(cfg.samples_per_bundle)]

    pending = [spec for spec in plan if any(key not in done for key in keys_of(spec))]
    total_bundles = sum(len(spec.bundle_indices) for spec in plan)
    completed = total_bundles - sum(len(s.bundle_indices) for s in pending)
    pending = pending[rank::world]
    if world > 1:  # rank 0's bar shows its own share
        total_bundles, completed = sum(len(s.bundle_indices) for s in pending), 0
    with progress_bar(cfg.progress and rank == 0, "bundles") as bar:
        task = bar.add_task("eval", total=total_bundles, completed=completed)
        for name, model in models.items():
            mine = [spec for spec in pending if spec.model == name]
            if not mine:
                continue
            tok = _tokenizer_for(name, model, tokenizer)
            engine = _open_engine(name, model, tok, cfg)
            try:
                for spec in mine:
                    bar.update(task, description=f"{name} N={spec.n_problems}")
                    records = run_batch(engine, tok, spec, bundles[spec.n_problems], cfg, done)
                    maybe_inject_failure(f"evaluation batch {spec.model} N={spec.n_problems} #{spec.batch_index}")
                    append_records(target, records)
                    done.update(record_key(r) for r in records)
                    existing.extend(records)
                    bar.advance(task, len(spec.bundle_indices))
                    if on_batch is not None:
                        on_batch({"model": name, "n_problems": spec.n_problems, "batch_index": spec.batch_index,
                                  "records": len(records)})
            finally:
                if engine is not model and hasattr(engine, "close"):  # an engine we opened (vLLM: one at a time)
                    engine.close()
                del engine
                _release_memory()


def _finish(out: Path, existing: list[dict], models, problems, cfg: EvalConfig) -> dict:
    """Rewrite results.jsonl in key order, summarise, write the summaries, report and plots."""
    write_results_sorted(out / RESULTS_FILE, existing, models=list(models), n_values=cfg.n_values)
    wanted = [r for r in existing if r["model"] in models and r["n_problems"] in cfg.n_values]
    summary = summarize_records(
        wanted,
        models=list(models),
        baseline=cfg.baseline,
        ci_method=cfg.ci_method,
        confidence=cfg.confidence,
        n_bootstrap=cfg.n_bootstrap,
        seed=cfg.seed,
    )
    summary = {"config": _summary_config(cfg, problems, models), **summary}
    write_run_outputs(out, summary, plots=cfg.plots)
    return summary


def _summary_config(cfg: EvalConfig, problems, models) -> dict:
    """The settings shown in summary.json: everything that decides the numbers, nothing machine-local."""
    skip = {"output_dir", "progress", "plots", "resume", "model", "models", "tokenizer", "data_dir", "engine_kwargs",
            "batch_size", "distributed_timeout", "gguf_file"}
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    conf["benchmark"] = cfg.benchmark if isinstance(cfg.benchmark, str) else str(cfg.benchmark)
    conf["num_problems"] = len(problems)
    conf["models"] = list(models)
    # batch_size changes speed, not results: it belongs with the throughput numbers
    conf[TIMING_KEY] = {"batch_size": cfg.batch_size}
    return conf


def _load(source, cfg: EvalConfig) -> list:
    if isinstance(source, (str, os.PathLike)):

        problems = load_problems(source, split=cfg.split, limit=cfg.limit, data_dir=cfg.data_dir)
        if isinstance(source, os.PathLike):
            cfg.benchmark = str(source)
        else:
            cfg.benchmark = source
    else:
        problems = list(source)[: cfg.limit] if cfg.limit else list(source)
        cfg.benchmark = "custom"
    if not problems:
        raise ConfigError(f"no problems to evaluate in {source!r}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"problem ids must be unique (results are keyed by them); {dup!r} repeats")
    return problems


# ----------------------------------------------------------------------------- CLI


def cli_main(argv: Sequence[str]) -> int:
    """``bcr eval [--config FILE.yaml] [key=value ...]``; ``--help`` lists the options."""

    cfg = parse_cli(EvalConfig, argv, prog="bcr eval")
    if cfg is None:
        return 0
    init_distributed(cfg.distributed_timeout)  # a no-op unless launched by torchrun with several processes
    try:
        summary = evaluate_scaling(config=cfg)
    except RankFailedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        rank = dist_info()[0]
        teardown_distributed()
    if rank == 0:
        _print_summary(summary, cfg.output_dir)
    return 0


def _print_summary(summary: Mapping, output_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="task-scaling sweep")
    for col in ("model", "N", "accuracy % (strict)", "95% CI", "flexible %", "tokens/problem", "truncated %",
                "problems/s"):
        table.add_column(col)
    for r in summary["rows"]:
        pps = (r.get(TIMING_KEY) or {}).get("problems_per_s")
        flexible = r.get("flexible_accuracy")
        table.add_row(
            str(r["model"]), str(r["n_problems"]), f"{100 * r['accuracy']:.1f}",
            f"[{100 * r['accuracy_ci_low']:.1f}, {100 * r['accuracy_ci_high']:.1f}]",
            f"{100 * flexible:.1f}" if flexible is not None else "-",
            f"{r['tokens_per_problem']:.1f}", f"{100 * r['truncation_rate']:.1f}",
            f"{pps:.2f}" if pps else "-",
        )
    console = Console()
    console.print(table)
    for model, fit in summary["fits"].items():
        p = fit.get("tokens_power_law")
        if p:
            console.print(f"{model}: tokens/problem = {power_law_label(p, a_digits=1, b_digits=3)} (R^2 = {p['r2']:.3f})")
    console.print(f"results in {output_dir}/ (report.md, summary.json, summary.csv, plots)")
