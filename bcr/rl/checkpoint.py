"""Checkpoints: a Hugging Face model directory plus everything needed to continue exactly.

``output_dir/checkpoint-<step>/`` holds

- the model (``save_pretrained``; ``AutoModelForCausalLM.from_pretrained`` opens it; a LoRA run
  saves its adapter, which ``peft.AutoPeftModelForCausalLM`` opens) and the tokenizer;
- ``trainer_state.json``: step, epoch, bundle position, the config, the metrics of the last step;
- ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pt`` (torch, CUDA, numpy and Python RNGs).

:func:`save_trainer_checkpoint` (a training checkpoint) and :func:`save_model` (the final HF
directory) are what the trainer calls on every rank; :func:`save_checkpoint` is the single-writer
core both build on.

Distributed runs (torchrun): with plain data parallel every rank holds the same state and rank 0
writes the files above. With FSDP2 (sharded parameters and optimizer state) every rank takes part:
the model is gathered into a full state dict that rank 0 writes as the same HF directory
(``from_pretrained`` opens it), and the optimizer state is written by all ranks through
``torch.distributed.checkpoint`` (DCP) into ``optimizer/`` (a shared file system is needed across
nodes). Either kind resumes at any world size and with either strategy: DCP reshards on load, and a
full ``optimizer.pt`` is scattered into the shards.

A checkpoint is written to a hidden temporary directory, then renamed into place, so a crash never
leaves a half-written ``checkpoint-<step>`` (``remove_stale_temporaries`` clears what a kill left
when the next run starts). Parameters that are not finite are never written.
Only the newest ``save_total_limit`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from bcr.runtime.distributed import all_reduce_sum, barrier, dist_info

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


class NonFiniteCheckpointError(RuntimeError):
    """The model has NaN/inf parameters; the checkpoint was not written."""


class NonFiniteWeightsError(RuntimeError):
    """An optimizer update made a parameter NaN/inf; training stopped before saving anything."""


def assert_finite_parameters(model, step: int) -> None:
    """Raise ``NonFiniteWeightsError`` naming ``step``, the first bad parameter and the fix when a
    trainable parameter of ``model`` (this rank's shard, for FSDP2) holds NaN/inf.

    Meant right after ``optimizer.step()``: the run stops at the update that broke the weights, and
    the newest checkpoint (written before it) stays the last good state. One device sync per call.
    """
    params = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()
              if p.requires_grad and torch.is_floating_point(p)]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return
    name = next(n for n, p in params if not torch.isfinite(p).all())
    raise NonFiniteWeightsError(
        f"step {step}: the optimizer update made parameter {name} NaN/inf, so training stopped (nothing of this "
        "step was saved; the newest checkpoint is the last good state). Lower learning_rate or set "
        "max_grad_norm > 0 to clip gradients, then resume_from=latest or start afresh"
    )


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


def check_finite(model, state_dict: dict | None = None) -> None:
    """Raise :class:`NonFiniteCheckpointError` if a parameter of ``model`` (or of ``state_dict``) holds NaN/inf."""
    items = state_dict.items() if state_dict is not None else model.named_parameters()
    for name, p in items:
        if torch.is_floating_point(p) and not torch.isfinite(p).all():
            raise NonFiniteCheckpointError(
                f"parameter {name} holds NaN/inf; refusing to write a checkpoint (lower learning_rate, "
                "check max_grad_norm, or resume from an earlier checkpoint)"
            )


# Temporaries of a write that a kill interrupted (``save_checkpoint`` and the trainer's final save).
_STALE_TMP = re.compile(rf"^\.(tmp-{PREFIX}\d+-.+|tmp-final-.+)$")
_STALE_OLD = re.compile(rf"^\.old-({PREFIX}\d+)-.+$")


def remove_stale_temporaries(output_dir: str | Path) -> list[str]:
    """Remove what a killed write left in ``output_dir``; returns the names handled.

    ``.tmp-checkpoint-*`` / ``.tmp-final-*`` folders are half-written and deleted. An
    ``.old-checkpoint-<step>-*`` folder is the previous copy of a step being rewritten: it is put
    back when the kill came before the new ``checkpoint-<step>`` was renamed into place, else deleted.
    Call it only while no other process writes into ``output_dir`` (the trainer holds its run lock).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    handled = []
    for d in sorted(root.iterdir()):
        old = _STALE_OLD.match(d.name)
        if not d.is_dir() or not (old or _STALE_TMP.match(d.name)):
            continue
        final = root / old.group(1) if old else None
        if final is not None and not final.exists() and (d / STATE_FILE).is_file():
            os.replace(d, final)
        else:
            shutil.rmtree(d, ignore_errors=True)
        handled.append(d.name)
    return handled


def save_checkpoint(output_dir: str | Path, step: int, *, model, optimizer=None, scheduler=None, tokenizer=None,
                    state: dict | None = None, save_total_limit: int | None = None,
                    model_state_dict: dict | None = None, staging: Path | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and prune old checkpoints. Returns its path.

    ``model_state_dict``: the full weights to write instead of ``model.state_dict()`` (FSDP2 gathers
    them first). ``staging``: an existing temporary directory already holding files written by
    other ranks (DCP optimizer shards); it is completed and renamed into place.
    """
    check_finite(model, model_state_dict)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = staging if staging is not None else root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    if staging is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        if model_state_dict is not None:
            model.save_pretrained(tmp, state_dict=model_state_dict)
        else:
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


def full_state_dict(model, device=None) -> dict | None:
    """Every rank: for an FSDP2-sharded ``model``, its full weights gathered to rank 0 (None on the
    other ranks) after every rank checked its shard is finite. None for a plain model (its own
    ``state_dict`` is the full one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return None
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if all_reduce_sum([bad], device)[0]:
        raise NonFiniteCheckpointError("a parameter holds NaN/inf; refusing to write a checkpoint (lower "
                                       "learning_rate, check max_grad_norm, or resume from an earlier checkpoint)")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if dist_info()[0] == 0 else None


def save_trainer_checkpoint(output_dir: str | Path, step: int, *, model, optimizer, scheduler=None, tokenizer=None,
                            state: dict | None = None, save_total_limit: int | None = None,
                            device=None) -> Path | None:
    """Every rank: write ``output_dir/checkpoint-<step>``; returns its path on rank 0 (None elsewhere).

    A plain (replicated) model is written by rank 0 alone. An FSDP2-sharded one: the full weights
    are gathered to rank 0 and every rank writes its optimizer shard through
    torch.distributed.checkpoint into the staging directory that rank 0 then completes and renames.
    """
    rank = dist_info()[0]
    kw = {"model": model, "scheduler": scheduler, "tokenizer": tokenizer, "state": state,
          "save_total_limit": save_total_limit}
    if not is_sharded(model):  # every rank holds the same state: rank 0 writes it
        path = save_checkpoint(output_dir, step, optimizer=optimizer, **kw) if rank == 0 else None
        barrier()
        return path
    full = full_state_dict(model, device)
    staging = Path(output_dir) / f".tmp-{PREFIX}{step}-dist"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    save_optimizer_dcp(model, optimizer, staging / "optimizer")
    barrier()
    path = save_checkpoint(output_dir, step, model_state_dict=full, staging=staging, **kw) if rank == 0 else None
    barrier()
    return path


def save_model(path: str | Path, model, tokenizer=None, *, device=None) -> Path:
    """Every rank: save ``model`` (and ``tokenizer``) as an HF directory at ``path``; rank 0 writes.

    The files are written to a temporary directory inside ``path`` first, then moved into ``path``
    one by one (``path`` may hold other things, e.g. the run's checkpoints), so no file is ever
    half written; an FSDP2-sharded model is gathered first."""
    path = Path(path)
    full = full_state_dict(model, device)
    if dist_info()[0] != 0:
        return path
    check_finite(model, full)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if full is not None:
            model.save_pretrained(tmp, state_dict=full)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_sharded(model) -> bool:
    """True when ``model`` holds FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_model_weights(model, path: str | Path) -> None:
    """Load the weights of a checkpoint directory into ``model`` in place (full model or LoRA adapter).
    An FSDP2-sharded model takes the full weights and keeps its own shard of them."""
    from safetensors.torch import load_file

    path = Path(path)
    if is_sharded(model):
        _load_sharded_model_weights(model, path)
        return
    if (path / "adapter_model.safetensors").is_file() and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    state = _safetensors_state(path)
    result = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights appear under both names
    loaded_ptrs = {p.data_ptr() for n, p in params.items() if n in state}
    missing = [k for k in result.missing_keys if not (k in params and params[k].data_ptr() in loaded_ptrs)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; resume with the same model architecture"
        )


def _safetensors_state(path: Path) -> dict:
    from safetensors.torch import load_file

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
    return state


def _load_sharded_model_weights(model, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if (path / "adapter_model.safetensors").is_file():
        raise NotImplementedError(f"{path}: resuming a LoRA adapter under FSDP2 is not supported; "
                                  "use distributed_strategy=ddp for LoRA runs")
    state = _safetensors_state(path)
    names = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in names if k not in state and not _is_tied(model, k)]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}; "
                           "resume with the same model architecture")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _is_tied(model, name: str) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")


def save_optimizer_dcp(model, optimizer, directory: Path) -> None:
    """All ranks: write the (sharded) optimizer state with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory))


def load_optimizer_state(path: Path, model, optimizer) -> None:
    """Restore the optimizer from ``optimizer/`` (DCP, any world size) or ``optimizer.pt`` (full state)."""
    if (path / "optimizer").is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        template = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        with warnings.catch_warnings():  # one process reading a checkpoint written by several is intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(template, checkpoint_id=str(path / "optimizer"))
        set_optimizer_state_dict(model, optimizer, template["optimizer"])
        return
    if not (path / "optimizer.pt").is_file():
        return
    full = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if not is_sharded(model):
        optimizer.load_state_dict(full)
        return
    # A full, index-keyed state (data-parallel checkpoint) into FSDP2 shards: key it by parameter name.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    index_to_name = {}
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[i] = names[id(p)]
            i += 1
    by_name = {"state": {index_to_name[int(k)]: v for k, v in full["state"].items()},
               "param_groups": [{**g, "params": [index_to_name[int(k)] for k in g["params"]]}
                                for g in full["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_checkpoint(path: str | Path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Restore model weights, optimizer, scheduler and RNGs from ``path``; returns trainer_state.json.

    Works for a plain or an FSDP2-sharded ``model`` and for checkpoints written by either, at any
    world size (every rank reads ``path``)."""
    path = Path(path)
    load_model_weights(model, path)
    if optimizer is not None:
        load_optimizer_state(path, model, optimizer)
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng and (path / "rng_state.pt").is_file():
        _set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
