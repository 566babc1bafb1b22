"""Profile one full BCR training step against padded eager PyTorch, Liger and TRL, side by side.

    python benchmarks/profile_step.py --preset cpu-small            # the issue-10 CPU shape (minutes)
    python benchmarks/profile_step.py --preset tiny --repeats 1     # seconds; what the smoke test runs
    python benchmarks/profile_step.py --preset qwen2.5-1.5b         # on a GPU (bf16)

A *step* is what ``bcr.trainer.BCRTrainer.update`` does for one batch of rollouts with
``num_iterations=1``: build the batch tensors from token lists, forward, completion-token log-probs,
policy loss (``token_mean`` = TRL's ``dapo``, epsilon 0.2, beta 0), backward, AdamW step. The model is a
random-init Qwen2 built from a config (nothing is downloaded); its weights do not change the cost.

The batch (same tokens for every variant, seeded): ``--num-completions`` prompt + completion pairs;
prompts ``--prompt-len`` tokens (uniform); completions spread like rollouts: a ``--truncated-frac``
share runs to the budget (``--budget``), the rest have lengths drawn from ``--length-dist`` between
``--min-completion`` and the budget. Every completion answers ``--n-problems`` instances (contiguous
spans after a short shared preamble, -1), with per-instance advantages drawn from N(0, 1).

Variants (each in a FRESH subprocess: 1+ untimed warm-up steps, then ``--repeats`` measured steps):

- ``packed``: one padding-free row (``bcr.packing.pack_samples``: position ids restarting per
  sequence, ``cu_seqlens``), attention through the ``"bcr_varlen"`` transformers backend registered by
  ``bcr_kernels.varlen_attention``; backbone hidden states at completion-target positions only ->
  ``bcr_kernels.fused_linear_logprobs`` -> ``scatter_instance_advantages`` -> ``policy_loss``. This is
  ``bcr.trainer.completion_logprobs`` + ``BCRTrainer.update`` written out so each phase is timed.
- ``packed-fused-loss``: the ``packed`` backbone, then ``bcr_kernels.fused_linear_policy_loss``
  (what ``BCRTrainer.update`` runs with ``num_iterations=1``): log-probs, loss and the LM-head
  gradients in one chunked forward (3 big matmuls instead of 4), reported as ``logprobs``.
- ``padded-eager``: the same sequences right-padded into ``[B, Lmax]`` with an attention mask (the
  model's default ``sdpa`` attention), full ``[B, Lmax, V]`` logits -> ``log_softmax`` -> ``gather``,
  per-token advantages and a masked clipped loss in eager PyTorch. The baseline of the ratios.
- ``packed-liger``: the ``packed`` backbone, then Liger-Kernel's ``LigerFusedLinearGRPOLoss``
  (fused LM head + GRPO loss, chunked). Liger takes one advantage per *row*, BCR has one per *token*
  (per instance), so the completion tokens are passed as ``C`` rows of length 1 (same loss: token
  mean of the clipped objective). Skipped with a reason when ``liger_kernel`` is not importable.
- ``trl``: TRL's ``GRPOTrainer`` loss path as of TRL 1.x: prompts left-padded, completions
  right-padded, ``trl.trainer.utils.add_fused_lm_head`` (chunked log-probs of the scored positions),
  TRL's clipped loss (``dapo``) with per-token advantages. Skipped when ``trl`` is not importable.
- ``trl-selective``: TRL's earlier path (<= 0.2x): ``logits_to_keep`` = completion length, logits of
  the completion positions, ``trl.trainer.utils.selective_log_softmax``; same loss.

Phases (wall clock; ``torch.cuda.synchronize`` at every boundary on CUDA; each region is also a
``torch.profiler.record_function`` so ``--trace DIR`` writes a Chrome trace of the last step):
``prepare`` (token lists -> tensors), ``forward``, ``logprobs``, ``loss``, ``backward``, ``optimizer``.
Fused variants report the fused part under the phase where it runs (``trl``: the LM head runs inside
the model call, so ``forward`` includes it; ``packed-liger``: log-probs, loss and the LM-head gradient
run in the forward of Liger's function, reported as ``logprobs``).

Memory. CUDA: ``max_memory_allocated`` during the step (peak) and that minus the memory allocated at
the start of the step (step growth). CPU (Linux): right before each measured step the peak-RSS
counter is reset (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``) and ``VmRSS`` is read; after
the step ``VmHWM - VmRSS_before`` is the step's peak growth. At that point the process holds the
model, the AdamW state (created by the warm-up step) and the batch; gradients were freed
(``zero_grad(set_to_none=True)``), so the growth includes the parameter gradients (equal for every
variant) plus activations, logits and temporaries. Children run with ``MALLOC_MMAP_THRESHOLD_=1 MiB``
so freed blocks return to the OS between steps. Without a writable ``clear_refs`` a 1 ms ``VmRSS``
sampler gives a lower bound (the JSON says which method ran).

Throughput: tokens/s = real (non-pad) prompt + completion tokens of the batch / step wall time; the
same numerator for every variant, so the ratio is the inverse ratio of step times.

Output: a table on stdout, ``<out>.json`` (every raw measurement, versions, thread count, command),
``<out>.md`` (a markdown snippet: ratios vs ``padded-eager`` with min-max spread over repeats) and
``<out>.png`` (phase times and peak memory per variant). Ratios are the claims; absolute CPU times
are context. Other processes on the machine add noise: compare medians and repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402  (benchmarks/rss.py, beside this script)


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("packed", "packed-fused-loss", "padded-eager", "packed-liger", "trl", "trl-selective")
BASELINE = "padded-eager"
PHASES = ("prepare", "forward", "logprobs", "loss", "backward", "optimizer")
MiB = 2**20

# Model shapes (Qwen2 configs; random init). ``batch`` holds the default batch of each preset.
PRESETS = {
    "tiny": {
        "model": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 4096,
            "tie_word_embeddings": True,
        },
        "batch": {"num_completions": 4, "budget": 48, "min_completion": 8, "prompt_len": (8, 16)},
        "dtype": "float32",
    },
    "cpu-small": {  # issue 10: hidden 256, 4 layers, the real Qwen2.5 vocabulary
        "model": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 1024,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
        "batch": {"num_completions": 8, "budget": 1024, "min_completion": 32, "prompt_len": (64, 128)},
        "dtype": "float32",
    },
    "qwen2.5-1.5b": {  # Qwen2.5-1.5B's config.json (random weights)
        "model": {
            "hidden_size": 1536,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "intermediate_size": 8960,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
        },
        "batch": {"num_completions": 8, "budget": 1024, "min_completion": 32, "prompt_len": (64, 128)},
        "dtype": "bfloat16",
    },
}


# --------------------------------------------------------------------------------------------------
# the synthetic batch (pure python; the same lists for every variant)


def make_batch_spec(
    *,
    num_completions: int,
    budget: int,
    min_completion: int,
    prompt_len: tuple[int, int],
    truncated_frac: float,
    length_dist: str,
    n_problems: int,
    vocab_size: int,
    seed: int,
) -> dict:
    """Token ids, segment ids and per-instance advantages of a synthetic rollout batch (seeded)."""
    import random

    rng = random.Random(seed)
    n_trunc = round(truncated_frac * num_completions)
    lengths = []
    for i in range(num_completions):
        if i < n_trunc:
            lengths.append(budget)
        elif length_dist == "uniform":
            lengths.append(rng.randint(min_completion, budget - 1))
        elif length_dist == "loguniform":
            lo, hi = math.log(min_completion), math.log(budget - 1)
            lengths.append(round(math.exp(rng.uniform(lo, hi))))
        else:
            raise ValueError(f"length_dist must be uniform or loguniform, got {length_dist!r}")
    rng.shuffle(lengths)
    samples = []
    for C in lengths:
        P = rng.randint(prompt_len[0], prompt_len[1])
        prompt = [rng.randrange(vocab_size) for _ in range(P)]
        completion = [rng.randrange(vocab_size) for _ in range(C)]
        # a short shared preamble (-1), then n_problems contiguous instance spans
        pre = min(C // 10, 32)
        span = max(1, (C - pre) // n_problems)
        seg = [-1] * pre + [min((t // span), n_problems - 1) for t in range(C - pre)]
        adv = [rng.gauss(0.0, 1.0) for _ in range(n_problems)]
        samples.append(
            {"prompt_ids": prompt, "completion_ids": completion, "segment_ids": seg, "advantages": adv}
        )
    return {
        "samples": samples,
        "completion_lengths": lengths,
        "prompt_lengths": [len(s["prompt_ids"]) for s in samples],
    }


def batch_stats(spec: dict) -> dict:
    P, C = spec["prompt_lengths"], spec["completion_lengths"]
    real = sum(P) + sum(C)
    lmax = max(p + c for p, c in zip(P, C))
    return {
        "num_sequences": len(C),
        "real_tokens": real,
        "completion_tokens": sum(C),
        "padded_positions": len(C) * lmax,
        "padding_fraction": 1 - real / (len(C) * lmax),
        "completion_lengths": C,
        "prompt_lengths": P,
    }


# --------------------------------------------------------------------------------------------------
# memory probes




class MemoryProbe:
    """Peak memory of one step: CUDA allocator stats, or the process RSS on the CPU."""

    def __init__(self, device):
        self.device = device
        self.method = None

    @contextlib.contextmanager
    def measure(self):
        import torch

        result = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            yield result
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            result.update(peak_bytes=peak, growth_bytes=peak - base, base_bytes=base)
            return
        if rss.reset_peak():
            base = rss.proc_status()["VmRSS"]
            self.method = "VmHWM reset via /proc/self/clear_refs"
            yield result
            peak = rss.proc_status()["VmHWM"]
        else:
            self.method = "VmRSS sampled every 1 ms (lower bound)"
            with rss.PeakSampler() as s:
                base = rss.proc_status()["VmRSS"]
                yield result
            peak = s.peak
        result.update(peak_bytes=peak, growth_bytes=peak - base, base_bytes=base)


# --------------------------------------------------------------------------------------------------
# child: one variant


class PhaseTimer:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        from torch.profiler import record_function

        self.sync()
        t0 = time.perf_counter()
        with record_function(f"bcr_step/{name}"):
            yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def build_model(preset: str, attn: str, dtype, device, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import bcr_kernels  # noqa: F401  (registers "bcr_varlen")

    cfg = Qwen2Config(**PRESETS[preset]["model"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.to(device).train()


def _variant_available(variant: str, device_type: str) -> tuple[bool, str]:
    import importlib.util

    if variant == "packed-liger" and importlib.util.find_spec("liger_kernel") is None:
        return False, "liger_kernel is not installed (pip install 'bcr[bench]' or liger-kernel)"
    if variant in ("trl", "trl-selective"):
        if importlib.util.find_spec("trl") is None:
            return False, "trl is not installed (pip install 'bcr[bench]' or trl)"
        try:
            from trl.trainer import utils as trl_utils
        except Exception as exc:  # noqa: BLE001
            return False, f"trl not importable ({type(exc).__name__}: {exc})"
        if variant == "trl" and not hasattr(trl_utils, "add_fused_lm_head"):
            return False, "this trl has no add_fused_lm_head (TRL < 1.x); see trl-selective"
    return True, ""


def _clipped_token_loss(logp, adv, mask, epsilon: float, normalizer):
    """TRL's GRPO objective (``dapo``/token mean), eager PyTorch, per-token advantages."""
    import torch

    old = logp.detach()  # num_iterations = 1: pi_old = pi_theta (the ratio is 1, its gradient is not)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    return (per_token * mask).sum() / normalizer


def make_step(variant: str, model, samples: list[dict], device, args: dict):
    """A closure running one training step of ``variant`` (without the optimizer) on ``samples``."""
    import torch

    from bcr.packing import Sample, pack_samples
    from bcr_kernels import (
        fused_linear_logprobs,
        fused_linear_policy_loss,
        policy_loss,
        scatter_instance_advantages,
    )
    from bcr_kernels._varlen_attention import packed_model_kwargs

    eps = 0.2
    n_completion = sum(len(s["completion_ids"]) for s in samples)
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    pad_id = 0

    def packed_rows(timer):
        with timer("prepare"):
            objs = [
                Sample(s["prompt_ids"], s["completion_ids"], s["advantages"], s["segment_ids"])
                for s in samples
            ]
            rows = [r.to(device) for r in pack_samples(objs, args.get("max_tokens_per_row"))]
        return rows

    def packed_hidden(row, timer):
        with timer("forward"):
            out = decoder(
                input_ids=row.input_ids[None],
                position_ids=row.position_ids[None],
                use_cache=False,
                **packed_model_kwargs(row.cu_seqlens, row.max_seqlen),
            )
            hidden = out.last_hidden_state[0].index_select(0, row.completion_index)
        return hidden

    def packed_advantages(row):
        return scatter_instance_advantages(
            row.instance_advantages,
            row.completion_segment_ids,
            row.completion_cu_seqlens,
            num_instances=row.num_instances,
            shared="mean",
        )

    if variant == "packed":

        def step(timer):
            for row in packed_rows(timer):
                hidden = packed_hidden(row, timer)
                with timer("logprobs"):
                    logp = fused_linear_logprobs(
                        hidden,
                        head.weight,
                        row.completion_targets,
                        bias=head.bias,
                        chunk_tokens=args.get("chunk_tokens"),
                    ).logp
                with timer("loss"):
                    adv = packed_advantages(row)
                    loss, _ = policy_loss(
                        logp,
                        logp.detach(),
                        adv,
                        torch.ones_like(logp),
                        row.completion_cu_seqlens,
                        epsilon=eps,
                        reduction="token_mean",
                        normalizer=float(n_completion),
                    )
                with timer("backward"):
                    loss.backward()
            return float(loss.detach())

        return step

    if variant == "packed-fused-loss":

        def step(timer):
            for row in packed_rows(timer):
                hidden = packed_hidden(row, timer)
                with timer("logprobs"):  # log-probs + loss + LM-head grads in one fused forward
                    adv = packed_advantages(row)
                    loss, *_ = fused_linear_policy_loss(
                        hidden,
                        head.weight,
                        row.completion_targets,
                        adv,
                        torch.ones_like(adv),
                        row.completion_cu_seqlens,
                        bias=head.bias,
                        epsilon=eps,
                        reduction="token_mean",
                        normalizer=float(n_completion),
                        chunk_tokens=args.get("chunk_tokens"),
                    )
                with timer("backward"):
                    loss.backward()
            return float(loss.detach())

        return step

    if variant == "packed-liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        compiled = args.get("liger_compiled")
        compiled = device.type == "cuda" if compiled is None else compiled
        liger = LigerFusedLinearGRPOLoss(
            beta=0.0,
            use_ref_model=False,
            loss_type="dapo",
            epsilon_low=eps,
            epsilon_high=eps,
            chunk_size=args.get("liger_chunk", 1024),
            compiled=compiled,
            temperature=1.0,
        )

        def step(timer):
            for row in packed_rows(timer):
                hidden = packed_hidden(row, timer)
                with timer("logprobs"):  # Liger: log-probs + loss (+ LM-head grads) in one fused forward
                    adv = packed_advantages(row)
                    C = hidden.shape[0]
                    out = liger(
                        hidden[:, None, :],
                        head.weight,
                        row.completion_targets[:, None],
                        torch.ones(C, 1, device=device, dtype=torch.long),
                        adv,
                        bias=head.bias,
                        num_items_in_batch=n_completion,
                    )
                    loss = out[0] if isinstance(out, tuple) else out
                with timer("backward"):
                    loss.backward()
            return float(loss.detach())

        return step

    # ---- padded variants: tensors built from the same token lists
    B = len(samples)

    def right_padded(timer):
        with timer("prepare"):
            L = max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples)
            ids = torch.full((B, L), pad_id, dtype=torch.long)
            attn = torch.zeros(B, L, dtype=torch.long)
            mask = torch.zeros(B, L - 1)  # target positions that predict a completion token
            adv = torch.zeros(B, L - 1)
            for b, s in enumerate(samples):
                P, C = len(s["prompt_ids"]), len(s["completion_ids"])
                ids[b, : P + C] = torch.tensor(s["prompt_ids"] + s["completion_ids"])
                attn[b, : P + C] = 1
                mask[b, P - 1 : P + C - 1] = 1
                inst = torch.tensor(s["advantages"])
                seg = torch.tensor(s["segment_ids"])
                adv[b, P - 1 : P + C - 1] = torch.where(seg >= 0, inst[seg.clamp(min=0)], inst.mean())
            return ids.to(device), attn.to(device), mask.to(device), adv.to(device)

    def left_right_padded(timer):
        """TRL's layout: prompts left-padded to Pmax, completions right-padded to Cmax."""
        with timer("prepare"):
            Pm = max(len(s["prompt_ids"]) for s in samples)
            Cm = max(len(s["completion_ids"]) for s in samples)
            ids = torch.full((B, Pm + Cm), pad_id, dtype=torch.long)
            attn = torch.zeros(B, Pm + Cm, dtype=torch.long)
            cmask = torch.zeros(B, Cm)
            adv = torch.zeros(B, Cm)
            for b, s in enumerate(samples):
                P, C = len(s["prompt_ids"]), len(s["completion_ids"])
                ids[b, Pm - P : Pm] = torch.tensor(s["prompt_ids"])
                ids[b, Pm : Pm + C] = torch.tensor(s["completion_ids"])
                attn[b, Pm - P : Pm + C] = 1
                cmask[b, :C] = 1
                inst = torch.tensor(s["advantages"])
                seg = torch.tensor(s["segment_ids"])
                adv[b, :C] = torch.where(seg >= 0, inst[seg.clamp(min=0)], inst.mean())
            return ids.to(device), attn.to(device), cmask.to(device), adv.to(device), Cm

    if variant == "padded-eager":

        def step(timer):
            ids, attn, mask, adv = right_padded(timer)
            with timer("forward"):
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, L, V]
            with timer("logprobs"):
                logp = (
                    torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                )
                del logits
            with timer("loss"):
                loss = _clipped_token_loss(logp, adv, mask, eps, mask.sum())
            with timer("backward"):
                loss.backward()
            return float(loss.detach())

        return step

    if variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",))

        def step(timer):
            ids, attn, cmask, adv, Cm = left_right_padded(timer)
            with timer("forward"):  # backbone + TRL's chunked fused LM head (only scored positions)
                labels = ids.masked_fill(attn == 0, -100)
                labels[:, :-Cm] = -100
                out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
                logp = out.log_probs[:, -Cm:]
            with timer("loss"):
                loss = _clipped_token_loss(logp, adv, cmask, eps, cmask.sum())
            with timer("backward"):
                loss.backward()
            return float(loss.detach())

        return step

    if variant == "trl-selective":
        from trl.trainer.utils import selective_log_softmax

        def step(timer):
            ids, attn, cmask, adv, Cm = left_right_padded(timer)
            with timer("forward"):
                logits = model(
                    input_ids=ids, attention_mask=attn, logits_to_keep=Cm + 1, use_cache=False
                ).logits
                logits = logits[:, :-1, :]  # [B, Cm, V]
            with timer("logprobs"):
                logp = selective_log_softmax(logits, ids[:, -Cm:])
                del logits
            with timer("loss"):
                loss = _clipped_token_loss(logp, adv, cmask, eps, cmask.sum())
            with timer("backward"):
                loss.backward()
            return float(loss.detach())

        return step

    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def child_main(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    variant = spec["variant"]
    ok, why = _variant_available(variant, device.type)
    if not ok:
        return {"variant": variant, "skipped": why}
    batch = make_batch_spec(**spec["batch"])
    attn = "bcr_varlen" if variant in ("packed", "packed-fused-loss", "packed-liger") else "sdpa"
    model = build_model(spec["preset"], attn, dtype, device, spec["seed"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    step = make_step(variant, model, batch["samples"], device, spec)
    probe = MemoryProbe(device)

    def one_step():
        timer = PhaseTimer(device)
        t0 = time.perf_counter()
        loss = step(timer)
        with timer("optimizer"):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        return loss, total, timer.times

    for _ in range(spec["warmup"]):
        optimizer.zero_grad(set_to_none=True)
        one_step()
    runs = []
    for i in range(spec["repeats"]):
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        trace = spec.get("trace") and i == spec["repeats"] - 1
        prof_ctx = contextlib.nullcontext()
        if trace:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            prof_ctx = profile(activities=acts)
        with prof_ctx as prof, probe.measure() as mem:
            loss, total, phases = one_step()
        if trace:
            Path(spec["trace"]).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(spec["trace"]) / f"{variant}.json"))
        runs.append({"time_s": total, "phases_s": phases, "loss": loss, **mem})
    optimizer.zero_grad(set_to_none=True)
    return {
        "variant": variant,
        "attn_implementation": model.config._attn_implementation,
        "runs": runs,
        "param_bytes": param_bytes,
        "memory_method": probe.method,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# parent


def run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU user's path is the PyTorch one, never the interpreter
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 * MiB))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"variant": spec["variant"], "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            return {"variant": spec["variant"], "error": f"exit {proc.returncode}: {tail}"}
        return json.loads(out_path.read_text())


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(results: list[dict], stats: dict) -> dict:
    """Per-variant medians and spreads, and ratios vs the baseline (paired by repeat index)."""
    out = {}
    base = next((r for r in results if r["variant"] == BASELINE and "runs" in r), None)
    for r in results:
        if "runs" not in r:
            continue
        times = [x["time_s"] for x in r["runs"]]
        mems = [x["growth_bytes"] for x in r["runs"]]
        peaks = [x["peak_bytes"] for x in r["runs"]]
        s = {
            "time_s": {"median": _median(times), "min": min(times), "max": max(times)},
            "tokens_per_s": {
                "median": stats["real_tokens"] / _median(times),
                "min": stats["real_tokens"] / max(times),
                "max": stats["real_tokens"] / min(times),
            },
            "step_mem_bytes": {"median": _median(mems), "min": min(mems), "max": max(mems)},
            "peak_bytes": {"median": _median(peaks), "min": min(peaks), "max": max(peaks)},
            "phases_s": {ph: _median([x["phases_s"].get(ph, 0.0) for x in r["runs"]]) for ph in PHASES},
        }
        if base is not None:
            bt = [x["time_s"] for x in base["runs"]]
            bm = [x["growth_bytes"] for x in base["runs"]]
            # all-pairs ratios give the spread; the claim is the ratio of medians
            tps = [b / t for b in bt for t in times]
            mem = [m / b for b in bm for m in mems if b > 0]
            s["tokens_per_s_ratio"] = {
                "median": _median(bt) / _median(times),
                "min": min(tps),
                "max": max(tps),
            }
            if mem:
                s["step_mem_ratio"] = {
                    "median": _median(mems) / _median(bm),
                    "min": min(mem),
                    "max": max(mem),
                }
        out[r["variant"]] = s
    return out


def _fmt_mib(b):
    return f"{b / MiB:,.0f}"


def markdown(report: dict) -> str:
    st, summ = report["batch"], report["summary"]
    dev = report["device"]
    mem_name = "peak step memory (MiB)" if dev == "cpu" else "peak step memory growth (MiB)"
    lines = [
        (
            f"**profile_step** preset `{report['preset']}` on {report['device_name']} "
            f"({report['dtype']}, torch {report['versions']['torch']}, {report['torch_threads']} threads), "
            f"{report['date']}"
        ),
        "",
        (
            f"Batch: {st['num_sequences']} sequences, {st['real_tokens']:,} real tokens "
            f"({st['completion_tokens']:,} completion), padded [B, Lmax] = {st['padded_positions']:,} positions "
            f"({100 * st['padding_fraction']:.0f} % padding); {report['repeats']} measured repeats after "
            f"{report['warmup']} warm-up, each variant in a fresh process. Ratios: median/median, spread = min-max "
            "over all pairs of repeats."
        ),
        "",
        (
            f"| variant | attention | step s (median, min-max) | tokens/s | tokens/s vs {BASELINE} | "
            f"{mem_name} | memory vs {BASELINE} |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        v = r["variant"]
        if "skipped" in r or "error" in r:
            lines.append(f"| {v} | | {'skipped: ' + r['skipped'] if 'skipped' in r else 'error'} | | | | |")
            continue
        s = summ[v]
        t, m = s["time_s"], s["step_mem_bytes"]
        tr = s.get("tokens_per_s_ratio")
        mr = s.get("step_mem_ratio")
        lines.append(
            f"| {v} | {r['attn_implementation']} | {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) "
            f"| {s['tokens_per_s']['median']:,.0f} "
            f"| {'{:.2f}x ({:.2f}-{:.2f})'.format(tr['median'], tr['min'], tr['max']) if tr else '-'} "
            f"| {_fmt_mib(m['median'])} ({_fmt_mib(m['min'])}-{_fmt_mib(m['max'])}) "
            f"| {'{:.2f}x ({:.2f}-{:.2f})'.format(mr['median'], mr['min'], mr['max']) if mr else '-'} |"
        )
    lines += [
        "",
        "Phase medians (s): " + ", ".join(PHASES),
        "",
        "| variant | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for v, s in summ.items():
        lines.append(f"| {v} | " + " | ".join(f"{s['phases_s'][ph]:.3f}" for ph in PHASES) + " |")
    lines += ["", f"Memory method: {report.get('memory_method')}; command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = report["summary"]
    names = list(summ)
    if not names:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(names)
    for ph in PHASES:
        vals = [summ[n]["phases_s"][ph] for n in names]
        ax1.bar(names, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("seconds per step (median)")
    ax1.set_title("phase times")
    ax1.legend(fontsize=8)
    mem = [summ[n]["step_mem_bytes"]["median"] / MiB for n in names]
    lo = [m - summ[n]["step_mem_bytes"]["min"] / MiB for m, n in zip(mem, names)]
    hi = [summ[n]["step_mem_bytes"]["max"] / MiB - m for m, n in zip(mem, names)]
    ax2.bar(names, mem, yerr=[lo, hi], color="tab:gray")
    ax2.set_ylabel("MiB")
    ax2.set_title("peak step memory" + (" (RSS growth)" if report["device"] == "cpu" else " (CUDA growth)"))
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"profile_step {report['preset']} on {report['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton", "trl", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """The commit and the locally modified files the numbers were measured on."""

    def run(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    status = run("status", "--porcelain", "--", "bcr", "bcr_kernels", "benchmarks")
    return {"commit": run("rev-parse", "HEAD"), "modified": status.splitlines() if status else []}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the preset's)")
    p.add_argument("--num-completions", type=int, default=None)
    p.add_argument("--budget", type=int, default=None, help="completion budget (max_completion_length)")
    p.add_argument("--min-completion", type=int, default=None)
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument(
        "--truncated-frac", type=float, default=0.25, help="share of completions cut at the budget"
    )
    p.add_argument("--length-dist", choices=("uniform", "loguniform"), default="uniform")
    p.add_argument("--n-problems", type=int, default=4, help="instances per completion (N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    p.add_argument(
        "--chunk-tokens", type=int, default=None, help="fused_linear_logprobs chunk (default: its own)"
    )
    p.add_argument(
        "--max-tokens-per-row", type=int, default=None, help="packed rows of at most this many tokens"
    )
    p.add_argument("--liger-chunk", type=int, default=1024, help="tokens per chunk of Liger's fused loss")
    p.add_argument(
        "--liger-compiled",
        choices=("auto", "yes", "no"),
        default="auto",
        help="torch.compile Liger's loss math (auto: on CUDA only)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    p.add_argument("--trace", default=None, help="write a Chrome trace of the last step of each variant here")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the variants in this process (no memory isolation; for smoke tests only)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output prefix (default benchmarks/results/profile_step_<preset>_<device>)",
    )
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child[0]).read_text())
        _atomic_write(Path(args.child[1]), json.dumps(child_main(spec)))
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    b = preset["batch"]
    batch = {
        "num_completions": args.num_completions or b["num_completions"],
        "budget": args.budget or b["budget"],
        "min_completion": args.min_completion or b["min_completion"],
        "prompt_len": tuple(args.prompt_len or b["prompt_len"]),
        "truncated_frac": args.truncated_frac,
        "length_dist": args.length_dist,
        "n_problems": args.n_problems,
        "vocab_size": preset["model"]["vocab_size"],
        "seed": args.seed,
    }
    stats = batch_stats(make_batch_spec(**batch))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    dtype = args.dtype or preset["dtype"]
    liger_compiled = {"auto": None, "yes": True, "no": False}[args.liger_compiled]
    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "results" / f"profile_step_{args.preset}_{device}"
    )
    device_name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )

    print(
        f"profile_step: preset {args.preset}, {device_name}, {dtype}; batch {stats['num_sequences']} seqs, "
        f"{stats['real_tokens']} real tokens, {stats['padded_positions']} padded positions",
        flush=True,
    )
    results = []
    for v in variants:
        spec = {
            "variant": v,
            "preset": args.preset,
            "device": device,
            "dtype": dtype,
            "batch": batch,
            "seed": args.seed,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "chunk_tokens": args.chunk_tokens,
            "max_tokens_per_row": args.max_tokens_per_row,
            "liger_chunk": args.liger_chunk,
            "liger_compiled": liger_compiled,
            "trace": args.trace,
        }
        t0 = time.perf_counter()
        r = child_main(spec) if args.in_process else run_child(spec, args.timeout)
        results.append(r)
        if "skipped" in r:
            print(f"  {v:14s} skipped: {r['skipped']}", flush=True)
        elif "error" in r:
            print(f"  {v:14s} ERROR: {r['error']}", flush=True)
        else:
            ts = [x["time_s"] for x in r["runs"]]
            ms = [x["growth_bytes"] / MiB for x in r["runs"]]
            print(
                f"  {v:14s} step {statistics.median(ts):7.3f} s  (runs {', '.join(f'{t:.3f}' for t in ts)}), "
                f"step memory {statistics.median(ms):8.0f} MiB  [{time.perf_counter() - t0:.0f} s wall]",
                flush=True,
            )
    summary = summarize(results, stats)
    method = next((r.get("memory_method") for r in results if r.get("memory_method")), None)
    report = {
        "benchmark": "profile_step",
        "preset": args.preset,
        "model_config": preset["model"],
        "device": device,
        "device_name": device_name,
        "dtype": dtype,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "benchmarks/profile_step.py"] + (sys.argv[1:] if argv is None else list(argv))
        ),
        "versions": versions(),
        "git": git_state(),
        "torch_threads": next(
            (r["torch_threads"] for r in results if "torch_threads" in r), torch.get_num_threads()
        ),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batch_spec": {k: v for k, v in batch.items()},
        "batch": stats,
        "memory_method": method,
        "results": results,
        "summary": summary,
    }
    md = markdown(report)
    _atomic_write(out.with_suffix(".json"), json.dumps(report, indent=1))
    _atomic_write(out.with_suffix(".md"), md)
    plot(report, out.with_suffix(".png"))
    print()
    print(md)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")
    failed = [r["variant"] for r in results if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
