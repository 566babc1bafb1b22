r"""The embedded CPU demo (``make demo`` / ``bcr demo``): BCR end to end on a tiny model, nothing downloaded.

The pipeline, each stage seeded and checkpointed under ``output_dir/<stage>/``:

``sft``     A "verbose reasoner". Synthetic multi-step arithmetic (:mod:`bcr.synthetic`) whose worked
            solutions carry 0-3 redundant ``Check: ... Correct.`` lines at random, like the
            metacognitive loops BCR removes. A byte-level BPE tokenizer is trained on the task's text
            and a tiny random-init Llama-architecture model is fine-tuned on single- and multi-problem bundles
            (``sft_n_values``, default N in 1..6, so every N of the sweep is one the model has seen):
            prompt = :func:`bcr.prompts.render_prompt`,
            target = :func:`bcr.prompts.bundle_solution`, loss on the completion tokens only. A plain
            AdamW loop you can read top to bottom.
``bcr``     BCR RL with :class:`bcr.trainer.BCRTrainer` from the SFT model: N in ``rl_n_values``
            (default {2, 3, 4}) problems per prompt, one shared completion budget
            ``max_completion_length`` in which the verbose solutions of 3-4 problems do not fit but
            concise ones do, per-instance accuracy reward, no length term anywhere. The advantage is
            the sequence's (the mean of its instance rewards, ``advantage_mode=sequence``): a verbose
            early section that leaves a later one without budget then pays for it, which per-instance
            advantages never make it do.
``length``  the explicit length-penalty baseline (on by default, ``length_baseline=false`` skips it):
            RL at N = 1 with the same number of steps, rewarded by accuracy plus the Kimi-1.5 length
            reward of :func:`bcr.rewards.length_penalty_rewards`.
``eval``    the task-scaling sweep N = 1..6 of every model (:func:`bcr.evaluation.evaluate_scaling`):
            ``output_dir/eval/`` gets results.jsonl, summary.json/csv, report.md and PNG plots; the
            demo prints a summary (tokens per problem per N, accuracy, the N = 1 "free lunch") and
            writes it to ``output_dir/demo_summary.json``.

Every stage uses the numbered prompt format at N = 1 too (``numbered_single``: ``Problem 1:``,
``### Problem 1``, ``Answer 1:``), so the sweep compares the same format at every N; with the plain
N = 1 prompt every N >= 2 pays ~5.5 format tokens per problem more than N = 1.

The default task is deliberately small so that a 0.55M-parameter model learns it on a CPU: two
operations on one-digit numbers (``+``/``-``), so every operand is found next to a unique anchor of
the problem text. The model is a Llama-architecture one (``arch=qwen2`` works too: tokenizers are
loaded with ``bcr.tokenizer_loading.load_tokenizer``, and the SFT stage checks the round trip).

``from_stage=bcr`` (or ``--from-stage bcr``) reuses the checkpoints of the stages before it and
re-runs that stage and the ones after; ``stop_after=sft`` stops early. Every stage writes
``<stage>/stage.json`` (its wall time and key numbers) when it finishes; a stage is reused only when
that file exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bcr.io import atomic_write_json

STAGES = ("sft", "bcr", "length", "eval")
STAGE_FILE = "stage.json"


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class DemoConfig:
    """Every knob of the demo; ``bcr demo key=value`` overrides any of them."""

    output_dir: str = _help("run directory; each stage writes <output_dir>/<stage>/", default="runs/demo")
    seed: int = _help("seeds the problems, the tokenizer corpus, model init, SFT order and every rollout", default=0)
    from_stage: str = _help("first stage to run (sft, bcr, length, eval); earlier stages are reused", default="sft")
    stop_after: str = _help("last stage to run (sft, bcr, length, eval)", default="eval")
    length_baseline: bool = _help("also train the explicit length-penalty RL baseline at N = 1 (stage 'length'); "
                                  "length_baseline=false skips it", default=True)
    progress: bool = _help("show rich progress bars", default=True)
    threads: int | None = _help("torch CPU threads (None: torch's default)", default=None)

    # --- the task ------------------------------------------------------------------------------
    num_train_problems: int = _help("synthetic training problems", default=6000)
    num_eval_problems: int = _help("held-out problems of the N = 1..6 sweep (none also in the training set)",
                                   default=120)
    problem_steps: list[int] = field(default_factory=lambda: [2, 2], metadata={"help": "inclusive range of operations per problem"})
    problem_digits: list[int] = field(default_factory=lambda: [1, 1], metadata={"help": "inclusive range of digits of the operands"})
    operators: str = _help("operators of the problems (any of '+-*/')", default="+-")
    verify_loops: list[int] = field(default_factory=lambda: [0, 3], metadata={"help": "inclusive range of redundant 'Check: ... Correct.' lines per worked solution"})
    vocab_size: int = _help("BPE vocabulary size of the task tokenizer", default=1024)
    numbered_single: bool = _help(
        "N = 1 prompts and solutions use the numbered format of N > 1 ('Problem 1:', '### Problem 1', "
        "'Answer 1:') in every stage, so the format costs the same tokens per problem at every N",
        default=True)

    # --- the model -----------------------------------------------------------------------------
    arch: str = _help("llama or qwen2", default="llama")
    hidden_size: int = _help("model width", default=128)
    num_layers: int = _help("transformer blocks", default=2)
    num_heads: int = _help("attention heads", default=4)
    num_kv_heads: int = _help("key/value heads", default=2)

    # --- stage 1: SFT ---------------------------------------------------------------------------
    sft_n_values: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6], metadata={"help": "N of the SFT bundles (equal weights)"})
    sft_steps: int = _help("SFT optimizer steps", default=3000)
    sft_batch_size: int = _help("SFT sequences per step", default=8)
    sft_learning_rate: float = _help("SFT AdamW peak learning rate (linear warm-up, cosine decay)", default=4e-3)
    sft_weight_decay: float = _help("SFT AdamW weight decay", default=0.01)

    # --- stage 2: BCR RL ----------------------------------------------------------------------
    rl_n_values: list[int] = field(default_factory=lambda: [2, 3, 4], metadata={"help": "N of the BCR training bundles (equal weights)"})
    rl_steps: int = _help("RL steps of the BCR stage (and of the length baseline)", default=150)
    max_completion_length: int = _help("the shared completion budget of one N-problem completion (tokens)",
                                       default=140)
    num_generations: int = _help("G: completions per prompt", default=4)
    bundles_per_step: int = _help("prompts per RL step", default=8)
    rl_learning_rate: float = _help("RL AdamW learning rate", default=1e-4)
    rl_temperature: float = _help("rollout temperature", default=1.0)
    rl_loss_type: str = _help("dapo, grpo, dr_grpo or bnpo", default="dapo")
    rl_beta: float = _help("KL coefficient towards the SFT model in both RL stages (0: no reference model)",
                           default=0.0)
    advantage_mode: str = _help("sequence or instance (see BCRConfig); with instance advantages a verbose early "
                                "section keeps its own reward when it starves a later one of budget",
                                default="sequence")

    # --- stage 3: length-penalty baseline -------------------------------------------------------
    length_max_completion_length: int = _help("completion budget of the N = 1 length-penalty run", default=80)
    length_penalty_weight: float = _help("weight of the Kimi-1.5 length reward added to accuracy", default=1.0)

    # --- stage 4: evaluation -------------------------------------------------------------------
    eval_n_values: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6], metadata={"help": "the Ns of the task-scaling sweep"})
    eval_max_completion_length: int | None = _help(
        "shared completion budget per prompt in the sweep (None: max_completion_length, the training budget)",
        default=None)
    eval_samples_per_bundle: int = _help("samples per bundle in the sweep", default=1)
    eval_temperature: float = _help("sampling temperature of the sweep", default=1.0)
    eval_top_p: float = _help("top-p of the sweep", default=1.0)
    eval_batch_size: int = _help("prompts per generate call in the sweep", default=32)

    def __post_init__(self):
        from .dataclass_cli import ConfigError

        for name in ("from_stage", "stop_after"):
            if getattr(self, name) not in STAGES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be one of {list(STAGES)}")
        if STAGES.index(self.stop_after) < STAGES.index(self.from_stage):
            raise ConfigError(f"stop_after={self.stop_after!r} comes before from_stage={self.from_stage!r}")
        for name in ("problem_steps", "problem_digits", "verify_loops"):
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ConfigError(f"{name}={value!r}: give an inclusive range [low, high]")
            setattr(self, name, [int(v) for v in value])
        for name in ("sft_n_values", "rl_n_values", "eval_n_values"):
            value = getattr(self, name)
            value = [value] if isinstance(value, int) else list(value)
            if not value or any(int(n) < 1 for n in value):
                raise ConfigError(f"{name}={value!r}: give a list of N >= 1")
            setattr(self, name, [int(n) for n in value])
        for name in ("num_train_problems", "num_eval_problems", "sft_steps", "sft_batch_size", "rl_steps",
                     "max_completion_length", "bundles_per_step", "eval_samples_per_bundle", "eval_batch_size",
                     "hidden_size", "num_layers", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.num_eval_problems < max(self.eval_n_values):
            raise ConfigError(f"num_eval_problems={self.num_eval_problems} is smaller than the largest N of "
                              f"eval_n_values={self.eval_n_values}")

    @property
    def eval_budget(self) -> int:
        return self.eval_max_completion_length or self.max_completion_length

    @property
    def template(self):
        """The prompt template of every stage (SFT data, RL prompts, the sweep)."""
        from .prompts import PromptTemplate

        return PromptTemplate(numbered_single=self.numbered_single)

    def stages(self) -> list[str]:
        """The stages this run executes, in order."""
        chosen = STAGES[STAGES.index(self.from_stage): STAGES.index(self.stop_after) + 1]
        return [s for s in chosen if s != "length" or self.length_baseline]


# ----------------------------------------------------------------------------------------------
# Small helpers: console, stage bookkeeping
# ----------------------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    return Console()


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, default=str)


def stage_dir(cfg: DemoConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / stage


def read_stage(cfg: DemoConfig, stage: str) -> dict:
    """The ``stage.json`` of a finished stage; a clear error when the stage never finished."""
    path = stage_dir(cfg, stage) / STAGE_FILE
    if not path.is_file():
        from .dataclass_cli import ConfigError

        raise ConfigError(f"stage {stage!r} has no finished checkpoint in {path.parent} (no {STAGE_FILE}); "
                          f"run it first: from_stage={stage} (or an earlier stage)")
    return json.loads(path.read_text())


def _finish_stage(cfg: DemoConfig, stage: str, seconds: float, info: dict) -> dict:
    record = {"stage": stage, "seconds": round(seconds, 2), **info}
    _write_json(stage_dir(cfg, stage) / STAGE_FILE, record)
    return record


def _fresh_dir(path: Path) -> Path:
    """An empty ``path`` (a re-run stage never mixes its files with an earlier run's)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def _held_out(text: str, seed: int) -> bool:
    """A fixed tenth of all problem texts is reserved for evaluation (the problem space is small)."""
    digest = hashlib.sha256(f"demo-held-out:{seed}:{text}".encode()).digest()
    return digest[0] % 10 == 0


def make_task(cfg: DemoConfig):
    """``(train_problems, eval_problems)``. Every distinct problem text is either a training or a
    held-out text (a fixed hash split), so no evaluation problem is ever trained on; the training
    problems carry verbose worked solutions; the evaluation problems are distinct texts."""
    from .synthetic import make_arithmetic_problems

    kw = {"steps": tuple(cfg.problem_steps), "digits": tuple(cfg.problem_digits), "operators": cfg.operators}
    train, size = [], cfg.num_train_problems
    while len(train) < cfg.num_train_problems and size < 50 * cfg.num_train_problems:
        size *= 2
        pool = make_arithmetic_problems(size, seed=cfg.seed, verify_loops=tuple(cfg.verify_loops), **kw)
        train = [p for p in pool if not _held_out(p.problem, cfg.seed)][: cfg.num_train_problems]
    evals, seen = [], set()
    for p in make_arithmetic_problems(cfg.num_eval_problems * 200, seed=cfg.seed + 10_007, **kw):
        if _held_out(p.problem, cfg.seed) and p.problem not in seen:
            seen.add(p.problem)
            evals.append(p)
            if len(evals) == cfg.num_eval_problems:
                break
    if len(train) < cfg.num_train_problems or len(evals) < cfg.num_eval_problems:
        raise RuntimeError(f"could not draw {cfg.num_train_problems} training and {cfg.num_eval_problems} distinct "
                           "held-out problems; lower num_eval_problems or widen problem_steps/problem_digits")
    return train, evals


def tokenizer_corpus(problems, cfg: DemoConfig, limit: int = 1500) -> list[str]:
    """Prompts and target completions of bundles of every N the demo uses (the tokenizer's training text)."""
    from .prompts import bundle_solution, format_prompt

    rng = random.Random(f"demo-tokenizer:{cfg.seed}")
    ns = sorted(set(cfg.sft_n_values) | set(cfg.rl_n_values) | set(cfg.eval_n_values))
    texts = []
    subset = list(problems[:limit])
    for i in range(len(subset)):
        n = rng.choice(ns)
        bundle = [subset[(i + j) % len(subset)] for j in range(n)]
        texts.append(format_prompt(bundle, cfg.template))
        texts.append(bundle_solution(bundle, cfg.template))
        texts.append("user\nassistant\n")  # the chat template's role names
    return texts


def bundle_solution_sample(problems, template=None) -> str:
    from .prompts import bundle_solution, render_prompt

    return render_prompt(problems[:2], None, template) + "\n" + bundle_solution(problems[:2], template)


def check_tokenizer_roundtrip(tokenizer, model_dir: Path, text: str) -> None:
    """The trainer and the evaluator load the tokenizer with ``bcr.tokenizer_loading.load_tokenizer``;
    make sure that gives the very tokenization the model was trained with."""
    from .tokenizer_loading import load_tokenizer

    loaded = load_tokenizer(model_dir)
    a = tokenizer(text, add_special_tokens=False)["input_ids"]
    b = loaded(text, add_special_tokens=False)["input_ids"]
    if a != b:
        raise RuntimeError(f"the tokenizer saved in {str(model_dir)!r} loads as a {type(loaded).__name__} that "
                           "tokenizes differently from the tokenizer the model was trained with")


def sft_example(bundle, tokenizer, template=None) -> tuple[list[int], int]:
    """Token ids of prompt + target completion + EOS, and the number of prompt tokens."""
    from .prompts import bundle_solution, render_prompt

    prompt = tokenizer(render_prompt(bundle, tokenizer, template), add_special_tokens=False)["input_ids"]
    target = (tokenizer(bundle_solution(bundle, template), add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id])
    return prompt + target, len(prompt)


# ----------------------------------------------------------------------------------------------
# Stage 1: SFT warm-up (the verbose reasoner)
# ----------------------------------------------------------------------------------------------
def _sft_batches(train, tokenizer, cfg: DemoConfig):
    """An endless stream of batches ``(input_ids, attention_mask, labels)``; each batch has one N
    (similar lengths, little padding); labels are -100 on prompt and padding tokens."""
    from .bundling import Bundler

    weights = {n: 1.0 for n in cfg.sft_n_values}
    bundler = Bundler(train, weights, seed=cfg.seed)
    pad = tokenizer.pad_token_id
    epoch = 0
    while True:
        by_n: dict[int, list] = {}
        for bundle in bundler.epoch_bundles(epoch):
            by_n.setdefault(len(bundle), []).append(bundle)
        batches = []
        for bundles in by_n.values():
            for i in range(0, len(bundles) - cfg.sft_batch_size + 1, cfg.sft_batch_size):
                batches.append(bundles[i: i + cfg.sft_batch_size])
        random.Random(f"demo-sft:{cfg.seed}:{epoch}").shuffle(batches)
        for bundles in batches:
            examples = [sft_example(b, tokenizer, cfg.template) for b in bundles]
            width = max(len(ids) for ids, _ in examples)
            input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
            attention = torch.zeros((len(examples), width), dtype=torch.long)
            labels = torch.full((len(examples), width), -100, dtype=torch.long)
            for row, (ids, n_prompt) in enumerate(examples):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            yield input_ids, attention, labels
        epoch += 1


def run_sft(cfg: DemoConfig, console=None) -> dict:
    """Stage 1: build the tokenizer and the tiny model, fine-tune it on verbose worked solutions."""
    from .tiny import build_tokenizer, tiny_model

    console = console or _console()
    t0 = time.perf_counter()
    out = _fresh_dir(stage_dir(cfg, "sft"))
    train, _ = make_task(cfg)
    tokenizer = build_tokenizer(tokenizer_corpus(train, cfg), vocab_size=cfg.vocab_size)
    tokenizer.save_pretrained(Path(cfg.output_dir) / "tokenizer")
    model = tiny_model(tokenizer, arch=cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, max_position_embeddings=2048,
                       seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]stage sft[/]: tokenizer of {len(tokenizer)} tokens, {cfg.arch} model of "
                  f"{n_params / 1e6:.2f}M parameters, {len(train)} training problems")

    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_learning_rate, betas=(0.9, 0.95),
                                  weight_decay=cfg.sft_weight_decay)
    warmup = max(1, cfg.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.sft_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    batches = _sft_batches(train, tokenizer, cfg)
    log = []
    smooth = None
    from .metrics import progress_bar

    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("sft", total=cfg.sft_steps, info="")
        for step in range(cfg.sft_steps):
            input_ids, attention, labels = next(batches)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            log.append({"step": step + 1, "loss": value, "lr": scheduler.get_last_lr()[0]})
            bar.update(task, advance=1, info=f"loss {smooth:.3f}")
    model.eval()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    check_tokenizer_roundtrip(tokenizer, out / "model", bundle_solution_sample(train, cfg.template))
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    final = sum(r["loss"] for r in log[-20:]) / len(log[-20:])
    console.print(f"  sft done: final loss {final:.3f}")
    return _finish_stage(cfg, "sft", time.perf_counter() - t0,
                         {"model": str(out / "model"), "final_loss": final, "parameters": n_params})


# ----------------------------------------------------------------------------------------------
# Stages 2 and 3: RL with the real BCRTrainer
# ----------------------------------------------------------------------------------------------
def _rl_config(cfg: DemoConfig, out: Path, model: str, **kw):
    from .config import BCRConfig

    base = {"model": model, "output_dir": str(out), "seed": cfg.seed, "num_generations": cfg.num_generations,
                "temperature": cfg.rl_temperature, "learning_rate": cfg.rl_learning_rate, "max_steps": cfg.rl_steps,
                "bundles_per_step": cfg.bundles_per_step, "loss_type": cfg.rl_loss_type,
                "advantage_mode": cfg.advantage_mode, "beta": cfg.rl_beta, "save_steps": 0, "save_total_limit": 1,
                "disable_progress_bar": not cfg.progress, "logging_steps": max(1, cfg.rl_steps // 10),
                "numbered_single": cfg.numbered_single}
    base.update(kw)
    return BCRConfig(**base)


def _run_rl(cfg: DemoConfig, stage: str, console, config, reward_fn=None) -> dict:
    from .trainer import BCRTrainer

    t0 = time.perf_counter()
    train, _ = make_task(cfg)
    trainer = BCRTrainer(config.model, train, config, reward_fn=reward_fn)
    last = trainer.train()
    history = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]

    def mean(key, rows):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else float("nan")

    k = max(1, len(history) // 5)
    first, final = history[:k], history[-k:]
    info = {"model": str(config.output_dir), "steps": trainer.step}
    for key in ("accuracy", "tokens_per_problem", "completions/truncated_ratio", "reward"):
        info[f"first_{key}"] = mean(key, first)
        info[f"final_{key}"] = mean(key, final)
    console.print(f"  {stage} done: accuracy {info['first_accuracy']:.2f} -> {info['final_accuracy']:.2f}, "
                  f"tokens/problem {info['first_tokens_per_problem']:.1f} -> {info['final_tokens_per_problem']:.1f}, "
                  f"truncated {info['first_completions/truncated_ratio']:.2f} -> "
                  f"{info['final_completions/truncated_ratio']:.2f} (mean of the first / last {k} steps)")
    info["last_step_metrics"] = last
    return _finish_stage(cfg, stage, time.perf_counter() - t0, info)


def run_bcr(cfg: DemoConfig, console=None) -> dict:
    """Stage 2: BCR from the SFT model: N problems share one completion budget; the reward is
    per-instance accuracy only (no length term)."""
    console = console or _console()
    sft = read_stage(cfg, "sft")
    out = _fresh_dir(stage_dir(cfg, "bcr"))
    config = _rl_config(cfg, out, sft["model"], n_problems={n: 1.0 for n in cfg.rl_n_values},
                        max_completion_length=cfg.max_completion_length)
    console.print(f"[bold]stage bcr[/]: N in {cfg.rl_n_values}, shared budget {cfg.max_completion_length} tokens, "
                  f"G={cfg.num_generations}, {cfg.bundles_per_step} prompts x {cfg.rl_steps} steps, "
                  "reward = per-problem accuracy (no length term)")
    return _run_rl(cfg, "bcr", console, config)


def length_penalty_reward(num_generations: int, *, method: str = "kimi", weight: float = 1.0):
    """A TRL-style reward for the baseline: accuracy + ``weight`` x the Kimi-1.5 length reward of
    :func:`bcr.rewards.length_penalty_rewards`, computed within each group of G completions."""
    from .rewards import length_penalty_rewards

    def reward(completions, completion_ids, answer, parsed, **_):
        from .scoring import score_completion

        acc = [sum(score_completion(p, refs).correct) / len(refs) for p, refs in zip(parsed, answer)]
        out = []
        for start in range(0, len(acc), num_generations):
            lengths = [len(ids) for ids in completion_ids[start: start + num_generations]]
            group_acc = acc[start: start + num_generations]
            bonus = length_penalty_rewards(lengths, group_acc, method=method).tolist()
            out.extend(a + weight * b for a, b in zip(group_acc, bonus))
        return out

    return reward


def run_length(cfg: DemoConfig, console=None) -> dict:
    """Stage 3 (``length_baseline=true``): the explicit length-penalty baseline, RL at N = 1 for the
    same number of steps, reward = accuracy + Kimi-1.5 length reward."""
    console = console or _console()
    sft = read_stage(cfg, "sft")
    out = _fresh_dir(stage_dir(cfg, "length"))
    config = _rl_config(cfg, out, sft["model"], n_problems=1,
                        max_completion_length=cfg.length_max_completion_length)
    console.print(f"[bold]stage length[/]: N = 1, budget {cfg.length_max_completion_length} tokens, "
                  f"{cfg.rl_steps} steps, reward = accuracy + {cfg.length_penalty_weight} x Kimi-1.5 length reward")
    reward = length_penalty_reward(cfg.num_generations, weight=cfg.length_penalty_weight)
    return _run_rl(cfg, "length", console, config, reward_fn=reward)


# ----------------------------------------------------------------------------------------------
# Stage 4: the task-scaling sweep and the summary
# ----------------------------------------------------------------------------------------------
MODEL_NAMES = {"sft": "verbose-sft", "bcr": "bcr", "length": "length-penalty"}


def _check_lines(records) -> dict:
    """Redundant ``Check:`` lines per problem, per (model, N), counted in the sweep's completions."""
    out: dict = {}
    for r in records:
        key = (r["model"], r["n_problems"])
        c, n = out.get(key, (0, 0))
        out[key] = (c + r["completion"].count("Check:"), n + r["n_actual"])
    return {k: c / max(n, 1) for k, (c, n) in out.items()}


def run_eval(cfg: DemoConfig, console=None) -> dict:
    """Stage 4: ``evaluate_scaling`` over N = 1..6 for every trained model; prints the summary."""
    from .evaluation import evaluate_scaling, read_results

    console = console or _console()
    t0 = time.perf_counter()
    out = _fresh_dir(stage_dir(cfg, "eval"))
    _, evals = make_task(cfg)
    models = {MODEL_NAMES[s]: read_stage(cfg, s)["model"] for s in ("sft", "bcr", "length")
              if s != "length" or cfg.length_baseline}
    console.print(f"[bold]stage eval[/]: N = {cfg.eval_n_values} on {len(evals)} held-out problems, "
                  f"shared budget {cfg.eval_budget} tokens per prompt, models {list(models)}")
    summary = evaluate_scaling(
        models, evals, output_dir=str(out), n_values=cfg.eval_n_values, samples_per_bundle=cfg.eval_samples_per_bundle,
        budget_mode="per_prompt", max_completion_length=cfg.eval_budget, temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p, seed=cfg.seed, batch_size=cfg.eval_batch_size, baseline=MODEL_NAMES["sft"],
        numbered_single=cfg.numbered_single,
        resume=False, progress=cfg.progress,
    )
    checks = _check_lines(read_results(out / "results.jsonl"))
    result = demo_summary(summary, checks)
    _write_json(Path(cfg.output_dir) / "demo_summary.json", result)
    return _finish_stage(cfg, "eval", time.perf_counter() - t0,
                         {"report": str(out / "report.md"), "summary": result})


def demo_summary(summary: dict, checks: dict | None = None) -> dict:
    """The demo's headline numbers from an ``evaluate_scaling`` summary: per model, tokens per problem
    and accuracy for each N and whether tokens fall monotonically; the N = 1 free lunch of every
    model against the verbose SFT baseline, with the acceptance thresholds of the demo."""
    checks = checks or {}
    models = {}
    for row in summary["rows"]:
        m = models.setdefault(row["model"], {"n": [], "tokens_per_problem": [], "tokens_per_problem_ci": [],
                                             "accuracy": [], "checks_per_problem": []})
        m["n"].append(row["n_problems"])
        m["tokens_per_problem"].append(row["tokens_per_problem"])
        m["tokens_per_problem_ci"].append([row.get("tokens_per_problem_ci_low"), row.get("tokens_per_problem_ci_high")])
        m["accuracy"].append(row["accuracy"])
        m["checks_per_problem"].append(checks.get((row["model"], row["n_problems"])))
    fits = summary.get("fits") or {}
    for name, m in models.items():
        tok = m["tokens_per_problem"]
        m["rises_at_n"] = [m["n"][i + 1] for i in range(len(tok) - 1) if tok[i + 1] >= tok[i]]
        m["tokens_fall_monotonically"] = not m["rises_at_n"]
        # a rise whose CI lies wholly above the previous N's CI: one that noise alone rarely explains
        m["clear_rises_at_n"] = fits.get(name, {}).get("clear_rises_n", [])
    lunch = []
    for c in (summary.get("free_lunch") or {}).get("comparisons", []):
        lunch.append({
            "model": c["model"],
            "tokens_per_problem": c["tokens_per_problem"],
            "baseline_tokens_per_problem": c["baseline_tokens_per_problem"],
            "token_reduction_pct": c["token_reduction_pct"],
            "token_reduction_ci": [c["token_reduction_ci_low"], c["token_reduction_ci_high"]],
            "accuracy": c["accuracy"],
            "baseline_accuracy": c["baseline_accuracy"],
            "accuracy_diff_points": 100 * c["accuracy_diff"],
            "accuracy_diff_ci_points": [100 * c["accuracy_diff_ci_low"], 100 * c["accuracy_diff_ci_high"]],
            "meets_15pct_fewer_tokens": bool(c["token_reduction_pct"] >= 15.0),
            "meets_accuracy_within_3_points": bool(abs(100 * c["accuracy_diff"]) <= 3.0),
        })
    return {"models": models, "free_lunch_n1": lunch,
            "baseline": (summary.get("free_lunch") or {}).get("baseline")}


def print_summary(result: dict, stage_seconds: dict | None = None, console=None) -> None:
    """The demo's closing table: tokens/problem and accuracy per N per model, then the free lunch."""
    from rich.table import Table

    console = console or _console()
    names = list(result["models"])
    ns = result["models"][names[0]]["n"] if names else []
    table = Table(title="task-scaling law: tokens per problem (accuracy %) [Check lines per problem]")
    table.add_column("N", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i, n in enumerate(ns):
        cells = []
        for name in names:
            m = result["models"][name]
            if i < len(m["n"]):
                chk = m["checks_per_problem"][i]
                chk = f" [{chk:.2f}]" if chk is not None else ""
                cells.append(f"{m['tokens_per_problem'][i]:.1f} ({100 * m['accuracy'][i]:.1f}){chk}")
            else:
                cells.append("-")
        table.add_row(str(n), *cells)
    console.print(table)
    for name in names:
        m = result["models"][name]
        verdict = "yes"
        if not m["tokens_fall_monotonically"]:
            clear = m.get("clear_rises_at_n", [])
            noise = [n for n in m["rises_at_n"] if n not in clear]
            verdict = "no (" + "; ".join(part for part in (
                f"clear rise at N = {clear}" if clear else "",
                f"rise within the 95% CIs at N = {noise}" if noise else "") if part) + ")"
        console.print(f"  {name}: tokens per problem fall monotonically with N: {verdict}")
    for c in result["free_lunch_n1"]:
        console.print(
            f"  free lunch at N = 1, {c['model']} vs {result['baseline']}: {c['tokens_per_problem']:.1f} vs "
            f"{c['baseline_tokens_per_problem']:.1f} tokens/problem = {c['token_reduction_pct']:.1f}% fewer "
            f"(95% CI {c['token_reduction_ci'][0]:.1f}..{c['token_reduction_ci'][1]:.1f}); accuracy "
            f"{100 * c['accuracy']:.1f}% vs {100 * c['baseline_accuracy']:.1f}% "
            f"({c['accuracy_diff_points']:+.1f} points)")
    if stage_seconds:
        total = sum(stage_seconds.values())
        console.print("  stage times: " + ", ".join(f"{s} {t:.0f} s" for s, t in stage_seconds.items())
                      + f" (total {total:.0f} s)")


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------
STAGE_FUNCTIONS = {"sft": run_sft, "bcr": run_bcr, "length": run_length, "eval": run_eval}


def run_demo(cfg: DemoConfig | None = None, **overrides) -> dict:
    """Run the stages ``cfg.from_stage`` .. ``cfg.stop_after``; returns ``{stage: stage record}`` of
    every stage (reused ones included)."""
    cfg = dataclasses.replace(cfg or DemoConfig(), **overrides)
    console = _console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    todo = cfg.stages()
    records = {}
    for stage in STAGES[: STAGES.index(cfg.from_stage)]:
        if stage == "length" and not cfg.length_baseline:
            continue
        records[stage] = read_stage(cfg, stage)
        console.print(f"[dim]reusing stage {stage} from {stage_dir(cfg, stage)}[/]")
    for stage in todo:
        records[stage] = STAGE_FUNCTIONS[stage](cfg, console)
        console.print(f"[green]stage {stage} finished in {records[stage]['seconds']:.1f} s[/]")
    from .dataclass_cli import to_yaml

    (Path(cfg.output_dir) / "demo_config.yaml").write_text(to_yaml(cfg))
    if "eval" in records:
        print_summary(records["eval"]["summary"], {s: r["seconds"] for s, r in records.items()}, console)
        console.print(f"report: {records['eval']['report']} (plots next to it); "
                      f"numbers: {Path(cfg.output_dir) / 'demo_summary.json'}")
    return records


def cli_main(argv: Sequence[str]) -> int:
    """``bcr demo [--config FILE.yaml] [key=value ...] [--from-stage STAGE]``."""
    from .dataclass_cli import parse_cli

    cfg = parse_cli(DemoConfig, argv, prog="bcr demo")
    if cfg is None:
        return 0
    run_demo(cfg)
    return 0
