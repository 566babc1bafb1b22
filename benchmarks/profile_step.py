"""Profile one full BCR training step against padded eager PyTorch, Liger and TRL, side by side.

    python -m benchmarks.profile_step --preset cpu-small            # the issue-10 CPU shape (minutes)
    python -m benchmarks.profile_step --preset tiny --repeats 1     # seconds; what the smoke test runs
    python -m benchmarks.profile_step --preset qwen2.5-1.5b         # on a GPU (bf16)
    python -m benchmarks.profile_step --preset cpu-small --objectives  # one row per policy objective
    python -m benchmarks.profile_step --preset cpu-small --objectives packed-entropy-bonus,packed-top-entropy

A *step* is what ``bcr.rl.trainer.BCRTrainer.update`` does for one batch of rollouts with
``num_iterations=1``: build the batch tensors from token lists, forward, completion-token log-probs,
policy loss (``token_mean`` = TRL's ``dapo``, epsilon 0.2, beta 0), backward, AdamW step. The model is a
random-init Qwen2 built from a config (nothing is downloaded); its weights do not change the cost.

The batch (same tokens for every variant, seeded): ``--num-completions`` prompt + completion pairs;
prompts ``--prompt-len`` tokens (uniform); completions spread like rollouts: a ``--truncated-frac``
share runs to the budget (``--budget``), the rest have lengths drawn from ``--length-dist`` between
``--min-completion`` and the budget. Every completion answers ``--n-problems`` instances (contiguous
spans after a short shared preamble, -1), with per-instance advantages drawn from N(0, 1).

Variants (each in a FRESH subprocess: 1+ untimed warm-up steps, then ``--repeats`` measured steps):

- ``packed``: the trainer's own code. A real ``bcr.rl.trainer.BCRTrainer`` is built on the model
  (``attn_implementation="bcr_varlen"``, ``num_iterations=1``, ``loss_type="dapo"``, ``bf16=False`` so
  it computes in the preset's dtype like every other variant) and its update runs on the prepared
  ``bcr.rl.packing.Sample`` objects: ``pack_samples`` into padding-free rows, the varlen backbone,
  ``scatter_instance_advantages``, ``fused_linear_policy_loss`` (log-probs, loss and the LM-head
  gradients in one chunked forward), backward, gradient-norm clipping (``max_grad_norm=1.0``, which the
  other variants do not do), AdamW, LR schedule. Phases come from hooks on the trainer's objects, not
  from a copy of its code: ``prepare`` = until the backbone starts (packing, advantages, normaliser),
  ``forward`` = the decoder's forward, ``logprobs`` = the fused head + loss (until the gradient reaches
  the backbone's output), ``backward`` = the rest of backward and the clipping, ``optimizer`` = from
  the optimizer's step pre-hook to the end of the update. (Its ``--trace`` has the trainer's own ops
  but no ``bcr_step/`` phase ranges.)
- ``packed-shared``: ``packed`` with ``shared_prompt=true``: each run of completions with one prompt
  (``--group-size``) is packed as ``[prompt, completion 1, ..., completion G]`` and the prompt's hidden
  states are computed once (``packed`` itself runs with ``shared_prompt=false``, every sequence whole).
- ``packed-two-pass``: the same packed backbone written out with the kernels of the unfused path (what
  the trainer runs with ``num_iterations > 1``): ``bcr_kernels.fused_linear_logprobs`` ->
  ``scatter_instance_advantages`` -> ``policy_loss``.
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

``--objectives`` runs ``packed`` (dapo, token level) and then ``packed`` once per row of ``OBJECTIVES``:
every other TRL loss type, two-sided clipping, the sequence (GSPO) and instance (BCR) ratios, the
rollout correction (samples carrying engine log-probs), the off-policy mask and TRL's entropy controls
(the entropy bonus, constant and adaptive, and ``top_entropy_quantile``); their ratios are against
``packed``. Rows whose gradient needs per-segment sums of the log-probs (the rollout correction, the
off-policy mask) or every token's entropy (``top_entropy_quantile``) run the fused head twice
(``fused_linear_policy_loss``'s ``two_pass`` plan). ``--objectives NAME,NAME`` runs ``packed`` and those
rows only.

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
``<out>.png`` (phase times and peak memory per variant), written through ``benchmarks.harness``. Ratios are the claims; absolute CPU times
are context. Other processes on the machine add noise: compare medians and repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForCausalLM, Qwen2Config

from bcr.rl.config import BCRConfig
from bcr.rl.packing import Sample, pack_samples
from bcr.task.synthetic import make_arithmetic_problems
from bcr.models.tiny import build_tokenizer
from bcr.rl.trainer import BCRTrainer, RolloutSample
from bcr_kernels import Objective, fused_linear_logprobs, policy_loss, scatter_instance_advantages
from bcr_kernels import packed_model_kwargs

from . import harness
from .harness import MiB

MODULE = "benchmarks.profile_step"
BASELINE = "padded-eager"
# ``--objectives``: the ``packed`` step (the trainer's update) once per policy objective, each against
# ``packed`` (dapo, token level) as the baseline. name -> (BCRConfig options, rows carry engine log-probs)
OBJECTIVES = {
    "packed-grpo": ({"loss_type": "grpo"}, False),
    "packed-dr_grpo": ({"loss_type": "dr_grpo"}, False),
    "packed-bnpo": ({"loss_type": "bnpo"}, False),
    "packed-cispo": ({"loss_type": "cispo", "epsilon_high": 5.0}, False),
    "packed-sapo": ({"loss_type": "sapo"}, False),
    "packed-vespo": ({"loss_type": "vespo"}, False),
    "packed-delta": ({"delta": 1.5}, False),
    "packed-sequence": ({"importance_sampling_level": "sequence"}, False),  # GSPO's ratio
    "packed-luspo": ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, False),
    "packed-instance": ({"importance_sampling_level": "instance"}, False),
    # the rollout correction (engine log-probs in every sample) and the off-policy mask: two passes
    "packed-is-sequence_mask": ({"vllm_importance_sampling_correction": True}, True),
    "packed-is-instance_mask": ({"vllm_importance_sampling_correction": True,
                                 "vllm_importance_sampling_mode": "instance_mask"}, True),
    "packed-off-policy-mask": ({"off_policy_mask_threshold": 0.5}, False),
    # TRL's entropy controls: the bonus (entropies and their gradient per chunk, one pass), the same under
    # adaptive control (a target above any entropy: applied from the second update), and the entropy
    # mask (every entropy before any gradient: two passes)
    "packed-entropy-bonus": ({"entropy_coef": 0.01}, False),
    "packed-entropy-adaptive": ({"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 100.0}, False),
    "packed-top-entropy": ({"top_entropy_quantile": 0.2}, False),
    "packed-top-entropy-bonus": ({"top_entropy_quantile": 0.2, "entropy_coef": 0.01}, False),
}
PHASES = ("prepare", "forward", "logprobs", "loss", "backward", "optimizer")
EPSILON = 0.2
RENAMED = {"packed-fused-loss": "packed (it now times BCRTrainer.update, which runs the fused loss)"}

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
    "cpu-gsm8k": {  # the shared-prompt benchmark (benchmarks/profile_shared_prompts.py): a small model,
        # a vocabulary the size of a BPE trained on GSM8K; prompt lengths come from the data
        "model": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 1024,
            "vocab_size": 8192,
            "tie_word_embeddings": True,
        },
        "batch": {"num_completions": 8, "budget": 256, "min_completion": 32, "prompt_len": (64, 128)},
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
    group_size: int = 1,
) -> dict:
    """Token ids, segment ids and per-instance advantages of a synthetic rollout batch (seeded).
    ``group_size`` consecutive completions share one prompt (a GRPO group of G samples)."""
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
    for i, C in enumerate(lengths):
        if i % group_size == 0:
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
    # tokens of the packed rows when each run of samples with one prompt carries it once
    firsts = [i for i, s in enumerate(spec["samples"])
              if i == 0 or s["prompt_ids"] != spec["samples"][i - 1]["prompt_ids"]]
    shared = sum(P[i] for i in firsts) + sum(C)
    lmax = max(p + c for p, c in zip(P, C))
    return {
        "num_sequences": len(C),
        "real_tokens": real,
        "completion_tokens": sum(C),
        "padded_positions": len(C) * lmax,
        "padding_fraction": 1 - real / (len(C) * lmax),
        "shared_prompt_tokens": shared,
        "completion_lengths": C,
        "prompt_lengths": P,
    }


# --------------------------------------------------------------------------------------------------
# one step of one variant


class PhaseTimer:
    """Wall time per phase, CUDA synchronised at each boundary.

    ``with timer("forward"): ...`` times a block and marks it as a profiler range (``--trace``).
    ``timer.begin(name)`` ends the open phase and starts ``name``; ``timer.end()`` closes it. These two
    are for hooks fired inside code that is not ours (the trainer's), possibly on autograd's own
    thread, so they time but mark no profiler range (a range must end on the thread that began it).
    """

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def begin(self, name: str) -> None:
        self.end()
        self.sync()
        self._open = (name, time.perf_counter())

    def end(self) -> None:
        if self._open is None:
            return
        self.sync()
        name, t0 = self._open
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        self._open = None

    @contextlib.contextmanager
    def __call__(self, name: str):
        with record_function(f"bcr_step/{name}"):
            self.begin(name)
            try:
                yield
            finally:
                self.end()


@dataclass
class Setup:
    """What a variant builds its step from: the model, the batch (token lists) and the child's spec."""

    model: torch.nn.Module
    samples: list[dict]
    device: torch.device
    spec: dict

    @property
    def completion_tokens(self) -> int:
        return sum(len(s["completion_ids"]) for s in self.samples)

    def bcr_samples(self) -> list[Sample]:
        return [Sample(s["prompt_ids"], s["completion_ids"], s["advantages"], s["segment_ids"]) for s in self.samples]

    def rollout_samples(self) -> list[RolloutSample]:
        """``bcr_samples`` with engine log-probs (seeded, near the trainer's -log V at init) for the
        rollout-correction rows."""
        g = torch.Generator().manual_seed(self.spec["seed"])
        out = []
        for s in self.bcr_samples():
            lp = (-math.log(self.spec["batch"]["vocab_size"]) + 0.01 * torch.randn(len(s.completion_ids), generator=g))
            out.append(RolloutSample(s.prompt_ids, s.completion_ids, s.advantages, s.segment_ids, lp.tolist()))
        return out


@dataclass
class Step:
    """One full training step, optimizer included (``run(timer)`` returns the loss), and the optimizer
    whose gradients the child frees before each measured step."""

    run: Callable[[PhaseTimer], float]
    optimizer: torch.optim.Optimizer


def build_model(preset: str, attn: str, dtype: torch.dtype, device: torch.device, seed: int):
    """The preset's random-init Qwen2 (seeded). On CUDA the weights are drawn on the GPU (a 1.5B model
    initialises in seconds there instead of tens of seconds on the CPU; the values differ, the cost
    does not)."""
    cfg = Qwen2Config(**PRESETS[preset]["model"])
    on_gpu = device.type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if on_gpu else []), torch.device(device.type):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.to(device).train()


def with_adamw(setup: Setup, loss_step: Callable[[PhaseTimer], float]) -> Step:
    """A hand-written step (forward + loss + backward) followed by AdamW."""
    optimizer = torch.optim.AdamW(setup.model.parameters(), lr=1e-6, weight_decay=0.0)

    def run(timer: PhaseTimer) -> float:
        loss = loss_step(timer)
        with timer("optimizer"):
            optimizer.step()
        return loss

    return Step(run, optimizer)


def loss_and_backward(timer: PhaseTimer, logp, adv, mask) -> float:
    """The padded variants' tail: the clipped token-mean loss over ``mask``, then backward."""
    with timer("loss"):
        loss = clipped_token_loss(logp, adv, mask, mask.sum())
    with timer("backward"):
        loss.backward()
    return float(loss.detach())


def clipped_token_loss(logp, adv, mask, normalizer):
    """TRL's GRPO objective (``dapo``/token mean), eager PyTorch, per-token advantages."""
    old = logp.detach()  # num_iterations = 1: pi_old = pi_theta (the ratio is 1, its gradient is not)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    return (per_token * mask).sum() / normalizer


# ---- packed: the trainer's own update


def trainer_config(setup: Setup) -> BCRConfig:
    """The trainer settings of the ``packed`` variant (the loss of every other variant)."""
    spec = setup.spec
    settings = dict(
        n_problems=1,  # only bundling reads it; the prepared samples carry their own N
        max_completion_length=spec["batch"]["budget"],
        learning_rate=1e-6,
        weight_decay=0.0,
        epsilon=EPSILON,
        loss_type="dapo",
        num_iterations=1,
        beta=0.0,
        max_tokens_per_microbatch=spec.get("max_tokens_per_row"),
        chunk_tokens=spec.get("chunk_tokens"),
        attn_implementation="bcr_varlen",
        bf16=False,
        shared_prompt="true" if setup.spec["variant"] == "packed-shared" else "false",
        seed=spec["seed"],
    )
    settings.update(OBJECTIVES.get(setup.spec["variant"], ({}, False))[0])  # an --objectives row's options
    return BCRConfig(**settings)


def trainer_update(trainer: BCRTrainer, samples: list[Sample]) -> float:
    """THE one call into the trainer: one update on prepared samples; returns the loss it optimised."""
    return trainer.update(samples).reduce().get("loss", math.nan)


def time_trainer_phases(trainer: BCRTrainer, clock: Callable[[], PhaseTimer | None]) -> None:
    """Hooks on the trainer's decoder and optimizer that switch ``clock()``'s phase (see the docstring)."""

    def begin(name: str) -> None:
        timer = clock()
        if timer is not None:
            timer.begin(name)

    def after_forward(module, args, output) -> None:
        begin("logprobs")
        hidden = output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: begin("backward"))

    decoder = trainer.model.get_decoder()
    decoder.register_forward_pre_hook(lambda module, args: begin("forward"))
    decoder.register_forward_hook(after_forward)
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: begin("optimizer"))


def packed(setup: Setup) -> Step:
    trainer = BCRTrainer(
        setup.model, make_arithmetic_problems(1, seed=0), trainer_config(setup), tokenizer=build_tokenizer()
    )
    samples = setup.rollout_samples() if OBJECTIVES.get(setup.spec["variant"], ({}, False))[1] else setup.bcr_samples()
    current: list[PhaseTimer | None] = [None]
    time_trainer_phases(trainer, lambda: current[0])

    def run(timer: PhaseTimer) -> float:
        current[0] = timer
        timer.begin("prepare")
        try:
            return trainer_update(trainer, samples)
        finally:
            timer.end()
            current[0] = None

    return Step(run, trainer.optimizer)


# ---- packed, written out with the kernels


def packed_rows(setup: Setup, timer: PhaseTimer) -> list:
    with timer("prepare"):
        rows = pack_samples(setup.bcr_samples(), setup.spec.get("max_tokens_per_row"))
        return [r.to(setup.device) for r in rows]


def packed_hidden(setup: Setup, row, timer: PhaseTimer) -> torch.Tensor:
    with timer("forward"):
        out = setup.model.get_decoder()(
            input_ids=row.input_ids[None],
            position_ids=row.position_ids[None],
            use_cache=False,
            **packed_model_kwargs(row.cu_seqlens, row.max_seqlen),
        )
        return out.last_hidden_state[0].index_select(0, row.completion_index)


def packed_advantages(row) -> torch.Tensor:
    return scatter_instance_advantages(
        row.instance_advantages,
        row.completion_segment_ids,
        row.completion_cu_seqlens,
        num_instances=row.num_instances,
        shared="mean",
    )


def packed_two_pass(setup: Setup) -> Step:
    head = setup.model.get_output_embeddings()

    def loss_step(timer: PhaseTimer) -> float:
        total = 0.0
        for row in packed_rows(setup, timer):
            hidden = packed_hidden(setup, row, timer)
            with timer("logprobs"):
                logp = kernel_logprobs(hidden, head, row.completion_targets, setup.spec.get("chunk_tokens"))
            with timer("loss"):
                adv = packed_advantages(row)
                loss = kernel_policy_loss(logp, adv, row.completion_cu_seqlens, setup.completion_tokens)
            with timer("backward"):
                loss.backward()
            total += float(loss.detach())
        return total

    return with_adamw(setup, loss_step)


def kernel_logprobs(hidden, head, targets, chunk_tokens):
    """``bcr_kernels.fused_linear_logprobs`` of the completion targets (fp32 ``[C]``)."""
    return fused_linear_logprobs(hidden, head.weight, targets, bias=head.bias, chunk_tokens=chunk_tokens).logp


def kernel_policy_loss(logp, adv, cu_seqlens, normalizer):
    """``bcr_kernels.policy_loss`` at ratio 1, token mean over ``normalizer`` tokens (the loss only)."""
    loss, _ = policy_loss(
        logp,
        logp.detach(),
        adv,
        torch.ones_like(logp),
        cu_seqlens,
        Objective(epsilon=EPSILON, reduction="token_mean"),
        normalizer=float(normalizer),
    )
    return loss


def packed_liger(setup: Setup) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    compiled = setup.spec.get("liger_compiled")
    liger = LigerFusedLinearGRPOLoss(
        beta=0.0,
        use_ref_model=False,
        loss_type="dapo",
        epsilon_low=EPSILON,
        epsilon_high=EPSILON,
        chunk_size=setup.spec.get("liger_chunk", 1024),
        compiled=setup.device.type == "cuda" if compiled is None else compiled,
        temperature=1.0,
    )
    head = setup.model.get_output_embeddings()

    def loss_step(timer: PhaseTimer) -> float:
        total = 0.0
        for row in packed_rows(setup, timer):
            hidden = packed_hidden(setup, row, timer)
            with timer("logprobs"):  # Liger: log-probs + loss (+ LM-head grads) in one fused forward
                C = hidden.shape[0]
                out = liger(
                    hidden[:, None, :],
                    head.weight,
                    row.completion_targets[:, None],
                    torch.ones(C, 1, device=setup.device, dtype=torch.long),
                    packed_advantages(row),
                    bias=head.bias,
                    num_items_in_batch=setup.completion_tokens,
                )
                loss = out[0] if isinstance(out, tuple) else out
            with timer("backward"):
                loss.backward()
            total += float(loss.detach())
        return total

    return with_adamw(setup, loss_step)


# ---- padded: tensors built from the same token lists


def token_advantages(s: dict) -> torch.Tensor:
    """Each completion token's advantage: its instance's, or the mean over instances for shared text."""
    inst, seg = torch.tensor(s["advantages"]), torch.tensor(s["segment_ids"])
    return torch.where(seg >= 0, inst[seg.clamp(min=0)], inst.mean())


def right_padded(setup: Setup, timer: PhaseTimer):
    """``[B, L]`` ids right-padded, attention mask, target-position mask and advantages ``[B, L-1]``."""
    with timer("prepare"):
        B = len(setup.samples)
        L = max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in setup.samples)
        ids = torch.zeros(B, L, dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.long)
        mask, adv = torch.zeros(B, L - 1), torch.zeros(B, L - 1)
        for b, s in enumerate(setup.samples):
            P, C = len(s["prompt_ids"]), len(s["completion_ids"])
            ids[b, : P + C] = torch.tensor(s["prompt_ids"] + s["completion_ids"])
            attn[b, : P + C] = 1
            mask[b, P - 1 : P + C - 1] = 1
            adv[b, P - 1 : P + C - 1] = token_advantages(s)
        return [t.to(setup.device) for t in (ids, attn, mask, adv)]


def left_right_padded(setup: Setup, timer: PhaseTimer):
    """TRL's layout: prompts left-padded to Pmax, completions right-padded to Cmax."""
    with timer("prepare"):
        B = len(setup.samples)
        Pm = max(len(s["prompt_ids"]) for s in setup.samples)
        Cm = max(len(s["completion_ids"]) for s in setup.samples)
        ids = torch.zeros(B, Pm + Cm, dtype=torch.long)
        attn = torch.zeros(B, Pm + Cm, dtype=torch.long)
        cmask, adv = torch.zeros(B, Cm), torch.zeros(B, Cm)
        for b, s in enumerate(setup.samples):
            P, C = len(s["prompt_ids"]), len(s["completion_ids"])
            ids[b, Pm - P : Pm] = torch.tensor(s["prompt_ids"])
            ids[b, Pm : Pm + C] = torch.tensor(s["completion_ids"])
            attn[b, Pm - P : Pm + C] = 1
            cmask[b, :C] = 1
            adv[b, :C] = token_advantages(s)
        return (*[t.to(setup.device) for t in (ids, attn, cmask, adv)], Cm)


def padded_eager(setup: Setup) -> Step:
    model = setup.model

    def loss_step(timer: PhaseTimer) -> float:
        ids, attn, mask, adv = right_padded(setup, timer)
        with timer("forward"):
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, L, V]
        with timer("logprobs"):
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            del logits
        return loss_and_backward(timer, logp, adv, mask)

    return with_adamw(setup, loss_step)


def trl_fused(setup: Setup) -> Step:
    from trl.trainer.utils import add_fused_lm_head

    model = setup.model
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",))

    def loss_step(timer: PhaseTimer) -> float:
        ids, attn, cmask, adv, Cm = left_right_padded(setup, timer)
        with timer("forward"):  # backbone + TRL's chunked fused LM head (only scored positions)
            labels = ids.masked_fill(attn == 0, -100)
            labels[:, :-Cm] = -100
            logp = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).log_probs[:, -Cm:]
        return loss_and_backward(timer, logp, adv, cmask)

    return with_adamw(setup, loss_step)


def trl_selective(setup: Setup) -> Step:
    from trl.trainer.utils import selective_log_softmax

    model = setup.model

    def loss_step(timer: PhaseTimer) -> float:
        ids, attn, cmask, adv, Cm = left_right_padded(setup, timer)
        with timer("forward"):
            logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=Cm + 1, use_cache=False).logits
            logits = logits[:, :-1, :]  # [B, Cm, V]
        with timer("logprobs"):
            logp = selective_log_softmax(logits, ids[:, -Cm:])
            del logits
        return loss_and_backward(timer, logp, adv, cmask)

    return with_adamw(setup, loss_step)


@dataclass(frozen=True)
class Variant:
    build: Callable[[Setup], Step]
    attn: str  # the model's attention implementation
    needs: str | None = None  # optional package it needs


VARIANTS: dict[str, Variant] = {
    "packed": Variant(packed, "bcr_varlen"),
    "packed-shared": Variant(packed, "bcr_varlen"),
    "packed-two-pass": Variant(packed_two_pass, "bcr_varlen"),
    "padded-eager": Variant(padded_eager, "sdpa"),
    "packed-liger": Variant(packed_liger, "bcr_varlen", "liger_kernel"),
    "trl": Variant(trl_fused, "sdpa", "trl"),
    "trl-selective": Variant(trl_selective, "sdpa", "trl"),
}


def variant(name: str) -> Variant:
    """``VARIANTS[name]``, or the trainer's ``packed`` step for an ``OBJECTIVES`` row."""
    return Variant(packed, "bcr_varlen") if name in OBJECTIVES else VARIANTS[name]


def unavailable(name: str) -> str | None:
    """Why variant ``name`` cannot run here (its optional package is missing), or None."""
    needs = variant(name).needs
    if needs is None:
        return None
    if importlib.util.find_spec(needs) is None:
        return f"{needs} is not installed (pip install 'bcr[bench]' or {needs.replace('_', '-')})"
    if needs == "trl":
        try:
            from trl.trainer import utils as trl_utils
        except Exception as exc:  # noqa: BLE001  (any import-time failure of an optional package)
            return f"trl not importable ({type(exc).__name__}: {exc})"
        if name == "trl" and not hasattr(trl_utils, "add_fused_lm_head"):
            return "this trl has no add_fused_lm_head (TRL < 1.x); see trl-selective"
    return None


# --------------------------------------------------------------------------------------------------
# child: one variant


def measure(step: Step, device: torch.device) -> tuple[float, float, dict]:
    """Run one step: (loss, wall seconds, seconds per phase)."""
    timer = PhaseTimer(device)
    t0 = time.perf_counter()
    loss = step.run(timer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0, timer.times


def traced(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts)


def child_main(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    name = spec["variant"]
    if name not in VARIANTS and name not in OBJECTIVES:
        raise ValueError(f"unknown variant {name!r}; choose from {tuple(VARIANTS) + tuple(OBJECTIVES)}")
    why = unavailable(name)
    if why:
        return {"variant": name, "skipped": why}
    device = torch.device(spec["device"])
    model = build_model(spec["preset"], variant(name).attn, getattr(torch, spec["dtype"]), device, spec["seed"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step = variant(name).build(Setup(model, make_batch_spec(**spec["batch"])["samples"], device, spec))
    probe = harness.MemoryProbe(device)
    for _ in range(spec["warmup"]):
        step.optimizer.zero_grad(set_to_none=True)
        measure(step, device)
    runs = []
    for i in range(spec["repeats"]):
        step.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        trace = bool(spec.get("trace")) and i == spec["repeats"] - 1
        with traced(trace, device) as prof, probe.measure() as mem:
            loss, total, phases = measure(step, device)
        if trace:
            Path(spec["trace"]).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(spec["trace"]) / f"{name}.json"))
        runs.append({"time_s": total, "phases_s": phases, "loss": loss, **mem})
    step.optimizer.zero_grad(set_to_none=True)
    return {
        "variant": name,
        "attn_implementation": model.config._attn_implementation,
        "runs": runs,
        "param_bytes": param_bytes,
        "memory_method": probe.method,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(spec: dict, timeout: float) -> dict:
    """``child_main(spec)`` in a fresh process (``{"variant", "error"}`` when it fails)."""
    result = harness.run_child(MODULE, spec, timeout=timeout)
    return {"variant": spec["variant"], **result} if "error" in result else result


# --------------------------------------------------------------------------------------------------
# parent


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(results: list[dict], stats: dict, baseline: str = BASELINE) -> dict:
    """Per-variant medians and spreads, and ratios vs the baseline (paired by repeat index)."""
    out = {}
    base = next((r for r in results if r["variant"] == baseline and "runs" in r), None)
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
    baseline = report.get("baseline", BASELINE)
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
            f"| variant | attention | step s (median, min-max) | tokens/s | tokens/s vs {baseline} | "
            f"{mem_name} | memory vs {baseline} |"
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
    harness.save_figure(fig, path)
    plt.close(fig)




def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "packed-shared"),
                   help=f"comma-separated subset of {tuple(VARIANTS)} (default: all but packed-shared, which "
                   "needs --group-size > 1 to differ from packed)")
    p.add_argument("--objectives", nargs="?", const="all", default=None, metavar="NAMES",
                   help=f"run packed and one packed row per policy objective {tuple(OBJECTIVES)} (or only the "
                   "comma-separated NAMES), with packed (dapo) as the baseline of the ratios (replaces --variants)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the preset's)")
    p.add_argument("--num-completions", type=int, default=None)
    p.add_argument("--budget", type=int, default=None, help="completion budget (max_completion_length)")
    p.add_argument("--min-completion", type=int, default=None)
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--truncated-frac", type=float, default=0.25, help="share of completions cut at the budget")
    p.add_argument("--length-dist", choices=("uniform", "loguniform"), default="uniform")
    p.add_argument("--n-problems", type=int, default=4, help="instances per completion (N)")
    p.add_argument("--group-size", type=int, default=1,
                   help="consecutive completions that share one prompt (G; 1: every completion its own prompt)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    p.add_argument("--chunk-tokens", type=int, default=None, help="fused LM-head chunk (default: the kernel's)")
    p.add_argument("--max-tokens-per-row", type=int, default=None, help="packed rows of at most this many tokens")
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
        "--out", default=None, help="output prefix (default benchmarks/results/profile_step_<preset>_<device>)"
    )
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.baseline = BASELINE
    if args.objectives:
        rows = list(OBJECTIVES) if args.objectives == "all" else [v.strip() for v in args.objectives.split(",")]
        unknown = [v for v in rows if v not in OBJECTIVES]
        if unknown:
            p.error(f"unknown objective rows {unknown}; choose from {tuple(OBJECTIVES)}")
        args.variant_list, args.baseline = ["packed", *rows], "packed"
    for v in args.variant_list:
        if v in RENAMED:
            p.error(f"variant {v!r} was renamed: use {RENAMED[v]}")
        if v not in VARIANTS and v not in OBJECTIVES:
            p.error(f"unknown variant {v!r}; choose from {tuple(VARIANTS) + tuple(OBJECTIVES)}")
    return args


def batch_settings(args: argparse.Namespace) -> dict:
    """``make_batch_spec`` arguments: the command line's, else the preset's defaults."""
    preset = PRESETS[args.preset]
    b = preset["batch"]
    return {
        "num_completions": args.num_completions or b["num_completions"],
        "budget": args.budget or b["budget"],
        "min_completion": args.min_completion or b["min_completion"],
        "prompt_len": tuple(args.prompt_len or b["prompt_len"]),
        "truncated_frac": args.truncated_frac,
        "length_dist": args.length_dist,
        "n_problems": args.n_problems,
        "vocab_size": preset["model"]["vocab_size"],
        "seed": args.seed,
        "group_size": args.group_size,
    }


def child_spec(args: argparse.Namespace, variant: str, device: str, dtype: str, batch: dict) -> dict:
    return {
        "variant": variant,
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
        "liger_compiled": {"auto": None, "yes": True, "no": False}[args.liger_compiled],
        "trace": args.trace,
    }


def print_result(r: dict, wall: float) -> None:
    v = r["variant"]
    if "skipped" in r:
        print(f"  {v:15s} skipped: {r['skipped']}", flush=True)
    elif "error" in r:
        print(f"  {v:15s} ERROR: {r['error']}", flush=True)
    else:
        ts = [x["time_s"] for x in r["runs"]]
        ms = [x["growth_bytes"] / MiB for x in r["runs"]]
        print(
            f"  {v:15s} step {statistics.median(ts):7.3f} s  (runs {', '.join(f'{t:.3f}' for t in ts)}), "
            f"step memory {statistics.median(ms):8.0f} MiB  [{wall:.0f} s wall]",
            flush=True,
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return harness.child_entry(args.child, child_main)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    dtype = args.dtype or preset["dtype"]
    batch = batch_settings(args)
    stats = batch_stats(make_batch_spec(**batch))
    device_name = harness.device_name(device)
    print(
        f"profile_step: preset {args.preset}, {device_name}, {dtype}; batch {stats['num_sequences']} seqs, "
        f"{stats['real_tokens']} real tokens, {stats['padded_positions']} padded positions",
        flush=True,
    )
    results = []
    for v in args.variant_list:
        t0 = time.perf_counter()
        spec = child_spec(args, v, device, dtype, batch)
        why = unavailable(v)  # known here already: no child needed to find out
        if why:
            results.append({"variant": v, "skipped": why})
        else:
            results.append(child_main(spec) if args.in_process else run_child(spec, args.timeout))
        print_result(results[-1], time.perf_counter() - t0)
    report = {
        "benchmark": "profile_step",
        "preset": args.preset,
        "model_config": preset["model"],
        "device": device,
        "device_name": device_name,
        "dtype": dtype,
        "date": harness.now(),
        "command": harness.command(MODULE, argv),
        "versions": harness.versions(),
        "git": harness.git_state(),
        "torch_threads": next((r["torch_threads"] for r in results if "torch_threads" in r), torch.get_num_threads()),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batch_spec": dict(batch),
        "batch": stats,
        "memory_method": next((r["memory_method"] for r in results if r.get("memory_method")), None),
        "results": results,
        "baseline": args.baseline,
        "summary": summarize(results, stats, args.baseline),
    }
    suffix = "_objectives" if args.objectives else ""
    out = Path(args.out) if args.out else harness.RESULTS / f"profile_step_{args.preset}_{device}{suffix}"
    md = markdown(report)
    harness.write_report(out, report, md, plot)
    print()
    print(md)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
