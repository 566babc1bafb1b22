"""Compile every Triton kernel of ``bcr_kernels`` ahead of time for the GPUs it will meet, on a CPU.

    python tests/kernels/gpu_compile.py                      # sm_90 and sm_80: a table, exit 1 on a failure
    python tests/kernels/gpu_compile.py --json OUT.json --targets sm_90

Triton compiles for an explicit ``GPUTarget`` with the ptxas it ships, without a driver or a GPU.
What is compiled is what a real launch compiles: each spec below calls a public op the way the
trainer does, at the trainer's real sizes (packed rows of 16k tokens, V = 151936, bf16 hidden
states and LM head, fp32 per-token vectors), on ``meta`` tensors (shapes and dtypes, no memory).
Every kernel launch is intercepted instead of run (``JITFunction.run``), and its arguments are
specialised by Triton's own launch-time binder for the target: pointer dtypes, 16-byte alignment
of each pointer (from the view's storage offset), integers divisible by 16 or equal to 1, the
constexpr block sizes and ``num_warps`` the op's own code picked. Each distinct specialisation is
compiled once per target.

It fails on a compile error, on shared memory above what one block may use on the target, and on a
kernel of ``bcr_kernels`` that no spec launches (a new kernel needs a spec in ``SPECS``); it reports
registers per thread and spilled (local-memory) bytes per thread from the cubin
(``cuobjdump --dump-resource-usage``, Triton's ``n_spills`` is the same number).

An ``@triton.autotune`` kernel is compiled in every one of its configs. A spec that cannot run on
``meta`` tensors (an op that reads a value back to the host) can call the op's internal launch
function instead, with the tensors it would get. Run in a process of its own without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit``
returns interpreted functions, which cannot be compiled): ``test_compile_gpu.py`` does that.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------
# targets and the trainer's sizes

#: name -> (capability, shared memory one block may use: the opt-in maximum per block, bytes)
TARGETS = {
    "sm_90": (90, 227 * 1024),  # H100: 228 KiB per SM, 227 KiB per block
    "sm_80": (80, 163 * 1024),  # A100: 164 KiB per SM, 163 KiB per block
}

ROW_TOKENS = 16384  # max_tokens_per_microbatch of the GPU recipes: one packed row
VOCAB = 151936  # Qwen2.5 / Qwen3
HIDDEN = 1536  # Qwen2.5-1.5B
SEQUENCES = 16  # sequences in a row (8 completions of ~1k tokens + prompts, or 16 shorter ones)
N_MAX = 8  # problems per bundle
META = torch.device("meta")


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def cu_seqlens(total: int, sequences: int = SEQUENCES) -> torch.Tensor:
    return meta(sequences + 1, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# specs: each calls public ops as the trainer does; every kernel it launches is compiled.
# One entry per op; a new kernel is launched by an existing spec or needs a new one here.


def spec_token_logprobs() -> None:
    from bcr_kernels import token_logprobs

    for dtype in (torch.bfloat16, torch.float32):
        for entropy in (False, True):
            logits = meta(ROW_TOKENS, VOCAB, dtype=dtype).requires_grad_()
            out = token_logprobs(logits, meta(ROW_TOKENS, dtype=torch.long), return_entropy=entropy)
            out.logp.backward(meta(ROW_TOKENS))


def spec_fused_linear_logprobs() -> None:
    from bcr_kernels import fused_linear_logprobs

    for tokens in (ROW_TOKENS, ROW_TOKENS - 1):
        hidden = meta(tokens, HIDDEN, dtype=torch.bfloat16).requires_grad_()
        weight = meta(VOCAB, HIDDEN, dtype=torch.bfloat16).requires_grad_()
        out = fused_linear_logprobs(hidden, weight, meta(tokens, dtype=torch.long), return_entropy=True)
        out.logp.backward(meta(tokens))


def _loss_inputs(tokens: int) -> dict:
    return {"advantages": meta(tokens), "mask": meta(tokens), "cu_seqlens": cu_seqlens(tokens)}


#: (reduction, with the KL term): every combination the kernels specialise on
LOSS_VARIANTS = [("token_mean", False), ("token_mean", True), ("seq_mean_token_mean", False),
                 ("seq_mean_token_mean", True), ("seq_mean_token_sum_norm", False)]


def spec_fused_linear_policy_loss() -> None:
    from bcr_kernels import Objective, fused_linear_policy_loss

    for tokens in (ROW_TOKENS, ROW_TOKENS - 1):
        # the loss variants, and the entropy bonus (its gradient runs through the log-softmax backward)
        for reduction, kl, bonus in [(r, k, 0.0) for r, k in LOSS_VARIANTS] + [("token_mean", False, 0.01)]:
            hidden = meta(tokens, HIDDEN, dtype=torch.bfloat16).requires_grad_()
            weight = meta(VOCAB, HIDDEN, dtype=torch.bfloat16).requires_grad_()
            objective = Objective(reduction=reduction, beta=0.04 if kl else 0.0, max_completion_length=1024,
                                  entropy_coef=bonus)
            out = fused_linear_policy_loss(
                hidden, weight, meta(tokens, dtype=torch.long), **_loss_inputs(tokens), objective=objective,
                ref_logp=meta(tokens) if kl else None, normalizer=float(tokens), return_entropy=True)
            out.loss.backward()


def spec_policy_loss() -> None:
    from bcr_kernels import Objective, policy_loss

    for tokens in (ROW_TOKENS, ROW_TOKENS - 1):  # a row padded to a multiple of 16, and one that is not
        for reduction, kl in LOSS_VARIANTS:
            logp = meta(tokens).requires_grad_()
            objective = Objective(reduction=reduction, beta=0.04 if kl else 0.0, max_completion_length=1024)
            out = policy_loss(logp, meta(tokens), **_loss_inputs(tokens), objective=objective,
                              ref_logp=meta(tokens) if kl else None, normalizer=float(tokens))
            out.loss.backward()


def spec_scatter_instance_advantages() -> None:
    from bcr_kernels import scatter_instance_advantages

    for tokens in (ROW_TOKENS, ROW_TOKENS - 1):
        for n_max in (1, N_MAX, 16):  # N = 1 specialises to a constant; N_P2 > 8 halves the block
            for shared in ("mean", "zero"):
                adv = meta(SEQUENCES, n_max).requires_grad_()
                out = scatter_instance_advantages(adv, meta(tokens, dtype=torch.long), cu_seqlens(tokens),
                                                  num_instances=meta(SEQUENCES, dtype=torch.long), shared=shared,
                                                  validate=False)
                out.backward(meta(tokens))


def spec_packed_targets() -> None:
    from bcr_kernels import packed_targets

    for tokens in (ROW_TOKENS, ROW_TOKENS - 1):
        packed_targets(meta(tokens, dtype=torch.long), cu_seqlens(tokens))


SPECS: dict[str, Callable[[], None]] = {
    "token_logprobs": spec_token_logprobs,
    "fused_linear_logprobs": spec_fused_linear_logprobs,
    "fused_linear_policy_loss": spec_fused_linear_policy_loss,
    "policy_loss": spec_policy_loss,
    "scatter_instance_advantages": spec_scatter_instance_advantages,
    "packed_targets": spec_packed_targets,
}

#: ``@triton.jit`` functions that are only called from other kernels (never launched): compiled inside
#: their callers. name -> the kernel that calls it.
DEVICE_FUNCTIONS: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------
# kernels, launches


def kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function defined in a module of ``bcr_kernels``: qualified name -> function."""
    from triton.runtime.jit import JITFunction, KernelInterface

    import bcr_kernels

    found: dict[str, object] = {}
    for info in pkgutil.walk_packages(bcr_kernels.__path__, "bcr_kernels."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            while isinstance(value, KernelInterface) and not isinstance(value, JITFunction):
                value = value.fn  # @triton.autotune / @triton.heuristics wrap the JITFunction
            if isinstance(value, JITFunction) and value.fn.__module__.startswith("bcr_kernels"):
                found[f"{value.fn.__module__}.{value.fn.__name__}"] = value
    return found


@dataclass
class Launch:
    spec: str
    kernel: object  # JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def intercepted_launches(launches: list[Launch], spec: str):
    """Record every Triton launch instead of running it, and let the ops pick Triton on meta tensors."""
    from triton.runtime.jit import JITFunction

    import bcr_kernels
    from bcr_kernels import _dispatch

    from triton.runtime.autotuner import Autotuner

    saved_run, saved_tune = JITFunction.run, Autotuner.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(spec, self, args, kwargs))

    def every_config(self, *args, **kwargs):  # an autotuned kernel: each of its configs is a launch
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    patched = [(_dispatch, "use_triton", _dispatch.use_triton)]
    for info in pkgutil.walk_packages(bcr_kernels.__path__, "bcr_kernels."):
        module = importlib.import_module(info.name)
        if getattr(module, "use_triton", None) is _dispatch.use_triton:
            patched.append((module, "use_triton", module.use_triton))
    JITFunction.run, Autotuner.run = record, every_config
    for module, name, _ in patched:
        setattr(module, name, lambda *tensors: True)
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved_run, saved_tune
        for module, name, value in patched:
            setattr(module, name, value)


class Pointer:
    """What Triton's binder sees of a tensor: its dtype and address (16-byte aligned or not, as the view
    would be in memory from the CUDA caching allocator, whose blocks are 512-byte aligned)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 1 << 20 if (t.storage_offset() * t.element_size()) % 16 == 0 else (1 << 20) + 4

    def data_ptr(self) -> int:
        return self._ptr


def pointer_args(values):
    return [Pointer(v) if isinstance(v, torch.Tensor) else v for v in values]


# --------------------------------------------------------------------------------------------------
# compile


@dataclass
class Result:
    kernel: str
    target: str
    specs: list[str]
    signature: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int = 0
    seconds: float = 0.0
    error: str | None = None
    key: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def specialise(launch: Launch, backend):
    """``(options, signature, constexprs, attrs)`` as ``JITFunction.run`` computes them for this target."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in launch.kwargs.items()}
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*pointer_args(launch.args), **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) per thread of the cubin's one kernel, from cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{text}")
    return int(m.group(1)), int(m.group(2))


def compile_all(launches: list[Launch], targets: list[str]) -> list[Result]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    results: dict[tuple, Result] = {}
    for tname in targets:
        capability, limit = TARGETS[tname]
        target = GPUTarget("cuda", capability, 32)
        backend = make_backend(target)
        for launch in launches:
            name = f"{launch.kernel.fn.__module__}.{launch.kernel.fn.__name__}"
            options, signature, constexprs, attrs = specialise(launch, backend)
            key = (name, tname, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   options.num_warps, options.num_stages)
            if key in results:
                if launch.spec not in results[key].specs:
                    results[key].specs.append(launch.spec)
                continue
            aligned = {launch.kernel.arg_names[k[0]] for k, v in attrs.items() if v}
            sig = ", ".join(
                f"{n}={constexprs[(i,)]!r}" if (i,) in constexprs else f"{n}:{t}{'/16' if n in aligned else ''}"
                for i, (n, t) in enumerate(signature.items()))
            r = Result(name, tname, [launch.spec], sig, options.num_warps, options.num_stages, shared_limit=limit,
                       key=repr(key))
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                r.shared_bytes = int(compiled.metadata.shared)
                r.registers, r.spill_bytes = resource_usage(compiled.asm["cubin"])
                if r.shared_bytes > limit:
                    r.error = f"shared memory {r.shared_bytes} B > {limit} B per block on {tname}"
            except Exception as exc:  # noqa: BLE001  (every failure becomes a row of the table)
                r.error = f"{type(exc).__name__}: {exc}"[-2000:]
            r.seconds = time.perf_counter() - t0
            results[key] = r
    return list(results.values())


def run(targets: list[str]) -> dict:
    """Capture every spec's launches, check coverage, compile; a JSON-able report."""
    os.environ.pop("TRITON_INTERPRET", None)
    found = kernels()
    launches: list[Launch] = []
    spec_errors: dict[str, str] = {}
    for name, spec in SPECS.items():
        with intercepted_launches(launches, name):
            try:
                spec()
            except Exception as exc:  # noqa: BLE001
                spec_errors[name] = f"{type(exc).__name__}: {exc}"
    launched = {f"{x.kernel.fn.__module__}.{x.kernel.fn.__name__}" for x in launches}
    uncovered = sorted(n for n in found if n not in launched and n.rsplit(".", 1)[1] not in DEVICE_FUNCTIONS)
    results = compile_all(launches, targets)
    return {
        "triton": __import__("triton").__version__,
        "torch": torch.__version__,
        "targets": {t: {"capability": TARGETS[t][0], "shared_limit_bytes": TARGETS[t][1]} for t in targets},
        "kernels": sorted(found),
        "uncovered": uncovered,
        "spec_errors": spec_errors,
        "launches": len(launches),
        "results": [asdict(r) | {"ok": r.ok} for r in results],
    }


def table(report: dict) -> str:
    lines = ["| target | kernel | specialisation | warps | regs | spill B | shared B | s | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["results"], key=lambda r: (r["target"], r["kernel"], r["signature"])):
        lines.append(
            f"| {r['target']} | {r['kernel'].rsplit('.', 1)[1]} | {r['signature']} | {r['num_warps']} | "
            f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['seconds']:.1f} | "
            f"{'yes' if r['ok'] else '**no**: ' + r['error'].splitlines()[0][:200]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {tuple(TARGETS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    report = run([t.strip() for t in args.targets.split(",") if t.strip()])
    print(table(report))
    for name, err in report["spec_errors"].items():
        print(f"spec {name} failed: {err}")
    for name in report["uncovered"]:
        print(f"kernel {name} is launched by no spec: add one to SPECS in {Path(__file__).name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    bad = report["spec_errors"] or report["uncovered"] or not all(r["ok"] for r in report["results"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
