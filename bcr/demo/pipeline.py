"""The stage order: run ``from_stage`` .. ``stop_after``, reusing the finished stages before them.

``bcr demo --from-stage eval`` (or ``from_stage=eval``) reads the ``stage.json`` of every earlier
stage, which names its checkpoint, and re-runs only the sweep; a stage that never finished is a
clear error naming the stage to run first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from bcr.runtime.dataclass_cli import parse_cli, to_yaml
from bcr.runtime.io import atomic_write_text, check_output_dir

from .config import STAGES, DemoConfig, check_renamed, demo_help
from .stages import read_stage, run_bcr, run_eval, run_length, run_sft, stage_dir
from .summary import print_summary

STAGE_FUNCTIONS = {"sft": run_sft, "bcr": run_bcr, "length": run_length, "eval": run_eval}


def run_demo(cfg: DemoConfig | None = None, **overrides) -> dict:
    """Run the stages ``cfg.from_stage`` .. ``cfg.stop_after``; returns ``{stage: stage record}`` of
    every stage (reused ones included)."""
    cfg = dataclasses.replace(cfg or DemoConfig(), **overrides)
    console = Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    records = {}
    for stage in STAGES[: STAGES.index(cfg.from_stage)]:
        if stage == "length" and not cfg.length_baseline:
            continue
        records[stage] = read_stage(cfg, stage)
        console.print(f"[dim]reusing stage {stage} from {stage_dir(cfg, stage)}[/]")
    for stage in cfg.stages():
        records[stage] = STAGE_FUNCTIONS[stage](cfg, console)
        console.print(f"[green]stage {stage} finished in {records[stage]['seconds']:.1f} s[/]")
    atomic_write_text(Path(cfg.output_dir) / "demo_config.yaml", to_yaml(cfg))
    if "eval" in records:
        print_summary(records["eval"]["summary"], {s: r["seconds"] for s, r in records.items()}, console)
        console.print(f"report: {records['eval']['report']} (plots next to it); "
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
