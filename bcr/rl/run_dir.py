"""One training run per ``output_dir``: a lock held while training, a run id, and the start rules.

- **Lock.** ``BCRTrainer.train`` holds ``output_dir/.bcr-run.lock`` with ``fcntl.flock`` for the
  whole run. A second run into the same directory (another process, or another trainer in this
  one) is refused with the holder's pid, host and run id. The kernel drops a ``flock`` when its
  process dies, so a lock left by ``kill -9`` is never stale: the next run simply takes it.
- **Identity.** A fresh run gets a new ``run_id`` (recorded in every checkpoint's
  ``trainer_state.json`` and in the lock file); a resumed run keeps the id of its checkpoint.
- **Start rules.** Starting afresh in a directory that already holds another run's checkpoints or
  ``metrics.jsonl`` is refused unless ``resume_from`` continues it or ``overwrite_output_dir=true``
  deletes them first (so a later ``resume_from=latest`` can never pick up the older run). Leftover
  temporaries of a write that was killed are cleaned up once the lock is held
  (``bcr.rl.checkpoint.remove_stale_temporaries``).
- **Settings on resume.** Resuming with a changed schedule or optimizer setting (``max_steps``,
  ``learning_rate``, ``lr_scheduler_type``, warm-up, ``weight_decay``, Adam betas / epsilon) warns
  and names every change; the run then follows the new settings from the first resumed update on
  (a loaded optimizer and scheduler would otherwise silently keep the checkpoint's).

Every check that needs no write (``preflight``) runs before the CLI loads a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bcr.rl.checkpoint import STATE_FILE, checkpoint_dirs, find_checkpoint, remove_stale_temporaries
from bcr.runtime.distributed import fail_together
from bcr.runtime.io import OutputDirError, check_output_dir

LOCK_FILE = ".bcr-run.lock"
METRICS_FILE = "metrics.jsonl"
# Options that decide the learning rate of every update, and the optimizer's own settings: a resume
# that changes one is warned about and then follows the new value.
SCHEDULE_KEYS = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                 "warmup_steps", "num_iterations", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


class RunDirError(OutputDirError):
    """``output_dir`` cannot take this run (in use, a file, not writable, holds another run)."""


# ----------------------------------------------------------------------------------------------
# Checks that write nothing
# ----------------------------------------------------------------------------------------------
def previous_run(output_dir: str | os.PathLike) -> list[Path]:
    """The files of an earlier run in ``output_dir``: its checkpoints and a non-empty metrics.jsonl."""
    found = checkpoint_dirs(output_dir)
    metrics = Path(output_dir) / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics)
    return found


def check_fresh_start(cfg) -> list[Path]:
    """Without ``resume_from``, an ``output_dir`` holding another run needs ``overwrite_output_dir``;
    returns what an overwrite would delete (nothing when resuming)."""
    if cfg.resume_from:
        return []
    old = previous_run(cfg.output_dir)
    if old and not cfg.overwrite_output_dir:
        names = ", ".join(p.name for p in old[-2:])
        raise RunDirError(
            f"output_dir={cfg.output_dir!r} already holds another run ({names}); continue it with "
            "resume_from=latest, start afresh with overwrite_output_dir=true (deletes its checkpoints and "
            "metrics.jsonl), or choose another output_dir"
        )
    return old


def lock_holder(output_dir: str | os.PathLike) -> str | None:
    """Who holds ``output_dir``'s run lock (``"pid ... on ..."``), or None when it is free."""
    path = Path(output_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(path)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def preflight(cfg, *, probe_lock: bool = True) -> None:
    """Every check of ``output_dir`` and ``resume_from`` that writes nothing, for a CLI to run before
    it loads a model: usable directory, not in use, no other run in it (or resume / overwrite), and
    the checkpoint to resume exists. ``probe_lock``: only one process of a job should look."""
    check_output_dir(cfg.output_dir)
    if probe_lock and (holder := lock_holder(cfg.output_dir)) is not None:
        raise _in_use(cfg.output_dir, holder)
    check_fresh_start(cfg)
    if cfg.resume_from:
        find_checkpoint(cfg.output_dir, cfg.resume_from)


# ----------------------------------------------------------------------------------------------
# The lock and the run id
# ----------------------------------------------------------------------------------------------
def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "a process that is just starting"
    parts = {"pid": "pid {}", "host": "on {}", "run_id": "run {}", "started": "since {}"}
    return " ".join(text.format(info[key]) for key, text in parts.items() if key in info)


def _in_use(output_dir, holder: str) -> RunDirError:
    return RunDirError(f"output_dir={str(output_dir)!r} is in use by another bcr run ({holder}); wait for it to "
                       "finish, or choose another output_dir")


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.bcr-run.lock``; the kernel releases it when the
    process ends, however it ends."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self, info: dict) -> None:
        """Take the lock and record ``info`` (who holds it) in the file; ``RunDirError`` when held."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise _in_use(self.output_dir, _describe_holder(self.path)) from None
        f.truncate(0)
        f.write(json.dumps(info) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


@dataclass
class RunDir:
    """The open ``output_dir`` of a run: its id and (on rank 0) the lock."""

    path: Path
    run_id: str
    lock: RunLock


def _resumed_run_id(cfg) -> str | None:
    if not cfg.resume_from:
        return None
    state = json.loads((find_checkpoint(cfg.output_dir, cfg.resume_from) / STATE_FILE).read_text())
    return state.get("run_id")


@contextlib.contextmanager
def open_run_dir(cfg, *, rank: int = 0) -> Iterator[RunDir]:
    """Hold ``cfg.output_dir`` for one run: rank 0 takes the lock, applies the start rules (deleting
    an earlier run's checkpoints and metrics when ``overwrite_output_dir``) and removes leftover
    temporaries. A refusal on rank 0 stops every rank."""
    lock = RunLock(cfg.output_dir)
    with fail_together("opening output_dir"):
        run = RunDir(Path(cfg.output_dir), _resumed_run_id(cfg) or uuid.uuid4().hex, lock)
        if rank == 0:
            check_output_dir(cfg.output_dir)
            lock.acquire({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run.run_id,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            try:
                for old in check_fresh_start(cfg):  # only with overwrite_output_dir=true
                    if old.is_dir():
                        shutil.rmtree(old)
                    else:
                        old.unlink()
                remove_stale_temporaries(cfg.output_dir)
            except BaseException:
                lock.release()
                raise
    try:
        yield run
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
def schedule_changes(state: dict, cfg, total_steps: int) -> list[str]:
    """``"max_steps 4 -> 8"`` for every schedule option that differs from the checkpoint's config."""
    saved = state.get("config", {})
    changes = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in SCHEDULE_KEYS
               if k in saved and saved[k] != getattr(cfg, k)]
    if not changes and state.get("total_steps") not in (None, total_steps):
        changes.append(f"total steps {state['total_steps']} -> {total_steps}")
    return changes


def resume_settings(state: dict, cfg, *, total_steps: int, optimizer, scheduler, where) -> list[str]:
    """After ``load_checkpoint``: when a schedule or optimizer option changed, warn (naming each
    change) and put the new values into the loaded optimizer and scheduler, so the first resumed
    update already follows them (the loaded state would otherwise keep the checkpoint's peak rate,
    the rate its schedule had reached, and its weight decay, betas and epsilon). Returns the
    changes; with none, nothing is touched."""
    changes = schedule_changes(state, cfg, total_steps)
    if not changes:
        return changes
    scheduler.base_lrs = [cfg.learning_rate] * len(scheduler.base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group.update(initial_lr=cfg.learning_rate, lr=lr, weight_decay=cfg.weight_decay,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler._last_lr = lrs
    warnings.warn(f"resuming {where} with changed settings: {', '.join(changes)}; the run follows the new ones "
                  "from this update on (so it differs from a run trained with them from the start)", stacklevel=3)
    return changes
