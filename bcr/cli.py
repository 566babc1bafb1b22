"""The ``bcr`` command: ``bcr train``, ``bcr eval``, ``bcr solve`` and ``bcr demo``.

Each sub-command takes ``[--config FILE.yaml] [key=value ...]`` and ``--help`` lists every option with
its default. The sub-command modules are imported only when used, so ``bcr --help`` is instant.

One error boundary serves them all: an error the user can fix (config, data, paths, the output
directory) is one ``error: ...`` line on stderr and exit status 2; a run stopped by what happened
during it (NaN weights, a failed rank, a full disk) is one line and status 1; Ctrl-C is status 130.
Neither prints a traceback; ``BCR_DEBUG=1`` lets every exception through with its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from bcr.runtime.dataclass_cli import ConfigError
from bcr.runtime.interrupts import remember_interrupts

COMMANDS = {
    "train": ("bcr.rl.train_cli", "train a model with BCR (rollout, per-instance rewards, packed update)"),
    "eval": ("bcr.eval.sweep", "task-scaling-law sweep over N: accuracy, tokens per problem, throughput"),
    "solve": ("bcr.eval.solve", "answer a file of problems N at a time (N as a throughput dial)"),
    "demo": ("bcr.demo", "the embedded CPU demo: SFT a verbose reasoner, BCR-train it, sweep N"),
}

USAGE = "usage: bcr {train,eval,solve,demo} [--config FILE.yaml] [key=value ...]\n\n" + "\n".join(
    f"  {name:6s} {text}" for name, (_, text) in COMMANDS.items()
)

# Input the user can fix: exit status 2. ValueError covers the library's own argument checks.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
    FileExistsError,
)


def _run_errors() -> tuple[type[BaseException], ...]:
    """What stops a run that started well: exit status 1 (imported late: they live next to torch)."""
    from bcr.rl.checkpoint import NonFiniteCheckpointError, NonFiniteWeightsError
    from bcr.runtime.distributed import RankFailedError

    return NonFiniteWeightsError, NonFiniteCheckpointError, RankFailedError, OSError


def run_command(name: str, argv: list[str]) -> int:
    """Run ``bcr <name> argv`` behind the error boundary; returns the exit status."""
    debug = os.environ.get("BCR_DEBUG", "") not in ("", "0")
    try:
        with remember_interrupts():  # a Ctrl-C that some code swallows still stops a training run
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.cli_main(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, INPUT_ERRORS):
            status = 2
        elif isinstance(err, _run_errors()):
            status = 1
        else:
            raise  # a bug: its traceback is what a report needs
        print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
        return status


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
