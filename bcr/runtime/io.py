"""Files: atomic writes (every results, state or report file bcr writes goes through these) and the
check that an output directory can be written, made before anything is loaded.

A file is written to a uniquely named temporary file in the target's directory, flushed and
fsynced, then renamed over the target (``os.replace``, atomic on POSIX). A crash or ``kill -9``
therefore leaves either the old file or the new one, never half of either, and two writers of the
same path never share a temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bcr.runtime.dataclass_cli import ConfigError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (creating parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> None:
    """Replace ``path`` with ``json.dumps(obj)`` plus a newline, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


class OutputDirError(ConfigError):
    """An ``output_dir`` (or another output path) that cannot be created or written."""


def check_output_dir(path: str | os.PathLike, option: str = "output_dir") -> Path:
    """``path`` is a directory this process can create or write into; raises ``OutputDirError`` naming
    ``option`` otherwise. Writes nothing."""
    if not str(path):
        raise OutputDirError(f"{option} is empty; set {option}=<a directory for the run's files>")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"{option}={str(path)!r} is a file, not a directory; choose another {option}")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{option}={str(path)!r} cannot be created: {existing} is a file; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"{option}={str(path)!r} is not writable ({existing} does not allow this user to write); "
                             f"choose a directory you can write to")
    return target
