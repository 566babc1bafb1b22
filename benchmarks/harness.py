"""The small harness the profiling scripts share: fresh child processes, versions, memory, reports.

A script measures each variant in a FRESH Python process so memory numbers are not polluted by
earlier variants (allocator caches, compiled kernels, leftover tensors):

    result = harness.run_child("benchmarks.profile_step", spec, timeout=600)

runs ``python -m benchmarks.profile_step --child SPEC OUT`` with :func:`child_env`; the script's
``main`` hands ``--child`` to :func:`child_entry`, which calls the script's own ``child_main(spec)``
and writes its JSON result atomically. A child that fails, times out or writes nothing comes back
as ``{"error": "..."}`` with the tail of its output.

``MemoryProbe`` measures the peak memory of one step: CUDA allocator statistics on a GPU; on the
CPU the process's peak RSS (``benchmarks.rss``), reset right before the step. ``versions``,
``git_state``, ``device_name`` and ``now`` make the context every report records; ``write_report``
writes ``<prefix>.json`` and ``<prefix>.md`` through :mod:`bcr.runtime.io` (atomic: a killed run never
leaves half a report) and ``<prefix>.png`` when a plot function is given.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata as md
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from bcr.runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text

from . import rss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MiB = 2**20

DEFAULT_PACKAGES = ("torch", "transformers", "triton", "trl", "liger-kernel")


# --------------------------------------------------------------------------------------------------
# child processes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a measuring child: this repository first on ``PYTHONPATH``, the Triton
    interpreter off (the CPU user's path is PyTorch's, never the interpreter), and glibc returning
    freed blocks >= 1 MiB to the OS so a step's peak RSS is not hidden by an earlier step's pages.
    ``extra`` overrides any of these."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 * MiB))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra or {})
    return env


def run_child(module: str, spec: dict, *, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m <module> --child SPEC OUT`` and return the JSON the child wrote.

    Failures come back as ``{"error": ...}`` (exit status and the last 2,000 characters of output,
    or the timeout), never as an exception: one broken variant must not lose the others' numbers.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", module, "--child", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(
                cmd, check=False, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            return {"error": f"exit {proc.returncode}: {tail}"}
        return json.loads(out_path.read_text())


def child_entry(paths: Sequence[str], child_main: Callable[[dict], dict]) -> int:
    """The child side of :func:`run_child`: ``paths`` = (spec file, output file)."""
    spec_path, out_path = paths
    result = child_main(json.loads(Path(spec_path).read_text()))
    atomic_write_json(out_path, result, indent=None)
    return 0


# --------------------------------------------------------------------------------------------------
# memory


class MemoryProbe:
    """Peak memory of one step: CUDA allocator statistics, or the process RSS on the CPU.

    ``with probe.measure() as mem: step()`` fills ``mem`` with ``peak_bytes``, ``base_bytes`` (at the
    start) and ``growth_bytes`` (peak - base); ``probe.method`` says how it was measured.
    """

    def __init__(self, device):
        self.device = device
        self.method: str | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict]:
        result: dict = {}
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            yield result
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif rss.reset_peak():
            base = rss.proc_status()["VmRSS"]
            self.method = "VmHWM reset via /proc/self/clear_refs"
            yield result
            peak = rss.proc_status()["VmHWM"]
        else:
            self.method = "VmRSS sampled every 1 ms (lower bound)"
            with rss.PeakSampler() as sampler:
                base = rss.proc_status()["VmRSS"]
                yield result
            peak = sampler.peak
        result.update(peak_bytes=peak, growth_bytes=peak - base, base_bytes=base)


# --------------------------------------------------------------------------------------------------
# context of a report


def versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Python and the installed version of each package (None where it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_state(paths: Sequence[str] = ("bcr", "bcr_kernels", "benchmarks")) -> dict:
    """The commit and the locally modified files (under ``paths``) the numbers were measured on."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", *paths)
    return {"commit": git("rev-parse", "HEAD"), "modified": status.splitlines() if status else []}


def device_name(device_type: str) -> str:
    """``torch.cuda.get_device_name()`` on CUDA, else the CPU and its core count."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def now() -> str:
    """Local date and time, ISO 8601 to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run (``argv`` None: this process's own arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *args])


# --------------------------------------------------------------------------------------------------
# writing


def write_report(
    prefix: Path,
    report: dict,
    markdown: str | None = None,
    plot: Callable[[dict, Path], None] | None = None,
    *,
    indent: int | None = 1,
) -> list[Path]:
    """Write ``<prefix>.json`` (+ ``.md``, + ``.png``) atomically; returns the paths written."""
    prefix = Path(prefix)
    written = [prefix.with_suffix(".json")]
    atomic_write_json(written[0], report, indent=indent)
    if markdown is not None:
        written.append(prefix.with_suffix(".md"))
        atomic_write_text(written[-1], markdown)
    if plot is not None:
        written.append(prefix.with_suffix(".png"))
        plot(report, written[-1])
    return written


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (rendered to memory, then one atomic write)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
