"""``BCRConfig``: every option of a BCR training run, as one plain dataclass.

Names follow TRL's ``GRPOConfig`` wherever the concept exists (``num_generations``,
``max_completion_length``, ``beta``, ``epsilon``, ``loss_type``, ...), so a TRL user can switch by
changing an import and a config class. BCR's own options are ``n_problems`` (N problems per prompt,
an int or weights over N), ``advantage_mode`` and ``shared_advantage``.

Load from YAML and override from the command line with ``bcr.runtime.dataclass_cli.load_dataclass``
(``BCRConfig.from_yaml`` / ``to_yaml`` are shortcuts). ``__post_init__`` validates every field and
raises ``ConfigError`` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bcr.runtime.dataclass_cli import ConfigError, check_fields, load_dataclass
from bcr_kernels.objective import IS_MODES, LEVELS, Objective, ObjectiveError, check_rollout_correction  # noqa: F401 (IS_MODES: re-exported)

# TRL loss_type -> (objective, reduction) of bcr_kernels.policy_loss (see its docstring).
LOSS_TYPES = {
    "dapo": ("clip", "token_mean"),  # token mean, normalised by the token count of the whole (global) batch
    "bnpo": ("clip", "token_mean"),  # token mean, normalised by the token count of this rank's batch
    "grpo": ("clip", "seq_mean_token_mean"),  # mean over sequences of each sequence's token mean
    "dr_grpo": ("clip", "seq_mean_token_sum_norm"),  # token sum / (sequences * max_completion_length)
    "cispo": ("cispo", "token_mean"),  # clipped, detached IS weight times A log p; normalised as dapo
    "sapo": ("sapo", "seq_mean_token_mean"),  # soft sigmoid gate instead of clipping; aggregated as grpo
    "luspo": ("clip", "seq_mean_token_sum"),  # token sum per sequence, mean over sequences
    "vespo": ("vespo", "token_mean"),  # Gamma weight of the sequence ratio times A log p; normalised as dapo
}
IMPORTANCE_SAMPLING_LEVELS = LEVELS  # the loss options' allowed values and checks live in bcr_kernels.objective
TRUNCATED_SCOPES = ("unanswered", "completion")
SCHEDULERS = ("constant", "linear", "cosine")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_MODES = ("instance", "sequence")
SHARED_ADVANTAGES = ("mean", "zero")
ROLLOUT_ENGINES = ("auto", "hf", "vllm")
VLLM_MODES = ("colocate",)  # TRL's "server" mode: a served model is evaluated (bcr eval / solve), not trained
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
SHARED_PROMPT = ("auto", "true", "false")
DISTRIBUTED_STRATEGIES = ("auto", "fsdp2", "ddp")
REPORT_TO = ("tensorboard", "wandb")
MODEL_DTYPES = ("auto", "float32", "bfloat16")  # bcr.models.loading.DTYPES
REWARD_EXTRACTIONS = ("strict", "flexible")  # bcr.task.scoring.EXTRACTIONS
CHOICES = {"loss_type": LOSS_TYPES, "mask_truncated_scope": TRUNCATED_SCOPES,
           "lr_scheduler_type": SCHEDULERS, "scale_rewards": SCALE_REWARDS,
           "advantage_mode": ADVANTAGE_MODES, "shared_advantage": SHARED_ADVANTAGES,
           "rollout_engine": ROLLOUT_ENGINES, "vllm_mode": VLLM_MODES, "vllm_dtype": VLLM_DTYPES,
           "distributed_strategy": DISTRIBUTED_STRATEGIES,
           "model_dtype": MODEL_DTYPES, "shared_prompt": SHARED_PROMPT, "reward_extraction": REWARD_EXTRACTIONS}
# bcr_kernels.Objective's field -> the BCRConfig option it comes from (the same name where absent)
OBJECTIVE_NAMES = {"kind": "loss_type", "reduction": "loss_type",
                   "importance_sampling_mode": "vllm_importance_sampling_mode",
                   "importance_sampling_clip_min": "vllm_importance_sampling_clip_min",
                   "importance_sampling_clip_max": "vllm_importance_sampling_clip_max"}
POSITIVE_INTS = ("num_generations", "max_completion_length", "bundles_per_step", "gradient_accumulation_steps",
                 "num_iterations", "logging_steps", "lora_r")
OPTIONAL_POSITIVE_INTS = ("max_prompt_length", "max_tokens_per_microbatch", "chunk_tokens", "generation_batch_size",
                          "save_total_limit", "limit", "eval_limit", "vllm_max_model_length")
# AdamW's step is lr / (1 - beta1 ** step), handed to torch as a float32 scalar: above ~3e37 / (1 - beta1)
# it cannot be represented and the first update fails deep inside torch. Up to this bound it can, for
# any beta1 < 1 a float can hold (1 - beta1 >= 1.1e-16); such rates are absurd but fail cleanly (the
# non-finite-weights check names the step).
MAX_LEARNING_RATE = 1e20
# Range checks of one field: name -> (holds, what the message says). Types (and NaN/inf) are
# checked before, from the annotations (``bcr.runtime.dataclass_cli.check_fields``). The loss options
# are checked by ``bcr_kernels.Objective`` (see ``BCRConfig.policy_objective``).
RANGES = {
    "distributed_timeout": (lambda v: v > 0, "must be > 0 seconds"),
    "learning_rate": (lambda v: 0 <= v <= MAX_LEARNING_RATE,
                      f"must lie in [0, {MAX_LEARNING_RATE:g}] (larger steps overflow AdamW's float32 update)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, "must be >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "must be -1 (use num_train_epochs) or >= 1"),
    "temperature": (lambda v: v > 0, "must be > 0 (sampling needs a positive temperature)"),
    "top_p": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0: no top-k filtering)"),
    "entropy_coef_delta": (lambda v: v >= 0, "must be >= 0"),
    "entropy_target": (lambda v: v >= 0, "must be >= 0 nats"),
    "save_steps": (lambda v: v >= 0, "must be >= 0 (0: save only at the end)"),
    "eval_steps": (lambda v: v >= 0, "must be >= 0 (0: never)"),
    "vllm_gpu_memory_utilization": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    "vllm_kv_cache_gb": (lambda v: v is None or v > 0, "must be > 0 GB (None: 2 on a CPU, the memory fraction on a GPU)"),
    "vllm_sync_check_atol": (lambda v: v is None or v > 0, "must be > 0 (None: 1e-4 in float32, 0.05 in bf16/fp16)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
}


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class BCRConfig:
    # --- model, output, data -------------------------------------------------------------------
    model: str = _help(
        "the model: a local Hugging Face directory, a .gguf file, or a Hub id (see bcr.models.loading)", default=""
    )
    model_dtype: str = _help(
        "dtype the weights load in: 'float32' (fp32 master weights; bf16 comes from autocast), 'bfloat16', or "
        "'auto' (the checkpoint's dtype; fp32 on the CPU)",
        default="float32",
    )
    gguf_file: str | None = _help("with model=<directory>: the .gguf file inside it to load", default=None)
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
        "instead of the plain single-problem prompt (see bcr.task.prompts.PromptTemplate.numbered_single)",
        default=False,
    )
    reward_extraction: str = _help(
        "how rewards read answers: 'strict' (the BCR answer format, the default: the format is part of the "
        "task) or 'flexible' (also the last \\boxed{}, 'answer is ...' or the last number per section; "
        "see bcr.task.scoring)",
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
    top_k: int = _help("sample from the k most likely tokens only (0: all); with top_p < 1 or top_k the engine's "
                       "log-probs are those of the truncated distribution (the rollout correction's denominator)",
                       default=0)
    rollout_engine: str = _help("'hf' (the trainer's own model), 'vllm' (vLLM in this process, fed the weights after "
                                "every update; needs vllm, see the README) or 'auto' (vllm where it is installed, "
                                "else hf; resolved when the config is made)", default="auto")
    generation_batch_size: int | None = _help("rows per generate call of the hf engine (None: all at once)", default=None)
    vllm_mode: str = _help("'colocate' (vLLM in the trainer's process; TRL's 'server' mode is not supported)",
                           default="colocate")
    vllm_gpu_memory_utilization: float = _help("GPU memory fraction given to vLLM", default=0.3)
    vllm_max_model_length: int | None = _help("vLLM's context (prompt + completion; None: the model config's)",
                                              default=None)
    vllm_dtype: str = _help("dtype vLLM serves in: 'auto' = the trainer's forward dtype (bfloat16 with bf16 on CUDA, "
                            "else the model's own), or float32 / bfloat16 / float16", default="auto")
    vllm_kv_cache_gb: float | None = _help("vLLM's KV-cache size in GB (None: 2 on a CPU, "
                                           "vllm_gpu_memory_utilization on a GPU)", default=None)
    vllm_sync_check_atol: float | None = _help(
        "after each weight sync the log-probs of a probe sequence from vLLM and from the trainer's model must agree "
        "to this (max abs; None: 1e-4 in float32, 0.05 in bf16/fp16), or the step raises", default=None)

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
    epsilon_high: float | None = _help(
        "upper clipping range (None: epsilon); with loss_type=cispo the cap of the IS weight itself (CISPO's "
        "epsilon_max, ScaleRL uses 5.0)", default=None)
    delta: float | None = _help(
        "two-sided clipping (INTELLECT-2): the ratio is also capped at delta in the unclipped branch (clip loss "
        "types); None: off", default=None)
    loss_type: str = _help(
        "as in TRL: 'dapo' (default; token mean over the global batch), 'grpo' (mean of sequence means), "
        "'dr_grpo' (token sum / (sequences * max_completion_length)), 'bnpo' (token mean of this rank), 'cispo' "
        "(clipped detached IS weight x A x log p), 'sapo' (soft sigmoid gate, sapo_temperature_*), 'luspo' (token "
        "sum per sequence; use importance_sampling_level=sequence), 'vespo' (Gamma weight of the sequence ratio, "
        "vespo_*)", default="dapo")
    sapo_temperature_pos: float = _help("SAPO gate temperature for tokens with a positive advantage", default=1.0)
    sapo_temperature_neg: float = _help("SAPO gate temperature for tokens with a non-positive advantage", default=1.05)
    vespo_k_pos: float = _help("VESPO power k for advantages >= 0 (down-weights ratios < 1)", default=2.0)
    vespo_lambda_pos: float = _help("VESPO decay lambda for advantages >= 0 (down-weights ratios > 1)", default=3.0)
    vespo_k_neg: float = _help("VESPO power k for negative advantages", default=3.0)
    vespo_lambda_neg: float = _help("VESPO decay lambda for negative advantages", default=2.0)
    importance_sampling_level: str = _help(
        "one IS ratio per 'token', per 'sequence' (GSPO: exp of the mean log-ratio over the completion) or per "
        "'instance' (BCR: exp of the mean log-ratio over one problem's tokens, so a completion's N answers are "
        "clipped independently; shared text takes its completion's sequence ratio)", default="token")
    use_bias_correction_kl: bool = _help(
        "multiply the KL term by the IS ratio (DeepSeek-V3.2's unbiased KL gradient); changes the KL gradient "
        "even on-policy", default=True)
    off_policy_mask_threshold: float | None = _help(
        "drop tokens with a negative advantage whose completion's mean KL(sampling || policy) exceeds this "
        "(DeepSeek-V3.2 off-policy sequence mask); None: off", default=None)
    mask_truncated_completions: bool = _help(
        "leave out of the loss what a cut at max_completion_length spoiled (see mask_truncated_scope)",
        default=False)
    mask_truncated_scope: str = _help(
        "with mask_truncated_completions: 'unanswered' (BCR: a truncated completion keeps the tokens up to its "
        "last answered problem, which keep their reward; only the unfinished tail is masked; nothing answered = "
        "all masked) or 'completion' (TRL: the whole truncated completion is masked)", default="unanswered")
    vllm_importance_sampling_correction: bool | None = _help(
        "reweight the loss by exp(trainer log-prob - rollout engine log-prob) (TRL's vLLM correction); None: "
        "on for rollout_engine=vllm, off for hf (whose own log-probs give a ratio of 1 up to float noise; True "
        "runs the path anyway)", default=None)
    vllm_importance_sampling_mode: str = _help(
        "'token_truncate' | 'token_mask' | 'sequence_truncate' | 'sequence_mask' (TRL's default) | "
        "'instance_truncate' | 'instance_mask' (one weight per problem segment): truncate clamps the weight to "
        "[clip_min, clip_max], mask zeroes the loss where it falls outside", default="sequence_mask")
    vllm_importance_sampling_clip_max: float | None = _help(
        "upper bound C_max of the rollout-correction weight (None: none)", default=3.0)
    vllm_importance_sampling_clip_min: float | None = _help(
        "lower bound C_min of the rollout-correction weight (None: none)", default=None)
    vllm_importance_sampling_cap: float | None = _help(
        "deprecated in TRL: sets vllm_importance_sampling_clip_max", default=None)
    top_entropy_quantile: float = _help(
        "keep in the policy loss only the tokens whose entropy is in this top quantile of a micro-batch's loss "
        "tokens (Beyond the 80/20 Rule recommends 0.2; 1.0: every token; 0.0: the highest only)", default=1.0)
    entropy_coef: float = _help(
        "entropy bonus: the loss minus entropy_coef x the mean entropy of the tokens the policy loss keeps, the "
        "same for every loss_type (0: off); with use_adaptive_entropy the starting coefficient", default=0.0)
    use_adaptive_entropy: bool = _help(
        "Skywork-OR1's adaptive entropy control: after each optimizer update entropy_coef moves by "
        "entropy_coef_delta (up when the update's mean entropy is <= entropy_target, else down), within "
        "[entropy_coef_min, entropy_coef_max]; the bonus applies only while the last update's entropy was <= "
        "entropy_target", default=False)
    entropy_coef_min: float = _help("lower bound of the adaptive entropy coefficient", default=0.0)
    entropy_coef_max: float = _help("upper bound of the adaptive entropy coefficient", default=1.0)
    entropy_coef_delta: float = _help("step of the adaptive entropy coefficient per optimizer update", default=0.005)
    entropy_target: float = _help(
        "the mean entropy (nats, over the tokens the policy loss keeps) below which adaptive control applies and "
        "raises the bonus; set it near the entropy of early training (the 'entropy' metric)", default=0.2)
    scale_rewards: str = _help("normalise rewards by the std of the 'group', the 'batch', or 'none'", default="group")

    # --- efficiency -----------------------------------------------------------------------------
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    shared_prompt: str = _help(
        "compute each prompt once for its G samples, in rollout prefill and in the training forward: auto (on "
        "when it saves tokens: G > 1 with bcr_varlen attention and no sliding window) | true | false; the "
        "update is the same either way", default="auto")
    bf16: bool | None = _help(
        "bf16 compute with fp32 master weights and fp32 gradient reduction (FSDP2's mixed-precision policy; "
        "one process runs it on a one-rank mesh; not with distributed_strategy=ddp). None: on with CUDA "
        "unless use_peft", default=None)
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
    overwrite_output_dir: bool = _help(
        "start afresh in an output_dir that holds another run: delete its checkpoints and metrics.jsonl first "
        "(without it such a start is refused; resume_from continues the run instead)",
        default=False,
    )
    report_to: list[str] = field(default_factory=list, metadata={"help": "extra loggers: 'tensorboard', 'wandb'"})
    disable_progress_bar: bool = _help("no rich progress bar", default=False)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("", "none") else [self.report_to]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if isinstance(self.shared_prompt, bool):  # YAML and key=value read true/false as booleans
            self.shared_prompt = "true" if self.shared_prompt else "false"
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        if self.vllm_importance_sampling_cap is not None:  # TRL's deprecated name
            warnings.warn("vllm_importance_sampling_cap is deprecated (as in TRL); use "
                          "vllm_importance_sampling_clip_max", FutureWarning, stacklevel=3)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        self.n_problems = _normalise_n_problems(self.n_problems)
        if self.rollout_engine == "auto":
            from bcr.models.rollout import default_engine

            self.rollout_engine = default_engine()
        self._validate()

    # ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {list(allowed)}")
        for name in self.report_to:
            if name not in REPORT_TO:
                raise ConfigError(f"report_to={self.report_to!r}: {name!r} is not one of {list(REPORT_TO)}")
        for name in POSITIVE_INTS:
            if getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        for name in OPTIONAL_POSITIVE_INTS:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, "must be None or an integer >= 1")
        for name, (holds, msg) in RANGES.items():
            if not holds(getattr(self, name)):
                fail(name, msg)
        if self.num_generations < 2:
            fail("num_generations", "GRPO needs at least 2 completions per prompt to compare; set num_generations >= 2")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            fail("num_train_epochs", "must be > 0 when max_steps = -1")
        if self.entropy_coef_min > self.entropy_coef_max:
            fail("entropy_coef_min", f"must be <= entropy_coef_max ({self.entropy_coef_max})")
        self._check_loss_options()

    def _check_loss_options(self) -> None:
        """The loss options, by ``bcr_kernels.Objective``'s own checks (the rollout correction's even where
        it is off), with this config's names in the message."""
        try:
            check_rollout_correction(self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                                     self.vllm_importance_sampling_clip_max)
            self.policy_objective()
        except ObjectiveError as err:
            name = OBJECTIVE_NAMES.get(err.field, err.field)
            reason = re.sub(r"\bimportance_sampling_(mode|clip_min|clip_max)\b", r"vllm_importance_sampling_\1",
                            err.reason)
            raise ConfigError(f"{name}={getattr(self, name)!r}: {reason}") from None

    # ------------------------------------------------------------------------------------------
    @property
    def reduction(self) -> str:
        """The ``reduction`` of ``bcr_kernels.policy_loss`` for TRL's ``loss_type``."""
        return LOSS_TYPES[self.loss_type][1]

    @property
    def objective(self) -> str:
        """The ``objective`` of ``bcr_kernels.policy_loss`` for TRL's ``loss_type``."""
        return LOSS_TYPES[self.loss_type][0]

    @property
    def rollout_correction(self) -> bool:
        """Whether the loss is reweighted by the rollout engine's log-probs."""
        if self.vllm_importance_sampling_correction is None:
            return self.rollout_engine == "vllm"
        return self.vllm_importance_sampling_correction

    def policy_objective(self) -> Objective:
        """The ``bcr_kernels.Objective`` of this config's loss options (the rollout correction only where
        ``rollout_correction``; ``entropy_coef`` is the starting one under ``use_adaptive_entropy``)."""
        correction = self.rollout_correction
        return Objective(
            kind=self.objective, reduction=self.reduction, max_completion_length=self.max_completion_length,
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, delta=self.delta,
            importance_sampling_level=self.importance_sampling_level,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg, beta=self.beta, use_bias_correction_kl=self.use_bias_correction_kl,
            importance_sampling_mode=self.vllm_importance_sampling_mode if correction else None,
            importance_sampling_clip_min=self.vllm_importance_sampling_clip_min,
            importance_sampling_clip_max=self.vllm_importance_sampling_clip_max,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            top_entropy_quantile=self.top_entropy_quantile, entropy_coef=self.entropy_coef,
        )

    @property
    def entropy_bonus(self) -> bool:
        """Whether the loss has the entropy bonus (a coefficient, or adaptive control, which may raise it)."""
        return self.entropy_coef != 0.0 or self.use_adaptive_entropy

    def policy_loss_kwargs(self) -> dict:
        """Deprecated: the old keyword form of :meth:`policy_objective` (``FutureWarning``)."""
        warnings.warn("BCRConfig.policy_loss_kwargs() is deprecated: pass BCRConfig.policy_objective() to the loss "
                      "ops", FutureWarning, stacklevel=2)
        return {
            "objective": self.objective, "reduction": self.reduction, "beta": self.beta, "epsilon": self.epsilon,
            "epsilon_high": self.epsilon_high, "delta": self.delta,
            "importance_sampling_level": self.importance_sampling_level,
            "sapo_temperature_pos": self.sapo_temperature_pos, "sapo_temperature_neg": self.sapo_temperature_neg,
            "vespo_k_pos": self.vespo_k_pos, "vespo_lambda_pos": self.vespo_lambda_pos,
            "vespo_k_neg": self.vespo_k_neg, "vespo_lambda_neg": self.vespo_lambda_neg,
            "use_bias_correction_kl": self.use_bias_correction_kl,
            "off_policy_mask_threshold": self.off_policy_mask_threshold,
            "importance_sampling_mode": self.vllm_importance_sampling_mode if self.rollout_correction else None,
            "importance_sampling_clip_min": self.vllm_importance_sampling_clip_min,
            "importance_sampling_clip_max": self.vllm_importance_sampling_clip_max,
        }

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
