r"""Answer equivalence: :func:`answers_match` = fast paths + math-verify with a hard time bound.

Decision procedure for ``answers_match(pred, ref)`` (``pred`` is an extracted answer such as the
content of ``\boxed{...}``; ``ref`` is a reference answer as written in the data files, without a
``\boxed{}`` wrapper):

1. ``pred`` is None/empty, or ``ref`` empty -> False.
2. Both are *normalised* (outer ``\boxed{}``/``$..$``/``\(..\)`` removed, whitespace, ``\left``/
   ``\right``, LaTeX spacing commands and ``{,}`` removed, ``\dfrac``/``\tfrac`` -> ``\frac``, final
   period dropped); equal normalised strings -> True.
3. **Plain numbers** (integers, ``1,000``-style thousands separators, decimals, ``a/b`` and
   ``\frac{a}{b}`` with integer parts, an optional sign, a leading ``$``/``\$`` currency sign and a
   trailing ``%``/``\%``) are compared without math-verify, exactly in rationals: two numbers
   written without a decimal point must be equal; when either side is written with a decimal point
   a relative tolerance of 1e-6 applies (``0.3333333`` matches ``\frac{1}{3}``, ``0.33`` does not).
   A percent sign may be kept or dropped: ``50%`` matches both ``50`` and ``0.5`` (math-verify's own
   rule). If both sides are plain numbers this step decides (no math-verify call), which makes the
   common case (GSM8K-style integers) take microseconds.
4. Otherwise, if either string is longer than :data:`MAX_VERIFY_CHARS`, False (a length cap: math-
   verify on megabyte strings is slow and never needed for a final answer).
5. Otherwise math-verify: ``parse("\boxed{ref}")`` as gold, ``parse("\boxed{pred}")`` as target,
   ``verify(gold, target)``, under a **hard time bound** of ``timeout`` seconds:

   * in the main thread (POSIX), in-process with our own ``SIGALRM`` interval timer (sub-second
     precision; math-verify's own ``timeout`` uses ``signal.alarm`` with whole seconds and raises in
     threads, so its timeouts are disabled and ours wraps parse + verify). A timer already armed
     by the caller (e.g. pytest-timeout) is restored afterwards with its remaining time;
   * in any other thread (a data-loader thread, a thread pool in a trainer), where signals cannot be
     used, in a persistent helper **subprocess** (``subprocess.Popen``, so it also works inside
     daemonic ``multiprocessing`` workers). The helper applies the same alarm internally; if it does
     not answer within ``timeout + 1 s`` it is killed and restarted on the next call, so even a hang
     inside C code cannot block the caller. Helpers form a pool, one per concurrent caller (started
     on demand, kept for reuse, at most :data:`MAX_HELPERS`), so the bound holds for every caller:
     16 threads checking at once each get their answer within ``timeout + 1 s``, not one after
     another.

   A timeout counts as "no match" (False).
6. Any exception anywhere -> False. ``answers_match`` never raises.

Results are cached with :func:`functools.lru_cache` on ``(pred, ref, timeout)``. Parsing completions
and turning answers into rewards is :mod:`bcr.task.scoring`'s job.

No cold start: the first check pays for importing math-verify (seconds), and the first burst of
concurrent checks off the main thread also waits for their helpers to start and import it, so
without care they all overrun their bound. :func:`warm_up` starts both in a background thread;
``bcr solve``, ``bcr eval`` and the trainer call it before they load the model, so scoring is warm
by the time the first completion exists.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction

__all__ = ["MAX_HELPERS", "MAX_VERIFY_CHARS", "REL_TOL", "answers_match", "normalize_answer", "parse_number",
           "warm_up"]

#: Strings longer than this are compared by normalised string equality only.
MAX_VERIFY_CHARS = 1000
#: Relative tolerance for plain numbers when either side is written with a decimal point.
REL_TOL = 1e-6
#: Extra seconds the subprocess helper gets beyond ``timeout`` before it is killed.
_HARD_GRACE_S = 1.0
#: Seconds allowed for the helper subprocess to start (it imports math-verify / sympy).
_STARTUP_S = 60.0
#: At most this many helper subprocesses (one per concurrent caller off the main thread); further
#: concurrent callers wait for a helper to come back.
MAX_HELPERS = 32


# ----------------------------------------------------------------------------------------------
# Normalisation and plain numbers
# ----------------------------------------------------------------------------------------------

_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_WRAP_RES = [
    re.compile(r"^\\boxed\{(.*)\}$", re.S),
    re.compile(r"^\\fbox\{(.*)\}$", re.S),
    re.compile(r"^\$\$(.*)\$\$$", re.S),
    re.compile(r"^\$(.*)\$$", re.S),
    re.compile(r"^\\\((.*)\\\)$", re.S),
    re.compile(r"^\\\[(.*)\\\]$", re.S),
]


def _balanced(s: str) -> bool:
    depth = 0
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


def normalize_answer(s: str) -> str:
    """Meaning-preserving normalisation used for the string-equality fast path."""
    s = s.strip()
    for _ in range(4):
        s0 = s
        for rx in _WRAP_RES:
            m = rx.match(s)
            if m and _balanced(m.group(1)):
                s = m.group(1).strip()
        s = s.rstrip(".").strip()
        if s == s0:
            break
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("{,}", ",").replace("−", "-")
    s = _SPACING_RE.sub("", s)
    s = re.sub(r"\s+", "", s)
    return s


_NUM_RE = re.compile(
    r"^(?P<cur>\\?\$)?(?P<sign>[-+])?(?P<cur2>\\?\$)?"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<dec>\d+))?|\.(?P<dec2>\d+))"
    r"(?P<pct>\\?%)?$"
)
_FRAC_RE = re.compile(
    r"^(?P<sign>[-+])?(?:\\frac\{(?P<a>[-+]?\d+)\}\{(?P<b>[-+]?\d+)\}|\\frac(?P<a2>\d)(?P<b2>\d)|(?P<a3>\d+)/(?P<b3>\d+))"
    r"(?P<pct>\\?%)?$"
)


def parse_number(s: str) -> tuple[Fraction, bool, bool] | None:
    """``(value, written_with_decimal_point, has_percent)`` for a plain number, else None.

    ``s`` should already be normalised (:func:`normalize_answer`).
    """
    m = _NUM_RE.match(s)
    if m:
        if m.group("cur") and m.group("cur2"):
            return None
        ip = (m.group("int") or "0").replace(",", "")
        dec = m.group("dec") if m.group("dec") is not None else m.group("dec2")
        v = Fraction(int(ip))
        if dec:
            v += Fraction(int(dec), 10 ** len(dec))
        if m.group("sign") == "-":
            v = -v
        return v, dec is not None, bool(m.group("pct"))
    m = _FRAC_RE.match(s)
    if m:
        a = m.group("a") or m.group("a2") or m.group("a3")
        b = m.group("b") or m.group("b2") or m.group("b3")
        if int(b) == 0:
            return None
        v = Fraction(int(a), int(b))
        if m.group("sign") == "-":
            v = -v
        return v, False, bool(m.group("pct"))
    return None


def _num_close(a: Fraction, b: Fraction, inexact: bool) -> bool:
    if a == b:
        return True
    if not inexact:
        return False
    return abs(a - b) <= Fraction(REL_TOL) * max(abs(a), abs(b))


def _numbers_match(p: tuple[Fraction, bool, bool], r: tuple[Fraction, bool, bool]) -> bool:
    pv, pdec, ppct = p
    rv, rdec, rpct = r
    inexact = pdec or rdec
    cands = [(pv, rv)]
    if ppct:
        cands.append((pv / 100, rv))
    if rpct:
        cands.append((pv, rv / 100))
    return any(_num_close(a, b, inexact) for a, b in cands)


# ----------------------------------------------------------------------------------------------
# math-verify with a time bound
# ----------------------------------------------------------------------------------------------

_MV = None


def _math_verify():
    global _MV
    if _MV is None:
        import math_verify
        import math_verify.grader as _g
        import math_verify.parser as _p

        # We disable math-verify's signal timeouts (we time-bound it ourselves); silence the
        # one-time warning it logs about that.
        for mod in (_g, _p):
            if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
                mod.TIMEOUT_WARNING_SHOWN = True
        _MV = math_verify
    return _MV


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_CMD_RE = re.compile(r"\\[a-zA-Z]+")


def _has_variables(s: str) -> bool:
    """Letters left after removing LaTeX commands and ``\\text{..}``-style unit words."""
    s = _CMD_RE.sub(" ", _TEXT_CMD_RE.sub(" ", s))
    return re.search(r"[A-Za-z]", s) is not None


def _drop_partial(parsed: list, source: str) -> list:
    """Drop a sympy number that math-verify extracted from *part* of an expression it could not
    parse (e.g. ``2/3`` from ``\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}``): a bare number parsed from
    text that has variables in it. The string form is kept (string comparison still applies)."""
    try:
        import sympy

        out = []
        for x in parsed:
            if isinstance(x, sympy.Number) and _has_variables(source):
                continue
            out.append(x)
        return out
    except Exception:
        return parsed


@functools.lru_cache(maxsize=1)
def _gold_config():
    mv = _math_verify()
    return [mv.LatexExtractionConfig()]


def _mv_compare(pred: str, ref: str) -> bool:
    """math-verify comparison without any timeout (callers bound the time)."""
    mv = _math_verify()
    # The reference is LaTeX: parse it with the LaTeX extractor only. math-verify's plain-
    # expression extractor, given LaTeX it cannot read as a whole, falls back to *some* number
    # inside it (``\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}`` -> 2/3), and a gold reduced to a stray
    # number matches wrong predictions. The prediction may be plain text, so it gets both.
    gold = mv.parse("\\boxed{" + ref + "}", extraction_config=_gold_config(), parsing_timeout=None)
    if not gold:
        return False
    target = mv.parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not target:
        return False
    gold = _drop_partial(gold, ref)
    target = _drop_partial(target, pred)
    return bool(mv.verify(gold, target, timeout_seconds=None))


class _VerifyTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so that library ``except Exception`` blocks
    (math-verify, sympy) do not swallow it."""


def _on_alarm(signum, frame):  # pragma: no cover - timing dependent
    raise _VerifyTimeout()


def _can_use_alarm() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )


def _compare_with_alarm(pred: str, ref: str, timeout: float) -> bool:
    try:
        _math_verify()  # import (slow, once) before the clock starts
    except Exception:
        return False
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
    t0 = time.monotonic()
    try:
        try:
            return _mv_compare(pred, ref)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _VerifyTimeout:
        return False
    except Exception:
        return False
    finally:
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if prev_delay > 0:
            left = prev_delay - (time.monotonic() - t0)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-4), prev_interval)


_WORKER_CODE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from bcr.task.verify import _compare_with_alarm, _math_verify
_math_verify()
out = sys.stdout.buffer
out.write(b"ready\n"); out.flush()
for line in sys.stdin.buffer:
    try:
        pred, ref, t = json.loads(line)
        ok = _compare_with_alarm(pred, ref, float(t))
    except Exception:
        ok = False
    out.write(b"1\n" if ok else b"0\n"); out.flush()
"""


class _Helper:
    """A persistent helper process running :func:`_compare_with_alarm`, killed on overrun.

    Used by one caller at a time (the :class:`_HelperPool` hands it out)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except Exception:
                pass
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except Exception:
                    pass
        self.proc = None
        self.buf = b""

    def _readline(self, deadline: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def _spawn(self) -> None:
        """Start the process without waiting for it to be ready (see :meth:`_wait_ready`)."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.buf = b""

    def _wait_ready(self) -> bool:
        if self._readline(time.monotonic() + _STARTUP_S) != b"ready":
            self._kill()
            return False
        return True

    def _start(self) -> bool:
        self._spawn()
        return self._wait_ready()

    def compare(self, pred: str, ref: str, timeout: float) -> bool:
        try:
            if self.proc is None or self.proc.poll() is not None:
                if not self._start():
                    return False
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write((json.dumps([pred, ref, timeout]) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(time.monotonic() + timeout + _HARD_GRACE_S)
            if line is None:
                self._kill()
                return False
            return line.strip() == b"1"
        except Exception:
            self._kill()
            return False


class _HelperPool:
    """Helpers handed out one per concurrent caller: a caller takes an idle helper, or starts a new
    one while fewer than :data:`MAX_HELPERS` exist (else it waits for one to come back), so the time
    bound holds per caller, not per process."""

    def __init__(self, max_helpers: int) -> None:
        self.max_helpers = max_helpers
        self.reset()

    def reset(self) -> None:
        """Forget all helpers (a forked child must not share its parent's pipes)."""
        self._cond = threading.Condition()
        self._idle: list[_Helper] = []
        self._count = 0

    def close(self) -> None:
        """Stop the idle helpers (at exit; a helper in use is left to its caller)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for helper in idle:
            helper._kill()

    def _acquire(self) -> _Helper:
        with self._cond:
            while not self._idle and self._count >= self.max_helpers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()  # the most recently used one: warm
            self._count += 1
            return _Helper()

    def start(self, count: int) -> None:
        """Start helpers (all at once) until ``count`` exist (at most ``max_helpers``) and leave them
        idle for the next callers."""
        with self._cond:
            new = min(count, self.max_helpers) - self._count
            if new <= 0:
                return
            self._count += new
        helpers = [_Helper() for _ in range(new)]
        for helper in helpers:
            try:
                helper._spawn()
            except Exception:
                helper._kill()
        for helper in helpers:
            if helper.proc is not None:
                helper._wait_ready()  # a helper that failed to start is started again when used
            self._release(helper)

    def _release(self, helper: _Helper) -> None:
        with self._cond:
            self._idle.append(helper)
            self._cond.notify()

    def compare(self, pred: str, ref: str, timeout: float) -> bool:
        helper = self._acquire()
        try:
            return helper.compare(pred, ref, timeout)
        finally:
            self._release(helper)


_HELPERS = _HelperPool(MAX_HELPERS)
atexit.register(_HELPERS.close)


def _bounded_math_verify(pred: str, ref: str, timeout: float) -> bool:
    if _can_use_alarm():
        return _compare_with_alarm(pred, ref, timeout)
    if os.name == "posix":
        return _HELPERS.compare(pred, ref, timeout)
    # Non-POSIX, not the main thread: no way to interrupt; rely on the length cap.
    try:
        return _mv_compare(pred, ref)
    except Exception:
        return False


@functools.lru_cache(maxsize=1 << 17)
def _match_cached(pred: str, ref: str, timeout: float) -> bool:
    try:
        p = normalize_answer(pred)
        r = normalize_answer(ref)
        if not p or not r:
            return False
        if p == r:
            return True
        pn = parse_number(p)
        rn = parse_number(r)
        if pn is not None and rn is not None:
            return _numbers_match(pn, rn)
        if len(pred) > MAX_VERIFY_CHARS or len(ref) > MAX_VERIFY_CHARS:
            return False
        return _bounded_math_verify(pred, ref, timeout)
    except BaseException as e:  # never raise; but let KeyboardInterrupt / SystemExit through
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def answers_match(pred: str | None, ref: str, *, timeout: float = 2.0) -> bool:
    """True when the predicted answer ``pred`` is equivalent to the reference ``ref``.

    See the module docstring for the exact rules. Never raises; never runs much longer than
    ``timeout`` seconds (plus, on first use off the main thread, the helper's start-up); cached.
    """
    if pred is None or ref is None:
        return False
    try:
        pred = pred if isinstance(pred, str) else str(pred)
        ref = ref if isinstance(ref, str) else str(ref)
        t = float(timeout)
        if not t > 0:
            t = 2.0
    except Exception:
        return False
    return _match_cached(pred, ref, t)


def warm_up(helpers: int = 0) -> threading.Thread:
    """Prepare answer checking in the background, so that the first checks do not wait for it.

    Imports math-verify in this process (what checks from the main thread use) and starts
    ``helpers`` helper processes (what checks from other threads use: one per concurrent caller,
    at most :data:`MAX_HELPERS`). Returns the daemon thread doing it; ``join()`` it to wait.
    Never raises: whatever fails here is tried again by the first check that needs it.
    """

    def work() -> None:
        try:
            _math_verify()
        except Exception:
            pass
        if helpers > 0 and os.name == "posix":
            _HELPERS.start(int(helpers))

    thread = threading.Thread(target=work, name="bcr-verify-warm-up", daemon=True)
    thread.start()
    return thread


def _reset_after_fork() -> None:  # pragma: no cover - exercised by process pools
    # A forked child must not talk to its parent's helper processes through inherited pipes.
    _HELPERS.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
