"""Peak resident memory of this process on Linux, for the CPU profiling scripts.

``reset_peak()`` zeroes the kernel's high-water mark (``VmHWM``) through ``/proc/self/clear_refs``,
so ``proc_status()["VmHWM"]`` read after a step is that step's exact peak. Where the reset is not
allowed, ``PeakSampler`` polls ``VmRSS`` every millisecond instead (a lower bound).
"""

from __future__ import annotations

import threading
import time


def proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Context manager polling ``VmRSS``; ``.peak`` holds the largest value seen (a lower bound)."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status()["VmRSS"])
            time.sleep(self.period)

    def __enter__(self):
        self.peak = proc_status()["VmRSS"]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["VmRSS"])
