"""Ctrl-C that is not lost when some code swallows the ``KeyboardInterrupt``.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread runs Python code
next. That may be inside code that drops it: a user's reward function with a bare ``except:``, or a
C extension that calls back into Python and clears any error it gets (an attribute lookup that
lands in a Python ``__getattr__``, say). The signal is then gone and a long run goes on as if no
one had pressed Ctrl-C (``tests/cli/test_cli_plumbing.py`` saw a training run take 2,500 more
steps).

Inside :func:`remember_interrupts` SIGINT still raises ``KeyboardInterrupt`` at once and is also
remembered; a loop calls :func:`raise_if_interrupted` at its safe points (the trainer: between
steps), which raises it again when the first one was swallowed. ``bcr``'s command line runs every
command inside it; library code that never enters it is unaffected (the check is then a no-op).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = threading.Event()


def _on_sigint(signum, frame):
    _pending.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remember_interrupts() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` and is remembered for :func:`raise_if_interrupted`
    within the block (main thread only; elsewhere the block changes nothing). The previous handler
    comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _pending.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending.clear()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a SIGINT came inside :func:`remember_interrupts` (whether or
    not its first ``KeyboardInterrupt`` got through)."""
    if _pending.is_set():
        raise KeyboardInterrupt
