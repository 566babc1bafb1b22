"""CPU profile of the LM-head + token log-prob step: fused chunked path vs materialised logits.

    python -m benchmarks.cpu_fused_logprobs --out benchmarks/results/cpu_fused_logprobs.json

For each dtype, token count T and variant, one FRESH Python subprocess builds the inputs
(``hidden [T, H]``, ``weight [V, H]``, both requiring grad, random ``targets``, an arbitrary upstream
gradient ``g [T]``), runs one untimed warm-up step, then ``--repeats`` measured steps. A step is the
forward plus ``torch.autograd.grad(logp, [hidden, weight], g)`` (so the two gradients are returned).

Variants
- ``ours``: ``bcr_kernels.fused_linear_logprobs`` on its chunked PyTorch path (``BCR_KERNEL_BACKEND=torch``);
- ``materialised``: ``F.linear`` (the lm_head) + ``log_softmax`` + ``gather`` on the full ``[T, V]`` logits;
- ``trl``: TRL's ``selective_log_softmax`` on the full logits (only when ``trl`` is importable).

Memory method (per measured step, Linux): right before the step the peak-RSS counter of the process
is reset (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``) and ``VmRSS`` is read as the baseline;
it already holds the inputs. After the step ``VmHWM`` is the exact peak RSS during the step. The
reported *extra memory* is ``VmHWM - baseline - bytes(returned gradients)``: the memory the step
needed beyond its inputs and the ``[T, H]`` + ``[V, H]`` gradients every variant must return. The
step's outputs are freed before the next repeat. Because the gradients are subtracted over the
whole step, forward-time temporaries that are freed before the gradients exist are only visible
when they exceed the gradients' size (this favours the materialised variant at small T); the
plain ``peak growth`` (``VmHWM - baseline``) is reported as well. Children run with ``MALLOC_MMAP_THRESHOLD_=1 MiB``
so freed large blocks go back to the OS (glibc's dynamic threshold could otherwise keep freed blocks
resident and hide them from the next step's growth). If ``clear_refs`` is not writable, a sampling
thread (1 ms period) reads ``VmRSS`` instead (a lower bound; the JSON says which method ran). Both are
``benchmarks.harness.MemoryProbe``; the fresh children are ``benchmarks.harness.run_child``.

Time: wall-clock of each measured step (``time.perf_counter``); the table shows the median and the
spread (min-max) over repeats. Other processes on the machine add noise: compare medians, and repeat.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bcr.runtime.io import atomic_write_json
from bcr_kernels import fused_linear_logprobs

from . import harness
from .harness import MiB

MODULE = "benchmarks.cpu_fused_logprobs"
VARIANTS = ("ours", "materialised", "trl")
# the CPU users' path (the kernels' chunked PyTorch code, never the interpreter); freed large blocks
# go back to the OS at once so the next step's growth is not hidden
CHILD_ENV = {"BCR_KERNEL_BACKEND": "torch", "MALLOC_MMAP_THRESHOLD_": str(1 * MiB), "MALLOC_TRIM_THRESHOLD_": str(1 * MiB)}


# --------------------------------------------------------------------------------------------------
# child: one variant, one shape


def _make_step(variant: str, chunk_tokens: int | None):
    if variant == "ours":

        def logprobs(hidden, weight, targets):
            return fused_linear_logprobs(hidden, weight, targets, chunk_tokens=chunk_tokens).logp

    elif variant == "materialised":

        def logprobs(hidden, weight, targets):
            logits = F.linear(hidden, weight).float()
            return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    elif variant == "trl":
        from trl.trainer.utils import selective_log_softmax

        def logprobs(hidden, weight, targets):
            return selective_log_softmax(F.linear(hidden, weight), targets).float()

    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")

    def step(hidden, weight, targets, upstream):
        logp = logprobs(hidden, weight, targets)
        return torch.autograd.grad(logp, [hidden, weight], upstream)

    return step


def child_main(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    T, H, V = spec["tokens"], spec["hidden"], spec["vocab"]
    g = torch.Generator().manual_seed(spec["seed"])
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    upstream = torch.randn(T, generator=g)  # an arbitrary per-token upstream gradient
    step = _make_step(spec["variant"], spec.get("chunk_tokens"))

    grads = step(hidden, weight, targets, upstream)  # warm-up: not timed, not measured
    grad_bytes = sum(t.numel() * t.element_size() for t in grads)
    del grads
    gc.collect()

    probe = harness.MemoryProbe(torch.device("cpu"))
    times, extras, growths = [], [], []
    for _ in range(spec["repeats"]):
        gc.collect()
        with probe.measure() as mem:
            t0 = time.perf_counter()
            grads = step(hidden, weight, targets, upstream)
            times.append(time.perf_counter() - t0)
        extras.append(mem["growth_bytes"] - grad_bytes)
        growths.append(mem["growth_bytes"])
        del grads
    return {
        **spec,
        "times_s": times,
        "extra_bytes": extras,
        "peak_growth_bytes": growths,
        "grad_bytes": grad_bytes,
        "input_bytes": sum(t.numel() * t.element_size() for t in (hidden, weight)),
        "memory_method": probe.method,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


# --------------------------------------------------------------------------------------------------
# parent: orchestrate, print, write JSON


def _available(variant: str) -> tuple[bool, str]:
    if variant != "trl":
        return True, ""
    try:
        import trl.trainer.utils  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"trl not importable ({type(exc).__name__}: {exc})"
    return True, ""


def run_child(spec: dict, timeout: float) -> dict:
    result = harness.run_child(MODULE, spec, timeout=timeout, env=CHILD_ENV)
    return {**spec, **result} if "error" in result else result


def _fmt_time(r):
    t = r["times_s"]
    return f"{statistics.median(t):7.2f} s ({min(t):.2f}-{max(t):.2f})"


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            continue
        base = next(
            (b for b in results if b.get("variant") == "materialised" and b["dtype"] == r["dtype"]
             and b["tokens"] == r["tokens"] and "times_s" in b),
            None,
        )
        row = {
            "dtype": r["dtype"], "tokens": r["tokens"], "variant": r["variant"],
            "time_median_s": statistics.median(r["times_s"]),
            "time_min_s": min(r["times_s"]), "time_max_s": max(r["times_s"]),
            "extra_mib_median": statistics.median(r["extra_bytes"]) / MiB,
            "extra_mib_max": max(r["extra_bytes"]) / MiB,
            "peak_growth_mib_median": statistics.median(r["peak_growth_bytes"]) / MiB,
        }
        if base is not None:
            row["time_ratio_vs_materialised"] = row["time_median_s"] / statistics.median(base["times_s"])
            row["memory_ratio_vs_materialised"] = statistics.median(r["extra_bytes"]) / max(
                statistics.median(base["extra_bytes"]), 1
            )
        rows.append(row)
    return rows


def print_table(rows: list[dict], results: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        Console = None
    header = ["dtype", "T", "variant", "time median (min-max)", "extra MiB", "peak growth MiB", "time / mat.",
              "mem / mat."]
    lines = []
    for row, r in zip(rows, [r for r in results if "times_s" in r]):
        lines.append([
            row["dtype"], str(row["tokens"]), row["variant"], _fmt_time(r), f"{row['extra_mib_median']:.0f}",
            f"{row['peak_growth_mib_median']:.0f}",
            f"{row.get('time_ratio_vs_materialised', float('nan')):.3f}",
            f"{row.get('memory_ratio_vs_materialised', float('nan')):.3f}",
        ])
    if Console is not None:
        table = Table(title="LM head + token log-probs, forward + backward (CPU)")
        for h in header:
            table.add_column(h)
        for line in lines:
            table.add_row(*line)
        Console(width=150).print(table)
    else:
        print(" | ".join(header))
        for line in lines:
            print(" | ".join(line))
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"[{r['dtype']} T={r['tokens']} {r['variant']}] {r.get('error') or r.get('skipped')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=3, help="measured steps per child (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh children per (dtype, T, variant); rounds interleave the variants")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in children (0: torch default)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="ours: chunk_tokens (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    p.add_argument("--out", type=Path, default=None, help="write JSON results here")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        return harness.child_entry(args.child, child_main)

    results = []
    for dtype in args.dtypes:
        for tokens in args.tokens:
            per_variant: dict[str, dict] = {}
            for rnd in range(args.rounds):
                for variant in args.variants:
                    ok, why = _available(variant)
                    spec = {"variant": variant, "dtype": dtype, "tokens": tokens, "hidden": args.hidden,
                            "vocab": args.vocab, "repeats": args.repeats, "threads": args.threads,
                            "chunk_tokens": args.chunk_tokens, "seed": args.seed}
                    if not ok:
                        per_variant.setdefault(variant, {**spec, "skipped": why})
                        continue
                    print(f"[{dtype} T={tokens} {variant} round {rnd + 1}/{args.rounds}] ...", flush=True)
                    r = run_child(spec, args.timeout)
                    if "error" in r:
                        per_variant[variant] = r
                        print(r["error"], flush=True)
                        continue
                    prev = per_variant.get(variant)
                    if prev is None or "times_s" not in prev:
                        per_variant[variant] = r
                    else:  # pool the rounds
                        prev["times_s"] += r["times_s"]
                        prev["extra_bytes"] += r["extra_bytes"]
                        prev["peak_growth_bytes"] += r["peak_growth_bytes"]
            results.extend(per_variant.values())

    rows = summarise(results)
    print_table(rows, results)
    if args.out is not None:
        payload = {
            "command": harness.command(MODULE, argv),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()},
            "summary": rows,
            "runs": results,
        }
        atomic_write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
