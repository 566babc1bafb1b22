"""``bcr train [--config FILE.yaml] [key=value ...]``: a ``BCRConfig`` run from the command line.

Order: parse and validate the config, check every path (``model``, ``output_dir``, ``resume_from``)
and the output directory's lock and start rules, load the problems, and only then load the model
and train. Errors propagate to ``bcr.cli.main``, which prints them as one line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from bcr.rl.config import BCRConfig
from bcr.runtime.dataclass_cli import ConfigError, parse_cli
from bcr.runtime.distributed import init_distributed, teardown_distributed
from bcr.models.loading import resolve_model_source
from bcr.data.problems import DataError, load_problems
from bcr.rl.run_dir import preflight
from bcr.task.synthetic import make_arithmetic_problems
from bcr.rl.trainer import BCRTrainer


def load_train_problems(cfg: BCRConfig, which: str = "train") -> list:
    """The training (``which="train"``) or held-out (``"eval"``) problems a config names."""
    option = "train_data" if which == "train" else "eval_data"
    source = cfg.train_data if which == "train" else cfg.eval_data
    split = cfg.train_split if which == "train" else cfg.eval_split
    limit = cfg.limit if which == "train" else cfg.eval_limit
    if not source:
        raise ConfigError(f"{option} is empty; set {option}=<file, benchmark name, or 'synthetic'>")
    if source.startswith("synthetic"):
        return make_arithmetic_problems(limit or 512, seed=cfg.seed + (0 if which == "train" else 1))
    problems = load_problems(source, split, limit, data_dir=cfg.data_dir)
    if not problems:
        raise DataError(f"{problems.report.path}: holds no problems ({option}={source!r}); "
                        f"point {option} at a file with at least one row")
    return list(problems)


def cli_main(argv: Sequence[str]) -> int:
    cfg = parse_cli(BCRConfig, argv, prog="bcr train")
    if cfg is None:  # --help
        return 0
    resolve_model_source(cfg.model, gguf_file=cfg.gguf_file)  # a directory, a .gguf file or a Hub id; no weights read
    # Under torchrun only the first process probes the lock: the others may start after it took it.
    preflight(cfg, probe_lock=os.environ.get("RANK", "0") == "0")
    init_distributed(cfg.distributed_timeout)  # a no-op unless launched by torchrun with several processes
    try:
        train = load_train_problems(cfg, "train")
        evals = load_train_problems(cfg, "eval") if cfg.eval_data else None
        trainer = BCRTrainer(cfg.model, train, cfg, eval_problems=evals)
        trainer.train()
    finally:
        teardown_distributed()
    if trainer.rank == 0:
        print(f"done: model and checkpoints in {cfg.output_dir}")
    return 0
