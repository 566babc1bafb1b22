"""Training metrics: reduced over ranks, written to ``metrics.jsonl``, shown in a rich progress bar.

- ``StepStats`` gathers one step's metrics as (sum, count) pairs so that means over all ranks are exact
  (``reduce()`` all-reduces the sums and counts, then divides).
- ``MetricsLogger`` appends one JSON object per step to ``output_dir/metrics.jsonl`` (rank 0 only) and
  forwards to TensorBoard / W&B when asked for in ``report_to``.
- ``progress_bar`` is the rich bar of the demo's SFT loop and the evaluator's sweep.
- ``TrainProgress`` is the rich progress bar (off when stdout is not a terminal or on ranks other than
  0; then a plain line is printed every ``logging_steps``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

from bcr.runtime.distributed import all_reduce_max, all_reduce_sum


class StepStats:
    """Means over all ranks: ``add(name, sum, count)`` locally, then ``reduce()`` once per step."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, float] = defaultdict(float)
        self._maxima: dict[str, float] = {}

    def add(self, name: str, value_sum: float, count: float = 1.0) -> None:
        self._sums[name] += float(value_sum)
        self._counts[name] += float(count)

    def add_max(self, name: str, value: float) -> None:
        """Keep the largest ``value`` seen under ``name`` (reported as the maximum over all ranks)."""
        self._maxima[name] = max(float(value), self._maxima.get(name, float("-inf")))

    def extend(self, other: StepStats) -> None:
        """Add every (sum, count) and maximum of ``other`` (e.g. the update's metrics to the rollout's)."""
        for name, value in other._sums.items():
            self.add(name, value, other._counts[name])
        for name, value in other._maxima.items():
            self.add_max(name, value)

    def reduce(self, device=None) -> dict[str, float]:
        names = sorted(self._sums)
        flat = all_reduce_sum([self._sums[n] for n in names] + [self._counts[n] for n in names], device)
        sums, counts = flat[: len(names)], flat[len(names) :]
        out = {n: (s / c if c else float("nan")) for n, s, c in zip(names, sums, counts)}
        maxima = sorted(self._maxima)
        out.update(zip(maxima, all_reduce_max([self._maxima[n] for n in maxima], device)))
        return out


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsLogger:
    """Writes metrics on rank 0: ``metrics.jsonl`` always, TensorBoard / W&B when in ``report_to``."""

    def __init__(self, output_dir: str | Path, *, report_to=(), run_name: str | None = None,
                 config: dict | None = None, rank: int = 0):
        self.enabled = rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:
                warnings.warn("report_to has 'tensorboard' but tensorboard is not installed: pip install tensorboard", stacklevel=2)
        if "wandb" in report_to:
            try:
                import wandb

                self._wandb = wandb.init(name=run_name or Path(output_dir).name, config=config or {}, reinit=True)
            except ImportError:
                warnings.warn("report_to has 'wandb' but wandb is not installed: pip install wandb", stacklevel=2)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run re-does those steps). Atomic rewrite."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = int(metrics.get("step", 0))
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress_bar(enabled: bool, detail: str = "{task.fields[info]}"):
    """A rich ``Progress`` for a counted loop (description, bar, done/total, ``detail``, elapsed,
    remaining); ``detail`` is a rich column template, e.g. a task field or fixed text."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(detail),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)


class TrainProgress:
    """A rich progress bar over training steps, or plain log lines when not on a terminal."""

    SHOWN = (
        ("reward", "reward {:.3f}"),
        ("accuracy", "acc {:.3f}"),
        ("tokens_per_problem", "tok/problem {:.1f}"),
        ("tokens_per_second", "tok/s {:.0f}"),
    )

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, logging_steps: int = 1,
                 rank: int = 0):
        self.total, self.start, self.logging_steps = total, start, logging_steps
        self.quiet = rank != 0
        self.use_bar = enabled and not self.quiet and sys.stdout.isatty()
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.use_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def _info(self, metrics: dict) -> str:
        parts = [fmt.format(metrics[k]) for k, fmt in self.SHOWN if isinstance(metrics.get(k), (int, float))]
        return "  ".join(parts)

    def update(self, step: int, metrics: dict) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=self._info(metrics))
        elif step % self.logging_steps == 0 or step == self.total:
            print(f"step {step}/{self.total}  {self._info(metrics)}", flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
