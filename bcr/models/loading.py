"""One loader for every model a user can point bcr at: ``load_model(source) -> (model, tokenizer)``.

``source`` is one of

* a local Hugging Face directory (``config.json`` + weights, as ``save_pretrained`` writes it);
* a ``.gguf`` file, or a directory plus ``gguf_file=<name inside it>``: transformers dequantizes the
  weights into a plain model (needs ``gguf`` and ``accelerate``: ``pip install 'bcr[gguf]'``), so it
  trains, saves and reloads like any HF model;
* a Hugging Face Hub id (``Qwen/Qwen2.5-1.5B-Instruct``): transformers downloads and caches it when
  the Hub can be reached; without a network, a cached copy is used, and an id that is not cached
  fails at once (no retries) with the command that downloads it.

The tokenizer and its chat template come from the same source. ``dtype``: ``auto`` (the checkpoint's
own dtype; fp32 on the CPU, which has no fast half-precision matmuls), ``float32`` or ``bfloat16``.

Every input the loader cannot use raises :class:`ModelLoadError` (a ``ConfigError``) naming the model
and the fix. :func:`resolve_model_source` runs the same checks without loading anything, so commands
can refuse a bad model before they write output.

Tokenizers: ``AutoTokenizer.from_pretrained`` in transformers 5 picks the tokenizer class from the
model type for some architectures (``qwen2`` among them) and rebuilds its pre-tokenizer from that
class, ignoring the ``tokenizer.json`` saved beside the model. For the model's own tokenizer that is
the same thing; for any other tokenizer saved beside a Qwen2 model (a locally trained one, say) it
silently re-tokenises every number digit by digit. :func:`load_tokenizer` compares the class
transformers picked with the saved ``tokenizer.json`` on a probe text and uses the saved one when
they disagree.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from bcr.runtime.dataclass_cli import ConfigError

__all__ = ["DTYPES", "ModelLoadError", "ModelNotFoundError", "ModelSource", "load_model", "load_tokenizer",
           "resolve_model_source"]

DTYPES = ("auto", "float32", "bfloat16")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_HUB_PROBE_TIMEOUT_S = 3.0
_PROBE = "Step 1: 17 + 125 = 142, so x^2 = \\frac{3}{4}.\n### Problem 2 — Answer 2: \\boxed{-7.5} 数学"


class ModelLoadError(ConfigError):
    """A model source the loader cannot use; the message names the model and the fix."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind``: ``directory``, ``gguf`` or ``hub``; ``location``: what
    ``from_pretrained`` is given (the directory, or the Hub id); ``gguf_file``: the file's name inside
    ``location`` (GGUF only); ``cached``: a Hub id found in the local cache (Hub only)."""

    kind: str
    location: str
    gguf_file: str | None = None
    cached: bool = False

    def __str__(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / self.gguf_file)
        return self.location


# ----------------------------------------------------------------------------- resolving the source
def resolve_model_source(source: str | os.PathLike, *, gguf_file: str | None = None) -> ModelSource:
    """Say what ``source`` is and check that it can be loaded, without reading any weights."""
    text = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else ""
    if not text:
        raise ModelLoadError(f"model={source!r}: give a local model directory, a .gguf file, or a Hugging Face "
                             "Hub id such as Qwen/Qwen2.5-1.5B-Instruct")
    path = Path(text).expanduser()
    if path.is_file():
        if gguf_file is not None:
            raise ModelLoadError(f"model={text!r} is a file and gguf_file={gguf_file!r} is set too: give either "
                                 "model=<file.gguf>, or model=<directory> with gguf_file=<name inside it>")
        return _gguf_source(text, path)
    if path.is_dir():
        if gguf_file is not None:
            return _gguf_source(text, path / gguf_file)
        if (path / "config.json").is_file():
            return ModelSource("directory", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise ModelLoadError(f"model={text!r} holds GGUF files ({', '.join(ggufs)}) but no config.json: pass "
                                 f"gguf_file={ggufs[0]} (or the file's path as model=)")
        raise ModelLoadError(f"model={text!r} is not a model directory (no config.json): give a directory written "
                             "by save_pretrained, a .gguf file, or a Hugging Face Hub id")
    if gguf_file is not None or not _looks_like_hub_id(text) or isinstance(source, Path):
        raise ModelNotFoundError(f"model={text!r}: {path} does not exist; give an existing model directory, a .gguf "
                                 "file, or a Hugging Face Hub id such as Qwen/Qwen2.5-1.5B-Instruct")
    return _hub_source(text)


def _looks_like_hub_id(text: str) -> bool:
    return (bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "~")) and ".." not in text
            and not text.lower().endswith(".gguf"))


def _gguf_source(text: str, file: Path) -> ModelSource:
    if not file.is_file():
        raise ModelNotFoundError(f"model={text!r}: the GGUF file {file} does not exist; check gguf_file= "
                                 f"(files there: {', '.join(sorted(p.name for p in file.parent.glob('*.gguf'))) or 'none'})")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"model={text!r}: {file} is not a GGUF file (it does not start with the bytes 'GGUF'; "
                             "a corrupt or partial download?); download the .gguf file again, or give a model "
                             "directory")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(f"model={text!r}: loading a GGUF file needs {' and '.join(missing)}: "
                             "pip install 'bcr[gguf]'")
    return ModelSource("gguf", str(file.parent), gguf_file=file.name)


def _hub_source(repo_id: str) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if cached:
        return ModelSource("hub", repo_id, cached=True)
    download = (f"download it where there is a network (huggingface-cli download {repo_id}, or hf download "
                f"{repo_id}) into the Hugging Face cache ({constants.HF_HUB_CACHE}), or pass a local directory")
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"model={repo_id!r}: no local directory of that name, and the Hub id is not in the "
                             f"local cache while HF_HUB_OFFLINE is set; {download}")
    if not _endpoint_reachable(constants.ENDPOINT):
        raise ModelLoadError(f"model={repo_id!r}: no local directory of that name, and the Hub id is not in the "
                             f"local cache and {constants.ENDPOINT} cannot be reached; {download} "
                             "(HF_HUB_OFFLINE=1 skips the network check)")
    return ModelSource("hub", repo_id)


def _endpoint_reachable(endpoint: str) -> bool:
    """One TCP connect with a short timeout (huggingface_hub would retry for ~25 s before failing)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- loading
def load_model(source, *, dtype: str | torch.dtype = "auto", gguf_file: str | None = None,
               device: str | torch.device | None = None, with_tokenizer: bool = True,
               trust_remote_code: bool = False):
    """Load ``source`` (a model directory, a ``.gguf`` file, a directory + ``gguf_file``, or a Hub id).

    Args:
        dtype: ``auto`` (the checkpoint's dtype; fp32 when ``device`` is the CPU), ``float32`` or
            ``bfloat16``.
        device: where the model goes (default: ``cuda`` when available, else ``cpu``).
        with_tokenizer: also load the tokenizer (with its chat template) from ``source``.
        trust_remote_code: passed to transformers (models whose code lives in the checkpoint).

    Returns:
        ``(model, tokenizer)``: an ``AutoModelForCausalLM`` in eval mode on ``device`` and the
        tokenizer (``None`` without ``with_tokenizer``).
    """
    from transformers import AutoModelForCausalLM

    resolved = source if isinstance(source, ModelSource) else resolve_model_source(source, gguf_file=gguf_file)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {"dtype": _torch_dtype(dtype, device), "trust_remote_code": trust_remote_code,
              **_source_kwargs(resolved)}
    if resolved.kind == "gguf":
        kwargs.update(_dequantize_kwargs())
    if kwargs.get("local_files_only"):
        # transformers (5.25) looks for a PEFT adapter_config.json without forwarding local_files_only, so
        # a cached Hub id with no network would wait out huggingface_hub's retries (~23 s) first.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    except Exception as err:  # noqa: BLE001 - a truncated GGUF raises struct.error, a bad config KeyError, ...
        raise ModelLoadError(f"model={str(resolved)!r} could not be loaded: {_first_line(err)}; "
                             f"{_fix_for(resolved)}") from err
    if resolved.kind == "gguf":
        _drop_gguf_quantizer(model, resolved)
    model = model.to(device).eval()
    tokenizer = load_tokenizer(resolved) if with_tokenizer else None
    return model, tokenizer


def load_tokenizer(source, *, gguf_file: str | None = None, **kwargs):
    """The tokenizer (and chat template) of ``source``, as the model was saved with it.

    For a directory (a model's, or one holding only a tokenizer) or a Hub id:
    ``AutoTokenizer.from_pretrained``, unless it tokenises differently from the ``tokenizer.json``
    saved there (then that file, with a warning; see the module docstring).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import cached_file

    if isinstance(source, ModelSource):
        resolved = source
    elif gguf_file is None and isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir():
        resolved = ModelSource("directory", str(Path(source).expanduser()))  # no config.json needed
    else:
        resolved = resolve_model_source(source, gguf_file=gguf_file)
    kwargs = {**_source_kwargs(resolved), **kwargs}
    try:
        auto = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
    except Exception as err:  # noqa: BLE001 - as in load_model
        raise ModelLoadError(f"the tokenizer of model={str(resolved)!r} could not be loaded: {_first_line(err)}; "
                             f"{_fix_for(resolved)}") from err
    if resolved.kind == "gguf":
        return auto
    saved_file = cached_file(resolved.location, "tokenizer.json", _raise_exceptions_for_missing_entries=False,
                             **{k: v for k, v in kwargs.items() if k == "local_files_only"})
    if saved_file is None:
        return auto
    saved = PreTrainedTokenizerFast.from_pretrained(resolved.location, **kwargs)
    if saved(_PROBE)["input_ids"] == auto(_PROBE)["input_ids"]:
        return auto
    warnings.warn(
        f"AutoTokenizer loaded {resolved} as {type(auto).__name__}, which tokenises differently from the "
        "tokenizer.json saved there; using the saved tokenizer.json",
        stacklevel=2,
    )
    return saved


def _source_kwargs(resolved: ModelSource) -> dict:
    if resolved.kind == "gguf":
        return {"gguf_file": resolved.gguf_file}
    if resolved.kind == "hub" and not resolved.cached:
        return {}
    return {"local_files_only": True}  # a directory, or a cached Hub id: no network round trips


def _torch_dtype(dtype, device: torch.device):
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise ModelLoadError(f"dtype={dtype}: must be one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype={dtype!r}: must be one of {list(DTYPES)}")
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return _TORCH_DTYPES[dtype]


def _dequantize_kwargs() -> dict:
    """Ask transformers for a plain dense model (versions that can keep GGUF blocks packed would
    otherwise do so when a matmul kernel is installed, and packed weights cannot be trained)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model, resolved: ModelSource) -> None:
    """A dequantized GGUF model is a plain model; drop the quantizer transformers attached so that
    ``save_pretrained`` writes it and training treats it as trainable."""
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise ModelLoadError(f"model={str(resolved)!r}: transformers kept the GGUF weights packed ({', '.join(packed)}); "
                             "they cannot be trained: convert the file to an HF directory first")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _fix_for(resolved: ModelSource) -> str:
    if resolved.kind == "gguf":
        return ("the file may be corrupt or of an architecture transformers cannot read from GGUF: download it "
                "again, or use the original Hugging Face checkpoint")
    if resolved.kind == "hub":
        return (f"check the id on the Hub (a gated or private model needs huggingface-cli login), or download it "
                f"with huggingface-cli download {resolved.location} and pass the directory")
    return "the directory needs config.json and the weights written by save_pretrained"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
