"""The stage order: run ``from_stage`` .. ``stop_after``, reusing the finished stages before them.

``sft`` runs once; ``bcr``, ``length`` and ``eval`` once per RL seed (:mod:`.seeds`, side by side in
``rl_workers`` processes), and after the sweeps their pooled summary is written and printed.
``bcr demo --from-stage eval`` (or ``from_stage=eval``) reads the ``stage.json`` of every earlier
stage, which names its checkpoint, and re-runs only the sweeps; a stage that never finished is a
clear error naming the stage to run first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from bcr.runtime.dataclass_cli import parse_cli, to_yaml
from bcr.runtime.io import atomic_write_text, check_output_dir

from .config import STAGES, DemoConfig, check_renamed, demo_help
from .seeds import POOLED_DIR, SEED_GROUPS, pool_sweeps, run_seed_stages
from .stages import read_stage, run_sft, seed_stage, stage_dir
from .summary import print_summary


def _reuse(cfg: DemoConfig, console: Console) -> dict:
    """The records of the finished stages before ``cfg.from_stage`` (every RL seed's)."""
    before = [s for s in STAGES[: STAGES.index(cfg.from_stage)] if s != "length" or cfg.length_baseline]
    names = ["sft"] if "sft" in before else []
    for group in SEED_GROUPS:  # in the order the stages run
        names += [seed_stage(cfg, stage, s) for s in cfg.seeds() for stage in group if stage in before]
    records = {}
    for name in names:
        records[name] = read_stage(cfg, name)
        console.print(f"[dim]reusing stage {name} from {stage_dir(cfg, name)}[/]")
    return records


def run_demo(cfg: DemoConfig | None = None, **overrides) -> dict:
    """Run the stages ``cfg.from_stage`` .. ``cfg.stop_after``; returns ``{stage directory: stage
    record}`` of every stage (reused ones included; ``bcr``, ``bcr-s1``, ... one per RL seed), plus
    ``pooled`` (``{"summary": ...}``, the summary pooled over the seeds) when the sweeps ran."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg or DemoConfig(), **overrides)
    console = Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    records = _reuse(cfg, console)
    stages = cfg.stages()
    if "sft" in stages:
        records["sft"] = run_sft(cfg, console)
        console.print(f"[green]stage sft finished in {records['sft']['seconds']:.1f} s[/]")
    ran = run_seed_stages(cfg, [s for s in stages if s != "sft"], console)
    for name, record in ran.items():
        console.print(f"[green]stage {name} finished in {record['seconds']:.1f} s[/]")
    records.update(ran)
    atomic_write_text(Path(cfg.output_dir) / "demo_config.yaml", to_yaml(cfg))
    if "eval" in stages:
        result = pool_sweeps(cfg)
        records["pooled"] = {"summary": result}
        seconds = {name: r["seconds"] for name, r in records.items() if "seconds" in r}
        print_summary(result, seconds, console, wall_seconds=time.perf_counter() - t0)
        where = Path(cfg.output_dir) / (POOLED_DIR if len(cfg.seeds()) > 1 else seed_stage(cfg, "eval", cfg.seeds()[0]))
        console.print(f"report: {where / 'report.md'} (plots next to it; each seed's sweep in its eval folder); "
                      f"numbers: {Path(cfg.output_dir) / 'demo_summary.json'}")
    return records


def cli_main(argv: Sequence[str]) -> int:
    """``bcr demo [--config FILE.yaml] [key=value ...] [section.key=value ...] [--from-stage STAGE]``."""
    if "-h" in argv or "--help" in argv:
        print(demo_help())
        return 0
    check_renamed(arg.lstrip("-").split("=", 1)[0].replace("-", "_") for arg in argv
                  if ("=" in arg or arg.startswith("--")) and not arg.startswith(("--config", "-c")))
    cfg = parse_cli(DemoConfig, argv, prog="bcr demo")
    if cfg is None:
        return 0
    check_output_dir(cfg.output_dir)
    run_demo(cfg)
    return 0
