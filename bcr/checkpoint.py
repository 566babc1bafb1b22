"""Checkpoints: a Hugging Face model directory plus everything needed to continue exactly.

``output_dir/checkpoint-<step>/`` holds

- the model (``save_pretrained``; ``AutoModelForCausalLM.from_pretrained`` opens it; a LoRA run
  saves its adapter, which ``peft.AutoPeftModelForCausalLM`` opens) and the tokenizer;
- ``trainer_state.json``: step, epoch, bundle position, the config, the metrics of the last step;
- ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pt`` (torch, CUDA, numpy and Python RNGs).

A checkpoint is written to a hidden temporary directory, then renamed into place, so a crash never
leaves a half-written ``checkpoint-<step>``. Parameters that are not finite are never written.
Only the newest ``save_total_limit`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


class NonFiniteCheckpointError(RuntimeError):
    """The model has NaN/inf parameters; the checkpoint was not written."""


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def find_checkpoint(output_dir: str | Path, resume_from: str) -> Path:
    """``resume_from`` = ``"latest"`` (newest checkpoint in ``output_dir``) or a checkpoint directory."""
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(
                f"resume_from='latest' but {output_dir} holds no checkpoint-* directory; "
                "drop resume_from to start fresh or point it at a checkpoint directory"
            )
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from={resume_from!r} is not a checkpoint (no {STATE_FILE} in it); "
            f"use 'latest' or a {PREFIX}<step> directory written by bcr"
        )
    return path


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_finite(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteCheckpointError(
                f"parameter {name} holds NaN/inf; refusing to write a checkpoint (lower learning_rate, "
                "check max_grad_norm, or resume from an earlier checkpoint)"
            )


def save_checkpoint(output_dir: str | Path, step: int, *, model, optimizer=None, scheduler=None, tokenizer=None,
                    state: dict | None = None, save_total_limit: int | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and prune old checkpoints. Returns its path."""
    _check_finite(model)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(state or {})}, indent=2, default=str))
        if final.exists():  # rewriting the same step: move the old one aside first
            old = root / f".old-{PREFIX}{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit is not None:
        for old in checkpoint_dirs(root)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model, path: str | Path) -> None:
    """Load the weights of a checkpoint directory into ``model`` in place (full model or LoRA adapter)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "adapter_model.safetensors").is_file() and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors in {path}; is it a checkpoint written by bcr?")
    state: dict = {}
    for name in files:
        state.update(load_file(str(path / name)))
    result = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights appear under both names
    loaded_ptrs = {p.data_ptr() for n, p in params.items() if n in state}
    missing = [k for k in result.missing_keys if not (k in params and params[k].data_ptr() in loaded_ptrs)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; resume with the same model architecture"
        )


def load_checkpoint(path: str | Path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Restore model weights, optimizer, scheduler and RNGs from ``path``; returns trainer_state.json."""
    path = Path(path)
    load_model_weights(model, path)
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng and (path / "rng_state.pt").is_file():
        _set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
