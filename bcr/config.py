"""``BCRConfig``: every option of a BCR training run, as one plain dataclass.

Names follow TRL's ``GRPOConfig`` wherever the concept exists (``num_generations``,
``max_completion_length``, ``beta``, ``epsilon``, ``loss_type``, ...), so a TRL user can switch by
changing an import and a config class. BCR's own options are ``n_problems`` (N problems per prompt,
an int or weights over N), ``advantage_mode`` and ``shared_advantage``.

Load from YAML and override from the command line with ``bcr.dataclass_cli.load_dataclass``
(``BCRConfig.from_yaml`` / ``to_yaml`` are shortcuts). ``__post_init__`` validates every field and
raises ``ConfigError`` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .dataclass_cli import ConfigError, load_dataclass

# TRL loss_type -> the aggregation mode of bcr_kernels.policy_loss (see its docstring).
LOSS_TYPES = {
    "dapo": "token_mean",  # token mean, normalised by the token count of the whole (global) batch
    "bnpo": "token_mean",  # token mean, normalised by the token count of this rank's batch
    "grpo": "seq_mean_token_mean",  # mean over sequences of each sequence's token mean
    "dr_grpo": "seq_mean_token_sum_norm",  # token sum / (sequences * max_completion_length)
}
SCHEDULERS = ("constant", "linear", "cosine")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_MODES = ("instance", "sequence")
SHARED_ADVANTAGES = ("mean", "zero")
ROLLOUT_ENGINES = ("hf", "vllm")
DISTRIBUTED_STRATEGIES = ("auto", "fsdp2", "ddp")
REPORT_TO = ("tensorboard", "wandb")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class BCRConfig:
    # --- model, output, data -------------------------------------------------------------------
    model: str = _help("local path of a Hugging Face causal LM directory (config.json + weights)", default="")
    output_dir: str = _help("where checkpoints, metrics.jsonl and the final model go", default="outputs/bcr")
    run_name: str | None = _help("a name for the run in TensorBoard / W&B (default: output_dir's name)", default=None)
    seed: int = _help("seeds model init, bundling and every rollout", default=0)
    train_data: str = _help(
        "training problems: a file (jsonl/json/parquet/csv), a benchmark name (gsm8k, math_train, ...), "
        "or 'synthetic' for generated arithmetic problems",
        default="",
    )
    train_split: str | None = _help("split of a named benchmark to train on", default="train")
    data_dir: str | None = _help("directory holding <name>/{train,test}.jsonl (default: $BCR_DATA_DIR)", default=None)
    limit: int | None = _help("use at most this many training problems", default=None)
    eval_data: str | None = _help("held-out problems evaluated every eval_steps (optional)", default=None)
    eval_split: str | None = _help("split of eval_data", default="test")
    eval_limit: int | None = _help("use at most this many eval problems", default=None)
    eval_steps: int = _help("evaluate every this many steps (0: never)", default=0)

    # --- BCR ------------------------------------------------------------------------------------
    n_problems: int | dict = field(
        default=3, metadata={"help": "N problems per prompt: an int, or weights over N such as {1: 0.5, 3: 0.5}"}
    )
    advantage_mode: str = _help(
        "'instance': each problem's tokens get that problem's advantage (a verbose early section keeps its "
        "reward even when it leaves a later problem without budget); "
        "'sequence': the whole completion gets the advantage of its mean reward (the shared budget's cost "
        "reaches every section)",
        default="instance",
    )
    numbered_single: bool = _help(
        "N = 1 prompts use the numbered format of N > 1 ('Problem 1:', '### Problem 1', 'Answer 1:') "
        "instead of the plain single-problem prompt (see bcr.prompts.PromptTemplate.numbered_single)",
        default=False,
    )
    reward_extraction: str = _help(
        "how rewards read answers: 'strict' (the BCR answer format, the default: the format is part of the "
        "task) or 'flexible' (also the last \\boxed{}, 'answer is ...' or the last number per section; "
        "see bcr.scoring)",
        default="strict",
    )
    shared_advantage: str = _help(
        "advantage of shared tokens (text not attributed to one problem): 'mean' of the instances or 'zero'",
        default="mean",
    )

    # --- rollout --------------------------------------------------------------------------------
    num_generations: int = _help("G: completions sampled per prompt (the group of GRPO)", default=4)
    max_prompt_length: int | None = _help("prompts longer than this are cut from the left (None: no limit)", default=None)
    max_completion_length: int = _help(
        "the shared completion budget in tokens for the WHOLE N-problem completion", default=1024
    )
    temperature: float = _help("sampling temperature (also divides the logits of the policy log-probs)", default=1.0)
    top_p: float = _help("nucleus sampling threshold", default=1.0)
    rollout_engine: str = _help("'hf' (transformers generate) or 'vllm' (colocated, needs vllm)", default="hf")
    generation_batch_size: int | None = _help("rows per generate call of the hf engine (None: all at once)", default=None)
    vllm_gpu_memory_utilization: float = _help("GPU memory fraction given to vLLM", default=0.3)

    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = _help("AdamW peak learning rate", default=1e-6)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _help("clip the global gradient norm to this (0: no clipping)", default=1.0)
    lr_scheduler_type: str = _help("'constant', 'linear' or 'cosine' decay after warm-up", default="constant")
    warmup_ratio: float = _help("warm-up as a fraction of all optimizer updates", default=0.0)
    warmup_steps: int = _help("warm-up updates (overrides warmup_ratio when > 0)", default=0)
    max_steps: int = _help("training steps (rollout batches); -1: derive from num_train_epochs", default=-1)
    num_train_epochs: float = _help("passes over the training problems when max_steps = -1", default=1.0)
    bundles_per_step: int = _help(
        "GLOBAL number of bundles (prompts of N problems) per step, over all ranks; each gets "
        "num_generations completions. Independent of the number of processes.",
        default=8,
    )
    gradient_accumulation_steps: int = _help(
        "split each rank's samples into this many micro-batches for backward (memory only: the loss is "
        "normalised over the whole batch, so the update does not change)",
        default=1,
    )
    max_tokens_per_microbatch: int | None = _help(
        "cap on tokens in one packed row (None: one row per micro-batch)", default=None
    )
    num_iterations: int = _help("mu: optimizer updates per rollout batch (old log-probs computed once)", default=1)

    # --- loss -----------------------------------------------------------------------------------
    beta: float = _help("KL coefficient; 0.0 loads no reference model", default=0.0)
    epsilon: float = _help("lower clipping range of the ratio", default=0.2)
    epsilon_high: float | None = _help("upper clipping range (None: epsilon)", default=None)
    loss_type: str = _help("'dapo' (default), 'grpo', 'dr_grpo' or 'bnpo', as in TRL", default="dapo")
    scale_rewards: str = _help("normalise rewards by the std of the 'group', the 'batch', or 'none'", default="group")

    # --- efficiency -----------------------------------------------------------------------------
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    bf16: bool | None = _help("bf16 autocast for the training forward (None: on when CUDA is used)", default=None)
    chunk_tokens: int | None = _help("tokens per chunk of the fused LM-head log-prob kernel", default=None)
    attn_implementation: str | None = _help(
        "attention for the packed training forward (None: 'bcr_varlen' when registered, else 'sdpa')", default=None
    )
    distributed_strategy: str = _help(
        "with several processes (torchrun): 'fsdp2' shards parameters, gradients and optimizer state "
        "(torch.distributed.fsdp.fully_shard), 'ddp' keeps a full replica per rank and all-reduces gradients, "
        "'auto' = fsdp2 on CUDA, ddp on CPU. Ignored in a single process",
        default="auto",
    )
    distributed_timeout: float = _help(
        "seconds a collective may wait for the other ranks before the job fails (instead of hanging)", default=1800.0
    )
    use_peft: bool = _help("train a LoRA adapter (needs peft)", default=False)
    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA alpha", default=32)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "modules that get LoRA adapters"},
    )

    # --- logging and checkpoints ----------------------------------------------------------------
    logging_steps: int = _help("print/report every this many steps (metrics.jsonl gets every step)", default=1)
    save_steps: int = _help("checkpoint every this many steps (0: only at the end)", default=0)
    save_total_limit: int | None = _help("keep only the newest this many checkpoints (None: all)", default=2)
    resume_from: str | None = _help("'latest' (newest checkpoint in output_dir) or a checkpoint path", default=None)
    report_to: list[str] = field(default_factory=list, metadata={"help": "extra loggers: 'tensorboard', 'wandb'"})
    disable_progress_bar: bool = _help("no rich progress bar", default=False)

    def __post_init__(self) -> None:
        self._coerce_numbers()
        self.n_problems = _normalise_n_problems(self.n_problems)
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("", "none") else [self.report_to]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        self._validate()

    def _coerce_numbers(self) -> None:
        """YAML reads ``1e-4`` as a string (YAML 1.1 wants ``1.0e-4``): turn numeric strings into numbers."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            target = {"float": float, "float | None": float, "int": int, "int | None": int}.get(str(f.type))
            if target is None or not isinstance(value, str):
                continue
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{f.name}={value!r}: expected a number") from None
            if target is int and not number.is_integer():
                raise ConfigError(f"{f.name}={value!r}: expected an integer")
            setattr(self, f.name, target(number))

    # ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        def choice(name: str, allowed) -> None:
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {list(allowed)}")

        choice("loss_type", LOSS_TYPES)
        choice("lr_scheduler_type", SCHEDULERS)
        choice("scale_rewards", SCALE_REWARDS)
        choice("advantage_mode", ADVANTAGE_MODES)
        choice("shared_advantage", SHARED_ADVANTAGES)
        choice("rollout_engine", ROLLOUT_ENGINES)
        choice("distributed_strategy", DISTRIBUTED_STRATEGIES)
        if not self.distributed_timeout > 0:
            fail("distributed_timeout", "must be > 0 seconds")
        for name in self.report_to:
            if name not in REPORT_TO:
                raise ConfigError(f"report_to={self.report_to!r}: {name!r} is not one of {list(REPORT_TO)}")
        positive = ("num_generations", "max_completion_length", "bundles_per_step", "gradient_accumulation_steps",
                    "num_iterations", "logging_steps", "lora_r")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        if self.num_generations < 2:
            fail("num_generations", "GRPO needs at least 2 completions per prompt to compare; set num_generations >= 2")
        for name in ("max_prompt_length", "max_tokens_per_microbatch", "chunk_tokens", "generation_batch_size",
                     "save_total_limit", "limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                fail(name, "must be None or an integer >= 1")
        if self.learning_rate < 0:
            fail("learning_rate", "must be >= 0")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("adam_beta1 and adam_beta2 must lie in [0, 1)")
        if self.max_grad_norm < 0:
            fail("max_grad_norm", "must be >= 0 (0 disables clipping)")
        if not 0 <= self.warmup_ratio <= 1:
            fail("warmup_ratio", "must lie in [0, 1]")
        if self.warmup_steps < 0:
            fail("warmup_steps", "must be >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            fail("max_steps", "must be -1 (use num_train_epochs) or >= 1")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            fail("num_train_epochs", "must be > 0 when max_steps = -1")
        if self.temperature <= 0:
            fail("temperature", "must be > 0 (sampling needs a positive temperature)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must lie in (0, 1]")
        if self.beta < 0:
            fail("beta", "must be >= 0 (0.0 disables the KL term and the reference model)")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigError("epsilon and epsilon_high must be >= 0")
        if self.save_steps < 0:
            fail("save_steps", "must be >= 0 (0: save only at the end)")
        if self.eval_steps < 0:
            fail("eval_steps", "must be >= 0 (0: never)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            fail("vllm_gpu_memory_utilization", "must lie in (0, 1]")

    # ------------------------------------------------------------------------------------------
    @property
    def kernel_loss_type(self) -> str:
        """The ``bcr_kernels.policy_loss`` aggregation mode for ``loss_type``."""
        return LOSS_TYPES[self.loss_type]

    @property
    def n_values(self) -> list[int]:
        """Every N this run can draw, ascending."""
        return [self.n_problems] if isinstance(self.n_problems, int) else sorted(self.n_problems)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> BCRConfig:
        return load_dataclass(cls, path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def _normalise_n_problems(value) -> int | dict[int, float]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"n_problems={value!r}: not an int or a mapping like {{1: 0.5, 3: 0.5}}") from err
    if isinstance(value, bool):
        raise ConfigError(f"n_problems={value!r}: must be an int >= 1 or a mapping of N to weight")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"n_problems={value}: must be >= 1")
        return value
    if isinstance(value, dict) and value:
        out: dict[int, float] = {}
        for k, w in value.items():
            try:
                n, weight = int(k), float(w)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"n_problems={value!r}: keys must be ints N and values weights") from err
            if n < 1 or weight < 0:
                raise ConfigError(f"n_problems={value!r}: every N must be >= 1 and every weight >= 0")
            out[n] = weight
        if sum(out.values()) <= 0:
            raise ConfigError(f"n_problems={value!r}: the weights must not all be 0")
        return out
    raise ConfigError(f"n_problems={value!r}: must be an int >= 1 or a mapping such as {{1: 0.5, 3: 0.5}}")
