"""bcr: Batched Contextual Reinforcement — train and evaluate LMs that solve N problems in one context.

Public names are imported lazily so that ``import bcr`` stays cheap and a user who only needs the
parser does not pay for transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Problem": "bcr.problems",
    "load_problems": "bcr.problems",
    "make_arithmetic_problems": "bcr.synthetic",
    "Bundler": "bcr.bundling",
    "render_prompt": "bcr.prompts",
    "PromptTemplate": "bcr.prompts",
    "parse_completion": "bcr.parsing",
    "answers_match": "bcr.verify",
    "compute_advantages": "bcr.rewards",
    "BCRConfig": "bcr.config",
    "BCRTrainer": "bcr.trainer",
    "evaluate_scaling": "bcr.evaluation",
    "EvalConfig": "bcr.evaluation",
    "load_model": "bcr.model_loading",
    "ModelLoadError": "bcr.model_loading",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bcr' has no attribute {name!r}")
