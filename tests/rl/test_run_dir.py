"""One run per output_dir, NaN weights, kill -9 leftovers, resume with changed settings.

Real trainings of a tiny random Qwen2 (a couple of steps each); the concurrent run is a second
trainer in this process and a second ``bcr train`` process against a training that is in flight.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from bcr.rl.checkpoint import NonFiniteWeightsError, checkpoint_dirs, find_checkpoint, remove_stale_temporaries
from bcr.rl.config import BCRConfig
from bcr.rl.run_dir import RunDirError, RunLock, lock_holder
from bcr.runtime.io import OutputDirError, check_output_dir
from bcr.task.synthetic import make_arithmetic_problems
from bcr.models.tiny import tiny_model
from bcr.rl.trainer import BCRTrainer

REPO = Path(__file__).resolve().parents[2]


def reward(completion_ids, n_problems, **kw):
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


def _cfg(out, **kw) -> BCRConfig:
    base = {"output_dir": str(out), "n_problems": 1, "num_generations": 2, "max_completion_length": 8,
            "bundles_per_step": 1, "max_steps": 2, "learning_rate": 1e-3, "disable_progress_bar": True,
            "save_total_limit": None}
    base.update(kw)
    return BCRConfig(**base)


def _train(tokenizer, problems, out, reward_fn=reward, **kw) -> BCRTrainer:
    trainer = BCRTrainer(tiny_model(tokenizer, seed=0), problems, _cfg(out, **kw), tokenizer=tokenizer,
                         reward_fn=reward_fn)
    trainer.train()
    return trainer


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def problems():
    return make_arithmetic_problems(8, seed=3)


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_model(tiny_tokenizer, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
def test_a_second_concurrent_run_is_refused(tmp_path, tiny_tokenizer, problems, model_dir):
    out = tmp_path / "run"
    in_rollout, finish = threading.Event(), threading.Event()

    def waiting_reward(**kw):  # holds the first run inside its first step until the checks are done
        in_rollout.set()
        assert finish.wait(300), "the test never released the first run"
        return reward(**kw)

    first: dict = {}

    def run_first():
        try:
            first["trainer"] = _train(tiny_tokenizer, problems, out, reward_fn=waiting_reward)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            first["error"] = err
            in_rollout.set()

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert in_rollout.wait(300) and "error" not in first, first.get("error")
        assert f"pid {os.getpid()}" in (lock_holder(out) or "")
        # another trainer in this process ...
        second = BCRTrainer(tiny_model(tiny_tokenizer, seed=1), problems, _cfg(out, max_steps=1),
                            tokenizer=tiny_tokenizer, reward_fn=reward)
        with pytest.raises(RunDirError, match="in use by another bcr run"):
            second.train()
        # ... and another process, refused before it loads the model
        proc = subprocess.run(
            [sys.executable, "-m", "bcr", "train", f"model={model_dir}", f"output_dir={out}", "train_data=synthetic",
             "limit=8", "n_problems=1", "num_generations=2", "max_completion_length=8", "bundles_per_step=1",
             "max_steps=1", "disable_progress_bar=true"],
            capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "in use by another bcr run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    finally:
        finish.set()
        thread.join(600)
    assert "error" not in first, first.get("error")
    assert _steps(out) == [1, 2]  # the first run alone wrote its metrics and checkpoints
    run_id = first["trainer"].run_id
    assert run_id and _state(out / "checkpoint-2")["run_id"] == run_id
    assert lock_holder(out) is None  # released when the run ended


def test_a_fresh_start_over_another_run_needs_overwrite_or_resume(tmp_path, tiny_tokenizer, problems):
    out = tmp_path / "run"
    old = _train(tiny_tokenizer, problems, out, max_steps=2)
    with pytest.raises(RunDirError, match="overwrite_output_dir=true") as err:
        _train(tiny_tokenizer, problems, out, max_steps=1)
    assert "resume_from=latest" in str(err.value) and "checkpoint-2" in str(err.value)
    assert _steps(out) == [1, 2] and [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2"]

    new = _train(tiny_tokenizer, problems, out, max_steps=1, overwrite_output_dir=True)
    assert new.run_id != old.run_id
    assert _steps(out) == [1] and [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1"]
    assert find_checkpoint(out, "latest") == out / "checkpoint-1"  # never the older run's checkpoint-2

    with pytest.warns(UserWarning, match=r"changed settings: max_steps 1 -> 2"):
        resumed = _train(tiny_tokenizer, problems, out, max_steps=2, resume_from="latest")
    assert resumed.run_id == new.run_id and _state(out / "checkpoint-2")["run_id"] == new.run_id
    assert _steps(out) == [1, 2]


def test_resume_with_a_changed_schedule_warns_and_follows_the_new_one(tmp_path, tiny_tokenizer, problems):
    out = tmp_path / "run"
    _train(tiny_tokenizer, problems, out, max_steps=2, lr_scheduler_type="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning, the schedule is left as saved
        same = BCRTrainer(tiny_model(tiny_tokenizer, seed=0), problems,
                          _cfg(out, max_steps=2, lr_scheduler_type="linear", resume_from="latest"),
                          tokenizer=tiny_tokenizer, reward_fn=reward)
        same._resume(find_checkpoint(out, "latest"))
    with pytest.warns(UserWarning, match=r"max_steps 2 -> 4, learning_rate 0.001 -> 0.002"):
        _train(tiny_tokenizer, problems, out, max_steps=4, learning_rate=2e-3, lr_scheduler_type="linear",
               resume_from="latest")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the first resumed update runs on the new linear schedule (2 of 4 updates done: half the new peak),
    # not at the 0.0 where the old 2-step schedule ended
    assert rows[2]["learning_rate"] == pytest.approx(2e-3 * 0.5)
    assert rows[3]["learning_rate"] == pytest.approx(2e-3 * 0.25)


def test_nan_weights_stop_the_run_at_that_step_and_keep_the_last_good_checkpoint(tmp_path, tiny_tokenizer,
                                                                                   problems):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    _train(tiny_tokenizer, problems, out, max_steps=2)
    # an absurd learning rate: AdamW's decoupled decay multiplies every weight by 1 - lr * weight_decay
    # = -1e40 in the update of step 3, which overflows float32 to inf
    with pytest.warns(UserWarning, match="changed settings"), \
            pytest.raises(NonFiniteWeightsError, match=r"^step 3: .*NaN/inf") as err:
        _train(tiny_tokenizer, problems, out, max_steps=4, learning_rate=1e20, weight_decay=1e20,
               resume_from="latest")
    assert "learning_rate" in str(err.value) and "max_grad_norm" in str(err.value)
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2"] and _steps(out) == [1, 2]
    good = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert lock_holder(out) is None
    # and the run continues from it with a sane learning rate
    with pytest.warns(UserWarning, match="max_steps 2 -> 3"):
        _train(tiny_tokenizer, problems, out, max_steps=3, resume_from="latest")
    assert _steps(out) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
_KILL_MID_WRITE = """
import os, signal, sys
from transformers import AutoModelForCausalLM
from bcr.rl.checkpoint import save_checkpoint

class KilledWhileSaving:  # the tokenizer is written after the weights: kill -9 in between
    def save_pretrained(self, path):
        os.kill(os.getpid(), signal.SIGKILL)

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
save_checkpoint(sys.argv[2], 1, model=model, tokenizer=KilledWhileSaving())
"""


def test_kill_9_leftovers_are_removed_when_a_run_starts(tmp_path, tiny_tokenizer, problems, model_dir):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(model_dir), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-1-")]
    assert leftovers and (leftovers[0] / "model.safetensors").is_file()  # a half-written checkpoint
    assert checkpoint_dirs(out) == []  # which never counts as one

    _train(tiny_tokenizer, problems, out, max_steps=1)
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", ".old"))]
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1"]


def test_remove_stale_temporaries_puts_back_a_checkpoint_caught_mid_rewrite(tmp_path):
    for name in (".tmp-checkpoint-3-77", ".tmp-final-77", ".old-checkpoint-2-77", ".old-checkpoint-1-77",
                 "checkpoint-1", ".keep-me"):
        (tmp_path / name).mkdir()
    (tmp_path / ".old-checkpoint-2-77" / "trainer_state.json").write_text('{"step": 2}')
    (tmp_path / ".old-checkpoint-1-77" / "trainer_state.json").write_text('{"step": 1}')
    handled = remove_stale_temporaries(tmp_path)
    assert sorted(handled) == [".old-checkpoint-1-77", ".old-checkpoint-2-77", ".tmp-checkpoint-3-77",
                               ".tmp-final-77"]
    # checkpoint-2 was moved aside and the kill came before its new copy was renamed in: put back;
    # checkpoint-1's new copy made it: the old one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep-me", "checkpoint-1", "checkpoint-2"]
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text()) == {"step": 2}


_LOCK_AND_DIE = """
import os, signal, sys
from bcr.rl.run_dir import RunLock

RunLock(sys.argv[1]).acquire({"pid": os.getpid(), "host": "h", "run_id": "killed", "started": "t"})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_of_a_killed_run_is_never_stale(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _LOCK_AND_DIE, str(tmp_path)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "killed" in (tmp_path / ".bcr-run.lock").read_text()  # its record is still there ...
    assert lock_holder(tmp_path) is None  # ... but the kernel released its lock
    lock = RunLock(tmp_path)
    lock.acquire({"pid": os.getpid()})
    try:
        assert lock.held and lock_holder(tmp_path) == f"pid {os.getpid()}"
        with pytest.raises(RunDirError, match="in use"):
            RunLock(tmp_path).acquire({})
    finally:
        lock.release()
    assert lock_holder(tmp_path) is None


def test_output_dir_checks_write_nothing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        check_output_dir(a_file)
    with pytest.raises(OutputDirError, match="cannot be created"):
        check_output_dir(a_file / "sub" / "run")
    with pytest.raises(OutputDirError, match="output_dir is empty"):
        check_output_dir("")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory, so none is unwritable")
def test_an_unwritable_output_dir_is_refused(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            check_output_dir(locked / "run")
    finally:
        locked.chmod(0o700)


def test_non_finite_parameters_are_named_with_the_step(tiny_qwen2):
    from bcr.rl.checkpoint import assert_finite_parameters

    assert_finite_parameters(tiny_qwen2, 5)  # finite: nothing happens
    name, param = list(tiny_qwen2.named_parameters())[3]
    with torch.no_grad():
        param.view(-1)[0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match=rf"^step 5: .*parameter {name} NaN/inf"):
        assert_finite_parameters(tiny_qwen2, 5)
    param.requires_grad_(False)  # a frozen parameter is not the update's doing
    assert_finite_parameters(tiny_qwen2, 5)
