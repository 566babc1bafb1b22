"""Scale-out on CPU: 2 gloo processes launched by torchrun (``python -m torch.distributed.run``).

- a 2-step run at world size 2 equals world size 1 (same global batch and seed), for plain data
  parallel (``ddp``) and for FSDP2 (``fully_shard`` works on CPU/gloo too);
- a checkpoint written at world size 2 resumes at world size 1 and continues as the uninterrupted run;
- ``torchrun ... -m bcr eval`` writes the same results.jsonl and summary.json as one process;
- a rank that raises inside the step (``BCR_TEST_FAIL_RANK=1``, a test hook) ends the job with a clear
  error from every rank, never a hang.

Every launch has a hard timeout. This file doubles as the worker script: ``python
tests/test_distributed.py train ...`` is what each torchrun process runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 150  # seconds: a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], *, env: dict | None = None, nproc: int = 2) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "--monitor-interval", "0.2", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT} s (a hang):\n{err.stdout}\n{err.stderr}")
    return proc, time.monotonic() - start


# ------------------------------------------------------------------------------------------------
# Shared setup (also used by the worker processes)
# ------------------------------------------------------------------------------------------------
def instance_token_reward(completion_ids, n_problems, **kw):
    """A dense per-instance reward, so every step has a non-zero update."""
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


def _problems():
    from bcr.synthetic import make_arithmetic_problems

    return make_arithmetic_problems(12, seed=3)


def _cfg(out, **kw):
    """adam_epsilon=1 with lr=1 makes AdamW's update about -g: smooth in the gradient (with a small epsilon
    it is sign(g), which blows rounding noise of near-zero gradients up to lr)."""
    from bcr.config import BCRConfig

    base = {"output_dir": str(out), "n_problems": 2, "num_generations": 2, "max_completion_length": 16,
            "bundles_per_step": 2, "max_steps": 2, "learning_rate": 1.0, "adam_epsilon": 1.0, "scale_rewards": "batch",
            "disable_progress_bar": True, "save_total_limit": None, "save_steps": 1, "seed": 5}
    base.update(kw)
    return BCRConfig(**base)


def _train(model_dir, out, **kw):
    from bcr.trainer import BCRTrainer

    trainer = BCRTrainer(str(model_dir), _problems(), _cfg(out, **kw), reward_fn=instance_token_reward)
    trainer.train()
    return trainer


def _worker(argv: list[str]) -> None:
    """``train MODEL_DIR OUT STRATEGY``: one torchrun process of the training scenario."""
    torch.set_num_threads(1)
    from bcr.distributed import init_distributed, teardown_distributed

    mode, model_dir, out, strategy, *extra = argv
    assert mode == "train"
    init_distributed(timeout_s=60)
    try:
        _train(model_dir, out, distributed_strategy=strategy, **dict(kv.split("=", 1) for kv in extra))
    finally:
        teardown_distributed()


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from bcr.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny")
    tiny_model(tiny_tokenizer, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """The uninterrupted single-process run: final parameters and metrics rows."""
    out = tmp_path_factory.mktemp("ws1")
    trainer = _train(model_dir, out)
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return params, rows


def _load(path):
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).named_parameters()}


def _assert_params_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_like_one_and_resume_at_world_size_one(tmp_path, model_dir, reference, strategy):
    ref_params, ref_rows = reference
    out = tmp_path / "ws2"
    proc, _ = _torchrun([__file__, "train", str(model_dir), str(out), strategy])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # (1) world size 2 == world size 1: the final HF directory (rank 0 wrote it) holds the same weights
    initial = _load(model_dir)
    assert any(not torch.equal(initial[k], v) for k, v in ref_params.items())  # the run did train
    _assert_params_close(_load(out), ref_params)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for got, want in zip(rows, ref_rows):  # metrics were all-reduced over both ranks before logging
        for key in ("reward", "reward_std", "completions/mean_length", "loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), (got["step"], key)
    ckpt = out / "checkpoint-1"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    if strategy == "fsdp2":  # optimizer shards through torch.distributed.checkpoint
        assert (ckpt / "optimizer" / ".metadata").is_file() and not (ckpt / "optimizer.pt").exists()
    else:
        assert (ckpt / "optimizer.pt").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    # (2) the step-1 checkpoint of the 2-process run resumes in one process and ends where the
    # uninterrupted run ended (weights, optimizer state and data position all carried over)
    resumed_out = tmp_path / "resumed"
    trainer = _train(model_dir, resumed_out, resume_from=str(ckpt))
    assert trainer.step == 2
    _assert_params_close({k: v.detach() for k, v in trainer.model.named_parameters()}, ref_params)
    resumed_rows = [json.loads(line) for line in (resumed_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_rows] == [2]
    assert resumed_rows[0]["reward"] == pytest.approx(ref_rows[1]["reward"], rel=1e-6)


def test_vllm_data_parallel_rollouts(tmp_path, model_dir):
    """Each rank drives its own colocated vLLM engine; needs vllm and two GPUs (skipped elsewhere)."""
    pytest.importorskip("vllm")
    if torch.cuda.device_count() < 2:
        pytest.skip("vLLM data-parallel rollouts need 2 GPUs")
    proc, _ = _torchrun([__file__, "train", str(model_dir), str(tmp_path / "out"), "auto", "rollout_engine=vllm"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()


def test_two_process_evaluation_equals_one_process(tmp_path, model_dir):
    from bcr.evaluation import evaluate_scaling
    from bcr.scaling import strip_timing

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n"
                            for p in _problems()[:7]))
    opts = {"n_values": [1, 3], "samples_per_bundle": 2, "max_completion_length": 12, "batch_size": 1,
            "temperature": 1.0, "top_p": 1.0, "n_bootstrap": 50, "plots": False, "progress": False}
    evaluate_scaling({"tiny": str(model_dir)}, str(data), output_dir=str(tmp_path / "one"), **opts)

    args = ["-m", "bcr", "eval", f"models={{tiny: {model_dir}}}", f"benchmark={data}",
            f"output_dir={tmp_path / 'two'}", "n_values=[1,3]", "samples_per_bundle=2", "max_completion_length=12",
            "batch_size=1", "temperature=1.0", "top_p=1.0", "n_bootstrap=50", "plots=false", "progress=false"]
    proc, _ = _torchrun(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("task-scaling sweep") == 1  # only rank 0 prints

    def lines(path):
        return [strip_timing(json.loads(line)) for line in path.read_text().splitlines()]

    one, two = tmp_path / "one", tmp_path / "two"
    assert len(lines(two / "results.jsonl")) == 2 * (7 + 3)
    assert lines(two / "results.jsonl") == lines(one / "results.jsonl")
    assert strip_timing(json.loads((two / "summary.json").read_text())) == strip_timing(
        json.loads((one / "summary.json").read_text()))
    assert not list(two.glob("results.rank*.jsonl"))  # the shards were merged and removed


def test_a_failing_rank_stops_every_rank_with_a_clear_error(tmp_path, model_dir):
    args = ["-m", "bcr", "train", f"model={model_dir}", f"output_dir={tmp_path / 'out'}", "train_data=synthetic",
            "limit=8", "n_problems=1", "num_generations=2", "max_completion_length=8", "bundles_per_step=2",
            "max_steps=3", "disable_progress_bar=true", "distributed_timeout=60"]
    proc, elapsed = _torchrun(args, env={"BCR_TEST_FAIL_RANK": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert elapsed < LAUNCH_TIMEOUT
    # rank 1 reports its own error ...
    assert "BCR_TEST_FAIL_RANK=1: injected failure on rank 1 in training step 1" in text, text[-4000:]
    # ... and rank 0 says why it stops, naming rank 1 and its error
    assert "rank 0/2: stopping because rank 1 failed in training step 1: RuntimeError" in text, text[-4000:]
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_strategy_resolution_and_global_std():
    from bcr.config import BCRConfig
    from bcr.dataclass_cli import ConfigError
    from bcr.distributed import global_std, resolve_strategy
    from bcr.rewards import compute_advantages

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_strategy("auto", 1, cuda) == "none"
    assert resolve_strategy("auto", 2, cuda) == "fsdp2" and resolve_strategy("auto", 2, cpu) == "ddp"
    assert resolve_strategy("fsdp2", 4, cpu) == "fsdp2"
    with pytest.raises(ConfigError, match="distributed_strategy"):
        BCRConfig(distributed_strategy="zero3")
    with pytest.raises(ConfigError, match="distributed_timeout"):
        BCRConfig(distributed_timeout=0)
    rewards = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0], [1.0], [0.0]])]
    flat = torch.cat([r.reshape(-1) for r in rewards])
    assert global_std(rewards) == pytest.approx(float(flat.std()))
    a = compute_advantages(rewards, scale_rewards="batch")
    b = compute_advantages(rewards, scale_rewards="batch", batch_std=global_std(rewards))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    c = compute_advantages(rewards, scale_rewards="batch", batch_std=2.0)
    torch.testing.assert_close(c[1], (rewards[1] - rewards[1].mean(0)) / (2.0 + 1e-4))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_without_shared_prompts_train_like_one_with_them(tmp_path, model_dir, reference, strategy):
    """The reference run packs each group's prompt once (shared_prompt=auto, G = 2); two ranks that do
    not share prompts end with the same weights."""
    out = tmp_path / "ws2-unshared"
    proc, _ = _torchrun([__file__, "train", str(model_dir), str(out), strategy, "shared_prompt=false"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref_params, ref_rows = reference
    _assert_params_close(_load(out), ref_params)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens/saved_by_shared_prompt"] == 0 for r in rows)
    assert all(r["tokens/saved_by_shared_prompt"] > 0 for r in ref_rows)


if __name__ == "__main__":
    _worker(sys.argv[1:])
