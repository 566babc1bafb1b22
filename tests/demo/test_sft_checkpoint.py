"""The demo's SFT survives a kill (``sft.checkpoint_every``): a run killed with SIGKILL and started
again trains bit for bit the model of a run that was not killed, in either of its phases; checkpoints
of other settings are not used; the checkpoints go once the stage is done."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from bcr.demo.config import DemoConfig
from bcr.demo.sft import checkpoint_seconds
from bcr.demo.stages import run_sft
from bcr.runtime.dataclass_cli import load_dataclass

# two phases (9 steps on worked solutions, then 5 on the mix of styles), a checkpoint every 3 steps
SETTINGS = ["task.num_train_problems=200", "task.num_eval_problems=8", "task.styles={steps: 1, direct: 1}",
            "model.vocab_size=400", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
            "model.num_kv_heads=1", "sft.steps=9", "sft.style_steps=5", "sft.batch_size=3", "sft.n_values=[1, 2]",
            "sft.checkpoint_every=3", "progress=false", "threads=1"]

# the child runs the stage and kills itself (SIGKILL) when it is about to take optimizer step KILL_AT
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import bcr.demo.sft as sft
    from bcr.demo.config import DemoConfig
    from bcr.demo.stages import run_sft
    from bcr.runtime.dataclass_cli import load_dataclass
    settings, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
    step, calls = sft.sft_step, [0]
    def counted(*args):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args)
    sft.sft_step = counted
    run_sft(load_dataclass(DemoConfig, overrides=settings))
""")


def _cfg(out) -> DemoConfig:
    return load_dataclass(DemoConfig, overrides=[*SETTINGS, f"output_dir={out}"])


def _weights(out) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(out / "sft" / "model").state_dict()


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_sft(_cfg(out))
    assert not (out / "sft-checkpoints").exists()  # removed once the stage is done
    return out


@pytest.mark.parametrize("kill_at", [8, 13], ids=["in-the-first-phase", "in-the-second-phase"])
def test_a_killed_sft_resumes_to_the_same_model(tmp_path, uninterrupted, kill_at):
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps([*SETTINGS, f"output_dir={tmp_path}"]),
                            str(kill_at)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    saved = sorted(p.name for p in (tmp_path / "sft-checkpoints").glob("*.pt"))
    assert saved == (["steps.pt"] if kill_at <= 9 else ["steps.pt", "styles.pt"])
    assert checkpoint_seconds(tmp_path / "sft-checkpoints")["cpu"] > 0
    run_sft(_cfg(tmp_path))
    whole, resumed = _weights(uninterrupted), _weights(tmp_path)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _losses(tmp_path) == _losses(uninterrupted)
    assert not (tmp_path / "sft-checkpoints").exists()


def test_checkpoints_of_other_settings_are_not_used(tmp_path, uninterrupted, capsys):
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-c", CHILD, json.dumps([*SETTINGS, f"output_dir={other}", "sft.learning_rate=1e-3"]),
                    "8"], capture_output=True, timeout=300)
    (tmp_path / "sft-checkpoints").mkdir()
    for f in (other / "sft-checkpoints").iterdir():  # another learning rate's checkpoints, moved here
        f.rename(tmp_path / "sft-checkpoints" / f.name)
    run_sft(_cfg(tmp_path))
    assert "holds checkpoints of other settings" in capsys.readouterr().out
    whole, fresh = _weights(uninterrupted), _weights(tmp_path)
    assert all(torch.equal(whole[k], fresh[k]) for k in whole)
