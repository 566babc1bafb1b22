"""The BCR trainer: one loop you can read top to bottom.

Each training step:

1. take this step's bundles of N problems (``bundles_per_step`` over all ranks; rank r takes
   bundles r, r + world, ...; a bundle's G samples always stay on one rank);
2. render each bundle as one prompt and sample ``num_generations`` completions that share the
   ``max_completion_length`` budget (seeds derived from (seed, step, bundle index): a resumed or
   re-sharded run draws the same completions);
3. parse each completion into N answers and their character spans, score them (per-instance
   accuracy, or a TRL-style ``reward_fn``), and turn the rewards [G, N] into advantages;
4. pack prompt + completion tokens of all samples into padding-free rows, run the model backbone with
   varlen attention, and compute log-probs of the completion tokens only with the fused LM-head
   kernel; scatter each instance's advantage onto its tokens; clipped policy loss (+ KL);
5. backward (micro-batches share one global normaliser), clip the gradient norm, AdamW, LR schedule.

Several processes (``torchrun --nproc-per-node K -m bcr train ...``): the global batch
(``bundles_per_step``) and every sample are the same whatever the world size; gradients are averaged
over ranks by FSDP2 (``distributed_strategy``: sharded parameters, gradients and optimizer state; the
default on CUDA) or by a plain all-reduce (``ddp``: the default on CPU/gloo). Metrics are
all-reduced before logging; only rank 0 prints and writes. See ``bcr.distributed``.

``num_iterations`` > 1 repeats step 4-5 on the same rollouts (old log-probs computed once, before the
first update). ``beta`` > 0 adds a KL term to a frozen reference (a copy of the initial model, or the
base model with the LoRA adapter disabled).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bcr_kernels import (
    branch_layout,
    fused_linear_logprobs,
    fused_linear_policy_loss,
    policy_loss,
    scatter_instance_advantages,
)
from bcr_kernels.varlen_attention import ATTN_IMPLEMENTATION, packed_model_kwargs

from .bundling import Bundler
from .checkpoint import _check_finite, find_checkpoint, load_checkpoint, save_checkpoint, save_optimizer_dcp
from .config import BCRConfig
from .dataclass_cli import ConfigError
from .distributed import (
    RankFailedError,
    all_reduce_max,
    barrier,
    fail_together,
    global_std,
    maybe_inject_failure,
    resolve_strategy,
)
from .metrics import MetricsLogger, StepStats, TrainProgress, all_reduce_sum, dist_info
from .packing import PackedBatch, Sample, pack_samples
from .rollout import derive_seed, make_engine

# Fewer completion tokens per problem than this and a bundle can hardly ever be answered in full.
MIN_TOKENS_PER_PROBLEM = 8


# ----------------------------------------------------------------------------------------------
# The packed forward: backbone with varlen attention, then log-probs of completion tokens only.
# ----------------------------------------------------------------------------------------------
def training_attention(requested: str | None = None) -> str:
    """The attention implementation of the packed forward: ``requested``, else ``bcr_varlen`` when
    bcr_kernels registered it with transformers, else ``sdpa`` (transformers builds a block-diagonal
    mask from the restarting ``position_ids``; correct, but quadratic in the row length)."""
    if requested:
        return requested
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return "bcr_varlen" if "bcr_varlen" in ALL_ATTENTION_FUNCTIONS else "sdpa"


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Temporarily run ``model`` with attention implementation ``name`` (forward only: a backward that
    recomputes activations must see the same implementation, so the trainer sets it once instead)."""
    config = model.config
    previous = config._attn_implementation
    if previous == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def completion_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, chunk_tokens: int | None = None,
                        return_entropy: bool = False, attn_implementation: str = "sdpa", loss_kwargs=None):
    """Log-probs (fp32 ``[C]``) of the completion tokens of a packed row (and their entropies).

    Runs the backbone on the whole row, keeps the hidden states at the target positions of
    completion tokens, and applies the LM head there only (``fused_linear_logprobs``).
    With ``loss_kwargs`` (the arguments of ``fused_linear_policy_loss`` after ``targets``), the policy
    loss at ratio 1 is fused in as well and ``(loss, metrics, logp[, entropy])`` is returned.
    """
    kwargs = {}
    if batch.shared_prompts:  # completions continue a prompt packed once: only bcr_varlen knows the layout
        if attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"a shared-prompt row needs attn_implementation={ATTN_IMPLEMENTATION!r}, "
                             f"got {attn_implementation!r}; set shared_prompt=false")
        kwargs = {"bcr_branch_layout": branch_layout(batch.position_ids)}
    elif attn_implementation not in ("sdpa", "eager"):  # flash-style backends take the sequence boundaries
        kwargs = packed_model_kwargs(batch.cu_seqlens, batch.max_seqlen)
    with attention_implementation(model, attn_implementation):
        out = model.get_decoder()(
            input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False, **kwargs
        )
    hidden = out.last_hidden_state[0].index_select(0, batch.completion_index)
    head = model.get_output_embeddings()
    weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
    bias = getattr(head, "bias", None)
    if loss_kwargs is not None:
        return fused_linear_policy_loss(hidden, weight, batch.completion_targets, bias=bias, temperature=temperature,
                                        chunk_tokens=chunk_tokens, return_entropy=return_entropy, **loss_kwargs)
    return fused_linear_logprobs(hidden, weight, batch.completion_targets, bias=bias, temperature=temperature,
                                 chunk_tokens=chunk_tokens, return_entropy=return_entropy)


class PackedLogprobs(torch.nn.Module):
    """``completion_logprobs`` of ``model`` as one module: FSDP2 shards it as the root, so its hooks
    gather the embedding, final norm and LM head (used outside the decoder's forward) as well."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, **kwargs):
        return completion_logprobs(self.model, batch, **kwargs)


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (one FSDP2 unit each)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"distributed_strategy=fsdp2: cannot find the decoder layers of {type(model).__name__}; "
                         "use distributed_strategy=ddp")
    return list(layers)


def shard_fsdp2(model, device: torch.device) -> torch.nn.Module:
    """Apply FSDP2 (``fully_shard``) to each decoder layer and to a ``PackedLogprobs`` root around
    ``model``; returns the root. ``model`` keeps working as an HF model (its parameters become
    DTensor shards; ``full_weights`` gathers them for generation)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    root = PackedLogprobs(model)
    fully_shard(root, mesh=mesh)
    # FSDP2 picks its root at the first forward; generation calls the layers directly, so fix it now.
    root._get_fsdp_state()._lazy_init()
    return root


@contextlib.contextmanager
def full_weights(root):
    """Every FSDP2 unit of ``root`` unsharded for the duration (generation runs the HF model forward
    many times, a different number of times on each rank: no collective may happen inside). A no-op
    for ``None``."""
    if root is None:
        yield
        return
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


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
def _share_prompts(cfg: BCRConfig, model, attn_implementation: str) -> bool:
    """Whether the training forward packs each group's prompt once (``shared_prompt``; see pack_row)."""
    config = getattr(model, "config", None)
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    usable = attn_implementation == ATTN_IMPLEMENTATION and not sliding
    if cfg.shared_prompt == "true" and not usable:
        raise ConfigError(
            f"shared_prompt=true needs attn_implementation={ATTN_IMPLEMENTATION!r} and a model without sliding-window "
            f"attention (got {attn_implementation!r}, sliding_window={getattr(config, 'sliding_window', None)}); "
            "set shared_prompt=auto or false")
    return cfg.shared_prompt == "true" or (cfg.shared_prompt == "auto" and usable and cfg.num_generations > 1)


def _template(template, numbered_single: bool):
    """The prompt template of the run: the one given, with ``config.numbered_single`` applied."""
    from .prompts import PromptTemplate

    if not numbered_single:
        return template
    return dataclasses.replace(template or PromptTemplate(), numbered_single=True)


def _as_instance_rewards(value, n: int) -> list[float]:
    """One reward function output for one sample -> N floats. None ("no opinion") counts as 0.0."""
    if value is None:
        return [0.0] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if isinstance(value, torch.Tensor):
        value = value.tolist()
        if not isinstance(value, list):
            return [float(value)] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"reward_fn returned {len(values)} rewards for a bundle of {n} problems; "
                         "return one float per sample or one per problem")
    return [0.0 if v is None else float(v) for v in values]


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after ``update`` optimizer updates."""

    def f(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass
class Rollouts:
    samples: list[Sample] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)
    generated_tokens: int = 0


class BCRTrainer:
    """Train ``model`` on ``train_problems`` with Batched Contextual Reinforcement.

    Args:
        model: a local model directory (loaded with ``AutoModelForCausalLM.from_pretrained``) or an
            HF causal LM.
        train_problems: ``bcr.problems.Problem`` objects (``problem`` text and reference ``answer``).
        config: a ``BCRConfig``.
        tokenizer: defaults to the one saved with ``model``.
        eval_problems: held-out problems, evaluated every ``config.eval_steps`` steps.
        reward_fn: TRL-style ``f(prompts=..., completions=..., answer=..., n_problems=..., **columns)``
            returning, per sample, a float (given to every problem of the bundle), a list of N floats
            (one per problem), or None. None means "no opinion" and counts as 0.0. A list of functions
            is summed. Default: per-instance accuracy (1.0 when answer k matches problem k's answer).
    """

    def __init__(self, model, train_problems: Sequence, config: BCRConfig, tokenizer=None,
                 eval_problems: Sequence | None = None, reward_fn=None, template=None):
        self.config = cfg = config
        self.rank, self.world_size = dist_info()
        self.model, self.tokenizer = _load_model(model, tokenizer, cfg)
        self.device = next(self.model.parameters()).device
        self.template = _template(template, cfg.numbered_single)
        self.reward_fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else ([reward_fn] if reward_fn else [])
        self.eval_problems = list(eval_problems) if eval_problems else []

        # Data: the same bundles on every rank; each rank slices its share per step.
        problems = list(train_problems)
        if not problems:
            raise ValueError("train_problems is empty; pass problems (e.g. from bcr.load_problems)")
        largest = max(cfg.n_values)
        if largest > len(problems):
            raise ValueError(f"n_problems asks for N={largest} but only {len(problems)} training problems were "
                             f"given; lower n_problems to <= {len(problems)} or add problems")
        if cfg.bundles_per_step < self.world_size:
            raise ValueError(f"bundles_per_step={cfg.bundles_per_step} is smaller than the {self.world_size} "
                             "processes; every rank needs a bundle: raise bundles_per_step")
        self.bundler = Bundler(problems, cfg.n_problems, seed=cfg.seed)
        self._epoch_cache: dict[int, list] = {}
        self._epoch_sizes: dict[int, int] = {}
        if cfg.max_completion_length < largest * MIN_TOKENS_PER_PROBLEM:
            warnings.warn(
                f"max_completion_length={cfg.max_completion_length} leaves fewer than {MIN_TOKENS_PER_PROBLEM} "
                f"tokens per problem for N={largest}: the model can hardly ever answer every problem; "
                "raise max_completion_length or lower n_problems",
                stacklevel=2,
            )

        # Models: LoRA, gradient checkpointing, reference.
        self.ref_model = None
        if cfg.beta > 0 and not cfg.use_peft:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.use_peft:
            self.model = _apply_lora(self.model, cfg)
        if cfg.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.use_peft:
                self.model.enable_input_require_grads()
        # The packed forward's attention, set once (not per forward: gradient checkpointing recomputes
        # during backward). bcr_varlen falls back to SDPA for padded or cached generation.
        self.attn_implementation = training_attention(cfg.attn_implementation)
        for m in (self.model, self.ref_model):
            if m is not None and m.config._attn_implementation != self.attn_implementation:
                m.set_attn_implementation(self.attn_implementation)
        # Scale-out: FSDP2 units (policy and reference), or a full replica per rank (gradient all-reduce).
        self.strategy = resolve_strategy(cfg.distributed_strategy, self.world_size, self.device)
        self.fsdp_root = self.ref_root = None
        if self.strategy == "fsdp2":
            self.fsdp_root = shard_fsdp2(self.model, self.device)
            if self.ref_model is not None:
                self.ref_root = shard_fsdp2(self.ref_model, self.device)
        use_bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext

        # Optimiser and schedule (counted in optimizer updates = steps x num_iterations).
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.total_steps = self._total_steps()
        total_updates = self.total_steps * cfg.num_iterations
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_updates))

        self.share_prompts = _share_prompts(cfg, self.model, self.attn_implementation)
        engine_kw = {"max_prompt_length": cfg.max_prompt_length, "batch_size": cfg.generation_batch_size,
                     "shared_prefill": cfg.shared_prompt != "false"}
        if cfg.rollout_engine == "vllm":
            engine_kw = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization, "seed": cfg.seed}
        self.engine = make_engine(cfg.rollout_engine, self.model, self.tokenizer, **engine_kw)
        self.step = 0  # completed training steps
        self.last_metrics: dict = {}
        self._updating = False  # True while the parameters are between two step boundaries

    # ------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------
    def _num_bundles(self, epoch: int) -> int:
        if epoch not in self._epoch_sizes:  # cached: with weighted N each count builds the epoch
            self._epoch_sizes[epoch] = self.bundler.num_bundles(epoch)
        return self._epoch_sizes[epoch]

    def _locate(self, index: int) -> tuple[int, int]:
        """Global bundle ``index`` of the endless stream epoch 0, epoch 1, ... -> (epoch, index in epoch)."""
        epoch = 0
        while index >= self._num_bundles(epoch):
            index -= self._num_bundles(epoch)
            epoch += 1
        return epoch, index

    def bundle(self, index: int) -> list:
        """The problems of global bundle ``index`` (the same on every rank)."""
        epoch, offset = self._locate(index)
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = self.bundler.epoch_bundles(epoch)
        return self._epoch_cache[epoch][offset]

    def step_bundles(self, step: int) -> list[tuple[int, list]]:
        """This rank's (global index, problems) pairs for ``step``."""
        B = self.config.bundles_per_step
        return [(j, self.bundle(j)) for j in range(step * B, (step + 1) * B)][self.rank :: self.world_size]

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        whole, frac = int(cfg.num_train_epochs), cfg.num_train_epochs - int(cfg.num_train_epochs)
        total = sum(self._num_bundles(e) for e in range(whole))
        total += int(frac * self._num_bundles(whole))
        return max(1, total // cfg.bundles_per_step)

    def _epoch_progress(self, step: int) -> float:
        epoch, offset = self._locate(step * self.config.bundles_per_step)
        return epoch + offset / self._num_bundles(epoch)

    # ------------------------------------------------------------------------------------------
    # Rollout and rewards
    # ------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollouts:
        """Sample, parse, score: the training samples of ``step`` on this rank, with their advantages."""
        from .parsing import completion_segment_ids, parse_completion
        from .prompts import render_prompt
        from .rewards import compute_advantages, instance_rewards

        cfg, G = self.config, self.config.num_generations
        bundles = self.step_bundles(step)
        prompts = [render_prompt(problems, self.tokenizer, self.template) for _, problems in bundles]
        seeds = [derive_seed(cfg.seed, step, j) for j, _ in bundles]
        with full_weights(self.fsdp_root):
            groups = self.engine.generate(prompts, num_generations=G, max_new_tokens=cfg.max_completion_length,
                                          temperature=cfg.temperature, top_p=cfg.top_p, seed=seeds)
        parsed = [[parse_completion(g.text, len(problems), truncated=g.truncated) for g in group]
                  for (_, problems), group in zip(bundles, groups)]
        correct = [instance_rewards(p, [q.answer for q in problems]) for (_, problems), p in zip(bundles, parsed)]
        rewards = self._rewards(prompts, bundles, groups, parsed) if self.reward_fns else correct
        batch_std = None
        if cfg.scale_rewards == "batch" and self.world_size > 1:  # the std of the GLOBAL batch
            values = rewards if cfg.advantage_mode == "instance" else [r.float().mean(1) for r in rewards]
            batch_std = global_std(values, self.device)
        advantages = compute_advantages(rewards, scale_rewards=cfg.scale_rewards, advantage_mode=cfg.advantage_mode,
                                        batch_std=batch_std)

        out = Rollouts()
        st = out.stats
        for (_, problems), group, pgroup, r, acc, adv in zip(bundles, groups, parsed, rewards, correct, advantages):
            n = len(problems)
            st.add("frac_reward_zero_std", float((r.float().std(0, unbiased=False) == 0).all()), 1)
            for g, p, r_i, acc_i, adv_i in zip(group, pgroup, r, acc, adv):
                # In sequence mode every token gets the same advantage: no need for segments.
                segments = None
                if cfg.advantage_mode == "instance":
                    segments = completion_segment_ids(self.tokenizer, g.completion_ids, p)
                out.samples.append(Sample(g.prompt_ids, g.completion_ids, adv_i.tolist(), segments))
                length = len(g.completion_ids)
                out.generated_tokens += length
                mean_r = float(r_i.float().mean())
                st.add("reward", mean_r)
                st.add("reward_sq", mean_r ** 2)
                st.add("accuracy", float(acc_i.sum()), n)
                for k in range(n):
                    st.add(f"accuracy/pos_{k + 1}", float(acc_i[k]))
                st.add("answered_rate", sum(ans is not None for ans in p.answers), n)
                st.add("completions/mean_length", length)
                st.add("completions/truncated_ratio", float(g.truncated))
                st.add("tokens_per_problem", length / n)
                st.add("n_problems", n)
        return out

    def _rewards(self, prompts, bundles, groups, parsed) -> list[torch.Tensor]:
        """Call the TRL-style reward functions once on all samples of this rank; -> [G, N] per bundle."""
        G = self.config.num_generations
        flat: dict[str, list] = {k: [] for k in ("prompts", "completions", "completion_ids", "answer", "n_problems",
                                                 "problems", "parsed", "truncated")}
        for prompt, (_, problems), group, pgroup in zip(prompts, bundles, groups, parsed):
            for g, p in zip(group, pgroup):
                flat["prompts"].append(prompt)
                flat["completions"].append(g.text)
                flat["completion_ids"].append(g.completion_ids)
                flat["answer"].append([q.answer for q in problems])
                flat["n_problems"].append(len(problems))
                flat["problems"].append(problems)
                flat["parsed"].append(p)
                flat["truncated"].append(g.truncated)
        total = [[0.0] * n for n in flat["n_problems"]]
        for fn in self.reward_fns:
            values = fn(**flat)
            if len(values) != len(total):
                raise ValueError(f"reward_fn returned {len(values)} values for {len(total)} completions")
            for i, (v, n) in enumerate(zip(values, flat["n_problems"])):
                total[i] = [a + b for a, b in zip(total[i], _as_instance_rewards(v, n))]
        out, i = [], 0
        for _ in bundles:
            out.append(torch.tensor(total[i : i + G], dtype=torch.float32))
            i += G
        return out

    # ------------------------------------------------------------------------------------------
    # Update
    # ------------------------------------------------------------------------------------------
    def _logprobs(self, model, row: PackedBatch, return_entropy: bool = False, loss_kwargs=None):
        root = {id(self.model): self.fsdp_root, id(self.ref_model): self.ref_root}.get(id(model))
        fn = root if root is not None else (lambda row, **kw: completion_logprobs(model, row, **kw))
        with self.autocast():
            return fn(row, temperature=self.config.temperature,
                                       chunk_tokens=self.config.chunk_tokens, return_entropy=return_entropy,
                                       attn_implementation=self.attn_implementation, loss_kwargs=loss_kwargs)

    @torch.no_grad()
    def _ref_logprobs(self, row: PackedBatch) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, row)
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._logprobs(self.model, row)

    def _normalizer(self, samples: list[Sample]) -> float:
        """The loss denominator of the whole global batch, per rank (gradients are averaged over ranks)."""
        cfg = self.config
        tokens = sum(len(s.completion_ids) for s in samples)
        if cfg.loss_type == "bnpo":
            return float(max(tokens, 1))
        g_tokens, g_seqs = all_reduce_sum([tokens, len(samples)], self.device)
        if cfg.loss_type == "dapo":
            return max(g_tokens, 1.0) / self.world_size
        if cfg.loss_type == "grpo":
            return max(g_seqs, 1.0) / self.world_size
        return max(g_seqs, 1.0) * cfg.max_completion_length / self.world_size  # dr_grpo

    def _sync_gradients(self) -> None:
        if self.world_size == 1 or self.strategy == "fsdp2":  # FSDP2 reduce-scatters in backward
            return
        for p in self.params:  # plain data parallel; FSDP2 replaces this
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    def update(self, samples: list[Sample], stats: StepStats) -> None:
        """``num_iterations`` optimizer updates on this step's samples."""
        cfg = self.config
        k = cfg.gradient_accumulation_steps
        per = math.ceil(len(samples) / k) if samples else 1
        rows = [row.to(self.device)
                for i in range(0, len(samples), per)
                for row in pack_samples(samples[i : i + per], cfg.max_tokens_per_microbatch,
                                        share_prompts=self.share_prompts)]
        # step totals over all ranks (each rank adds its share with weight 1 / world_size)
        processed = sum(r.num_tokens for r in rows)
        stats.add("tokens/processed", processed, 1.0 / self.world_size)
        stats.add("tokens/saved_by_shared_prompt",
                  sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples) - processed, 1.0 / self.world_size)
        normalizer = self._normalizer(samples)
        shared = cfg.shared_advantage if cfg.advantage_mode == "instance" else "mean"
        advantages = [scatter_instance_advantages(r.instance_advantages, r.completion_segment_ids,
                                                  r.completion_cu_seqlens, num_instances=r.num_instances,
                                                  shared=shared) for r in rows]
        real = len(rows)
        if self.strategy == "fsdp2":
            # Every rank must run as many forwards/backwards (each one gathers and reduce-scatters):
            # repeat a row with zero weight on ranks that have fewer.
            most = int(all_reduce_max([len(rows)], self.device)[0])
            rows += [rows[0]] * (most - real)
            advantages += [advantages[0]] * (most - real)
        self.model.train()
        old = [None] * len(rows)
        if cfg.num_iterations > 1:
            with torch.no_grad():
                old = [self._logprobs(self.model, r) for r in rows]
        ref = [self._ref_logprobs(r) for r in rows] if cfg.beta > 0 else [None] * len(rows)
        old, ref = old + [None] * (len(rows) - len(old)), ref + [None] * (len(rows) - len(ref))

        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            finite, total_loss = True, 0.0
            for i, (row, adv, old_logp, ref_logp) in enumerate(zip(rows, advantages, old, ref)):
                if self.fsdp_root is not None:  # reduce-scatter once, after the last micro-batch
                    self.fsdp_root.set_requires_gradient_sync(i == len(rows) - 1)
                mask = torch.ones_like(adv)
                loss_kwargs = {"ref_logp": ref_logp, "beta": cfg.beta, "epsilon": cfg.epsilon,
                               "epsilon_high": cfg.epsilon_high, "loss_type": cfg.kernel_loss_type,
                               "max_completion_length": cfg.max_completion_length, "normalizer": normalizer}
                if old_logp is None:  # num_iterations == 1: ratio 1, the LM-head gradients come with the forward
                    fused = {"advantages": adv, "mask": mask, "cu_seqlens": row.completion_cu_seqlens, **loss_kwargs}
                    loss, m, _, entropy = self._logprobs(self.model, row, return_entropy=True, loss_kwargs=fused)
                else:
                    logp, entropy = self._logprobs(self.model, row, return_entropy=True)
                    loss, m = policy_loss(logp, old_logp, adv, mask, row.completion_cu_seqlens, **loss_kwargs)
                if i >= real or not torch.isfinite(loss):
                    if i < real:
                        finite = False
                    if self.fsdp_root is None:
                        break
                    (loss * 0.0).backward()  # FSDP2: keep the collectives in step with the other ranks
                    continue
                loss.backward()
                total_loss += float(loss.detach())
                c = row.num_completion_tokens
                stats.add("entropy", float(entropy.sum()), c)
                for name, value in m.items():
                    stats.add(name, float(value) * c, c)
            self._sync_gradients()
            if self.fsdp_root is not None:  # DTensor gradients: the norm is a DTensor too
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            elif cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in self.params if p.grad is not None] or [torch.zeros(())])))
            finite = bool(all_reduce_sum([float(not finite)], self.device)[0] == 0) and math.isfinite(grad_norm)
            stats.add("learning_rate", self.scheduler.get_last_lr()[0])
            if finite:
                self._updating = True
                self.optimizer.step()
                stats.add("loss", total_loss)
                stats.add("grad_norm", grad_norm)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"step {self.step}: non-finite loss or gradient; the update was skipped", stacklevel=2)
            stats.add("skipped_updates", float(not finite))
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def training_step(self) -> dict:
        """One step (rollout + update) on every rank; a failure on any rank stops all of them."""
        with fail_together(f"training step {self.step + 1}"):
            return self._training_step()

    def _training_step(self) -> dict:
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(self.config.seed, self.step, self.rank, 7))  # dropout etc.
        rollouts = self.rollout(self.step)
        maybe_inject_failure(f"training step {self.step + 1}", self.step + 1)
        t1 = time.perf_counter()
        self.update(rollouts.samples, rollouts.stats)
        t2 = time.perf_counter()
        if self.config.rollout_engine != "hf":  # vLLM: one engine per rank (data parallel), fed full weights
            with full_weights(self.fsdp_root):
                self.engine.sync_weights(self.model)
        m = rollouts.stats.reduce(self.device)
        m["reward_std"] = math.sqrt(max(0.0, m.pop("reward_sq") - m["reward"] ** 2))
        generated = all_reduce_sum([rollouts.generated_tokens], self.device)[0]
        m.update({"time/rollout": t1 - t0, "time/update": t2 - t1,
                  "tokens_per_second": generated / max(t2 - t0, 1e-9)})
        return m

    def train(self) -> dict:
        """Run until ``total_steps``; returns the metrics of the last step."""
        cfg = self.config
        logger = MetricsLogger(cfg.output_dir, report_to=cfg.report_to, run_name=cfg.run_name,
                               config=cfg.to_dict(), rank=self.rank)
        if cfg.resume_from:
            with fail_together("resuming"):
                self._resume(find_checkpoint(cfg.output_dir, cfg.resume_from))
            logger.truncate_after(self.step)
        last_saved = self.step if cfg.resume_from else -1
        progress = TrainProgress(self.total_steps, start=self.step, enabled=not cfg.disable_progress_bar,
                                 logging_steps=cfg.logging_steps, rank=self.rank)
        try:
            with progress:
                while self.step < self.total_steps:
                    metrics = self.training_step()
                    self.step += 1
                    self._updating = False
                    metrics = {"step": self.step, "epoch": self._epoch_progress(self.step), **metrics}
                    if cfg.eval_steps and self.eval_problems and self.step % cfg.eval_steps == 0:
                        with fail_together(f"evaluation at step {self.step}"):
                            metrics.update(self.evaluate())
                    self.last_metrics = metrics
                    logger.log(metrics)
                    progress.update(self.step, metrics)
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self.save_checkpoint()
                        last_saved = self.step
            if last_saved != self.step:
                self.save_checkpoint()
            self.save()
        except KeyboardInterrupt:
            if self._updating:
                progress.message(f"interrupted during the update of step {self.step + 1}; no checkpoint written "
                                 "(resume from the last saved one)")
            else:
                path = self.save_checkpoint()
                progress.message(f"interrupted: resumable checkpoint written to {path} "
                                 f"(continue with resume_from=latest)")
            raise
        finally:
            logger.close()
        return self.last_metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy and tokens per problem on ``eval_problems`` (one sample per bundle, for each N)."""
        from .bundling import bundle_sequential
        from .parsing import parse_completion
        from .prompts import render_prompt
        from .rewards import instance_rewards

        cfg, out = self.config, {}
        for n in cfg.n_values:
            bundles = bundle_sequential(self.eval_problems, n)[self.rank :: self.world_size]
            prompts = [render_prompt(b, self.tokenizer, self.template) for b in bundles]
            with full_weights(self.fsdp_root):
                groups = self.engine.generate(prompts, num_generations=1, max_new_tokens=cfg.max_completion_length,
                                              temperature=cfg.temperature, top_p=cfg.top_p,
                                              seed=derive_seed(cfg.seed, 99))
            correct = problems = tokens = 0.0
            for b, (g,) in zip(bundles, groups):
                acc = instance_rewards([parse_completion(g.text, len(b), truncated=g.truncated)], [q.answer for q in b])
                correct += float(acc.sum())
                problems += len(b)
                tokens += len(g.completion_ids)
            correct, problems, tokens = all_reduce_sum([correct, problems, tokens], self.device)
            out[f"eval/accuracy/n{n}"] = correct / max(problems, 1)
            out[f"eval/tokens_per_problem/n{n}"] = tokens / max(problems, 1)
        return out

    # ------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "epoch": self._epoch_progress(self.step),
                "bundle_position": self.step * self.config.bundles_per_step, "world_size": self.world_size,
                "total_steps": self.total_steps, "config": self.config.to_dict(), "metrics": self.last_metrics}

    def save_checkpoint(self) -> Path | None:
        """``output_dir/checkpoint-<step>``; every rank must call it. Rank 0 writes the HF directory
        and returns its path (other ranks: None). With FSDP2 the weights are gathered to rank 0 first
        and every rank writes its optimizer shard through torch.distributed.checkpoint."""
        with fail_together(f"saving checkpoint-{self.step}"):
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path | None:
        cfg = self.config
        kw = {"model": self.model, "scheduler": self.scheduler, "tokenizer": self.tokenizer, "state": self._state(),
                  "save_total_limit": cfg.save_total_limit}
        if self.strategy != "fsdp2":  # every rank holds the same state: rank 0 writes it
            path = save_checkpoint(cfg.output_dir, self.step, optimizer=self.optimizer, **kw) if self.rank == 0 else None
            barrier()
            return path
        full = self._full_state_dict()
        staging = Path(cfg.output_dir) / f".tmp-checkpoint-{self.step}-dist"
        if self.rank == 0:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        save_optimizer_dcp(self.model, self.optimizer, staging / "optimizer")
        barrier()
        path = None
        if self.rank == 0:
            path = save_checkpoint(cfg.output_dir, self.step, model_state_dict=full, staging=staging, **kw)
        barrier()
        return path

    def _full_state_dict(self) -> dict | None:
        """FSDP2: the full weights on rank 0 (None elsewhere); every rank checks its shard is finite."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                  for p in self.model.parameters())
        if all_reduce_sum([bad], self.device)[0]:
            from .checkpoint import NonFiniteCheckpointError

            raise NonFiniteCheckpointError("a parameter holds NaN/inf; refusing to write a checkpoint (lower "
                                           "learning_rate, check max_grad_norm, or resume from an earlier checkpoint)")
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.rank == 0 else None

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        saved = state.get("config", {})
        for key in ("bundles_per_step", "n_problems", "seed", "num_generations"):
            if key in saved and saved[key] != getattr(self.config, key) and not (
                    key == "n_problems" and isinstance(saved[key], dict)):
                warnings.warn(f"resuming {path} with {key}={getattr(self.config, key)!r} but it was trained with "
                              f"{saved[key]!r}; the data order will differ from the original run", stacklevel=2)
        self.step = int(state["step"])

    def save(self, path: str | Path | None = None) -> Path:
        """Save the model and tokenizer as an HF directory (default: ``output_dir``). Every rank must
        call it (FSDP2 gathers the weights); rank 0 writes."""
        import os
        import shutil

        path = Path(path or self.config.output_dir)
        full = None
        if self.strategy == "fsdp2":  # every rank takes part in gathering the weights
            with fail_together("saving the final model"):
                full = self._full_state_dict()
        if self.rank != 0:
            return path
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _check_finite(self.model, full)
        if full is not None:
            self.model.save_pretrained(tmp, state_dict=full)
        else:
            self.model.save_pretrained(tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        tmp.rmdir()
        return path


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------
def _load_model(model, tokenizer, cfg: BCRConfig):
    from transformers import AutoModelForCausalLM

    from .tokenizer_loading import load_tokenizer

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not str(model) or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model={str(model)!r} is not a local model directory (no config.json); set model=<path of a "
                "directory written by save_pretrained> (download it first with huggingface-cli download)"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).to(device)
        if tokenizer is None:
            tokenizer = load_tokenizer(path, local_files_only=True)
    if tokenizer is None:
        name = getattr(model, "name_or_path", "")
        if name and Path(name).is_dir():
            tokenizer = load_tokenizer(name, local_files_only=True)
        else:
            raise ValueError("pass tokenizer=... (the model was given as an object with no local directory)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _apply_lora(model, cfg: BCRConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("use_peft=true needs peft: pip install 'bcr[peft]'") from err
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# ----------------------------------------------------------------------------------------------
# CLI: bcr train --config cfg.yaml key=value ...
# ----------------------------------------------------------------------------------------------
def load_train_problems(cfg: BCRConfig, which: str = "train") -> list:
    from .problems import load_problems

    source = cfg.train_data if which == "train" else cfg.eval_data
    split = cfg.train_split if which == "train" else cfg.eval_split
    limit = cfg.limit if which == "train" else cfg.eval_limit
    if not source:
        raise FileNotFoundError("train_data is empty; set train_data=<file, benchmark name, or 'synthetic'>")
    if source.startswith("synthetic"):
        from .synthetic import make_arithmetic_problems

        return make_arithmetic_problems(limit or 512, seed=cfg.seed + (0 if which == "train" else 1))
    return list(load_problems(source, split, limit, data_dir=cfg.data_dir))


def cli_main(argv: Sequence[str]) -> int:
    from .dataclass_cli import ConfigError, die, parse_cli
    from .distributed import init_distributed, teardown_distributed

    try:
        cfg = parse_cli(BCRConfig, argv, prog="bcr train")
        if cfg is None:  # --help
            return 0
    except (ConfigError, ValueError) as err:
        return die(str(err))
    init_distributed(cfg.distributed_timeout)  # a no-op unless launched by torchrun with several processes
    try:
        return _train_cli(cfg)
    finally:
        teardown_distributed()


def _train_cli(cfg: BCRConfig) -> int:
    from .dataclass_cli import ConfigError, die
    from .problems import DataError

    try:
        train = load_train_problems(cfg, "train")
        evals = load_train_problems(cfg, "eval") if cfg.eval_data else None
        trainer = BCRTrainer(cfg.model, train, cfg, eval_problems=evals)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        return die(str(err))
    try:
        trainer.train()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RankFailedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    if trainer.rank == 0:
        print(f"done: model and checkpoints in {cfg.output_dir}")
    return 0
