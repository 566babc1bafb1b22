"""The BCR trainer: one loop you can read top to bottom.

Each training step (:meth:`BCRTrainer.training_step`):

1. take this step's bundles of N problems (``bundles_per_step`` over all ranks; rank r takes
   bundles r, r + world, ...; a bundle's G samples always stay on one rank; see
   :class:`bcr.data.bundling.BundleStream`);
2. render each bundle as one prompt and sample ``num_generations`` completions that share the
   ``max_completion_length`` budget (seeds derived from (seed, step, bundle index): a resumed or
   re-sharded run draws the same completions);
3. parse each completion into N answers and their character spans, score them (per-instance
   accuracy, or a TRL-style ``reward_fn``), and turn the rewards [G, N] into advantages;
4. pack prompt + completion tokens of all samples into padding-free rows, run the model backbone with
   varlen attention, and compute log-probs of the completion tokens only with the fused LM-head
   kernel; scatter each instance's advantage onto its tokens; the policy loss of ``loss_type`` at
   ``importance_sampling_level`` (+ KL, rollout correction, masks, entropy terms: one
   ``bcr_kernels.Objective``, ``BCRConfig.policy_objective``);
5. backward (micro-batches share one global normaliser), clip the gradient norm, AdamW, LR schedule;
6. metrics, computed from what was scored and from the update.

Several processes (``torchrun --nproc-per-node K -m bcr train ...``): the global batch
(``bundles_per_step``) and every sample are the same whatever the world size; gradients are averaged
over ranks by FSDP2 (``distributed_strategy``: sharded parameters, gradients and optimizer state; the
default on CUDA) or by a plain all-reduce (``ddp``: the default on CPU/gloo). The strategy is one
object (``bcr.runtime.distributed.make_strategy``) that owns everything rank-dependent in the update. On CUDA
(``bf16``) the forward runs on bf16 copies of fp32 master weights with fp32 gradient reduction
(FSDP2's mixed-precision policy, on a one-rank mesh in one process). Metrics are all-reduced before
logging; only rank 0 prints and writes.

``num_iterations`` > 1 repeats step 4-5 on the same rollouts (old log-probs computed once, before the
first update). ``beta`` > 0 adds a KL term to a frozen reference (a copy of the initial model, or the
base model with the LoRA adapter disabled).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bcr.data.bundling import Bundler, BundleStream, bundle_sequential
from bcr.data.problems import problems_from_records
from bcr.eval.sweep import BatchSpec, EvalConfig, run_batch
from bcr.models.loading import load_model, load_tokenizer
from bcr.rl.checkpoint import (
    assert_finite_parameters,
    find_checkpoint,
    load_checkpoint,
    save_model,
    save_trainer_checkpoint,
)
from bcr.rl.config import BCRConfig
from bcr.rl.entropy_control import EntropyControl
from bcr.rl.packing import COMPLETION_MULTIPLE, PackedBatch, Sample, pack_samples
from bcr.rl.rewards import compute_advantages, instance_rewards
from bcr.models.rollout import Generation, derive_seed, make_engine
from bcr.rl.run_dir import open_run_dir, resume_settings
from bcr.runtime.dataclass_cli import ConfigError
from bcr.runtime.distributed import (
    all_reduce_sum,
    dist_info,
    fail_together,
    global_std,
    make_strategy,
    maybe_inject_failure,
)
from bcr.runtime.interrupts import raise_if_interrupted
from bcr.runtime.metrics import MetricsLogger, StepStats, TrainProgress
from bcr.task.parsing import ParsedCompletion, completion_segment_ids, parse_completion
from bcr.task.prompts import PromptTemplate, render_prompt
from bcr.task.verify import warm_up
from bcr_kernels import (
    FusedPolicyLossOutput,
    LogprobsOutput,
    branch_layout,
    fused_linear_logprobs,
    fused_linear_policy_loss,
    packed_model_kwargs,
    policy_loss,
    scatter_instance_advantages,
)
from bcr_kernels.transformers_attention import ATTN_IMPLEMENTATION, check_supported
from bcr_kernels.transformers_attention import register as register_bcr_varlen

# Fewer completion tokens per problem than this and a bundle can hardly ever be answered in full.
MIN_TOKENS_PER_PROBLEM = 8


# ----------------------------------------------------------------------------------------------
# The packed forward: backbone with varlen attention, then log-probs of completion tokens only.
# ----------------------------------------------------------------------------------------------
def training_attention(requested: str | None = None) -> str:
    """The attention implementation of the packed forward: ``requested``, else ``bcr_varlen`` when
    it registers with transformers, else ``sdpa`` (transformers builds a block-diagonal
    mask from the restarting ``position_ids``; correct, but quadratic in the row length)."""
    if requested:
        return requested
    return ATTN_IMPLEMENTATION if register_bcr_varlen() else "sdpa"


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


def _completion_head_inputs(model, batch: PackedBatch, attn_implementation: str):
    """The backbone on the whole row; the hidden states at the target positions of completion tokens,
    and the LM head's weight and bias."""
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
    return hidden, weight, bias


def completion_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, chunk_tokens: int | None = None,
                        return_entropy: bool = False, attn_implementation: str = "sdpa") -> LogprobsOutput:
    """Log-probs (fp32 ``[C]``) of the completion tokens of a packed row, and their entropies with
    ``return_entropy`` (``LogprobsOutput``). The LM head runs at the completion tokens only
    (``fused_linear_logprobs``)."""
    hidden, weight, bias = _completion_head_inputs(model, batch, attn_implementation)
    return fused_linear_logprobs(hidden, weight, batch.completion_targets, bias=bias, temperature=temperature,
                                 chunk_tokens=chunk_tokens, return_entropy=return_entropy)


def completion_policy_loss(model, batch: PackedBatch, *, temperature: float = 1.0, chunk_tokens: int | None = None,
                           return_entropy: bool = False, attn_implementation: str = "sdpa",
                           **loss_kwargs) -> FusedPolicyLossOutput:
    """``completion_logprobs`` with the policy loss at ratio 1 fused into the LM head
    (``fused_linear_policy_loss``; ``loss_kwargs`` are its arguments after ``targets``, by name: the
    tensors, ``objective`` and the per-call keywords)."""
    hidden, weight, bias = _completion_head_inputs(model, batch, attn_implementation)
    return fused_linear_policy_loss(hidden, weight, batch.completion_targets, bias=bias, temperature=temperature,
                                    chunk_tokens=chunk_tokens, return_entropy=return_entropy, **loss_kwargs)


class PackedLogprobs(torch.nn.Module):
    """``completion_logprobs`` of ``model`` as one module: the root the scale-out strategy wraps (FSDP2
    shards it as the root, so its hooks gather the embedding, final norm and LM head, used outside
    the decoder layers' forwards, as well)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, fn=completion_logprobs, **kwargs):
        return fn(self.model, batch, **kwargs)


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


def _loss_mask(sample: Sample) -> list[float]:
    mask = getattr(sample, "loss_mask", None)
    return [1.0] * len(sample.completion_ids) if mask is None else list(mask)


def _bonus_entropy(objective, metrics: dict, entropy: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(tokens, summed entropy) of one row over the tokens the entropy bonus acts on: the loss tokens, or
    those the entropy mask kept (from the loss's ``entropy/kept_*`` metrics)."""
    if objective.top_entropy_quantile >= 1.0:
        return float(mask.sum()), float((entropy.detach() * mask).sum())
    kept = float(metrics["entropy/kept_fraction"]) * max(float(mask.sum()), 1.0)
    return kept, float(metrics["entropy/kept_mean"]) * max(kept, 1.0)


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
class Scored:
    """What scoring made of one step's completions, per bundle: parsed ``[G]``, accuracy ``[G, N]``
    (1.0 where answer k is right) and the training rewards ``[G, N]``."""

    parsed: list[list[ParsedCompletion]]
    correct: list[torch.Tensor]
    rewards: list[torch.Tensor]


@dataclass
class Microbatches:
    """The update's input on this rank: packed rows, their per-token advantages, the loss normaliser
    of the global batch; ``rows[real:]`` are repeats with zero weight that keep the ranks' numbers
    of micro-batches equal (see ``SingleProcess.even_rows``)."""

    rows: list[PackedBatch]
    advantages: list[torch.Tensor]
    normalizer: float
    real: int
    unshared_tokens: int = 0  # the tokens of the real rows had no prompt been shared
    masks: list[torch.Tensor | None] | None = None  # per row: fp32 [C], 0 where masked (None: no token is)
    sampling: list[torch.Tensor | None] | None = None  # per row: the rollout engine's log-probs [C], or None
    loss_tokens: float = 0.0  # the loss tokens of all ranks / world size (the entropy bonus's shares)


@dataclass
class RolloutSample(Sample):
    """A ``Sample`` with what the rollout engine and the truncation mask add, per completion token."""

    sampling_logprobs: Sequence[float] | None = None  # the engine's log-probs (rollout correction)
    loss_mask: Sequence[float] | None = None  # 0 = left out of the loss (mask_truncated_completions)


def truncation_mask(generation: Generation, parsed: ParsedCompletion, segment_ids: Sequence[int],
                    scope: str) -> list[float] | None:
    """Per completion token, 1 = in the loss, for ``mask_truncated_completions`` (None: nothing masked).

    ``completion`` (TRL): a truncated completion is masked whole. ``unanswered`` (BCR): the cut spoils
    only what it interrupted, so a truncated completion keeps its tokens up to the last token of the
    last problem that got an answer (those problems keep their reward) and masks the unfinished tail
    after it; with no answered problem it is masked whole. Causal attention makes masking a tail an
    exact removal of it: the kept tokens' log-probs never see it.
    """
    n = len(generation.completion_ids)
    if not generation.truncated:
        return None
    if scope == "completion":
        return [0.0] * n
    answered = {k for k, inst in enumerate(parsed.instances) if inst.answer is not None}
    last = max((t for t, k in enumerate(segment_ids) if k in answered), default=-1)
    return [1.0 if t <= last else 0.0 for t in range(n)]


def _one_of(bcr_name: str, bcr_value, trl_name: str, trl_value) -> tuple[str, object]:
    """The argument given under bcr's name or TRL's (not both) -> (the name used, its value)."""
    if bcr_value is not None and trl_value is not None:
        raise TypeError(f"BCRTrainer got both {bcr_name}= and {trl_name}= (the same argument under bcr's and "
                        f"TRL's name); pass only one")
    return (trl_name, trl_value) if trl_value is not None else (bcr_name, bcr_value)


def reads_segments(cfg: BCRConfig) -> bool:
    """Whether a step reads each completion token's problem segment: the advantages do in
    ``advantage_mode=instance``, the loss at ``importance_sampling_level=instance`` and in the
    ``instance_*`` correction modes, whatever the advantage mode. Otherwise the samples carry none, and
    every token is shared text (in sequence mode all of a completion's advantages are equal anyway)."""
    mode = cfg.vllm_importance_sampling_mode if cfg.rollout_correction else ""
    return cfg.advantage_mode == "instance" or cfg.importance_sampling_level == "instance" or mode.startswith("instance")


def default_completion_multiple(device: torch.device) -> int:
    """16 on CUDA, where the Triton kernels vectorise the completion fields' loads when their length is
    a multiple of 16; 1 elsewhere: the CPU paths gain nothing from padding, and the padded sums differ in
    the last bits, which over a run gives another model (the demo's tables were made unpadded)."""
    return COMPLETION_MULTIPLE if device.type == "cuda" else 1


class BCRTrainer:
    """Train ``model`` on ``train_problems`` with Batched Contextual Reinforcement.

    Args:
        model: a local model directory, a ``.gguf`` file or a Hub id (loaded by
            ``bcr.models.loading.load_model`` in ``config.model_dtype``), or an HF causal LM.
        train_problems: ``bcr.data.problems.Problem`` objects, a ``datasets.Dataset`` or a list of dict
            records in any schema ``load_problems`` reads (``problem``/``answer``, GSM8K, MATH, DAPO's
            ``prompt`` messages + ``reward_model.ground_truth``, TRL's ``prompt``; see
            ``bcr.data.problems.problems_from_records``). TRL's name ``train_dataset=`` works too.
        config: a ``BCRConfig`` (or TRL's name, ``args=``).
        tokenizer: defaults to the one saved with ``model`` (or TRL's name, ``processing_class=``).
        eval_problems: held-out problems (same forms; or ``eval_dataset=``), evaluated every
            ``config.eval_steps`` steps.
        reward_fn: TRL-style ``f(prompts=..., completions=..., answer=..., n_problems=..., **columns)``
            returning, per sample, a float (given to every problem of the bundle), a list of N floats
            (one per problem), or None. None means "no opinion" and counts as 0.0. A list of functions
            is summed. Default: per-instance accuracy (1.0 when answer k matches problem k's answer).
            TRL's name ``reward_funcs=`` works too.
    """

    #: The packed rows' completion fields are padded to a multiple of this (vectorised kernel access;
    #: see ``bcr.rl.packing``); 1 turns the padding off. None: :func:`default_completion_multiple` of the
    #: device. Padding changes no loss, gradient or metric beyond the last bits of the sums.
    completion_multiple: int | None = None

    def __init__(self, model, train_problems=None, config: BCRConfig | None = None, tokenizer=None,
                 eval_problems=None, reward_fn=None, template=None, *,
                 train_dataset=None, eval_dataset=None, reward_funcs=None, args=None, processing_class=None):
        _, config = _one_of("config", config, "args", args)
        _, tokenizer = _one_of("tokenizer", tokenizer, "processing_class", processing_class)
        train_name, train = _one_of("train_problems", train_problems, "train_dataset", train_dataset)
        eval_name, evals = _one_of("eval_problems", eval_problems, "eval_dataset", eval_dataset)
        reward_name, reward_fn = _one_of("reward_fn", reward_fn, "reward_funcs", reward_funcs)
        if config is None:
            raise TypeError("BCRTrainer needs config=BCRConfig(...) (or TRL's name, args=)")
        if train is None:
            raise TypeError("BCRTrainer needs training problems: train_dataset= (a datasets.Dataset or a list of "
                            "records) or train_problems=")
        train = problems_from_records(train, label=train_name)  # before the model loads: bad data fails fast
        evals = problems_from_records(evals, label=eval_name) if evals is not None else []
        self.reward_fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else ([reward_fn] if reward_fn else [])
        for i, fn in enumerate(self.reward_fns):
            if not callable(fn):
                raise TypeError(f"{reward_name}[{i}] is {type(fn).__name__} {fn!r}, not a function; bcr calls reward "
                                "functions (a reward model by name is not supported)")
        self.config = cfg = config
        self.rank, self.world_size = dist_info()
        warm_up()  # math-verify imports while the model loads, so the first rewards do not wait for it
        self.model, self.tokenizer = _load_model(model, tokenizer, cfg)
        self.device = next(self.model.parameters()).device
        self.completion_multiple = self.completion_multiple or default_completion_multiple(self.device)
        self.template = _template(template, cfg.numbered_single)
        self.eval_problems = list(evals)
        self.bundles = self._bundle_stream(list(train))

        # Models (LoRA, gradient checkpointing, attention, reference), wrapped by the scale-out strategy.
        self.attn_implementation = training_attention(cfg.attn_implementation)
        self.model, self.ref_model = self._prepare_models(self.model)
        bf16 = cfg.bf16 if cfg.bf16 is not None else (self.device.type == "cuda" and not cfg.use_peft)
        self.scale = make_strategy(cfg.distributed_strategy, self.device, bf16=bf16)
        self.policy = self.scale.wrap(PackedLogprobs(self.model), self.model)
        self.reference = None if self.ref_model is None else self.scale.wrap(PackedLogprobs(self.ref_model),
                                                                              self.ref_model)

        # Optimiser and schedule (counted in optimizer updates = steps x num_iterations).
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.total_steps = self.bundles.total_steps(cfg.max_steps, cfg.num_train_epochs)
        total_updates = self.total_steps * cfg.num_iterations
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_updates))

        self.share_prompts = _share_prompts(cfg, self.model, self.attn_implementation)
        with self.scale.full_weights(self.policy):
            self.engine = make_engine(cfg.rollout_engine, self.model, self.tokenizer, **self._engine_kwargs(bf16))
        self.weights_version = 0  # optimizer updates (and resumes) so far; the engine serves _served_version
        self._served_version = 0  # vLLM starts from the weights as they are now
        self.objective = cfg.policy_objective()  # the loss's options (bcr_kernels.Objective), built once
        self.entropy_control = EntropyControl.from_config(cfg)  # the bonus's coefficient (None: no bonus)
        self.step = 0  # completed training steps
        self.last_metrics: dict = {}
        self._updating = False  # True while the parameters are between two step boundaries
        self.run_id: str | None = None  # set by train(); recorded in every checkpoint

    def _engine_kwargs(self, bf16: bool) -> dict:
        """The rollout engine's options from the config (``bcr.models.rollout.make_engine``)."""
        cfg = self.config
        if cfg.rollout_engine == "hf":
            return {"max_prompt_length": cfg.max_prompt_length, "batch_size": cfg.generation_batch_size,
                    "shared_prefill": cfg.shared_prompt != "false"}
        dtype = cfg.vllm_dtype
        if dtype == "auto":  # what the trainer's forward computes in, so the correction has least to do
            dtype = "bfloat16" if bf16 else str(next(self.model.parameters()).dtype).replace("torch.", "")
        return {"dtype": dtype, "max_model_len": cfg.vllm_max_model_length, "max_prompt_length": cfg.max_prompt_length,
                "kv_cache_gb": cfg.vllm_kv_cache_gb, "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
                "seed": cfg.seed, "check_atol": cfg.vllm_sync_check_atol}

    def sync_engine(self) -> None:
        """Give the rollout engine the current weights if it serves older ones (vLLM; checked by the
        engine, which raises on a mismatch). Called before every generation, so a resumed run or an
        evaluation never samples from stale weights."""
        if self._served_version == self.weights_version or self.config.rollout_engine == "hf":
            return
        with self.scale.full_weights(self.policy):
            self.engine.sync_weights(self.model)
        self._served_version = self.weights_version

    def _prepare_models(self, model) -> tuple:
        """LoRA, gradient checkpointing, the packed forward's attention, and the frozen reference
        (``beta`` > 0 without LoRA: a copy of the initial model); -> (policy, reference or None)."""
        cfg = self.config
        if self.attn_implementation == ATTN_IMPLEMENTATION:
            check_supported(model)  # an attention feature bcr_varlen lacks fails here, not mid-training
        if getattr(model.config, "final_logit_softcapping", None):  # the fused LM head has no softcap
            raise ValueError(
                f"{type(model).__name__} caps its logits (final_logit_softcapping="
                f"{model.config.final_logit_softcapping}), which bcr's fused LM-head log-probs do not apply; "
                "such models (Gemma 2/3) cannot be trained here yet")
        ref_model = None
        if cfg.beta > 0 and not cfg.use_peft:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if cfg.use_peft:
            model = _apply_lora(model, cfg)
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.use_peft:
                model.enable_input_require_grads()
        # The packed forward's attention, set once (not per forward: gradient checkpointing recomputes
        # during backward). bcr_varlen falls back to SDPA for padded or cached generation.
        for m in (model, ref_model):
            if m is not None and m.config._attn_implementation != self.attn_implementation:
                m.set_attn_implementation(self.attn_implementation)
        return model, ref_model

    def _bundle_stream(self, problems: list) -> BundleStream:
        """The same bundles on every rank; each rank takes its share per step."""
        cfg = self.config
        if not problems:
            raise ValueError("train_problems is empty; pass problems (e.g. from bcr.load_problems)")
        largest = max(cfg.n_values)
        if largest > len(problems):
            raise ValueError(f"n_problems asks for N={largest} but only {len(problems)} training problems were "
                             f"given; lower n_problems to <= {len(problems)} or add problems")
        stream = BundleStream(Bundler(problems, cfg.n_problems, seed=cfg.seed), cfg.bundles_per_step,
                              rank=self.rank, world_size=self.world_size)
        if cfg.max_completion_length < largest * MIN_TOKENS_PER_PROBLEM:
            warnings.warn(
                f"max_completion_length={cfg.max_completion_length} leaves fewer than {MIN_TOKENS_PER_PROBLEM} "
                f"tokens per problem for N={largest}: the model can hardly ever answer every problem; "
                "raise max_completion_length or lower n_problems",
                stacklevel=3,
            )
        return stream

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    def training_step(self) -> dict:
        """One step on every rank (a failure on any rank stops all of them); returns its metrics."""
        cfg, step = self.config, self.step
        with fail_together(f"training step {step + 1}"):
            t0 = time.perf_counter()
            torch.manual_seed(derive_seed(cfg.seed, step, self.rank, 7))  # dropout etc.
            bundles = self.bundles.step_bundles(step)
            prompts = [render_prompt(problems, self.tokenizer, self.template) for _, problems in bundles]
            self.sync_engine()
            with self.scale.full_weights(self.policy):
                groups = self.engine.generate(prompts, num_generations=cfg.num_generations,
                                              max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                              top_p=cfg.top_p, top_k=cfg.top_k,
                                              seed=[derive_seed(cfg.seed, step, j) for j, _ in bundles])
            scored = self.score(prompts, [problems for _, problems in bundles], groups)
            advantages = self.advantages(scored.rewards)
            samples = self.samples(groups, scored.parsed, advantages)
            maybe_inject_failure(f"training step {step + 1}", step + 1)
            t1 = time.perf_counter()
            batch = self.microbatches(samples)
            old = self.old_logprobs(batch)
            ref = self.ref_logprobs(batch)
            update_stats = self.optimize(batch, old, ref)
            t2 = time.perf_counter()
            return self.step_metrics(bundles, groups, scored, update_stats, seconds=(t1 - t0, t2 - t1))

    def update(self, samples: list[Sample]) -> StepStats:
        """The update of one step on ``samples`` (packing, old/reference log-probs, ``num_iterations``
        optimizer updates), exactly as :meth:`training_step` runs it; returns the update's metrics."""
        batch = self.microbatches(samples)
        return self.optimize(batch, self.old_logprobs(batch), self.ref_logprobs(batch))

    # ------------------------------------------------------------------------------------------
    # Scoring and samples
    # ------------------------------------------------------------------------------------------
    def score(self, prompts: list[str], bundles: list[list], groups: list[list[Generation]]) -> Scored:
        """Parse every completion into N answers; accuracy per instance (``reward_extraction``: the BCR
        answer format, or also free-form answers); the training rewards (``reward_fn`` when given, else
        the accuracy)."""
        parsed = [[parse_completion(g.text, len(problems), truncated=g.truncated) for g in group]
                  for problems, group in zip(bundles, groups)]
        extraction = self.config.reward_extraction
        correct = [instance_rewards(p, [q.answer for q in problems], extraction=extraction,
                                    texts=[g.text for g in group], truncated=[g.truncated for g in group])
                   for problems, group, p in zip(bundles, groups, parsed)]
        rewards = self._rewards(prompts, bundles, groups, parsed) if self.reward_fns else correct
        return Scored(parsed, correct, rewards)

    def _rewards(self, prompts, bundles, groups, parsed) -> list[torch.Tensor]:
        """Call the TRL-style reward functions once on all samples of this rank; -> [G, N] per bundle."""
        G = self.config.num_generations
        flat: dict[str, list] = {k: [] for k in ("prompts", "completions", "completion_ids", "answer", "n_problems",
                                                 "problems", "parsed", "truncated")}
        for prompt, problems, group, pgroup in zip(prompts, bundles, groups, parsed):
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

    def advantages(self, rewards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rewards ``[G, N]`` per bundle -> advantages (``scale_rewards='batch'``: the std of the
        global batch, all-reduced over ranks)."""
        cfg = self.config
        batch_std = None
        if cfg.scale_rewards == "batch" and self.world_size > 1:
            values = rewards if cfg.advantage_mode == "instance" else [r.float().mean(1) for r in rewards]
            batch_std = global_std(values, self.device)
        return compute_advantages(rewards, scale_rewards=cfg.scale_rewards, advantage_mode=cfg.advantage_mode,
                                  batch_std=batch_std)

    def samples(self, groups: list[list[Generation]], parsed: list[list[ParsedCompletion]],
                advantages: list[torch.Tensor]) -> list[Sample]:
        """One training sample per completion: its tokens, its N advantages, the instance each
        completion token belongs to (when the step reads it: see :func:`reads_segments`; else None, all
        shared), the engine's log-probs (when it reports them: the rollout correction and the off-policy
        mask use them) and the truncation mask (when ``mask_truncated_completions``)."""
        cfg = self.config
        reads = reads_segments(cfg)
        out = []
        for group, pgroup, adv in zip(groups, parsed, advantages):
            for g, p, adv_i in zip(group, pgroup, adv):
                need = reads or (cfg.mask_truncated_completions and g.truncated)
                seg = completion_segment_ids(self.tokenizer, g.completion_ids, p) if need else None
                mask = truncation_mask(g, p, seg, cfg.mask_truncated_scope) if cfg.mask_truncated_completions else None
                sampling = g.sampling_logprobs  # the correction (if on) and the off-policy mask read them
                if sampling is not None and len(sampling) != len(g.completion_ids):
                    raise ValueError(f"the rollout engine gave {len(sampling)} log-probs for {len(g.completion_ids)} "
                                     "completion tokens")
                out.append(RolloutSample(g.prompt_ids, g.completion_ids, adv_i.tolist(), seg if reads else None,
                                         sampling, mask))
        return out

    # ------------------------------------------------------------------------------------------
    # Update
    # ------------------------------------------------------------------------------------------
    def microbatches(self, samples: list[Sample]) -> Microbatches:
        """``samples`` packed into rows (``gradient_accumulation_steps`` groups, each cut at
        ``max_tokens_per_microbatch``), their per-token advantages, masks and engine log-probs, and the
        global loss normaliser."""
        cfg = self.config
        per = math.ceil(len(samples) / cfg.gradient_accumulation_steps) if samples else 1
        rows, masks, sampling = [], [], []
        for i in range(0, len(samples), per):
            part = samples[i : i + per]
            for row in pack_samples(part, cfg.max_tokens_per_microbatch, share_prompts=self.share_prompts,
                                    pad_to=self.completion_multiple):
                rows.append(row.to(self.device))
                mine = [part[j] for j in row.sample_indices]  # completion tokens are in sample order
                pad = [0.0] * row.completion_padding  # the padding entries of the completion fields: no loss
                # None: every token counts (the row's own mask, 0 at padding, is used) / no engine log-probs
                masked = any(getattr(s, "loss_mask", None) is not None for s in mine)
                masks.append(torch.tensor([x for s in mine for x in _loss_mask(s)] + pad, dtype=torch.float32,
                                          device=self.device) if masked else None)
                smp = [getattr(s, "sampling_logprobs", None) for s in mine]
                sampling.append(None if any(x is None for x in smp) else
                                torch.tensor([x for xs in smp for x in xs] + pad, dtype=torch.float32,
                                             device=self.device))
        normalizer = self._normalizer(samples)
        loss_tokens = self._loss_tokens(samples) if self.entropy_control is not None else 0.0
        shared = cfg.shared_advantage if cfg.advantage_mode == "instance" else "mean"
        advantages = [scatter_instance_advantages(r.instance_advantages, r.completion_segment_ids,
                                                  r.completion_cu_seqlens, num_instances=r.num_instances,
                                                  shared=shared) for r in rows]
        padded = self.scale.even_rows(list(zip(rows, advantages, masks, sampling)))
        unshared = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        return Microbatches([r for r, *_ in padded], [a for _, a, *_ in padded], normalizer, real=len(rows),
                            unshared_tokens=unshared, masks=[m for _, _, m, _ in padded],
                            sampling=[x for *_, x in padded], loss_tokens=loss_tokens)

    def _normalizer(self, samples: list[Sample]) -> float:
        """The loss denominator of the whole global batch, per rank (gradients are averaged over ranks):
        tokens in the loss (``bnpo``: of this rank; ``dapo``, ``cispo``, ``vespo``: of all ranks), or
        sequences (``grpo``, ``sapo``, ``luspo``; times ``max_completion_length`` for ``dr_grpo``), as TRL."""
        cfg = self.config
        tokens = sum(sum(_loss_mask(s)) for s in samples)
        if cfg.loss_type == "bnpo":
            return float(max(tokens, 1))
        g_tokens, g_seqs = all_reduce_sum([tokens, len(samples)], self.device)
        if cfg.loss_type in ("dapo", "cispo", "vespo"):
            return max(g_tokens, 1.0) / self.world_size
        if cfg.loss_type in ("grpo", "sapo", "luspo"):
            return max(g_seqs, 1.0) / self.world_size
        return max(g_seqs, 1.0) * cfg.max_completion_length / self.world_size  # dr_grpo

    def _loss_tokens(self, samples: list[Sample]) -> float:
        """The loss tokens of the global batch per rank (the sum over ranks / world size)."""
        tokens = sum(sum(_loss_mask(s)) for s in samples)
        return max(all_reduce_sum([tokens], self.device)[0], 1.0) / self.world_size

    def _logprobs(self, root: torch.nn.Module, row: PackedBatch, fn=completion_logprobs, **kwargs):
        """``fn`` (``completion_logprobs`` or ``completion_policy_loss``) of ``root``'s model on ``row``."""
        cfg = self.config
        return root(row, fn, temperature=cfg.temperature, chunk_tokens=cfg.chunk_tokens,
                    attn_implementation=self.attn_implementation, **kwargs)

    @torch.no_grad()
    def old_logprobs(self, batch: Microbatches) -> list[torch.Tensor | None]:
        """The policy's log-probs before the first update (``num_iterations`` > 1; else Nones: the
        ratio is 1 and the loss is fused into the forward). Puts the policy in training mode, in
        which every forward of the update runs."""
        self.model.train()
        if self.config.num_iterations == 1:
            return [None] * len(batch.rows)
        return [self._logprobs(self.policy, row).logp for row in batch.rows]

    @torch.no_grad()
    def ref_logprobs(self, batch: Microbatches) -> list[torch.Tensor | None]:
        """The reference's log-probs (``beta`` > 0; LoRA: the base model with the adapter disabled)."""
        if self.config.beta == 0:
            return [None] * len(batch.rows)
        if self.reference is not None:
            return [self._logprobs(self.reference, row).logp for row in batch.rows]
        with self.model.disable_adapter():
            return [self._logprobs(self.policy, row).logp for row in batch.rows]

    def optimize(self, batch: Microbatches, old: list, ref: list) -> StepStats:
        """``num_iterations`` optimizer updates on ``batch``; a non-finite loss or gradient on any
        rank skips the update (the schedule still advances). Returns the update's metrics."""
        cfg, stats = self.config, StepStats()
        processed = sum(row.num_tokens for row in batch.rows[: batch.real])
        # step totals over all ranks: each rank adds its share with weight 1 / world_size
        stats.add("tokens/processed", processed, 1.0 / self.world_size)
        stats.add("tokens/saved_by_shared_prompt", batch.unshared_tokens - processed, 1.0 / self.world_size)
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            window = [0.0, 0.0]  # the update's entropy over the bonus's tokens, and their count
            finite, total_loss = self._backward(batch, old, ref, stats, self._update_objective(), window)
            self._update_entropy_control(window, stats)
            grad_norm = self.scale.reduce_and_clip(self.params, cfg.max_grad_norm)
            finite = bool(all_reduce_sum([float(not finite)], self.device)[0] == 0) and math.isfinite(grad_norm)
            stats.add("learning_rate", self.scheduler.get_last_lr()[0])
            if finite:
                self._updating = True
                self.optimizer.step()
                self.weights_version += 1
                assert_finite_parameters(self.model, self.step + 1)  # stop at the update that broke them
                stats.add("loss", total_loss)
                stats.add("grad_norm", grad_norm)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"step {self.step}: non-finite loss or gradient; the update was skipped", stacklevel=2)
            stats.add("skipped_updates", float(not finite))
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()
        return stats

    def _backward(self, batch: Microbatches, old: list, ref: list, stats: StepStats, objective=None,
                  entropy_window: list | None = None) -> tuple[bool, float]:
        """Accumulate the gradients of every micro-batch; -> (all losses finite, summed loss). Adds each
        real row's entropy sum and token count over the bonus's tokens to ``entropy_window``.

        Padding rows, and every row after a non-finite loss, run backward with weight 0, so each rank
        runs the same forwards and backwards (FSDP2 gathers and reduce-scatters in them)."""
        objective = self.objective if objective is None else objective
        finite, total_loss, last = True, 0.0, len(batch.rows) - 1
        masks = batch.masks or [None] * len(batch.rows)
        sampling = batch.sampling or [None] * len(batch.rows)
        for i, (row, adv, old_logp, ref_logp) in enumerate(zip(batch.rows, batch.advantages, old, ref)):
            self.scale.set_gradient_sync(self.policy, i == last)
            mask = row.completion_weights(adv) if masks[i] is None else masks[i]
            share = float(mask.sum()) / batch.loss_tokens if self.entropy_control is not None else 1.0
            loss, metrics, entropy = self._loss(row, adv, old_logp, ref_logp, batch.normalizer, mask, sampling[i],
                                                objective=objective, entropy_weight=share)
            if i < batch.real and not torch.isfinite(loss):
                finite = False
            if i >= batch.real or not finite:
                (loss * 0.0).backward()
                continue
            loss.backward()
            total_loss += float(loss.detach())
            c = row.num_completion_tokens
            stats.add("entropy", float(entropy.sum()), c)
            for name, value in metrics.items():
                if name.endswith("/max"):
                    stats.add_max(name, float(value))
                else:
                    stats.add(name, float(value) * c, c)
            if entropy_window is not None and self.entropy_control is not None:
                kept, entropy_sum = _bonus_entropy(objective, metrics, entropy, mask)
                entropy_window[0] += entropy_sum
                entropy_window[1] += kept
        return finite, total_loss

    def _update_objective(self):
        """The objective of the next optimizer update: the config's, with the entropy coefficient it applies."""
        control = self.entropy_control
        if control is None or control.applied() == self.objective.entropy_coef:
            return self.objective
        return dataclasses.replace(self.objective, entropy_coef=control.applied())

    def _update_entropy_control(self, window: list, stats: StepStats) -> None:
        """After an update: adaptive control reads its entropy (over every rank); ``entropy_coef`` is logged."""
        control = self.entropy_control
        if control is None:
            return
        entropy_sum, tokens = all_reduce_sum(window, self.device)
        control.update(entropy_sum, tokens)
        stats.add("entropy_coef", control.coef)

    def _loss(self, row: PackedBatch, adv: torch.Tensor, old_logp, ref_logp, normalizer: float,
              mask: torch.Tensor | None = None, sampling: torch.Tensor | None = None, *, objective=None,
              entropy_weight: float = 1.0):
        """Policy loss (+ KL, + entropy bonus) of one row -> (loss, metrics, entropy). Without old log-probs
        (ratio 1) the loss is fused into the LM head, whose gradients come with the forward."""
        if mask is None:
            mask = row.completion_weights(adv)  # 0 at the padding entries of the completion fields
        o = self.objective if objective is None else objective
        if sampling is None and o.importance_sampling_mode is not None:  # no engine log-probs: nothing to correct
            o = dataclasses.replace(o, importance_sampling_mode=None)
        per_call = {"ref_logp": ref_logp, "segment_ids": row.completion_segment_ids, "sampling_logp": sampling,
                    "normalizer": normalizer, "entropy_weight": entropy_weight}
        if old_logp is None:
            out = self._logprobs(self.policy, row, completion_policy_loss, return_entropy=True, advantages=adv,
                                 mask=mask, cu_seqlens=row.completion_cu_seqlens, objective=o, **per_call)
            return out.loss, {**out.metrics, **_sampling_gap(out.logp, sampling, mask)}, out.entropy
        logp, entropy = self._logprobs(self.policy, row, return_entropy=True)  # both differentiable
        loss, metrics = policy_loss(logp, old_logp, adv, mask, row.completion_cu_seqlens, o,
                                    entropy=entropy if o.uses_entropy else None, **per_call)
        return loss, {**metrics, **_sampling_gap(old_logp, sampling, mask)}, entropy.detach()

    # ------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------
    def step_metrics(self, bundles: list[tuple[int, list]], groups: list[list[Generation]], scored: Scored,
                     update_stats: StepStats, seconds: tuple[float, float]) -> dict:
        """The step's metrics over all ranks: what was scored, what the update recorded, timings."""
        stats, generated = StepStats(), 0
        for (_, problems), group, pgroup, r, acc in zip(bundles, groups, scored.parsed, scored.rewards, scored.correct):
            n = len(problems)
            stats.add("frac_reward_zero_std", float((r.float().std(0, unbiased=False) == 0).all()), 1)
            for g, p, r_i, acc_i in zip(group, pgroup, r, acc):
                length = len(g.completion_ids)
                generated += length
                mean_r = float(r_i.float().mean())
                stats.add("reward", mean_r)
                stats.add("reward_sq", mean_r ** 2)
                stats.add("accuracy", float(acc_i.sum()), n)
                for k in range(n):
                    stats.add(f"accuracy/pos_{k + 1}", float(acc_i[k]))
                stats.add("answered_rate", sum(ans is not None for ans in p.answers), n)
                stats.add("completions/mean_length", length)
                stats.add("completions/truncated_ratio", float(g.truncated))
                stats.add("tokens_per_problem", length / n)
                stats.add("n_problems", n)
        stats.extend(update_stats)
        m = stats.reduce(self.device)
        m["reward_std"] = math.sqrt(max(0.0, m.pop("reward_sq") - m["reward"] ** 2))
        generated = all_reduce_sum([generated], self.device)[0]
        rollout_s, update_s = seconds
        m.update({"time/rollout": rollout_s, "time/update": update_s,
                  "tokens_per_second": generated / max(rollout_s + update_s, 1e-9)})
        return m

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until ``total_steps``; returns the metrics of the last step. Holds ``output_dir`` for
        the run (``bcr.rl.run_dir``: one run per directory, its run id, leftover temporaries removed)."""
        with open_run_dir(self.config, rank=self.rank) as run:
            self.run_id = run.run_id
            return self._train()

    def _train(self) -> dict:
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
                    metrics = {"step": self.step, "epoch": self.bundles.epoch_progress(self.step), **metrics}
                    if cfg.eval_steps and self.eval_problems and self.step % cfg.eval_steps == 0:
                        with fail_together(f"evaluation at step {self.step}"):
                            metrics.update(self.evaluate())
                    self.last_metrics = metrics
                    logger.log(metrics)
                    progress.update(self.step, metrics)
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self.save_checkpoint()
                        last_saved = self.step
                    raise_if_interrupted()  # a Ctrl-C whose KeyboardInterrupt was swallowed mid-step
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
        """Accuracy and tokens per problem on ``eval_problems`` for each N (one sample per bundle),
        generated and scored by the evaluator's own code (``bcr.eval.sweep.run_batch``: the seeds of
        ``bcr eval`` with this run's seed, budget, temperature and prompt template); the bundles are
        shared out over the ranks."""
        cfg, out = self.config, {}
        self.sync_engine()
        eval_cfg = EvalConfig(n_values=list(cfg.n_values), max_completion_length=cfg.max_completion_length,
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                              numbered_single=cfg.numbered_single)
        with self.scale.full_weights(self.policy):
            for n in cfg.n_values:
                bundles = bundle_sequential(self.eval_problems, n)
                spec = BatchSpec("policy", n, 0, tuple(range(self.rank, len(bundles), self.world_size)))
                records = run_batch(self.engine, self.tokenizer, spec, bundles, eval_cfg, template=self.template)
                correct, problems, tokens = all_reduce_sum(
                    [sum(sum(r["correct"]) for r in records), sum(r["n_actual"] for r in records),
                     sum(r["completion_tokens"] for r in records)], self.device)
                out[f"eval/accuracy/n{n}"] = correct / max(problems, 1)
                out[f"eval/tokens_per_problem/n{n}"] = tokens / max(problems, 1)
        return out

    # ------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"step": self.step, "epoch": self.bundles.epoch_progress(self.step),
                 "bundle_position": self.step * self.config.bundles_per_step, "world_size": self.world_size,
                 "total_steps": self.total_steps, "config": self.config.to_dict(), "metrics": self.last_metrics,
                 "run_id": self.run_id}
        if self.entropy_control is not None:
            state["entropy_control"] = self.entropy_control.state()
        return state

    def save_checkpoint(self) -> Path | None:
        """``output_dir/checkpoint-<step>``; every rank must call it. Rank 0 writes the HF directory
        and returns its path (other ranks: None). With FSDP2 the weights are gathered to rank 0 first
        and every rank writes its optimizer shard through torch.distributed.checkpoint."""
        cfg = self.config
        with fail_together(f"saving checkpoint-{self.step}"):
            return save_trainer_checkpoint(cfg.output_dir, self.step, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, tokenizer=self.tokenizer, state=self._state(),
                                           save_total_limit=cfg.save_total_limit, device=self.device)

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        resume_settings(state, self.config, total_steps=self.total_steps, optimizer=self.optimizer,
                        scheduler=self.scheduler, where=path)
        saved = state.get("config", {})
        for key in ("bundles_per_step", "n_problems", "seed", "num_generations"):
            if key in saved and saved[key] != getattr(self.config, key) and not (
                    key == "n_problems" and isinstance(saved[key], dict)):
                warnings.warn(f"resuming {path} with {key}={getattr(self.config, key)!r} but it was trained with "
                              f"{saved[key]!r}; the data order will differ from the original run", stacklevel=2)
        self.step = int(state["step"])
        self.weights_version += 1  # the loaded weights: the engine gets them before it generates
        if self.entropy_control is not None and "entropy_control" in state:
            self.entropy_control.load(state["entropy_control"])

    def save(self, path: str | Path | None = None) -> Path:
        """Save the model and tokenizer as an HF directory (default: ``output_dir``). Every rank must
        call it (FSDP2 gathers the weights); rank 0 writes."""
        with fail_together("saving the final model"):
            return save_model(path or self.config.output_dir, self.model, self.tokenizer, device=self.device)


def _sampling_gap(logp: torch.Tensor, sampling: torch.Tensor | None, mask: torch.Tensor) -> dict:
    """How far the engine's sampling log-probs lie from the policy's before the update (TRL's names):
    ``sampling/sampling_logp_difference/mean`` and ``/max`` of ``|old - sampling|`` over the loss tokens.
    On policy with an exact engine both are ~0 (the rollout correction's ratio is 1)."""
    if sampling is None:
        return {}
    keep = mask > 0
    if not bool(keep.any()):
        return {}
    gap = (logp.detach().float() - sampling.to(logp.device).float()).abs()[keep]
    return {"sampling/sampling_logp_difference/mean": gap.mean(), "sampling/sampling_logp_difference/max": gap.max()}


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------
def _load_model(model, tokenizer, cfg: BCRConfig):
    if isinstance(model, (str, Path)):
        model, loaded = load_model(model, dtype=cfg.model_dtype, gguf_file=cfg.gguf_file, with_tokenizer=tokenizer is None)
        tokenizer = tokenizer if tokenizer is not None else loaded
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
