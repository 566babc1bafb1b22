"""The vLLM test group: runs in ``.venv-vllm`` (``make test-vllm``, which ``make test`` calls), where
``vllm-cpu`` is installed beside the project's torch. In an environment without vllm every test here
skips with that reason; in ``.venv-vllm`` none may skip (``make test-vllm`` fails on a skip)."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB; vLLM would take 30 % of RAM without it
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _has_vllm() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # not a namespace package of folders named vllm


REQUIRED = os.environ.get("BCR_REQUIRE_VLLM") == "1"  # make test-vllm: vllm must be here, no test may skip


def pytest_collection_modifyitems(config, items):
    if _has_vllm():
        return
    if REQUIRED:
        raise pytest.UsageError("BCR_REQUIRE_VLLM=1 but vllm does not import here (run make install-vllm)")
    skip = pytest.mark.skip(reason="vllm is not installed here: the vLLM tests run in .venv-vllm (make test-vllm)")
    for item in items:
        if "tests/with_vllm/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped and "tests/with_vllm/" in str(item.fspath).replace(os.sep, "/"):
        report.outcome = "failed"
        report.longrepr = f"skipped under BCR_REQUIRE_VLLM=1 (make test-vllm runs every vLLM test): {report.longrepr}"
