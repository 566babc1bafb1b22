"""bcr: Batched Contextual Reinforcement — train and evaluate LMs that solve N problems in one context.

Public names are imported lazily so that ``import bcr`` stays cheap and a user who only needs the
parser does not pay for transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Problem": "bcr.data.problems",
    "load_problems": "bcr.data.problems",
    "problems_from_records": "bcr.data.problems",
    "make_arithmetic_problems": "bcr.task.synthetic",
    "Bundler": "bcr.data.bundling",
    "render_prompt": "bcr.task.prompts",
    "PromptTemplate": "bcr.task.prompts",
    "parse_completion": "bcr.task.parsing",
    "answers_match": "bcr.task.verify",
    "compute_advantages": "bcr.rl.rewards",
    "BCRConfig": "bcr.rl.config",
    "BCRTrainer": "bcr.rl.trainer",
    "evaluate_scaling": "bcr.eval.sweep",
    "EvalConfig": "bcr.eval.sweep",
    "solve": "bcr.eval.solve",
    "SolveConfig": "bcr.eval.solve",
    "load_model": "bcr.models.loading",
    "ModelLoadError": "bcr.models.loading",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bcr' has no attribute {name!r}")
