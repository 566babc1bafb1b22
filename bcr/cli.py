"""The ``bcr`` command: ``bcr train``, ``bcr eval`` and ``bcr demo``.

Each sub-command takes ``[--config FILE.yaml] [key=value ...]`` and ``--help`` lists every option with
its default. The sub-command modules are imported only when used, so ``bcr --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys

from .dataclass_cli import ConfigError

COMMANDS = {
    "train": ("bcr.trainer", "train a model with BCR (rollout, per-instance rewards, packed update)"),
    "eval": ("bcr.evaluation", "task-scaling-law sweep over N: accuracy, tokens per problem, throughput"),
    "demo": ("bcr.demo", "the embedded CPU demo: SFT a verbose reasoner, BCR-train it, sweep N"),
}

USAGE = "usage: bcr {train,eval,demo} [--config FILE.yaml] [key=value ...]\n\n" + "\n".join(
    f"  {name:6s} {text}" for name, (_, text) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.cli_main(rest) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
