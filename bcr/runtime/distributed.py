"""Scale-out plumbing on ``torch.distributed``: process-group setup from ``torchrun``'s environment,
rank helpers, small all-reduces, the trainer's scale-out strategies and error propagation so that
one failing rank ends the whole job instead of hanging it.

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

Scale-out strategies
--------------------
:func:`make_strategy` picks one object that owns every decision the update makes about other
ranks, so the trainer's update reads the same whichever runs:

- :class:`SingleProcess`: one process, full fp32 weights, no collectives;
- :class:`AllReduce` (``ddp``): a full replica per rank, gradients all-reduced (averaged) before
  clipping - the default on CPU/gloo;
- :class:`FullyShard` (``fsdp2``): ``fully_shard`` on each decoder layer and on the root, so
  parameters, gradients and optimizer state are sharded; every rank runs the same number of
  micro-batches (each one gathers and reduce-scatters); generation runs inside
  :meth:`~SingleProcess.full_weights`. The default on CUDA.

Mixed precision (``bf16``) is FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)``: the optimizer holds fp32 master weights, the forward and backward see
bf16 copies of them (bf16 q/k/v, bf16 LM-head GEMMs, by construction rather than through
autocast), and gradients are accumulated over micro-batches and reduced in fp32. In one process
the same policy runs on a one-rank mesh (a one-rank process group is created when none exists).

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

__all__ = [
    "AllReduce", "FullyShard", "RankFailedError", "SingleProcess", "all_reduce_max", "all_reduce_sum", "barrier",
    "broadcast_object", "dist_info", "fail_together", "init_distributed", "make_strategy", "maybe_inject_failure",
    "resolve_strategy", "teardown_distributed",
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


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(values: Sequence[float], device=None) -> list[float]:
    """Sum a list of floats over all ranks (identity in a single process)."""
    if dist_info()[1] == 1 or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


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
# Scale-out strategies of the trainer
# ----------------------------------------------------------------------------------------------
def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (one FSDP2 unit each)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"distributed_strategy=fsdp2: cannot find the decoder layers of {type(model).__name__}; "
                         "use distributed_strategy=ddp (and bf16=false)")
    return list(layers)


def _grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm of full (unsharded) ``params``, clipped to ``max_norm`` when it is > 0."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms or [torch.zeros(())])))


class SingleProcess:
    """One process with full fp32 weights: no collectives. Each method is one decision of the update
    that depends on the other ranks; :class:`AllReduce` and :class:`FullyShard` override them."""

    name = "none"

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world_size = dist_info()

    def wrap(self, root: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
        """``root`` (a module whose forward runs the HF ``model``) ready for training; returns it."""
        return root

    @contextlib.contextmanager
    def full_weights(self, root: torch.nn.Module):
        """The full weights of ``root`` in place for the duration (generation calls the HF model)."""
        yield

    def even_rows(self, rows: list) -> list:
        """``rows`` extended to the number of micro-batches every rank runs (the caller gives the added
        ones zero weight). Strategies without collectives inside the forward keep ``rows``."""
        return rows

    def set_gradient_sync(self, root: torch.nn.Module, enabled: bool) -> None:
        """Whether the next backward of ``root`` reduces gradients over ranks (the last micro-batch)."""

    def reduce_and_clip(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        """Average the gradients over ranks and clip their global norm to ``max_norm`` (0: no
        clipping); returns the norm before clipping."""
        return _grad_norm(params, max_norm)


class AllReduce(SingleProcess):
    """A full replica per rank; gradients averaged by one all-reduce per parameter (DDP-style)."""

    name = "ddp"

    def reduce_and_clip(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        for p in params:
            if p.grad is None:  # every rank must all-reduce the same tensors
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(self.world_size)
        return _grad_norm(params, max_norm)


class FullyShard(SingleProcess):
    """FSDP2 (``fully_shard``) on each decoder layer and on the root; ``param_dtype=torch.bfloat16``
    adds the mixed-precision policy (bf16 compute, fp32 master weights, fp32 gradient reduction).

    In a single process with no process group, a one-rank group is created (and kept for the
    life of the process: the sharded parameters need it)."""

    name = "fsdp2"

    def __init__(self, device: torch.device, param_dtype: torch.dtype | None = None):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        super().__init__(device)
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        reduce_dtype = torch.float32 if param_dtype is not None else None
        self.layer_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        # The root's forward takes the loss inputs (advantages, reference log-probs): keep them fp32.
        self.root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                                cast_forward_inputs=False)

    def wrap(self, root: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
        """Shard each decoder layer of ``model``, then ``root`` (its hooks gather what the layers do not
        hold: embedding, final norm, LM head). ``model`` keeps working as an HF model whose
        parameters are DTensor shards (see :meth:`full_weights`)."""
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, mp_policy=self.layer_policy)
        fully_shard(root, mesh=self.mesh, mp_policy=self.root_policy)
        # FSDP2 picks its root at the first forward; generation calls the layers directly, so fix it now.
        root._get_fsdp_state()._lazy_init()
        return root

    @contextlib.contextmanager
    def full_weights(self, root: torch.nn.Module):
        """Every FSDP2 unit of ``root`` unsharded (in the compute dtype) for the duration. Generation runs
        the HF model forward a different number of times on each rank: no collective may happen inside."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in root.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def even_rows(self, rows: list) -> list:
        most = int(all_reduce_max([len(rows)], self.device)[0])
        return rows + [rows[0]] * (most - len(rows))

    def set_gradient_sync(self, root: torch.nn.Module, enabled: bool) -> None:
        root.set_requires_gradient_sync(enabled)  # reduce-scatter once, after the last micro-batch

    def reduce_and_clip(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        # The gradients were reduce-scattered in backward; the norm of DTensor gradients is a DTensor.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def make_strategy(name: str, device: torch.device, *, bf16: bool = False) -> SingleProcess:
    """The scale-out strategy of ``distributed_strategy=name`` at this world size (see
    :func:`resolve_strategy`); ``bf16`` selects the mixed-precision policy, which runs through FSDP2
    (on a one-rank mesh in a single process)."""
    resolved = resolve_strategy(name, dist_info()[1], device)
    if resolved == "ddp":
        if bf16:
            raise ValueError("bf16=true needs FSDP2's mixed-precision policy; set distributed_strategy=fsdp2 "
                             "(or auto on CUDA), or bf16=false for plain fp32 data parallel")
        return AllReduce(device)
    if resolved == "fsdp2" or bf16:
        return FullyShard(device, param_dtype=torch.bfloat16 if bf16 else None)
    return SingleProcess(device)


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
