"""Scale-out on CPU: 2 gloo processes launched by torchrun (``python -m torch.distributed.run``).

- a 2-step run at world size 2 equals world size 1 (same global batch and seed), for plain data
  parallel (``ddp``) and for FSDP2 (``fully_shard`` works on CPU/gloo too);
- a checkpoint written at world size 2 resumes at world size 1 and continues as the uninterrupted run;
- ``torchrun ... -m bcr eval`` writes the same results.jsonl and summary.json as one process;
- the bf16 mixed-precision policy (FSDP2, on 2 ranks and on the one-rank mesh of a single process):
  the forward sees bf16 weights and q/k/v and the LM head bf16 inputs, the optimizer holds fp32
  weights, gradients are reduced in fp32, and the update matches the fp32 one within bf16 tolerance;
- a rank that raises inside the step (``BCR_TEST_FAIL_RANK=1``, a test hook) ends the job with a clear
  error from every rank, never a hang.

Every launch has a hard timeout. This file doubles as the worker script: ``python
tests/rl/test_distributed.py train ...`` is what each torchrun process runs.
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

pytestmark = pytest.mark.slow  # end to end: a whole pipeline, a process group or a child script

REPO = Path(__file__).resolve().parents[2]
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
    from bcr.task.synthetic import make_arithmetic_problems

    return make_arithmetic_problems(12, seed=3)


def _cfg(out, **kw):
    """adam_epsilon=1 with lr=1 makes AdamW's update about -g: smooth in the gradient (with a small epsilon
    it is sign(g), which blows rounding noise of near-zero gradients up to lr)."""
    from bcr.rl.config import BCRConfig

    base = {"output_dir": str(out), "n_problems": 2, "num_generations": 2, "max_completion_length": 16,
            "bundles_per_step": 2, "max_steps": 2, "learning_rate": 1.0, "adam_epsilon": 1.0, "scale_rewards": "batch",
            "disable_progress_bar": True, "save_total_limit": None, "save_steps": 1, "seed": 5}
    base.update(kw)
    return BCRConfig(**base)


def _train(model_dir, out, **kw):
    from bcr.rl.trainer import BCRTrainer

    trainer = BCRTrainer(str(model_dir), _problems(), _cfg(out, **kw), reward_fn=instance_token_reward)
    trainer.train()
    return trainer


def _worker(argv: list[str]) -> None:
    """``train MODEL_DIR OUT STRATEGY``: one torchrun process of the training scenario;
    ``mixed_precision MODEL_DIR OUT``: one process of the mixed-precision checks."""
    torch.set_num_threads(1)
    from bcr.runtime.distributed import init_distributed, teardown_distributed

    mode, model_dir, out, *rest = argv
    assert mode in ("train", "mixed_precision")
    init_distributed(timeout_s=60)
    try:
        if mode == "mixed_precision":
            _mixed_precision(model_dir, Path(out))
        else:
            strategy, *extra = rest
            _train(model_dir, out, distributed_strategy=strategy, **dict(_option(kv) for kv in extra))
    finally:
        teardown_distributed()


def _option(text: str) -> tuple[str, object]:
    """``key=value`` of the worker's command line; the value parsed as JSON when it is JSON."""
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _one_step_samples(trainer):
    """The samples of step 0, as ``training_step`` builds them."""
    from bcr.task.prompts import render_prompt

    bundles = trainer.bundles.step_bundles(0)
    prompts = [render_prompt(problems, trainer.tokenizer, trainer.template) for _, problems in bundles]
    with trainer.scale.full_weights(trainer.policy):
        groups = trainer.engine.generate(prompts, num_generations=2, max_new_tokens=16, seed=[j for j, _ in bundles])
    scored = trainer.score(prompts, [problems for _, problems in bundles], groups)
    return trainer.samples(groups, scored.parsed, trainer.advantages(scored.rewards))


def _full(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 shard (every rank must call it), or ``p`` itself."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _mixed_precision(model_dir, out: Path) -> None:
    """One update on the same samples with fp32 and with the bf16 policy (FSDP2 both), recording the
    dtypes the forward, the LM head, the optimizer and the gradient reduction see; rank 0 writes
    them with the update's parameter deltas to ``out/mixed_precision.json``."""
    import torch.distributed as dist
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import bcr.rl.trainer as trainer_module
    from bcr.runtime.distributed import dist_info
    from bcr.rl.trainer import BCRTrainer, training_attention

    seen: dict = {}
    real_attention = ALL_ATTENTION_FUNCTIONS[training_attention()]

    def attention_spy(module, query, key, value, *args, **kwargs):
        seen.setdefault("attention", set()).add((str(query.dtype), str(key.dtype), str(value.dtype),
                                                  str(module.q_proj.weight.dtype)))
        return real_attention(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("bcr_spy", attention_spy)
    real_head = trainer_module.fused_linear_policy_loss

    def head_spy(hidden, weight, *args, **kwargs):
        seen.setdefault("head", set()).add((str(hidden.dtype), str(weight.dtype)))
        return real_head(hidden, weight, *args, **kwargs)

    trainer_module.fused_linear_policy_loss = head_spy
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # whichever FSDP2 calls
        real = getattr(dist, name, None)
        if real is not None:
            def spy(*args, _real=real, **kwargs):
                tensor = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
                seen.setdefault("reduce", set()).add(str(tensor.dtype))
                return _real(*args, **kwargs)

            setattr(dist, name, spy)

    result = {"world_size": dist_info()[1]}
    deltas = {}
    samples = None
    for bf16 in (False, True):
        seen.clear()
        cfg = {"distributed_strategy": "fsdp2", "bf16": bf16, "attn_implementation": "bcr_spy", "max_steps": 1}
        trainer = BCRTrainer(str(model_dir), _problems(), _cfg(out / str(bf16), **cfg), reward_fn=instance_token_reward)
        before = [_full(p).clone() for p in trainer.model.parameters()]
        samples = samples or _one_step_samples(trainer)  # the fp32 policy's samples, for both updates
        seen.clear()
        metrics = trainer.update(samples).reduce()
        after = [_full(p) for p in trainer.model.parameters()]
        deltas[bf16] = torch.cat([(a - b).reshape(-1) for a, b in zip(after, before)])
        result[f"bf16={bf16}"] = {
            "strategy": trainer.scale.name,
            "attention": sorted(seen.get("attention", ())), "head": sorted(seen.get("head", ())),
            "reduce": sorted(seen.get("reduce", ())),
            "optimizer_params": sorted({str(p.dtype) for g in trainer.optimizer.param_groups for p in g["params"]}),
            "grads": sorted({str(p.grad.dtype) for p in trainer.params if p.grad is not None}),
            "model_params": sorted({str(p.dtype) for p in trainer.model.parameters()}),
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "skipped": metrics["skipped_updates"],
        }
        if bf16:  # the bf16 run's checkpoint and final model: fp32 master weights, gathered to rank 0
            trainer.step = 1
            trainer.save_checkpoint()
            trainer.save()
            names = [n for n, _ in trainer.model.named_parameters()]
            if dist_info()[0] == 0:
                torch.save(dict(zip(names, after)), out / "bf16_after.pt")
    result["delta_norm"] = float(deltas[False].norm())
    result["delta_rel_error"] = float((deltas[True] - deltas[False]).norm() / deltas[False].norm())
    if dist_info()[0] == 0:
        (out / "mixed_precision.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from bcr.models.tiny import tiny_model

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


@pytest.mark.parametrize("nproc", [2, 1])
def test_bf16_policy_computes_in_bf16_keeps_fp32_masters_and_reduces_in_fp32(tmp_path, model_dir, nproc):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on 2 gloo ranks, and on the
    one-rank mesh a single process builds itself (the single-GPU path), against an fp32 update of
    the same samples."""
    proc, _ = _torchrun([__file__, "mixed_precision", str(model_dir), str(tmp_path)], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = json.loads((tmp_path / "mixed_precision.json").read_text())
    assert got["world_size"] == nproc
    # fp32 in one process needs no sharding; bf16 always runs FSDP2 (a one-rank mesh in one process)
    assert got["bf16=False"]["strategy"] == ("fsdp2" if nproc > 1 else "none")
    assert got["bf16=True"]["strategy"] == "fsdp2"
    fp32, bf16 = got["bf16=False"], got["bf16=True"]
    f32, b16 = "torch.float32", "torch.bfloat16"
    assert fp32["attention"] == [[f32, f32, f32, f32]] and fp32["head"] == [[f32, f32]]
    # the packed forward sees bf16 weights and bf16 q/k/v; the LM head gets bf16 hidden states and weight
    assert bf16["attention"] == [[b16, b16, b16, b16]] and bf16["head"] == [[b16, b16]]
    # the optimizer steps fp32 master weights with fp32 gradients, reduced over ranks in fp32
    assert bf16["optimizer_params"] == bf16["model_params"] == bf16["grads"] == [f32]
    if nproc > 1:
        assert bf16["reduce"] == [f32] and fp32["reduce"] == [f32]
    # the update matches the fp32 one within bf16 rounding
    assert fp32["skipped"] == bf16["skipped"] == 0
    assert got["delta_norm"] > 1e-3
    assert got["delta_rel_error"] < 0.05, got
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2, abs=1e-3)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=5e-2)
    # the sharded checkpoint (optimizer through DCP) and the final HF directory hold the fp32 masters
    assert (tmp_path / "True" / "checkpoint-1" / "optimizer" / ".metadata").is_file()
    after = torch.load(tmp_path / "bf16_after.pt")
    saved = _load(tmp_path / "True")
    assert all(v.dtype == torch.float32 for v in saved.values())
    for k, v in after.items():
        assert torch.equal(saved[k], v), k


def test_uneven_micro_batch_counts_under_fsdp2_train_like_one_process(tmp_path, model_dir):
    """3 bundles on 2 ranks with one sample per micro-batch: rank 0 runs 4 rows, rank 1 runs 2 and
    repeats one with zero weight twice (every FSDP2 forward/backward is a collective)."""
    opts = {"bundles_per_step": 3, "gradient_accumulation_steps": 4, "max_steps": 1, "save_steps": 0}
    one = _train(model_dir, tmp_path / "ws1", **opts)
    want = {k: v.detach().clone() for k, v in one.model.named_parameters()}
    proc, _ = _torchrun([__file__, "train", str(model_dir), str(tmp_path / "ws2"), "fsdp2",
                         *(f"{k}={v}" for k, v in opts.items())])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert any(not torch.equal(_load(model_dir)[k], v) for k, v in want.items())  # it trained
    _assert_params_close(_load(tmp_path / "ws2"), want)


def test_vllm_data_parallel_rollouts(tmp_path, model_dir):
    """Each rank drives its own colocated vLLM engine; needs vllm and two GPUs (skipped elsewhere)."""
    pytest.importorskip("vllm")
    if torch.cuda.device_count() < 2:
        pytest.skip("vLLM data-parallel rollouts need 2 GPUs")
    proc, _ = _torchrun([__file__, "train", str(model_dir), str(tmp_path / "out"), "auto", "rollout_engine=vllm"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()


def test_two_process_evaluation_equals_one_process(tmp_path, model_dir):
    from bcr.eval.sweep import evaluate_scaling
    from bcr.eval.scaling import strip_timing

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
    from bcr.rl.config import BCRConfig
    from bcr.runtime.dataclass_cli import ConfigError
    from bcr.runtime.distributed import SingleProcess, global_std, make_strategy, resolve_strategy
    from bcr.rl.rewards import compute_advantages

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert type(make_strategy("auto", cpu)) is SingleProcess and type(make_strategy("fsdp2", cpu)) is SingleProcess
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    assert SingleProcess(cpu).reduce_and_clip(params, 0.0) == pytest.approx(20 ** 0.5)
    assert params[0].grad.tolist() == [2.0] * 3  # no clipping at max_norm 0
    assert SingleProcess(cpu).reduce_and_clip(params, 1.0) == pytest.approx(20 ** 0.5)
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)
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
