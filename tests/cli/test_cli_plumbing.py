"""The configuration plumbing and the error boundary shared by every ``bcr`` command, and the tiny
local model builders."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bcr.cli import main
from bcr.runtime.dataclass_cli import ConfigError, dataclass_help, load_dataclass, parse_cli, to_yaml


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = 10
    n_problems: object = 3
    name: str = "run"
    values: list = dataclasses.field(default_factory=lambda: [1, 2], metadata={"help": "the Ns to sweep"})


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 4\nn_problems: {2: 1.0, 3: 2.0}\n")
    cfg = load_dataclass(_Cfg, path, ["steps=7", "values=[1, 4, 8]", "name=my run"])
    assert cfg == _Cfg(lr=0.5, steps=7, n_problems={2: 1.0, 3: 2.0}, name="my run", values=[1, 4, 8])


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\n")
    assert load_dataclass(_Cfg, path).lr == 1e-4
    assert load_dataclass(_Cfg, None, ["lr=3E5", "name=1e2x"]) == _Cfg(lr=3e5, name="1e2x")


def test_round_trip_through_yaml(tmp_path):
    cfg = _Cfg(lr=2e-5, values=[3])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_dataclass(_Cfg, path) == cfg


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean steps"):
        load_dataclass(_Cfg, None, ["stpes=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataclass(_Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_dataclass(_Cfg, bad)


def test_parse_cli_forms(capsys):
    assert parse_cli(_Cfg, ["--help"], "bcr x") is None
    out = capsys.readouterr().out
    assert "steps = 10" in out and "the Ns to sweep" in out
    cfg = parse_cli(_Cfg, ["--steps", "5", "--lr=0.25", "name=a"], "bcr x")
    assert (cfg.steps, cfg.lr, cfg.name) == (5, 0.25, "a")
    assert "lr = 0.001" in dataclass_help(_Cfg)


def test_top_level_cli_usage(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny_tokenizer):
    text = "### Problem 2\nStep 1: 7 + 12 = 19\nAnswer 2: \\boxed{\\frac{1}{2}} — ü"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_is_seeded_and_saveable(tiny_tokenizer, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from bcr.models.tiny import tiny_model

    a = tiny_model(tiny_tokenizer, arch=arch, seed=3)
    b = tiny_model(tiny_tokenizer, arch=arch, seed=3)
    c = tiny_model(tiny_tokenizer, arch=arch, seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    a.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[1, 5, 9, 11]])
    torch.testing.assert_close(loaded(x).logits, a(x).logits)


# ------------------------------------------------------------------------------------------------
# One error boundary for bcr train / eval / demo: one line on stderr, a status, no traceback
# ------------------------------------------------------------------------------------------------
def _env() -> dict:
    repo = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": str(repo), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
            "BCR_DEBUG": ""}


def _bcr(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bcr", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**_env(), "PYTHONFAULTHANDLER": "1"})


def _assert_one_line_error(rc: int, stderr: str, status: int, *needles: str) -> None:
    assert rc == status, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


@pytest.fixture
def cli_files(tmp_path, tiny_tokenizer):
    """A tiny model, one with unreadable weights, and data files good and bad."""
    from bcr.task.synthetic import make_arithmetic_problems
    from bcr.models.tiny import tiny_model

    files = {"model": tmp_path / "tiny", "broken": tmp_path / "broken", "file": tmp_path / "a-file"}
    tiny_model(tiny_tokenizer, seed=0).save_pretrained(files["model"])
    tiny_tokenizer.save_pretrained(files["model"])
    files["broken"].mkdir()
    (files["broken"] / "config.json").write_text((files["model"] / "config.json").read_text())
    (files["broken"] / "model.safetensors").write_bytes(b"not weights")  # loading it would fail loudly
    files["file"].write_text("not a directory")
    rows = [json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer})
            for p in make_arithmetic_problems(4, seed=0)]
    files["data"] = tmp_path / "data.jsonl"
    files["data"].write_text("\n".join(rows) + "\n")
    files["malformed"] = tmp_path / "malformed.jsonl"
    files["malformed"].write_text(rows[0] + '\n{"problem": "1 + 1"}\n')
    files["empty"] = tmp_path / "empty.jsonl"
    files["empty"].write_text("")
    files["latin1"] = tmp_path / "latin1.jsonl"
    files["latin1"].write_bytes((rows[0] + "\n").encode() + '{"problem": "café", "answer": "1"}\n'.encode("latin-1"))
    return files


def test_user_errors_are_one_line_without_a_traceback(tmp_path, cli_files):
    f = cli_files
    out = tmp_path / "out"
    train = ("train", "train_data=synthetic", "limit=4", "n_problems=1", "num_generations=2",
             "max_completion_length=8", "bundles_per_step=1", "max_steps=1", "disable_progress_bar=true")
    cases = {  # name: (argv, status, words the line must hold)
        "eval unknown benchmark": (("eval", f"model={f['model']}", "benchmark=nope", f"output_dir={out}"), 2,
                                   ["'nope'", "benchmark"]),
        "eval malformed row": (("eval", f"model={f['model']}", f"benchmark={f['malformed']}", f"output_dir={out}"), 2,
                               [f"{f['malformed']}:2", "answer"]),
        "eval missing model": (("eval", f"model={tmp_path / 'missing'}", f"benchmark={f['data']}", f"output_dir={out}"),
                               2, ["does not exist"]),
        "eval output_dir is a file": (("eval", f"model={f['broken']}", f"benchmark={f['data']}",
                                       f"output_dir={f['file']}"), 2, ["is a file"]),
        "train output_dir is a file": ((*train, f"model={f['broken']}", f"output_dir={f['file']}"), 2, ["is a file"]),
        "train empty data file": ((*train, f"model={f['model']}", f"train_data={f['empty']}", f"output_dir={out}"), 2,
                                  [str(f["empty"]), "no problems"]),
        "train non-UTF-8 data file": ((*train, f"model={f['model']}", f"train_data={f['latin1']}",
                                       f"output_dir={out}"), 2, [f"{f['latin1']}:2", "not UTF-8"]),
        "train list for an int": (("train", "max_steps=[1]"), 2, ["max_steps"]),
        "demo output_dir is a file": (("demo", f"output_dir={f['file']}"), 2, ["is a file"]),
    }
    procs = {name: _bcr(*argv) for name, (argv, _, _) in cases.items()}  # in parallel: each pays the imports
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=900)
        _assert_one_line_error(proc.returncode, stderr, cases[name][1], *cases[name][2])
    assert not out.exists()  # checked before anything was written (eval used to write eval_config.json)


def test_ctrl_c_is_status_130_without_a_traceback(tmp_path, cli_files):
    out = tmp_path / "out"
    proc = _bcr("train", f"model={cli_files['model']}", f"output_dir={out}", "train_data=synthetic", "limit=8",
                "n_problems=1", "num_generations=2", "max_completion_length=8", "bundles_per_step=1",
                "max_steps=100000", "disable_progress_bar=true")
    try:
        deadline = time.monotonic() + 600
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        sent_after = len((out / "metrics.jsonl").read_text().splitlines())
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:  # seen in loaded full runs: the child trained on, its KeyboardInterrupt
            # swallowed somewhere mid-step (now also re-raised between steps: bcr.runtime.interrupts)
            proc.send_signal(signal.SIGABRT)  # every thread's stack, from the child's faulthandler
            stdout, stderr = proc.communicate(timeout=60)  # stdout: did steps go on after the Ctrl-C?
            pytest.fail(f"no exit 180 s after Ctrl-C (sent after step {sent_after}); the child's last steps:\n"
                        + "\n".join(stdout.splitlines()[-5:]) + "\nthe child's stacks:\n" + stderr[-20000:])
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    # after the run's own output (loading bars, warnings): the trainer's note and the boundary's line
    *_, note, last = stderr.strip().splitlines()
    assert "Traceback" not in stderr and last == "interrupted", stderr
    # between steps a checkpoint is written; inside a step's update none is (its weights are half-moved)
    if note.startswith("interrupted during the update of step"):
        assert not list(out.glob("checkpoint-*")), stderr
    else:
        assert note.startswith("interrupted: resumable checkpoint written to"), stderr
        assert (out / note.split()[5]).is_dir(), stderr


def test_other_user_errors_in_process(tmp_path, capsys):
    """The same boundary in this process (no imports to pay): what each message must name."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(["eval", "samples_per_bundle=abc"], "samples_per_bundle='abc'"), (["eval", "temperature=-1"], "temperature"),
             (["train", "seed=0.5"], "seed=0.5"), (["train", "learning_rate=inf"], "learning_rate=inf"),
             (["train", "learning_rate=1e38"], "overflow"), (["demo", "sft.learning_rate=1e38"], "sft.learning_rate"),
             (["demo", "rl.temperature=nan"], "rl.temperature=nan"), (["demo", "eval.top_p=2"], "eval.top_p"),
             (["train", f"model={tmp_path}", f"output_dir={a_file / 'run'}"], "cannot be created")]
    (tmp_path / "config.json").write_text("{}")  # enough for the model check, which comes first
    # the model check is the loader's (a directory, a .gguf file or a Hub id), before anything loads
    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    cases += [(["train", f"model={tmp_path / 'ggufs'}"], "pass gguf_file=m.gguf"),
              (["train", f"model={tmp_path / 'fake.gguf'}"], "is not a GGUF file")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.parametrize("argv,field", [
    (["train", "max_steps=1.5"], "max_steps"), (["train", "learning_rate=[1]"], "learning_rate"),
    (["train", "temperature=nan"], "temperature"), (["train", "max_grad_norm=nan"], "max_grad_norm"),
    (["eval", "top_p=0"], "top_p"), (["eval", "top_p=1.5"], "top_p"), (["eval", "n_values=[1, 2.5]"], "n_values"),
    (["demo", "sft.steps=2.5"], "sft.steps"), (["demo", "rl.max_steps=[1]"], "rl.max_steps"),
])
def test_config_errors_in_process(capsys, argv, field):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}") and len(err.strip().splitlines()) == 1, err


def test_bcr_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("BCR_DEBUG", "1")
    with pytest.raises(ConfigError, match="max_steps"):
        main(["train", "max_steps=1.5"])
