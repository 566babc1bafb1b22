"""The demo's four stages, each ``run_<stage>(cfg, console) -> stage record``, and their bookkeeping.

Every stage starts from an empty ``output_dir/<stage>/`` and ends by writing ``<stage>/stage.json``
(its wall time and key numbers); a later stage reads the checkpoints it needs from there
(:func:`read_stage`), so any stage can be re-run alone. The RL stages and the sweep run once per RL
seed (``seed=``, default the demo's own ``seed``): the demo's seed writes ``bcr/``, ``length/`` and
``eval/``, any other seed ``s`` writes ``bcr-s<s>/``, ``length-s<s>/`` and ``eval-s<s>/``
(:func:`seed_stage`), each from the one SFT model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from bcr.rl.config import BCRConfig
from bcr.runtime.dataclass_cli import ConfigError
from bcr.eval.sweep import EvalConfig, evaluate_scaling, read_results
from bcr.runtime.io import atomic_write_json, atomic_write_text
from bcr.rl.rewards import length_penalty_rewards
from bcr.task.scoring import score_completion
from bcr.rl.trainer import BCRTrainer

from .config import LENGTH_METHODS, DemoConfig
from .sft import sft_batches, train_sft
from .plots import write_adaptive_plot
from .summary import budget_use, check_lines, demo_summary, difficulty_label, style_mix
from .task import (build_tokenizer_and_model, bundle_solution_sample, check_tokenizer_roundtrip, has_shorter_styles,
                   make_task, worked_only)

STAGE_FILE = "stage.json"
MODEL_NAMES = {"sft": "verbose-sft", "bcr": "bcr", "length": "length-penalty"}


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------
def stage_dir(cfg: DemoConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / stage


def seed_stage(cfg: DemoConfig, stage: str, seed: int | None = None) -> str:
    """The directory of ``stage`` for RL seed ``seed``: ``stage`` for the demo's own seed (or None),
    ``<stage>-s<seed>`` for any other."""
    return stage if seed is None or seed == cfg.seed else f"{stage}-s{seed}"


def read_stage(cfg: DemoConfig, stage: str) -> dict:
    """The ``stage.json`` of a finished stage; a clear error when the stage never finished."""
    path = stage_dir(cfg, stage) / STAGE_FILE
    if not path.is_file():
        raise ConfigError(f"stage {stage!r} has no finished checkpoint in {path.parent} (no {STAGE_FILE}); "
                          f"run it first: from_stage={stage} (or an earlier stage)")
    return json.loads(path.read_text())


def _finish_stage(cfg: DemoConfig, stage: str, seconds: float, info: dict) -> dict:
    record = {"stage": stage, "seconds": round(seconds, 2), **info}
    atomic_write_json(stage_dir(cfg, stage) / STAGE_FILE, record, default=str)
    return record


def _fresh_dir(path: Path) -> Path:
    """An empty ``path`` (a re-run stage never mixes its files with an earlier run's)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------
# Stage 1: SFT warm-up (the verbose reasoner)
# ----------------------------------------------------------------------------------------------
def sft_checkpoints(cfg: DemoConfig, console: Console) -> Path | None:
    """``output_dir/sft-checkpoints`` when ``sft.checkpoint_every`` is set (None otherwise), holding only
    checkpoints of this very SFT: the settings that decide it are recorded there, and checkpoints
    made with other settings are removed (with a line saying so)."""
    if not cfg.sft.checkpoint_every:
        return None
    folder = Path(cfg.output_dir) / "sft-checkpoints"
    settings = repr((cfg.seed, cfg.threads, cfg.task, cfg.model, dataclasses.replace(cfg.sft, checkpoint_every=0)))
    record = folder / "settings.txt"
    if folder.exists() and (not record.is_file() or record.read_text() != settings):
        console.print(f"  {folder} holds checkpoints of other settings: removed, the SFT starts afresh")
        shutil.rmtree(folder)
    if folder.exists() and any(folder.glob("*.pt")):
        console.print(f"  continuing from the checkpoints in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, settings)
    return folder


def _shipped_sft(cfg: DemoConfig, out: Path, tokenizer, console: Console) -> dict | None:
    """The shipped SFT model copied into ``out`` when it is this stage's model (its provenance), else
    None with a line saying why the stage trains."""
    from . import shipped  # here, so that ``python -m bcr.demo.shipped`` finds it not yet imported

    reason = shipped.why_not_shipped(cfg)
    record = shipped.install(out, tokenizer) if reason is None else None
    if reason is None and record is None:
        reason = "the tokenizer this code builds is not the shipped model's"
    if record is None:
        console.print(f"[bold]stage sft[/]: training here: {reason}")
        return None
    console.print(f"[bold]stage sft[/]: the SFT model shipped with bcr ({record['note']}; {record['seconds']:.0f} s "
                  f"of training, final loss {record['final_loss']:.3f}); train_sft=true trains it here")
    return record


def run_sft(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Stage 1: build the tokenizer and the tiny model, fine-tune it on verbose worked solutions, then
    (``sft.direct_steps``) on the direct answers alone, then (when ``task.styles`` holds shorter
    styles) on the task's mix of styles for ``sft.style_steps``. At the settings of the SFT model
    shipped with bcr (:mod:`.shipped`) the stage copies that model instead, unless ``cfg.train_sft``."""
    console = console or Console()
    t0 = time.perf_counter()
    out = _fresh_dir(stage_dir(cfg, "sft"))
    train, _ = make_task(worked_only(cfg))
    tokenizer, model = build_tokenizer_and_model(cfg, train)
    tokenizer.save_pretrained(Path(cfg.output_dir) / "tokenizer")
    n_params = sum(p.numel() for p in model.parameters())
    copied = None if cfg.train_sft else _shipped_sft(cfg, out, tokenizer, console)
    if copied is not None:
        return _finish_stage(cfg, "sft", time.perf_counter() - t0,
                             {"model": str(out / "model"), "final_loss": copied["final_loss"], "parameters": n_params,
                              "shipped": {k: copied[k] for k in ("note", "machine", "seconds")}})
    console.print(f"[bold]stage sft[/]: tokenizer of {len(tokenizer)} tokens, {cfg.model.arch} model of "
                  f"{n_params / 1e6:.2f}M parameters, {len(train)} training problems")
    checkpoints = sft_checkpoints(cfg, console)
    log = train_sft(model, sft_batches(train, tokenizer, cfg), cfg.sft, pad_token_id=tokenizer.pad_token_id,
                    seed=cfg.seed, progress=cfg.progress, checkpoint=checkpoints and checkpoints / "steps.pt")
    styled, _ = make_task(cfg) if has_shorter_styles(cfg) else (train, None)
    if cfg.sft.direct_steps:
        direct = [p for p in styled if p.meta["style"] == "direct"]
        console.print(f"  then {cfg.sft.direct_steps} steps on the direct answers of {len(direct)} problems alone")
        phase = dataclasses.replace(cfg.sft, steps=cfg.sft.direct_steps, learning_rate=cfg.sft.style_learning_rate)
        more = train_sft(model, sft_batches(direct, tokenizer, cfg), phase, pad_token_id=tokenizer.pad_token_id,
                         seed=cfg.seed, progress=cfg.progress, checkpoint=checkpoints and checkpoints / "direct.pt")
        log += [{**r, "step": r["step"] + len(log), "phase": "direct"} for r in more]
    if has_shorter_styles(cfg) and cfg.sft.style_steps:
        console.print(f"  then {cfg.sft.style_steps} steps on the styles {cfg.task.styles}")
        phase = dataclasses.replace(cfg.sft, steps=cfg.sft.style_steps, learning_rate=cfg.sft.style_learning_rate)
        more = train_sft(model, sft_batches(styled, tokenizer, cfg), phase, pad_token_id=tokenizer.pad_token_id,
                         seed=cfg.seed, progress=cfg.progress, checkpoint=checkpoints and checkpoints / "styles.pt")
        log += [{**r, "step": r["step"] + len(log), "phase": "styles"} for r in more]
        train = styled
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    check_tokenizer_roundtrip(tokenizer, out / "model", bundle_solution_sample(train, cfg.template))
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    final = sum(r["loss"] for r in log[-20:]) / len(log[-20:])
    console.print(f"  sft done: final loss {final:.3f}")
    if checkpoints:
        shutil.rmtree(checkpoints)
    return _finish_stage(cfg, "sft", time.perf_counter() - t0,
                         {"model": str(out / "model"), "final_loss": final, "parameters": n_params})


# ----------------------------------------------------------------------------------------------
# Stages 2 and 3: RL with the real BCRTrainer
# ----------------------------------------------------------------------------------------------
def rl_config(cfg: DemoConfig, out: Path, model: str, **changes) -> BCRConfig:
    """``cfg.rl`` with the fields the demo sets for a stage (see ``SET_BY_DEMO``; the seed is the
    demo's unless ``changes`` gives one), then ``changes``."""
    fields = {"model": model, "output_dir": str(out), "seed": cfg.seed, "numbered_single": cfg.task.numbered_single,
              "disable_progress_bar": not cfg.progress, "logging_steps": max(1, cfg.rl.max_steps // 10)}
    return dataclasses.replace(cfg.rl, **{**fields, **changes})


def _first_and_final(history: list[dict]) -> tuple[dict, int]:
    """Means of key metrics over the first and the last fifth of the steps."""
    def mean(key, rows):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else float("nan")

    k = max(1, len(history) // 5)
    first, final = history[:k], history[-k:]
    info = {}
    for key in ("accuracy", "tokens_per_problem", "completions/truncated_ratio", "reward"):
        info[f"first_{key}"] = mean(key, first)
        info[f"final_{key}"] = mean(key, final)
    return info, k


def _run_rl(cfg: DemoConfig, stage: str, console: Console, config: BCRConfig, reward_fn=None) -> dict:
    t0 = time.perf_counter()
    train, _ = make_task(cfg)
    trainer = BCRTrainer(config.model, train, config, reward_fn=reward_fn)
    last = trainer.train()
    history = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    means, k = _first_and_final(history)
    info = {"model": str(config.output_dir), "steps": trainer.step, **means}
    console.print(f"  {stage} done: accuracy {info['first_accuracy']:.2f} -> {info['final_accuracy']:.2f}, "
                  f"tokens/problem {info['first_tokens_per_problem']:.1f} -> {info['final_tokens_per_problem']:.1f}, "
                  f"truncated {info['first_completions/truncated_ratio']:.2f} -> "
                  f"{info['final_completions/truncated_ratio']:.2f} (mean of the first / last {k} steps)")
    info["last_step_metrics"] = last
    return _finish_stage(cfg, stage, time.perf_counter() - t0, info)


def run_bcr(cfg: DemoConfig, console: Console | None = None, *, seed: int | None = None) -> dict:
    """Stage 2: BCR from the SFT model: N problems share one completion budget; the reward is
    per-instance accuracy only (no length term). ``seed``: the RL seed (default: the demo's)."""
    console = console or Console()
    sft = read_stage(cfg, "sft")
    stage = seed_stage(cfg, "bcr", seed)
    out = _fresh_dir(stage_dir(cfg, stage))
    config = rl_config(cfg, out, sft["model"], seed=cfg.seed if seed is None else seed)
    console.print(f"[bold]stage {stage}[/] (seed {config.seed}): N in {config.n_values}, shared budget {config.max_completion_length} tokens, "
                  f"G={config.num_generations}, {config.bundles_per_step} prompts x {config.max_steps} steps, "
                  "reward = per-problem accuracy (no length term)")
    return _run_rl(cfg, stage, console, config)


def length_penalty_reward(num_generations: int, *, method: str = "kimi", weight: float = 1.0, budget: int = 1):
    """A TRL-style reward for the baseline: accuracy + ``weight`` x a length term of
    :func:`bcr.rl.rewards.length_penalty_rewards`, computed within each group of G completions:
    ``method="kimi"`` the Kimi-1.5 length reward, ``method="linear"`` ``-length / budget``."""
    if method not in LENGTH_METHODS:
        raise ConfigError(f"length penalty method {method!r}: must be one of {list(LENGTH_METHODS)}")

    def reward(completions, completion_ids, answer, parsed, **_):
        acc = [sum(score_completion(p, refs).correct) / len(refs) for p, refs in zip(parsed, answer)]
        out = []
        for start in range(0, len(acc), num_generations):
            lengths = [len(ids) for ids in completion_ids[start: start + num_generations]]
            group_acc = acc[start: start + num_generations]
            bonus = length_penalty_rewards(lengths, group_acc, method=method, alpha=1.0 / budget).tolist()
            out.extend(a + weight * b for a, b in zip(group_acc, bonus))
        return out

    return reward


def run_length(cfg: DemoConfig, console: Console | None = None, *, stage: str | None = None,
               seed: int | None = None) -> dict:
    """Stage 3 (``length_baseline=true``): the explicit length-penalty baseline, like for like with
    stage 2 (same N mix, budget, steps and settings), reward = accuracy + the length term of
    ``cfg.length``; written to ``output_dir/<stage>/`` (default :func:`seed_stage` of ``seed``; the
    seed study names one directory per setting)."""
    console = console or Console()
    sft = read_stage(cfg, "sft")
    stage = stage or seed_stage(cfg, "length", seed)
    out = _fresh_dir(stage_dir(cfg, stage))
    budget = cfg.length.max_completion_length or cfg.rl.max_completion_length
    config = rl_config(cfg, out, sft["model"], max_completion_length=budget, seed=cfg.seed if seed is None else seed)
    console.print(f"[bold]stage {stage}[/] (seed {config.seed}): N in {config.n_values}, shared budget {budget} tokens, "
                  f"{config.max_steps} steps, reward = accuracy + {cfg.length.penalty_weight} x "
                  f"{LENGTH_METHODS[cfg.length.method]}")
    reward = length_penalty_reward(config.num_generations, method=cfg.length.method, weight=cfg.length.penalty_weight,
                                   budget=budget)
    return _run_rl(cfg, stage, console, config, reward_fn=reward)


# ----------------------------------------------------------------------------------------------
# Stage 4: the task-scaling sweep
# ----------------------------------------------------------------------------------------------
def eval_config(cfg: DemoConfig, out: Path, seed: int | None = None) -> EvalConfig:
    """``cfg.eval`` with the fields the demo sets (see ``SET_BY_DEMO``; ``seed``: the sweep's sampling
    seed, default the demo's)."""
    return dataclasses.replace(cfg.eval, output_dir=str(out), seed=cfg.seed if seed is None else seed,
                               baseline=MODEL_NAMES["sft"], numbered_single=cfg.task.numbered_single, resume=False,
                               progress=cfg.progress)


def _budget_text(config: EvalConfig) -> str:
    if config.budget_mode == "per_problem":
        return f"{config.per_problem_budget} tokens per problem (N x {config.per_problem_budget} per prompt)"
    return f"shared budget {config.max_completion_length} tokens per prompt"


def sweep_summary(summary: dict, records: list[dict], evals) -> dict:
    """:func:`.summary.demo_summary` of a sweep (its ``evaluate_scaling`` summary and records), with
    the checks, budget use and styles counted in the records (per difficulty when the task has several)."""
    difficulty = {p.id: difficulty_label(p) for p in evals}
    by_difficulty = style_mix(records, difficulty) if len(set(difficulty.values())) > 1 else None
    return demo_summary(summary, check_lines(records), budget_use(records), style_mix(records), by_difficulty)


def run_eval(cfg: DemoConfig, console: Console | None = None, *, seed: int | None = None) -> dict:
    """Stage 4: ``evaluate_scaling`` over N = 1..6 of the SFT model and RL seed ``seed``'s models
    (default: the demo's seed), sampled with that seed; writes the seed's demo summary into its
    directory (``demo_summary.json``; the pipeline pools the seeds into ``output_dir``'s)."""
    console = console or Console()
    t0 = time.perf_counter()
    stage = seed_stage(cfg, "eval", seed)
    out = _fresh_dir(stage_dir(cfg, stage))
    _, evals = make_task(cfg)
    models = {MODEL_NAMES[s]: read_stage(cfg, s if s == "sft" else seed_stage(cfg, s, seed))["model"]
              for s in ("sft", "bcr", "length") if s != "length" or cfg.length_baseline}
    config = eval_config(cfg, out, seed)
    console.print(f"[bold]stage {stage}[/] (seed {config.seed}): N = {config.n_values} on {len(evals)} held-out "
                  f"problems, {_budget_text(config)}, models {list(models)}")
    summary = evaluate_scaling(models, evals, config=config)
    result = sweep_summary(summary, read_results(out / "results.jsonl"), evals)
    if any(m.get("styles_by_difficulty") for m in result["models"].values()):
        write_adaptive_plot(result, out / "adaptive.png")
    atomic_write_json(out / "demo_summary.json", result, default=str)
    return _finish_stage(cfg, stage, time.perf_counter() - t0,
                         {"report": str(out / "report.md"), "summary": result, "seed": config.seed})
