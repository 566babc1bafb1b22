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
     used, in a helper **subprocess**. One helper process per process (``subprocess.Popen``, so it
     also works inside daemonic ``multiprocessing`` workers) loads math-verify once, then forks a
     worker per concurrent caller (milliseconds: the fork shares what was loaded; at most
     :data:`MAX_HELPERS`, kept for reuse). A worker applies the same alarm; if it does not answer
     within ``timeout + 1 s`` of the request it is killed and replaced on the next call, so even a
     hang inside C code cannot block the caller, and 16 threads checking at once each get their
     answer within ``timeout + 1 s``, not one after another.

   A timeout counts as "no match" (False).
6. Any exception anywhere -> False. ``answers_match`` never raises.

Results are cached with :func:`functools.lru_cache` on ``(pred, ref, timeout)``. Parsing completions
and turning answers into rewards is :mod:`bcr.task.scoring`'s job.

The bound from a cold start: loading math-verify (importing it and a few first parses that build
its parser state; about 1.5 s of CPU) happens once per process, in the process for main-thread
checks and in the helper process for the others. Until it is done, the first checks wait for it
*in addition to* their ``timeout + 1 s``: a main-thread check waits for the in-process load before
its clock starts, and a check off the main thread waits for the one helper start, shared by all
callers arriving meanwhile (not one start each; 16 threads in a fresh process on a busy 2-core
machine: the start took 2.9-11.9 s, and the slowest caller was answered 1.3-3.6 s after it with
timeouts of 1-2 s; ``benchmarks/RESULTS.md``). The callers wait rather than answer "no match" early, which would turn a
cold start into wrong rewards. :func:`warm_up` does both loads in a background thread; ``bcr
solve``, ``bcr eval`` and the trainer call it before they load the model, so scoring is warm by the
time the first completion exists.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import signal
import socket
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
_MV_LOCK = threading.Lock()
#: Checks run once when math-verify is loaded: the first parse of each kind of expression builds
#: parser and sympy state (about 2 s together); afterwards a check takes milliseconds.
_FIRST_CHECKS = [("x^2+2x+1", "(x+1)^2"), ("(1,2)", "(1, 2)"), ("\\{1,2\\}", "\\{2,1\\}")]


def _math_verify():
    """math-verify, imported and warmed up (:data:`_FIRST_CHECKS`) once per process; other threads
    asking meanwhile wait for it."""
    global _MV
    if _MV is None:
        with _MV_LOCK:
            if _MV is None:
                import math_verify
                import math_verify.grader as _g
                import math_verify.parser as _p

                # We disable math-verify's signal timeouts (we time-bound it ourselves); silence the
                # one-time warning it logs about that.
                for mod in (_g, _p):
                    if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
                        mod.TIMEOUT_WARNING_SHOWN = True
                for pred, ref in _FIRST_CHECKS:
                    _compare_with(math_verify, pred, ref)
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


def _mv_compare(pred: str, ref: str) -> bool:
    """math-verify comparison without any timeout (callers bound the time)."""
    return _compare_with(_math_verify(), pred, ref)


def _compare_with(mv, pred: str, ref: str) -> bool:
    # The reference is LaTeX: parse it with the LaTeX extractor only. math-verify's plain-
    # expression extractor, given LaTeX it cannot read as a whole, falls back to *some* number
    # inside it (``\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}`` -> 2/3), and a gold reduced to a stray
    # number matches wrong predictions. The prediction may be plain text, so it gets both.
    gold = mv.parse("\\boxed{" + ref + "}", extraction_config=[mv.LatexExtractionConfig()], parsing_timeout=None)
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


# The one helper process started per process ("the zygote"): it loads math-verify once, then forks a
# worker per concurrent caller on request (milliseconds: the fork shares the loaded, warmed-up state).
# Control messages: the parent sends one byte with the worker's socket attached (SCM_RIGHTS); the
# zygote answers the worker's pid. It exits when the parent closes its end (or dies).
_ZYGOTE_CODE = r"""
import os, signal, socket, sys
sys.path.insert(0, sys.argv[1])
from bcr.task.verify import _math_verify, _serve
_math_verify()
control = socket.socket(fileno=int(sys.argv[2]))
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
control.sendall(b"ready\n")
while True:
    msg, fds, _, _ = socket.recv_fds(control, 1, 1)
    if not msg:
        break
    pid = os.fork()
    if pid == 0:
        control.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _serve(socket.socket(fileno=fds[0]))
        os._exit(0)
    os.close(fds[0])
    control.sendall(b"%d\n" % pid)
"""


def _serve(sock) -> None:
    """A worker's loop: one ``[pred, ref, timeout]`` JSON line in, ``1``/``0`` out, until EOF."""
    with sock, sock.makefile("rb") as requests:
        for line in requests:
            try:
                pred, ref, t = json.loads(line)
                ok = _compare_with_alarm(pred, ref, float(t))
            except Exception:
                ok = False
            sock.sendall(b"1\n" if ok else b"0\n")


def _read_line(fd: int, buf: bytes, deadline: float) -> tuple[bytes | None, bytes]:
    """``(line, rest)`` read from ``fd`` after ``buf``; ``(None, buf)`` at the deadline or EOF."""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None, buf
        chunk = os.read(fd, 4096)
        if not chunk:
            return None, buf
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return line, rest


class _Zygote:
    """Starts the zygote once (callers arriving during the start wait for that same start) and forks
    workers from it. A zygote that died is started again by the next caller."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the zygote (a forked child must not share its parent's socket)."""
        self._cond = threading.Condition()
        self._fork_lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.state = "stopped"  # -> "starting" -> "ready", or back to "stopped" when it fails

    def _start(self) -> None:
        """Spawn the zygote; a daemon thread waits for its ``ready`` (called with ``_cond`` held)."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE_CODE, root, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except Exception:
            ours.close()
            return
        finally:
            theirs.close()
        self.control, self.state = ours, "starting"
        threading.Thread(target=self._wait_ready, args=(ours,), name="bcr-verify-zygote", daemon=True).start()

    def _wait_ready(self, control: socket.socket) -> None:
        line, _ = _read_line(control.fileno(), b"", time.monotonic() + _STARTUP_S)
        with self._cond:
            if self.control is control:  # not stopped and replaced meanwhile
                if line == b"ready":
                    self.state = "ready"
                else:
                    self.stop()
            self._cond.notify_all()

    def ready(self) -> bool:
        """Start the zygote unless it runs; wait for it (at most :data:`_STARTUP_S`); True when ready."""
        with self._cond:
            if self.state == "stopped" or (self.proc is not None and self.proc.poll() is not None):
                self.stop()
                self._start()
            deadline = time.monotonic() + _STARTUP_S
            while self.state == "starting" and self._cond.wait(max(0.0, deadline - time.monotonic())):
                pass
            return self.state == "ready"

    def fork(self) -> tuple[socket.socket, int] | None:
        """A new worker: ``(its socket, its pid)``, or None when the zygote cannot give one."""
        if not self.ready():
            return None
        ours, theirs = socket.socketpair()
        with self._fork_lock:
            try:
                socket.send_fds(self.control, [b"f"], [theirs.fileno()])
                line, _ = _read_line(self.control.fileno(), b"", time.monotonic() + _STARTUP_S)
                if line is not None:
                    return ours, int(line)
            except Exception:
                pass
            finally:
                theirs.close()
        ours.close()
        with self._cond:
            self.stop()
        return None

    def stop(self) -> None:
        """Close the control socket (the zygote exits on it) and kill the process; workers stay."""
        if self.control is not None:
            self.control.close()
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except Exception:
                pass
        self.proc, self.control, self.state = None, None, "stopped"


class _Helper:
    """A worker process (forked from the zygote) running :func:`_compare_with_alarm` for one caller at
    a time (the :class:`_HelperPool` hands it out); killed when it overruns ``timeout + 1 s``."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.buf = b""

    def _kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.sock is not None:
            self.sock.close()
        self.sock, self.pid, self.buf = None, None, b""

    def start(self) -> bool:
        """Fork a worker unless this helper has a live one (an idle worker's socket is readable only
        when the worker is gone)."""
        if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
            self._kill()
        if self.sock is None:
            worker = _ZYGOTE.fork()
            if worker is None:
                return False
            self.sock, self.pid = worker
        return True

    def compare(self, pred: str, ref: str, timeout: float) -> bool:
        try:
            if not self.start():
                return False
            self.sock.sendall((json.dumps([pred, ref, timeout]) + "\n").encode())
            line, self.buf = _read_line(self.sock.fileno(), self.buf, time.monotonic() + timeout + _HARD_GRACE_S)
            if line is None:  # overran (or died): the next call forks a fresh worker
                self._kill()
                return False
            return line.strip() == b"1"
        except Exception:
            self._kill()
            return False


class _HelperPool:
    """Helpers handed out one per concurrent caller: a caller takes an idle helper, or a new one while
    fewer than :data:`MAX_HELPERS` exist (else it waits for one to come back), so the time bound holds
    per caller, not per process."""

    def __init__(self, max_helpers: int) -> None:
        self.max_helpers = max_helpers
        self.reset()

    def reset(self) -> None:
        """Forget all helpers (a forked child must not share its parent's sockets)."""
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
                return self._idle.pop()  # the most recently used one
            self._count += 1
            return _Helper()

    def start(self, count: int) -> None:
        """Fork helpers until ``count`` exist (at most ``max_helpers``) and leave them idle."""
        with self._cond:
            new = min(count, self.max_helpers) - self._count
            if new <= 0:
                return
            self._count += new
        for _ in range(new):
            helper = _Helper()
            helper.start()  # one that failed is started again when used
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


_ZYGOTE = _Zygote()
_HELPERS = _HelperPool(MAX_HELPERS)


@atexit.register
def _close_helpers() -> None:
    _HELPERS.close()
    with _ZYGOTE._cond:
        _ZYGOTE.stop()


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

    See the module docstring for the exact rules. Never raises; cached. Returns within ``timeout
    + 1 s``, plus, until math-verify is loaded in this process (main thread) or in the shared
    helper process (other threads), the wait for that one-time load (see the module docstring).
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

    Loads math-verify in this process (what checks from the main thread use) and, with ``helpers``
    > 0, starts the helper process and forks ``helpers`` workers from it (what checks from other
    threads use: one per concurrent caller, at most :data:`MAX_HELPERS`; more are forked on demand
    in milliseconds). Returns the daemon thread doing it; ``join()`` it to wait.
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
    # A forked child must not talk to its parent's helper processes through inherited sockets.
    _HELPERS.reset()
    _ZYGOTE.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
