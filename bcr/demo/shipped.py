"""The SFT model shipped with bcr: the demo's stage 1 at its default settings, trained once.

Stage ``sft`` at the defaults takes 12-13 minutes on two cores, most of the demo's 15. Like a BCR user
who starts from a published checkpoint, the demo starts its RL stages from this one whenever the
settings that decide it (``seed``, ``task``, ``model``, ``sft``) are the ones it was trained with, and
trains stage 1 itself otherwise or with ``train_sft=true``.

``sft_model/`` holds the model and tokenizer as ``save_pretrained`` wrote them, the training log
(``metrics.jsonl.gz``) and ``provenance.json``: the settings, the commit, machine, threads and time of
the run that trained it, and the sha256 of every file. A copy is used only when every file's hash
matches and this code's tokenizer for the settings is the shipped one (a change to the task or the
tokenizer code makes the demo train instead, and fails ``tests/demo/test_shipped.py``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
from pathlib import Path

from .config import DemoConfig

SHIPPED_DIR = Path(__file__).with_name("sft_model")
PROVENANCE = "provenance.json"
LOG = "metrics.jsonl.gz"


def sft_settings(cfg: DemoConfig) -> dict:
    """The settings that decide the SFT model, as plain JSON values (``sft.checkpoint_every`` only
    changes where the run can resume, so it is left out)."""
    sft = dataclasses.replace(cfg.sft, checkpoint_every=0)
    settings = {"seed": cfg.seed, "task": dataclasses.asdict(cfg.task), "model": dataclasses.asdict(cfg.model),
                "sft": dataclasses.asdict(sft)}
    return json.loads(json.dumps(settings))


def provenance(folder: Path | None = None) -> dict | None:
    """The shipped model's ``provenance.json`` (None when bcr ships none); ``folder``: default
    :data:`SHIPPED_DIR`, as for every function here."""
    path = (folder or SHIPPED_DIR) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted names of the settings in which ``a`` and ``b`` differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def why_not_shipped(cfg: DemoConfig, folder: Path | None = None) -> str | None:
    """None when the shipped model is stage 1 of ``cfg``; otherwise why it is not (the reason the
    demo gives for training stage 1 itself)."""
    folder = folder or SHIPPED_DIR
    record = provenance(folder)
    if record is None:
        return f"no SFT model is shipped in {folder}"
    differ = _differences(sft_settings(cfg), record["settings"])
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        return f"the shipped SFT model was trained with other settings ({shown})"
    for name, digest in record["sha256"].items():
        path = folder / name
        if not path.is_file() or sha256(path) != digest:
            return f"the shipped file {path} is missing or changed (sha256)"
    return None


def install(out: Path, tokenizer, folder: Path | None = None) -> dict | None:
    """Copy the shipped model into ``out / "model"`` and its log into ``out / "metrics.jsonl"`` when
    ``tokenizer`` (the one this code builds for the run's settings) has the shipped model's vocabulary; returns
    the provenance, or None (nothing copied) when the vocabularies differ."""
    from transformers import AutoTokenizer

    folder = folder or SHIPPED_DIR
    shipped = AutoTokenizer.from_pretrained(folder)
    if shipped.get_vocab() != tokenizer.get_vocab():
        return None
    record = provenance(folder)
    (out / "model").mkdir(parents=True, exist_ok=True)
    for name in record["sha256"]:
        if name == LOG:
            (out / "metrics.jsonl").write_bytes(gzip.decompress((folder / name).read_bytes()))
        else:
            shutil.copyfile(folder / name, out / "model" / name)
    return record


def package(run_dir: Path, note: str, folder: Path | None = None) -> dict:
    """Make ``folder`` the shipped model from a finished demo run ``run_dir``: its ``sft/model``
    files, its gzipped SFT log, and a provenance of the run's settings (``demo_config.yaml``), its
    machine (``demo_summary.json``), the stage's time and loss, ``note`` (say where and at which
    commit it was trained) and every file's sha256. Returns the provenance."""
    from bcr.runtime.dataclass_cli import load_dataclass
    from bcr.runtime.io import atomic_write_json

    run_dir, folder = Path(run_dir), folder or SHIPPED_DIR
    cfg = load_dataclass(DemoConfig, run_dir / "demo_config.yaml")
    stage = json.loads((run_dir / "sft" / "stage.json").read_text())
    if stage.get("shipped"):
        raise ValueError(f"{run_dir}'s SFT stage is itself a shipped copy; package a run that trained it")
    summary = run_dir / "demo_summary.json"
    machine = json.loads(summary.read_text()).get("machine") if summary.is_file() else None
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in sorted((run_dir / "sft" / "model").iterdir()):
        shutil.copyfile(path, folder / path.name)
    (folder / LOG).write_bytes(gzip.compress((run_dir / "sft" / "metrics.jsonl").read_bytes(), mtime=0))
    record = {"settings": sft_settings(cfg), "note": note, "machine": machine, "threads": cfg.threads,
              "seconds": stage["seconds"], "final_loss": stage["final_loss"], "parameters": stage["parameters"],
              "sha256": {p.name: sha256(p) for p in sorted(folder.iterdir())}}
    atomic_write_json(folder / PROVENANCE, record)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m bcr.demo.shipped RUN_DIR NOTE``: ship the SFT model of a finished demo run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bcr.demo.shipped", description=main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a finished demo run (output_dir) whose stage sft trained")
    parser.add_argument("note", help="where, when and at which commit the run trained it")
    args = parser.parse_args(argv)
    record = package(args.run_dir, args.note)
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
