"""One prepared GPU check: the measurements a first GPU session needs, in one run of a few minutes.

    bash benchmarks/gpu_check.sh [OUT_DIR]                   # on a CUDA machine (<= 8 min on one H100/H200)
    python -m benchmarks.gpu_check OUT_DIR --smoke           # tiny sizes on the CPU: proves the script runs

Nothing is downloaded: every model is random-init from a config of Qwen2.5-1.5B's shape (hidden 1536,
28 layers, 12 query / 2 key-value heads of 128, vocabulary 151936). Parts (``--parts``), each written
to ``<OUT_DIR>/gpu_check.json`` as soon as it finishes, so a run cut short keeps what it measured:

- ``tests``: ``pytest -m gpu`` over the test modules that hold ``gpu``-marked tests, in a subprocess
  (budget 150 s).
- ``token_logprobs``: ``bcr_kernels.token_logprobs`` on bf16 logits ``[T, V]`` (T = 16384, V = 151936),
  forward and backward timed separately with CUDA events. Bytes moved are the op's minimum traffic:
  forward reads the logits once (``T V 2`` bytes) plus targets (``8 T``) and writes fp32 log-probs
  (``4 T``); backward reads the logits and writes their gradient (``2 T V 2``) plus ``16 T`` for
  targets, upstream gradient and the saved log-sum-exp. Effective bandwidth = bytes / median time,
  compared with the device's HBM peak from ``HBM_PEAK_TBPS`` (by device name; ``--hbm-peak`` overrides).
  Target: >= 80 % of peak. (Budget 20 s.)
- ``head``: LM head + token log-probs, forward + backward (gradients of hidden and weight, an arbitrary
  upstream ``[T]`` gradient) at T = 16384, H = 1536, V = 151936, bf16: ``fused_linear_logprobs`` vs the
  materialised ``F.linear`` + fp32 ``log_softmax`` + ``gather`` vs Liger's fused linear cross-entropy
  (a scalar mean loss, so a scalar upstream gradient; only where ``liger_kernel`` is installed).
  Median time and peak extra CUDA memory (``max_memory_allocated`` over the step minus what was
  allocated before it, i.e. the gradients plus every temporary). Targets: fused <= 1/8 of the
  materialised memory at <= 1.15x its time. (Budget 40 s.)
- ``attention``: ``bcr_kernels.varlen_attention`` on one packed row of the 1.5B attention shape
  (T = 16384 in 13 sequences of 256..2048 tokens, seeded, bf16), forward and forward + backward, with each
  backend forced: ``flash_attn``, ``torch_varlen`` (``torch.nn.attention.varlen``), ``sdpa``; a
  backend that is not available (or that falls back to SDPA) is reported as skipped with the reason.
  (Budget 20 s.)
- ``step``: the full training step at equal batch (``python -m benchmarks.profile_step --preset
  qwen2.5-1.5b``: 8 completions, budget 1024; each variant in a fresh process): ``packed``
  (``BCRTrainer``'s own update) vs ``padded-eager`` vs ``packed-liger`` and ``trl`` where installed.
  Targets: packed >= 1.5x padded-eager tokens/s at <= 0.5x its peak memory (``max_memory_allocated``),
  and ahead of the fastest of Liger / TRL. (Budget 240 s: up to four children, each compiling its
  kernels in its warm-up step.)

``--smoke`` runs every part at tiny sizes on whatever device there is (CPU in CI): parts or
measurements that need CUDA are skipped with the reason, and no target is judged. It proves the
script runs; its numbers mean nothing.

Output: one markdown table on stdout and in ``gpu_check.md`` (measurement, value, target, met), and
``gpu_check.json`` (every raw number, device, versions, date, command).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bcr_kernels import fused_linear_logprobs, token_logprobs, varlen_attention
from bcr_kernels._varlen_attention import last_dispatch

from . import harness, profile_step
from .harness import MiB

MODULE = "benchmarks.gpu_check"
GB = 1e9

# HBM peak bandwidth (TB/s = 1e12 bytes/s) by device name, from the vendor's data sheets. The first
# pattern that occurs in torch.cuda.get_device_name() wins, so the more specific names come first.
HBM_PEAK_TBPS: list[tuple[str, float, str]] = [
    ("GH200 144G", 4.9, "GH200 144 GB HBM3e"),
    ("GH200", 4.0, "GH200 96 GB HBM3"),
    ("H200", 4.8, "H200 141 GB HBM3e"),
    ("H100 NVL", 3.9, "H100 NVL 94 GB HBM3"),
    ("H100 PCIe", 2.0, "H100 PCIe 80 GB HBM2e"),
    ("H100", 3.35, "H100 SXM 80 GB HBM3"),
    ("H800", 3.35, "H800 SXM 80 GB HBM3"),
    ("B200", 8.0, "B200 HBM3e"),
    ("A100-SXM4-80GB", 2.039, "A100 SXM 80 GB HBM2e"),
    ("A100 80GB PCIe", 1.935, "A100 PCIe 80 GB HBM2e"),
    ("A100", 1.555, "A100 40 GB HBM2"),
    ("L40S", 0.864, "L40S GDDR6"),
    ("A10G", 0.6, "A10G GDDR6"),
    ("L4", 0.3, "L4 GDDR6"),
]

TARGETS = {
    "token_logprobs_hbm_fraction": 0.80,
    "head_memory_ratio": 1 / 8,
    "head_time_ratio": 1.15,
    "step_tokens_per_s_ratio": 1.5,
    "step_peak_memory_ratio": 0.5,
}


@dataclass(frozen=True)
class Sizes:
    tokens: int  # T of token_logprobs and of the LM head
    vocab: int
    hidden: int
    attn_tokens: int
    attn_seqlens: tuple[int, int]  # packed sequence lengths drawn from this range
    heads: int
    kv_heads: int
    head_dim: int
    step_preset: str
    iters: int
    warmup: int


FULL = Sizes(16384, 151936, 1536, 16384, (256, 2048), 12, 2, 128, "qwen2.5-1.5b", 10, 3)
SMOKE = Sizes(64, 1000, 32, 96, (8, 40), 4, 2, 16, "tiny", 2, 1)


# --------------------------------------------------------------------------------------------------
# the kernel calls (one place to adapt when bcr_kernels' signatures or return types change)


def kernel_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_logprobs(logits, targets).logp


def kernel_fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return fused_linear_logprobs(hidden, weight, targets).logp


def kernel_varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, backend: str) -> torch.Tensor:
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=backend)


# --------------------------------------------------------------------------------------------------
# helpers


def row(part: str, measure: str, value: str, target: str = "", met: bool | None = None) -> dict:
    """One line of the table; ``met`` is None where nothing is judged."""
    return {"part": part, "measure": measure, "value": value, "target": target, "met": met}


def skipped(part: str, measure: str, why: str) -> dict:
    return row(part, measure, f"skipped: {why}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call (CUDA events on a GPU, the wall clock elsewhere)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_time(fn: Callable[[], object], device: torch.device, sizes: Sizes) -> float:
    for _ in range(sizes.warmup):
        fn()
    sync(device)
    return statistics.median(timed(fn, device) for _ in range(sizes.iters))


def randn(*shape: int, ctx: Context, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Seeded normal values drawn on the device itself (a [16384, 151936] tensor would take many
    seconds and 10 GB on the host), in the check's dtype, requiring grad."""
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=ctx.device, dtype=torch.float32)
    return x.mul_(scale).to(ctx.dtype).requires_grad_()


def randint(high: int, n: int, ctx: Context, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    return torch.randint(0, high, (n,), generator=g, device=ctx.device)


def peak_extra(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above what was allocated before one call of ``fn`` (its results freed after)."""
    probe = harness.MemoryProbe(device)
    with probe.measure() as mem:
        out = fn()
        sync(device)
    del out
    return mem["growth_bytes"]


def hbm_peak(name: str, override: float | None) -> tuple[float | None, str]:
    """(TB/s, where the number comes from) for a device name."""
    if override:
        return override, "--hbm-peak"
    for pattern, tbps, label in HBM_PEAK_TBPS:
        if pattern in name:
            return tbps, label
    return None, f"unknown device {name!r}: pass --hbm-peak TB/s"


def ratio_row(part: str, measure: str, value: float, limit: float, smaller_is_better: bool, judge: bool) -> dict:
    target = f"{'<=' if smaller_is_better else '>='} {limit:.3g}x"
    met = (value <= limit if smaller_is_better else value >= limit) if judge else None
    return row(part, measure, f"{value:.3f}x", target, met)


# --------------------------------------------------------------------------------------------------
# parts: each returns {"rows": [...], "data": {...}}


def gpu_test_files() -> list[str]:
    """The test modules that hold ``gpu``-marked tests (only these are collected: a module whose
    optional imports fail on the GPU box cannot stop the gpu tests)."""
    tests = harness.REPO / "tests"
    return sorted(str(p.relative_to(harness.REPO)) for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text())


def part_tests(ctx: Context) -> dict:
    if ctx.smoke:
        return {"rows": [skipped("tests", "pytest -m gpu", "smoke mode (on the CPU every gpu test skips)")], "data": {}}
    if importlib.util.find_spec("pytest") is None:
        return {"rows": [skipped("tests", "pytest -m gpu", "pytest is not installed (pip install -e '.[dev]')")], "data": {}}
    files = gpu_test_files()
    if not files:
        return {"rows": [row("tests", "error", "no test module under tests/ uses the gpu marker", "", False)], "data": {}}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=harness.REPO, env=harness.child_env(), capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        return {"rows": [row("tests", "pytest -m gpu", "timed out after 150 s", "all pass", False)], "data": {}}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|error|skipped)", line)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0  # skips (optional packages) are listed, not failures
    value = f"{summary.strip('= ')} ({time.perf_counter() - t0:.0f} s)"
    return {
        "rows": [row("tests", "pytest -m gpu", value, "all pass", ok)],
        "data": {"returncode": proc.returncode, "counts": counts, "tail": tail},
    }


def part_token_logprobs(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    T, V = s.tokens, s.vocab
    logits = randn(T, V, ctx=ctx)
    targets = randint(V, T, ctx)
    upstream = randn(T, ctx=ctx, seed=2).detach().float()
    fwd = median_time(lambda: kernel_token_logprobs(logits.detach(), targets), dev, s)

    def backward_only() -> float:
        logits.grad = None
        out = kernel_token_logprobs(logits, targets)
        sync(dev)
        return timed(lambda: out.backward(upstream), dev)

    for _ in range(s.warmup):
        backward_only()
    bwd = statistics.median(backward_only() for _ in range(s.iters))
    elt = logits.element_size()
    bytes_fwd, bytes_bwd = T * V * elt + 12 * T, 2 * T * V * elt + 16 * T
    data = {"T": T, "V": V, "dtype": str(ctx.dtype), "forward_s": fwd, "backward_s": bwd,
            "bytes_forward": bytes_fwd, "bytes_backward": bytes_bwd,
            "forward_GBps": bytes_fwd / fwd / GB, "backward_GBps": bytes_bwd / bwd / GB}
    part = f"token_logprobs T={T} V={V}"
    rows = []
    for name, b, t in (("forward", bytes_fwd, fwd), ("backward", bytes_bwd, bwd)):
        bw = b / t / 1e12
        value = f"{b / t / GB:,.0f} GB/s ({t * 1e3:.2f} ms)"
        if dev.type != "cuda":
            rows.append(row(part, f"{name} bandwidth", value + "; vs HBM skipped: needs CUDA"))
            continue
        peak, source = hbm_peak(ctx.device_name, ctx.hbm_peak)
        data["hbm_peak_TBps"], data["hbm_peak_source"] = peak, source
        if peak is None:
            rows.append(row(part, f"{name} bandwidth", f"{value}; {source}"))
            continue
        frac = bw / peak
        data[f"{name}_hbm_fraction"] = frac
        goal = TARGETS["token_logprobs_hbm_fraction"]
        rows.append(row(part, f"{name} bandwidth vs HBM peak {peak} TB/s ({source})",
                        f"{value} = {100 * frac:.0f} %", f">= {100 * goal:.0f} %", frac >= goal if ctx.judge else None))
    return {"rows": rows, "data": data}


def head_variants(ctx: Context) -> dict[str, Callable | str]:
    """name -> step(hidden, weight, targets, upstream) returning the gradients, or why it cannot run."""

    def fused(h, w, t, up):
        return torch.autograd.grad(kernel_fused_logprobs(h, w, t), [h, w], up)

    def materialised(h, w, t, up):
        logp = torch.log_softmax(F.linear(h, w).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)
        return torch.autograd.grad(logp, [h, w], up)

    out: dict[str, Callable | str] = {"fused": fused, "materialised": materialised}
    if importlib.util.find_spec("liger_kernel") is None:
        out["liger"] = "liger_kernel is not installed (pip install liger-kernel)"
    elif ctx.device.type != "cuda":
        out["liger"] = "Liger's fused linear cross-entropy needs CUDA"
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()

        def liger(h, w, t, up):  # a scalar mean loss: scalar upstream gradient
            return torch.autograd.grad(loss(w, h, t), [h, w])

        out["liger"] = liger
    return out


def part_head(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    hidden = randn(s.tokens, s.hidden, ctx=ctx)
    weight = randn(s.vocab, s.hidden, ctx=ctx, scale=s.hidden**-0.5, seed=3)
    targets = randint(s.vocab, s.tokens, ctx)
    upstream = randn(s.tokens, ctx=ctx, seed=2).detach().float()
    part = f"LM head T={s.tokens} H={s.hidden} V={s.vocab}"
    rows, data = [], {}
    for name, step in head_variants(ctx).items():
        if isinstance(step, str):
            rows.append(skipped(part, name, step))
            continue
        try:
            t = median_time(lambda step=step: step(hidden, weight, targets, upstream), dev, s)
            mem = peak_extra(lambda step=step: step(hidden, weight, targets, upstream), dev)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            rows.append(skipped(part, name, f"out of CUDA memory ({exc})"))
            continue
        data[name] = {"time_s": t, "peak_extra_bytes": mem}
        rows.append(row(part, f"{name}: fwd+bwd time, peak extra memory", f"{t * 1e3:.1f} ms, {mem / MiB:,.0f} MiB"))
    if "fused" in data and "materialised" in data:
        base = data["materialised"]
        tr = data["fused"]["time_s"] / base["time_s"]
        mr = data["fused"]["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
        data.update(fused_time_ratio=tr, fused_memory_ratio=mr)
        rows.append(ratio_row(part, "fused / materialised time", tr, TARGETS["head_time_ratio"], True, ctx.judge))
        rows.append(ratio_row(part, "fused / materialised peak memory", mr, TARGETS["head_memory_ratio"], True, ctx.judge))
    return {"rows": rows, "data": data}


def auto_attention_backend(ctx: Context) -> str:
    """The varlen path ``backend="auto"`` takes for the step's attention here (bf16 on a GPU): what the
    ``bcr_varlen`` attention of the packed variants runs in their processes, which make the same choice."""
    s = ctx.sizes
    q = torch.zeros(32, s.heads, s.head_dim, device=ctx.device, dtype=ctx.dtype)
    kv = torch.zeros(32, s.kv_heads, s.head_dim, device=ctx.device, dtype=ctx.dtype)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32, device=ctx.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel_varlen_attention(q, kv, kv, cu, 16, "auto")
    return last_dispatch().backend


def part_step(ctx: Context) -> dict:
    prefix = ctx.out_dir / "profile_step"
    args = ["--preset", ctx.sizes.step_preset, "--variants", "packed,padded-eager,packed-liger,trl",
            "--repeats", "3" if not ctx.smoke else "1", "--warmup", "1" if not ctx.smoke else "0",
            "--device", ctx.device.type, "--timeout", "120", "--out", str(prefix)]
    if ctx.smoke:
        args += ["--in-process", "--threads", "1"]
    profile_step.main(args)
    report = json.loads(prefix.with_suffix(".json").read_text())
    summ = report["summary"]
    part = f"training step ({ctx.sizes.step_preset}, {report['batch']['real_tokens']:,} tokens)"
    varlen = auto_attention_backend(ctx)
    rows = []
    for r in report["results"]:
        v = r["variant"]
        if v in summ:
            s = summ[v]
            attn = profile_step.VARIANTS[v].attn
            attn = f"bcr_varlen: {varlen}" if attn == "bcr_varlen" else f"transformers {attn}"
            rows.append(row(part, f"{v} (attention {attn}): tokens/s, peak memory",
                            f"{s['tokens_per_s']['median']:,.0f}, {s['peak_bytes']['median'] / MiB:,.0f} MiB"))
        elif "skipped" in r:
            rows.append(skipped(part, v, r["skipped"]))
        else:  # an out-of-memory padded baseline or a broken variant: shown, and the run fails
            rows.append(row(part, "error", f"{v}: {r.get('error', '')[-300:]}", "", False))
    data = {"report": str(prefix.with_suffix(".json")), "bcr_varlen_backend": varlen}
    if "packed" in summ and "padded-eager" in summ:
        p, b = summ["packed"], summ["padded-eager"]
        speed = p["tokens_per_s"]["median"] / b["tokens_per_s"]["median"]
        mem = p["peak_bytes"]["median"] / max(b["peak_bytes"]["median"], 1)
        data.update(packed_vs_padded_tokens_per_s=speed, packed_vs_padded_peak_memory=mem)
        rows.append(ratio_row(part, "packed / padded-eager tokens/s", speed, TARGETS["step_tokens_per_s_ratio"], False, ctx.judge))
        rows.append(ratio_row(part, "packed / padded-eager peak memory", mem, TARGETS["step_peak_memory_ratio"], True, ctx.judge))
        peers = [summ[v]["tokens_per_s"]["median"] for v in ("packed-liger", "trl") if v in summ]
        if peers:
            ahead = p["tokens_per_s"]["median"] / max(peers)
            data["packed_vs_fastest_peer_tokens_per_s"] = ahead
            rows.append(ratio_row(part, "packed / fastest of Liger, TRL tokens/s", ahead, 1.0, False, ctx.judge))
    return {"rows": rows, "data": data}


def packed_lengths(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Sequence lengths in [lo, hi] (the last one cut) that sum to ``total``."""
    rng, out = random.Random(seed), []
    while sum(out) < total:
        out.append(min(rng.randint(lo, hi), total - sum(out)))
    return out


def attention_backends(ctx: Context) -> dict[str, str | None]:
    """backend -> why it cannot run here (None: it can)."""
    half_cuda = None if ctx.device.type == "cuda" else "needs CUDA (fp16/bf16 CUDA tensors)"
    flash = half_cuda or (None if importlib.util.find_spec("flash_attn") else "flash-attn is not installed")
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (only probing for it)

        tv = half_cuda
    except ImportError:
        tv = f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    return {"flash_attn": flash, "torch_varlen": tv, "sdpa": None}


def part_attention(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    lengths = packed_lengths(s.attn_tokens, *s.attn_seqlens)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=dev)
    q, k, v = (randn(s.attn_tokens, h, s.head_dim, ctx=ctx, seed=i)
               for i, h in enumerate((s.heads, s.kv_heads, s.kv_heads)))
    part = f"varlen attention T={s.attn_tokens} ({len(lengths)} seqs) Hq={s.heads} Hkv={s.kv_heads} D={s.head_dim}"
    rows, data = [], {"lengths": lengths}
    for backend, why in attention_backends(ctx).items():
        if why:
            rows.append(skipped(part, backend, why))
            continue

        def fwd(backend=backend):
            with torch.no_grad():
                return kernel_varlen_attention(q, k, v, cu, max(lengths), backend)

        def fwd_bwd(backend=backend):
            out = kernel_varlen_attention(q, k, v, cu, max(lengths), backend)
            return torch.autograd.grad(out, [q, k, v], torch.ones_like(out))

        try:  # a forced backend that cannot run either warns and falls back to SDPA, or raises
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tf = median_time(fwd, dev, s)
                tb = median_time(fwd_bwd, dev, s)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            rows.append(skipped(part, backend, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        ran = last_dispatch().backend  # the path that produced the output, whatever was asked
        fell_back = [str(w.message) for w in caught if "using SDPA" in str(w.message) or "trying the next" in str(w.message)]
        if ran != backend:
            rows.append(skipped(part, backend, f"asked for {backend}, {ran} ran" + (f" ({fell_back[0]})" if fell_back else "")))
            continue
        data[backend] = {"forward_s": tf, "forward_backward_s": tb, "ran": ran}
        rows.append(row(part, f"{backend} (ran {ran}): forward, forward+backward", f"{tf * 1e3:.2f} ms, {tb * 1e3:.2f} ms"))
    return {"rows": rows, "data": data}


PARTS: dict[str, Callable[[Context], dict]] = {
    "tests": part_tests,
    "token_logprobs": part_token_logprobs,
    "head": part_head,
    "attention": part_attention,
    "step": part_step,  # last: the longest part, the one a cut-short run loses
}


# --------------------------------------------------------------------------------------------------
# driver


@dataclass
class Context:
    device: torch.device
    device_name: str
    dtype: torch.dtype
    sizes: Sizes
    smoke: bool
    out_dir: Path
    hbm_peak: float | None

    @property
    def judge(self) -> bool:
        """Targets are judged on full-size CUDA runs only."""
        return self.device.type == "cuda" and not self.smoke


def markdown(report: dict) -> str:
    mark = {True: "yes", False: "**no**", None: ""}
    lines = [
        f"**gpu_check** on {report['device_name']}, {report['date']} (torch {report['versions']['torch']}, "
        f"triton {report['versions']['triton']}, flash-attn {report['versions']['flash-attn']}"
        + (", smoke sizes: numbers mean nothing" if report["smoke"] else "")
        + ")",
        "",
        "| part | measurement | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['part']} | {r['measure']} | {r['value']} | {r['target']} | {mark[r['met']]} |")
    lines += ["", f"Command: `{report['command']}`; wall time {report['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=None, help="where to write (default: $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU (what CI runs)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {tuple(PARTS)}")
    p.add_argument("--hbm-peak", type=float, default=None, help="the device's HBM peak in TB/s (default: by name)")
    args = p.parse_args(argv)
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    for name in args.part_list:
        if name not in PARTS:
            p.error(f"unknown part {name!r}; choose from {tuple(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or pass --smoke for the tiny CPU run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out_dir = Path(args.out_dir or os.environ.get("OUT") or harness.RESULTS / "gpu_check")
    sizes = SMOKE if args.smoke else FULL
    ctx = Context(device, harness.device_name(device.type), torch.bfloat16 if device.type == "cuda" else torch.float32,
                  sizes, args.smoke, out_dir, args.hbm_peak)
    report = {
        "benchmark": "gpu_check",
        "device": device.type,
        "device_name": ctx.device_name,
        "date": harness.now(),
        "command": harness.command(MODULE, argv),
        "versions": harness.versions((*harness.DEFAULT_PACKAGES, "flash-attn", "math-verify", "hypothesis")),
        "git": harness.git_state(),
        "smoke": args.smoke,
        "sizes": asdict(sizes),
        "targets": TARGETS,
        "rows": [],
        "parts": {},
        "wall_s": 0.0,
    }
    for name in args.part_list:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = PARTS[name](ctx)
        except Exception as exc:  # noqa: BLE001  (one broken part must not lose the others' numbers)
            result = {"rows": [row(name, "error", f"{type(exc).__name__}: {exc}"[:500], "", False)], "data": {}}
        result["data"]["wall_s"] = time.perf_counter() - t0
        report["rows"] += result["rows"]
        report["parts"][name] = result["data"]
        report["wall_s"] = time.perf_counter() - t_start
        harness.write_report(out_dir / "gpu_check", report)
    md = markdown(report)
    harness.write_report(out_dir / "gpu_check", report, md)
    print()
    print(md)
    print(f"wrote {out_dir / 'gpu_check.json'}, .md")
    # a missed target is a result (the table says so); a part that broke, or failing gpu tests, is not
    broken = [r for r in report["rows"] if r["measure"] == "error" or (r["part"] == "tests" and r["met"] is False)]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
