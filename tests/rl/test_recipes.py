"""Every recipe under recipes/ parses into a valid BCRConfig and says whether it has been run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bcr.rl.config import BCRConfig

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"bcr-r1-distill-qwen-1.5b.yaml", "bcr-qwen3-4b.yaml", "smollm2-135m-cpu.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_states_its_status(path):
    cfg = BCRConfig.from_yaml(path)
    assert cfg.model and cfg.train_data and cfg.max_steps >= 1
    header = path.read_text().split("\nmodel:")[0]
    assert "Status: NEVER RUN" in header or "Status: RUN" in header


def test_gpu_recipes_fit_the_16k_context():
    for path in RECIPES:
        cfg = BCRConfig.from_yaml(path)
        if cfg.max_prompt_length is not None:
            assert cfg.max_prompt_length + cfg.max_completion_length <= 16384, path.name
