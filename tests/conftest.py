"""Shared fixtures: a locally built tokenizer, tiny random models, and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BCR_DATA_DIR", REPO.parent / "shared" / "data"))

# Tiny models decode several times faster on one thread than on two contended ones (CI has 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from bcr.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_qwen2(tiny_tokenizer):
    from bcr.tiny import tiny_model

    return tiny_model(tiny_tokenizer, arch="qwen2", seed=0)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    from bcr.tiny import tiny_model

    return tiny_model(tiny_tokenizer, arch="llama", seed=0)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared maths data not found at {SHARED_DATA} (set BCR_DATA_DIR to run these tests)")
    return SHARED_DATA
