"""Scale-out plumbing on ``torch.distributed``: process-group setup from ``torchrun``'s environment,
rank helpers, small all-reduces, the choice between FSDP2 and plain data parallel, and error
propagation so that one failing rank ends the whole job instead of hanging it.

Launch (nothing in the config changes; one process stays the default and needs none of this)::

    torchrun --nproc-per-node 8 -m bcr train --config cfg.yaml
    torchrun --nnodes 2 --node-rank $R --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint $HOST:29500 -m bcr train --config cfg.yaml

``init_distributed()`` reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (set by torchrun), picks
``nccl`` on CUDA and ``gloo`` on CPU, pins each process to GPU ``LOCAL_RANK`` and sets the
collective timeout (``distributed_timeout`` seconds: a collective that waits longer raises instead
of hanging).

Failures
--------
A rank that raises inside a guarded section (:func:`fail_together`: each training step, each
checkpoint, each evaluation batch) posts ``"rank r failed in <where>: <error>"`` to the process
group's key-value store before it exits. Every other rank then stops with
:class:`RankFailedError` naming the failed rank and its error, by one of three routes, whichever
comes first:

1. its next collective fails (gloo: the peer's connection closed) and ``fail_together`` finds the
   posted error;
2. a watchdog thread (started by ``init_distributed``) sees the posted error within a second,
   prints the clear message on stderr and, if the main thread has not ended within
   ``WATCHDOG_GRACE_S`` (e.g. blocked in an NCCL collective), exits the process with status 1;
3. the collective timeout (``distributed_timeout``) - the last resort.

Test hook: ``BCR_TEST_FAIL_RANK=<r>`` makes rank ``r`` raise inside the training step (and inside an
evaluation batch); ``BCR_TEST_FAIL_STEP=<s>`` picks the step (default: the first one). Only tests
set these.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

import torch

from .metrics import all_reduce_sum, dist_info

__all__ = [
    "RankFailedError", "all_reduce_max", "all_reduce_sum", "barrier", "broadcast_object", "dist_info",
    "fail_together", "init_distributed", "is_main_process", "maybe_inject_failure", "resolve_strategy",
    "teardown_distributed",
]

DEFAULT_TIMEOUT_S = 1800.0
WATCHDOG_POLL_S = 0.5
WATCHDOG_GRACE_S = 20.0
ACK_WAIT_S = 5.0
ENV_FAIL_RANK = "BCR_TEST_FAIL_RANK"
ENV_FAIL_STEP = "BCR_TEST_FAIL_STEP"
_ERROR_KEY = "bcr/first_error"
_ACK_KEY = "bcr/error_acks"
STRATEGIES = ("auto", "fsdp2", "ddp")


class RankFailedError(RuntimeError):
    """Another rank of the job failed; this rank stops too (the message names the rank and its error)."""


# ----------------------------------------------------------------------------------------------
# Setup and teardown
# ----------------------------------------------------------------------------------------------
_state: dict = {"owned": False, "watchdog": None, "stop": None}


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    A no-op (returns False) in a single process or when the group already exists (the caller
    manages it). Returns True when this call created the group (then
    :func:`teardown_distributed` destroys it).
    """
    import torch.distributed as dist

    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
    kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    _state["owned"] = True
    _start_watchdog()
    return True


def teardown_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    import torch.distributed as dist

    stop, thread = _state.get("stop"), _state.get("watchdog")
    if stop is not None:
        stop.set()
    if thread is not None:  # never leave it inside a store call while the group is destroyed
        thread.join(timeout=5.0)
    if _state["owned"] and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(owned=False, watchdog=None, stop=None)


@contextlib.contextmanager
def distributed_session(timeout_s: float | None = None):
    """``with distributed_session(): ...`` = init from torchrun's environment, always tear down."""
    init_distributed(timeout_s)
    try:
        yield dist_info()
    finally:
        teardown_distributed()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    return dist_info()[0] == 0


def barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def all_reduce_max(values: Sequence[float], device=None) -> list[float]:
    """Element-wise maximum over ranks (identity in a single process)."""
    if dist_info()[1] == 1 or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def resolve_strategy(name: str, world_size: int, device: torch.device) -> str:
    """``"none"`` in one process; else ``"fsdp2"`` or ``"ddp"`` (``"auto"``: FSDP2 on CUDA, DDP-style
    gradient all-reduce on CPU)."""
    if name not in STRATEGIES:
        raise ValueError(f"distributed_strategy={name!r}: must be one of {list(STRATEGIES)}")
    if world_size <= 1:
        return "none"
    if name == "auto":
        return "fsdp2" if device.type == "cuda" else "ddp"
    return name


def global_std(values: Sequence[torch.Tensor], device=None) -> float:
    """Unbiased std (Bessel) of all elements of ``values`` on all ranks: all-reduces sum, sum of
    squares and count. 0.0 with fewer than two values."""
    flat = torch.cat([v.reshape(-1).double() for v in values]) if values else torch.zeros(0, dtype=torch.float64)
    s, sq, n = all_reduce_sum([float(flat.sum()), float((flat * flat).sum()), float(flat.numel())], device)
    if n < 2:
        return 0.0
    return max(0.0, (sq - s * s / n) / (n - 1)) ** 0.5


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------
def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001  # pragma: no cover - private API moved
        return None


def _post_error(message: str) -> None:
    store = _store()
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.compare_set(_ERROR_KEY, "", message)  # the first failure wins


def _read_error(wait_s: float = 0.0) -> str | None:
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_ERROR_KEY]):
                return store.get(_ERROR_KEY).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the store's host is gone
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _failure_message(rank: int, where: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"rank {rank} failed in {where}: {type(err).__name__}: {text[0] if text else ''}"


def _stopping_message(rank: int, world: int, posted: str) -> str:
    return (f"rank {rank}/{world}: stopping because {posted} "
            "(the failed rank's traceback is above; fix it and resume with resume_from=latest)")


def _looks_like_collective_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "distbackend",
                                   "peer", "socket", "broken pipe"))


@contextlib.contextmanager
def fail_together(where: str):
    """Guard a section in which every rank runs the same collectives.

    An exception on this rank is posted to the store (so the other ranks stop with a message naming
    it) and re-raised unchanged. An exception caused by another rank's failure (its collective
    broke) becomes a :class:`RankFailedError` naming that rank and its error.
    """
    rank, world = dist_info()
    if world == 1:
        yield
        return
    try:
        yield
    except RankFailedError:
        raise
    except Exception as err:
        posted = _read_error(wait_s=2.0 if _looks_like_collective_error(err) else 0.0)
        if posted is not None and not posted.startswith(f"rank {rank} "):
            raise RankFailedError(_stopping_message(rank, world, posted)) from err
        message = _failure_message(rank, where, err)
        _post_error(message)
        print(f"[bcr] {message}", file=sys.stderr, flush=True)
        _wait_for_acks(world)
        raise


def _wait_for_acks(world: int) -> None:
    """Give the other ranks' watchdogs a moment to report before this process exits."""
    store = _store()
    if store is None or _state.get("watchdog") is None:
        return
    deadline = time.monotonic() + ACK_WAIT_S
    with contextlib.suppress(Exception):
        while store.add(_ACK_KEY, 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.1)


def _start_watchdog() -> None:
    store = _store()
    if store is None:
        return
    rank, world = dist_info()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(WATCHDOG_POLL_S):
            try:
                if not store.check([_ERROR_KEY]):
                    continue
                posted = store.get(_ERROR_KEY).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            if posted.startswith(f"rank {rank} "):
                return
            print(f"[bcr] {_stopping_message(rank, world, posted)}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                store.add(_ACK_KEY, 1)
            if not stop.wait(WATCHDOG_GRACE_S):  # the main thread did not end: it is stuck in a collective
                print(f"[bcr] rank {rank}: exiting (still blocked {WATCHDOG_GRACE_S:.0f} s after the failure)",
                      file=sys.stderr, flush=True)
                os._exit(1)
            return

    thread = threading.Thread(target=watch, name="bcr-failure-watchdog", daemon=True)
    thread.start()
    _state.update(watchdog=thread, stop=stop)


def maybe_inject_failure(where: str, step: int | None = None) -> None:
    """Test hook: raise on rank ``$BCR_TEST_FAIL_RANK`` (at step ``$BCR_TEST_FAIL_STEP``, default the first)."""
    target = os.environ.get(ENV_FAIL_RANK)
    if target is None or target == "":
        return
    rank = dist_info()[0]
    if int(target) != rank:
        return
    want = os.environ.get(ENV_FAIL_STEP)
    if step is not None and want not in (None, "") and int(want) != step:
        return
    if step is not None and want in (None, "") and _state.setdefault("injected", False):
        return
    _state["injected"] = True
    raise RuntimeError(f"{ENV_FAIL_RANK}={target}: injected failure on rank {rank} in {where} (test hook)")
