"""bcr.models.loading: each kind of source loads, and each kind of bad input gives one clear error.

The GGUF happy path runs on the real SmolLM2 file in tests/models/test_real_model.py; here tiny models keep
every case fast.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bcr.rl.config import BCRConfig
from bcr.runtime.dataclass_cli import ConfigError
from bcr.eval.sweep import EvalConfig, evaluate_scaling
from bcr.models.loading import (
    ModelLoadError,
    ModelNotFoundError,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from bcr.task.synthetic import make_arithmetic_problems
from bcr.models.tiny import tiny_model
from bcr.rl.trainer import BCRTrainer

REPO = Path(__file__).resolve().parents[2]
TEXT = "Step 1: 17 + 125 = 142\nAnswer 2: \\boxed{-7}"
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
                                reason="GGUF loading needs gguf and accelerate (pip install 'bcr[gguf]')")


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_model(tiny_tokenizer, arch="llama", seed=0).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_directory_loads_model_tokenizer_and_chat_template(model_dir, tiny_tokenizer):
    saved = tiny_model(tiny_tokenizer, arch="llama", seed=0).to(torch.bfloat16)
    model, tok = load_model(model_dir, device="cpu")
    assert resolve_model_source(model_dir).kind == "directory"
    assert not model.training
    for (name, p), q in zip(model.named_parameters(), saved.parameters()):
        assert p.dtype == torch.float32, name  # auto on the CPU: fp32
        assert torch.equal(p, q.float()), name
    assert tok(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    assert tok.chat_template == tiny_tokenizer.chat_template and tok.chat_template
    assert load_tokenizer(str(model_dir))(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]


def test_tokenizer_only_directory(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    with pytest.raises(ModelLoadError, match="tokenizer of model=.*could not be loaded"):
        load_tokenizer(tmp_path)  # an empty directory


@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_dtype(model_dir, dtype, expected):
    model, tok = load_model(str(model_dir), dtype=dtype, device="cpu", with_tokenizer=False)
    assert tok is None
    assert {p.dtype for p in model.parameters()} == {expected}


def test_bad_dtype(model_dir):
    with pytest.raises(ModelLoadError, match="dtype='fp8'.*auto"):
        load_model(model_dir, dtype="fp8")


def test_missing_path(tmp_path):
    for source in (tmp_path / "nope", str(tmp_path / "nope"), "runs/a/final", "./model", "model.gguf"):
        with pytest.raises(ModelNotFoundError, match="does not exist") as err:
            load_model(source)
        assert isinstance(err.value, FileNotFoundError)
        assert str(source) in str(err.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="gguf_file=m.Q4_0.gguf"):
        load_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="other.gguf does not exist.*m.Q4_0.gguf"):
        load_model(tmp_path, gguf_file="other.gguf")


def test_directory_with_config_but_no_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="could not be loaded.*save_pretrained"):
        load_model(model_dir)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>404 Not Found</html>")  # what a failed download often leaves
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(tmp_path, gguf_file="model.gguf")


@needs_gguf
def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "unknown.gguf"
    writer = gguf.GGUFWriter(str(path), "bcr-unknown-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unknown.gguf.*bcr-unknown-arch.*original Hugging Face checkpoint"):
        load_model(path, with_tokenizer=False)


@needs_gguf
def test_truncated_gguf(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "cut.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "x" * 5000)
    writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:2000])  # cut inside the metadata
    with pytest.raises(ModelLoadError, match="cut.gguf.*could not be loaded.*download it again"):
        load_model(path, with_tokenizer=False)


def test_hub_id_offline_fails_fast_with_the_download_command(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'bcr-test/not-cached'.*HF_HUB_OFFLINE.*huggingface-cli download bcr-test/not-cached"):
        load_model("bcr-test/not-cached")
    assert time.perf_counter() - started < 5


def test_hub_id_without_network_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'Qwen/Qwen2.5-1.5B-Instruct'.*cannot be reached.*huggingface-cli download"):
        load_model("Qwen/Qwen2.5-1.5B-Instruct")
    assert time.perf_counter() - started < 10


def test_cached_hub_id_loads_offline(model_dir, tmp_path, tiny_tokenizer):
    """A Hub id whose snapshot is in the Hugging Face cache loads without a network (a fresh process,
    since huggingface_hub reads its cache location when imported)."""
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--bcr-test--tiny-llama" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text(commit)
    script = ("from bcr.models.loading import load_model\n"
              "m, t = load_model('bcr-test/tiny-llama', device='cpu')\n"
              f"print(m.config.model_type, t({TEXT!r})['input_ids'])\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Retrying" not in out.stderr, out.stderr[-2000:]  # no request to the Hub at all, so no retries
    assert out.stdout.split()[0] == "llama"
    assert out.stdout.strip().endswith(str(tiny_tokenizer(TEXT)["input_ids"]))


def test_trainer_loads_through_the_loader(model_dir, tmp_path):
    cfg = BCRConfig(model=str(model_dir), output_dir=str(tmp_path / "out"), n_problems=1, num_generations=2,
                    max_completion_length=8, bundles_per_step=1, max_steps=1, disable_progress_bar=True)
    trainer = BCRTrainer(cfg.model, make_arithmetic_problems(4, seed=0), cfg)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # model_dtype defaults to fp32
    with pytest.raises(ModelNotFoundError, match="model="):
        BCRTrainer(str(tmp_path / "missing"), make_arithmetic_problems(4, seed=0), cfg)


def test_eval_refuses_a_bad_model_before_writing(tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        evaluate_scaling(str(bad), make_arithmetic_problems(4, seed=0), output_dir=str(out), n_values=[1],
                         progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="gguf_file goes with model="):
        evaluate_scaling(problems=make_arithmetic_problems(4, seed=0),
                         config=EvalConfig(models={"a": str(bad)}, gguf_file="x.gguf", output_dir=str(out), n_values=[1]))
    assert not out.exists()


def test_configs_validate_model_dtype():
    with pytest.raises(ConfigError, match="model_dtype"):
        BCRConfig(model_dtype="fp16")
    with pytest.raises(ConfigError, match="model_dtype"):
        EvalConfig(model_dtype="half")
    assert BCRConfig().model_dtype == "float32" and EvalConfig().model_dtype == "auto"
