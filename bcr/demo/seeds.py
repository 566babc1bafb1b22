"""The demo's RL seeds: the RL stages and the sweep once per seed, side by side, and the pooled summary.

The SFT model is trained once (seed ``seed``); the RL stages (``bcr``, ``length``) then run once per
RL seed of ``DemoConfig.seeds()`` from it, each seed's models are swept with that seed's sampling
(``eval``, ``eval-s<s>``; the SFT model in every sweep), and :func:`pool_sweeps` pools the sweeps:
the closing table's numbers are those of every seed's completions together (mean over the seeds),
with the range over the seeds beside them, so a claim can be judged on more than one RL run.

The units (first every seed's ``bcr`` and ``length``, then every seed's ``eval``) run at one torch
thread each: with ``rl_workers`` > 1 (default: one per CPU core) in that many spawned worker
processes (no progress bars), with ``rl_workers=1`` one after the other in this process. A tiny model's
RL step gains little from a second thread (and loses much when the cores are shared with other
work), so two one-thread workers on two cores do more than one two-thread process. A unit computes
the same in a worker as in this process (tested), so ``rl_workers`` changes the time, not the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

from bcr.eval.report import write_run_outputs
from bcr.eval.scaling import summarize_records
from bcr.eval.sweep import read_results
from bcr.runtime.io import atomic_write_json

from .config import DemoConfig
from .stages import (MODEL_NAMES, eval_config, run_bcr, run_eval, run_length, seed_stage, stage_dir,
                     sweep_summary)
from .summary import collapse, pool_seeds
from .task import make_task

#: the stages that run once per RL seed, in order; the units of one group may run side by side
SEED_GROUPS = (("bcr", "length"), ("eval",))
SEED_STAGES = {"bcr": run_bcr, "length": run_length, "eval": run_eval}
POOLED_DIR = "pooled"
#: environment variables that pin CPU float kernels (ATen's vector code, MKL's code path); recorded, not set
FLOAT_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")


def _run_unit(cfg: DemoConfig, stage: str, seed: int) -> dict:
    """One stage of one RL seed at one torch thread (also the worker processes' entry point)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return SEED_STAGES[stage](cfg, Console(), seed=seed)
    finally:
        torch.set_num_threads(threads)


def run_seed_stages(cfg: DemoConfig, stages: list[str], console: Console) -> dict[str, dict]:
    """The per-seed ``stages`` (of ``bcr``, ``length``, ``eval``) for every RL seed: ``{stage directory:
    stage record}``; each group of :data:`SEED_GROUPS` finishes before the next starts."""
    groups = [[(stage, s) for s in cfg.seeds() for stage in group if stage in stages] for group in SEED_GROUPS]
    groups = [units for units in groups if units]
    records: dict[str, dict] = {}
    workers = min(cfg.rl_workers or os.cpu_count() or 1, max((len(units) for units in groups), default=1))
    if workers == 1:
        for units in groups:
            for stage, seed in units:
                records[seed_stage(cfg, stage, seed)] = _run_unit(cfg, stage, seed)
        return records
    quiet = dataclasses.replace(cfg, progress=False)
    console.print(f"running {sum(map(len, groups))} RL-seed stages in {workers} processes of one torch thread each")
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for units in groups:
            futures = [(stage, seed, pool.submit(_run_unit, quiet, stage, seed)) for stage, seed in units]
            for stage, seed, future in futures:
                records[seed_stage(cfg, stage, seed)] = future.result()
    return records


def machine() -> dict:
    """The machine the numbers came from: CPU, cores, torch, the float kernels ATen chose and the
    pins of :data:`FLOAT_PINS` in the environment (None: unset)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    pins = {name: os.environ.get(name) for name in FLOAT_PINS}
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **pins}


def _collapses(cfg: DemoConfig) -> dict[str, dict[int, dict]]:
    """Per RL model, per seed, :func:`.summary.collapse` of its training accuracy."""
    out: dict[str, dict[int, dict]] = {}
    for stage in ("bcr", "length"):
        for seed in cfg.seeds():
            path = stage_dir(cfg, seed_stage(cfg, stage, seed)) / "metrics.jsonl"
            if path.is_file():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                out.setdefault(MODEL_NAMES[stage], {})[seed] = collapse([r.get("accuracy") for r in rows])
    return out


def pool_sweeps(cfg: DemoConfig) -> dict:
    """The demo summary of every seed's sweep pooled (the records of all seeds together, summarised as
    one sweep: the law verdict and the free lunch on pooled numbers), with each seed's numbers, their
    range, the collapses and the machine; written to ``output_dir/demo_summary.json`` (and, with several
    seeds, the pooled report and plots to ``output_dir/pooled/``)."""
    _, evals = make_task(cfg)
    records, per_seed = [], {}
    for seed in cfg.seeds():
        out = stage_dir(cfg, seed_stage(cfg, "eval", seed))
        records += read_results(out / "results.jsonl")
        per_seed[seed] = json.loads((out / "demo_summary.json").read_text())
    config = eval_config(cfg, Path(cfg.output_dir) / POOLED_DIR)
    models = [name for name in MODEL_NAMES.values() if any(r["model"] == name for r in records)]
    summary = summarize_records(records, models=models, baseline=MODEL_NAMES["sft"], ci_method=config.ci_method,
                                confidence=config.confidence, n_bootstrap=config.n_bootstrap, seed=cfg.seed)
    result = pool_seeds(sweep_summary(summary, records, evals), per_seed, _collapses(cfg))
    result["machine"] = machine()
    if len(per_seed) > 1:
        first = json.loads((stage_dir(cfg, seed_stage(cfg, "eval", cfg.seeds()[0])) / "summary.json").read_text())
        conf = {**first.get("config", {}), "rl_seeds": cfg.seeds()}
        write_run_outputs(config.output_dir, {"config": conf, **summary}, plots=config.plots)
    atomic_write_json(Path(cfg.output_dir) / "demo_summary.json", result, default=str)
    return result
