"""``DemoConfig``: every knob of the demo, one section per part of the pipeline.

The RL stages and the sweep take the trainer's and the evaluator's own configs, so ``rl`` is a
:class:`bcr.rl.config.BCRConfig` and ``eval`` an :class:`bcr.eval.sweep.EvalConfig`, each with the demo's
defaults; the task, the tiny model, SFT and the length baseline have small sections of their own.
On the command line a section's field is a dotted key: ``bcr demo rl.max_steps=50 eval.n_values=[1,2]``.

A few fields of ``rl`` and ``eval`` are filled in by the demo for each stage (the model to start
from, the stage's directory, the seed, the prompt format, progress bars); setting one of them is an
error that names the demo option to set instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bcr.rl.config import MAX_LEARNING_RATE, BCRConfig
from bcr.runtime.dataclass_cli import ConfigError, check_fields
from bcr.eval.sweep import EvalConfig
from bcr.task.prompts import PromptTemplate
from bcr.task.synthetic import PHRASINGS, check_styles, check_styles_by_steps

STAGES = ("sft", "bcr", "length", "eval")
#: the explicit length penalties of stage length (and the study), each added to accuracy x a weight
LENGTH_METHODS = {"kimi": "the Kimi-1.5 length reward", "linear": "-length / budget (a per-token penalty)"}


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


def _int_range(section: str, name: str, value) -> list[int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ConfigError(f"{section}.{name}={value!r}: give an inclusive range [low, high]")
    return [int(v) for v in value]


def _n_list(section: str, name: str, value) -> list[int]:
    value = [value] if isinstance(value, int) else list(value)
    if not value or any(int(n) < 1 for n in value):
        raise ConfigError(f"{section}.{name}={value!r}: give a list of N >= 1")
    return [int(n) for n in value]


def _at_least_one(section: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        if int(getattr(obj, name)) < 1:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)!r}: must be >= 1")


@dataclass
class TaskConfig:
    """The synthetic task: arithmetic problems whose worked solutions carry redundant checks."""

    num_train_problems: int = _help("synthetic training problems", default=6000)
    num_eval_problems: int = _help("held-out problems of the N = 1..6 sweep (none also in the training set)",
                                   default=120)
    held_out_every: int = _help("about one problem text in this many is held out for evaluation (a hash split), "
                                "the rest may be trained on; the one-operation texts are few (126 with one "
                                "digit), so a mix with them needs a large held-out share", default=10)
    problem_steps: list[int] = _help("inclusive range of operations per problem", default_factory=lambda: [2, 2])
    problem_digits: list[int] = _help("inclusive range of digits of the operands", default_factory=lambda: [1, 1])
    operators: str = _help("operators of the problems (any of '+-*/')", default="+-")
    verify_loops: list[int] = _help("inclusive range of redundant 'Check: ... Correct.' lines per worked solution",
                                    default_factory=lambda: [0, 3])
    styles: dict = _help("weights of the ways a worked solution is written: steps (one line per operation, plus "
                         "the checks), merged (the chain on one 'Merged: ...' line) and direct (the answer line "
                         "only); each shorter and less reliable than the one before",
                         default_factory=lambda: {"steps": 3.0, "direct": 1.0})
    styles_by_steps: dict = _help("style weights for the problems of a given number of operations, in place of "
                                  "styles for them, e.g. {1: {steps: 1, direct: 1}} (direct answers on "
                                  "one-operation problems only)", default_factory=dict)
    ordinals: bool = _help("problem texts name each operation's place ('First, add 5. Second, subtract 3.'), "
                           "so step k of the work has a word of its own to copy from", default=False)
    phrasings: int = _help("how many wordings of the problem text ('Start with 7. ... What is the result?', "
                           "'Take 7. ... What do you get?', ...; up to 12) the problems use: with several, a "
                           "held-out text can be a new wording of a fact the model was trained on", default=1)
    numbered_single: bool = _help(
        "N = 1 prompts and solutions use the numbered format of N > 1 ('Problem 1:', '### Problem 1', "
        "'Answer 1:') in every stage, so the format costs the same tokens per problem at every N",
        default=True)

    def __post_init__(self) -> None:
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        for name in ("problem_steps", "problem_digits", "verify_loops"):
            setattr(self, name, _int_range("task", name, getattr(self, name)))
        _at_least_one("task", self, ("num_train_problems", "num_eval_problems", "phrasings"))
        if self.phrasings > len(PHRASINGS):
            raise ConfigError(f"task.phrasings={self.phrasings!r}: there are {len(PHRASINGS)} wordings")
        if self.held_out_every < 2:
            raise ConfigError(f"task.held_out_every={self.held_out_every!r}: must be >= 2 (1 would hold out every "
                              "text and leave nothing to train on)")
        try:
            check_styles(self.styles)
            check_styles_by_steps(self.styles_by_steps)
        except ValueError as e:
            raise ConfigError(f"task.{e}") from None


@dataclass
class ModelConfig:
    """The task tokenizer and the tiny random-init model SFT starts from."""

    arch: str = _help("llama or qwen2", default="llama")
    vocab_size: int = _help("BPE vocabulary size of the task tokenizer", default=1024)
    hidden_size: int = _help("model width", default=128)
    num_layers: int = _help("transformer blocks", default=2)
    num_heads: int = _help("attention heads", default=4)
    num_kv_heads: int = _help("key/value heads", default=2)

    def __post_init__(self) -> None:
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        _at_least_one("model", self, ("vocab_size", "hidden_size", "num_layers"))


@dataclass
class SFTConfig:
    """Stage sft: a plain AdamW loop on verbose worked solutions, then (when ``task.styles`` has
    shorter styles) a second, shorter one on the task's mix of styles."""

    n_values: list[int] = _help("N of the SFT bundles (equal weights)", default_factory=lambda: [1, 2, 3, 4, 5, 6])
    steps: int = _help("optimizer steps on the worked solutions alone (the steps style)", default=3000)
    style_steps: int = _help("then optimizer steps on the mix of task.styles (skipped when the mix is the steps "
                             "style alone): trained from scratch on the mix, the 0.55M model never learns to "
                             "copy operands reliably", default=500)
    direct_steps: int = _help("between the two: optimizer steps on the training problems task.styles writes "
                              "'direct', alone (bundles of their answer lines): the facts the model is to know by "
                              "heart before it learns when to use them; in the mix they are too few answer tokens "
                              "to be learnt (0: no such phase)", default=0)
    style_learning_rate: float = _help("AdamW peak learning rate of the direct_steps and style_steps (warm-up, "
                                       "cosine decay)",
                                       default=1e-3)
    batch_size: int = _help("sequences per step", default=8)
    learning_rate: float = _help("AdamW peak learning rate (linear warm-up, cosine decay)", default=4e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    packed: bool = _help("SFT on the packed path with the fused LM head, as the RL step (one padding-free row, "
                         "varlen attention, log-probs of the target tokens only; equal loss, no faster at the "
                         "demo's size, a different model after 3000 steps); false: padded batches and the "
                         "model's own loss (the README's tables)", default=False)
    checkpoint_every: int = _help("save the SFT loop's state every this many steps (and at each phase's end) in "
                                  "output_dir/sft-checkpoints, and continue from there when the stage is run "
                                  "again with the same settings (a killed run loses at most this many steps); "
                                  "removed when the stage finishes; 0: none", default=0)

    def __post_init__(self) -> None:
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        self.n_values = _n_list("sft", "n_values", self.n_values)
        for name in ("learning_rate", "style_learning_rate"):
            if not 0 <= getattr(self, name) <= MAX_LEARNING_RATE:
                raise ConfigError(f"sft.{name}={getattr(self, name)!r} must lie in [0, {MAX_LEARNING_RATE:g}]")
        for name in ("style_steps", "direct_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sft.{name}={getattr(self, name)!r} must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"sft.weight_decay={self.weight_decay!r} must be >= 0")
        _at_least_one("sft", self, ("steps", "batch_size"))


@dataclass
class LengthConfig:
    """Stage length: the explicit length-penalty baseline, trained like BCR (the ``rl`` section's N mix,
    budget, steps and settings) with the Kimi-1.5 length reward added to accuracy."""

    max_completion_length: int | None = _help("completion budget of the length-penalty run (None: the bcr "
                                              "stage's rl.max_completion_length, like for like)", default=None)
    method: str = _help("the length term: kimi (Kimi-1.5 length reward, relative within each group) or "
                        "linear (-length / budget)", default="kimi")
    penalty_weight: float = _help("weight of the length term added to accuracy", default=1.0)

    def __post_init__(self) -> None:
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ConfigError(f"length.max_completion_length={self.max_completion_length}: must be >= 1 (or None)")
        if self.method not in LENGTH_METHODS:
            raise ConfigError(f"length.method={self.method!r}: must be one of {list(LENGTH_METHODS)}")
        if self.penalty_weight < 0:
            raise ConfigError(f"length.penalty_weight={self.penalty_weight!r}: must be >= 0")


def default_rl() -> BCRConfig:
    """The demo's BCR stage: N in 1..6, a 100-token shared budget, sequence advantages."""
    return BCRConfig(n_problems={n: 1.0 for n in range(1, 7)}, max_steps=100, max_completion_length=100,
                     num_generations=4, bundles_per_step=8, learning_rate=1e-4, temperature=1.0,
                     loss_type="dapo", beta=0.0, advantage_mode="sequence", save_steps=0, save_total_limit=1,
                     rollout_engine="hf")


def default_eval() -> EvalConfig:
    """The demo's sweep: N = 1..6, one sample per bundle at temperature 1, 100 tokens per problem (a
    budget no model's point is bound by, so tokens per problem are the model's own choice)."""
    return EvalConfig(n_values=[1, 2, 3, 4, 5, 6], budget_mode="per_problem", per_problem_budget=100,
                      max_completion_length=100, samples_per_bundle=1, temperature=1.0, top_p=1.0, batch_size=32,
                      resume=False)


# Fields of the nested configs that the demo fills in for each stage, and where the value comes from.
SET_BY_DEMO = {
    "rl": {"model": "the sft stage's checkpoint", "output_dir": "the stage's directory under output_dir",
           "seed": "seed", "numbered_single": "task.numbered_single", "disable_progress_bar": "progress",
           "logging_steps": "a tenth of rl.max_steps"},
    "eval": {"model": "the trained stages", "models": "the trained stages", "benchmark": "the task's problems",
             "split": "the task's problems", "limit": "task.num_eval_problems", "data_dir": "the task's problems",
             "output_dir": "output_dir/eval", "seed": "seed", "baseline": "the sft model",
             "numbered_single": "task.numbered_single", "resume": "the sweep always starts afresh",
             "progress": "progress"},
}


@dataclass
class DemoConfig:
    """Every knob of the demo; ``bcr demo key=value section.key=value`` overrides any of them."""

    output_dir: str = _help("run directory; each stage writes <output_dir>/<stage>/", default="runs/demo")
    seed: int = _help("seeds the problems, the tokenizer corpus, model init and SFT order, and is the first "
                      "RL seed unless rl_seeds says otherwise", default=0)
    from_stage: str = _help("first stage to run (sft, bcr, length, eval); earlier stages are reused", default="sft")
    stop_after: str = _help("last stage to run (sft, bcr, length, eval)", default="eval")
    length_baseline: bool = _help("also train the explicit length-penalty RL baseline like for like (stage 'length'); "
                                  "length_baseline=false skips it", default=True)
    train_sft: bool = _help("train stage sft here (12-13 minutes on two cores) even when the SFT model shipped with "
                            "bcr is the one these settings train (bcr/demo/sft_model: the defaults' seed, task, model "
                            "and sft); with any other of those settings the stage trains anyway", default=False)
    progress: bool = _help("show rich progress bars", default=True)
    threads: int | None = _help("torch CPU threads of the SFT stage (None: torch's default); the RL seeds' stages "
                                "run at one thread each (see rl_workers)", default=None)
    rl_seeds: list[int] | None = _help(
        "seeds of the RL stages (bcr, length) and of their sweeps, all from the one SFT model of seed (None: "
        "seed, seed + 1, seed + 2); the demo's seed writes bcr/, length/, eval/, any other s bcr-s<s>/, "
        "length-s<s>/, eval-s<s>/, and the closing table pools them (mean and range over the seeds)",
        default=None)
    rl_workers: int | None = _help(
        "processes that run the RL seeds' stages side by side (None: one per CPU core, at most one per stage "
        "that can run at once; 1: one after the other in this process). Every such stage runs at one torch "
        "thread wherever it runs, so the number of workers changes the time, not the numbers", default=None)
    task: TaskConfig = _help("the synthetic task", default_factory=TaskConfig)
    model: ModelConfig = _help("the tokenizer and the tiny model", default_factory=ModelConfig)
    sft: SFTConfig = _help("stage 1: SFT warm-up (the verbose reasoner)", default_factory=SFTConfig)
    rl: BCRConfig = _help("stage 2: BCR RL (and the RL settings of stage 3); a BCRConfig",
                          default_factory=default_rl)
    length: LengthConfig = _help("stage 3: the length-penalty baseline", default_factory=LengthConfig)
    eval: EvalConfig = _help("stage 4: the task-scaling sweep; an EvalConfig", default_factory=default_eval)

    def __post_init__(self) -> None:
        check_fields(self)  # types from the annotations: whole ints, finite floats, no list for a scalar
        for name in ("from_stage", "stop_after"):
            if getattr(self, name) not in STAGES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be one of {list(STAGES)}")
        if STAGES.index(self.stop_after) < STAGES.index(self.from_stage):
            raise ConfigError(f"stop_after={self.stop_after!r} comes before from_stage={self.from_stage!r}")
        self._check_set_by_demo()
        if self.rl_seeds is not None:
            seeds = [self.rl_seeds] if isinstance(self.rl_seeds, int) else list(self.rl_seeds)
            if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
                raise ConfigError(f"rl_seeds={self.rl_seeds!r}: give distinct seeds >= 0, at least one (or None)")
            self.rl_seeds = seeds
        if self.rl_workers is not None and self.rl_workers < 1:
            raise ConfigError(f"rl_workers={self.rl_workers!r}: must be >= 1")
        if self.rl.max_steps < 1:
            raise ConfigError(f"rl.max_steps={self.rl.max_steps}: the demo's RL stages run a fixed number of "
                              "steps; give one >= 1")
        if self.sft.direct_steps and not any(
                "direct" in check_styles(w)[0] for w in [self.task.styles, *self.task.styles_by_steps.values()]):
            raise ConfigError(f"sft.direct_steps={self.sft.direct_steps}: no problem is written 'direct' "
                              f"(task.styles={self.task.styles}, task.styles_by_steps={self.task.styles_by_steps})")
        if self.task.num_eval_problems < max(self.eval.n_values):
            raise ConfigError(f"task.num_eval_problems={self.task.num_eval_problems} is smaller than the largest N "
                              f"of eval.n_values={self.eval.n_values}")

    def _check_set_by_demo(self) -> None:
        defaults = {"rl": default_rl(), "eval": default_eval()}
        for section, names in SET_BY_DEMO.items():
            for name, source in names.items():
                value = getattr(getattr(self, section), name)
                if value != getattr(defaults[section], name):
                    raise ConfigError(f"{section}.{name}={value!r}: the demo sets this for each stage ({source}); "
                                      "leave it out")

    @property
    def template(self) -> PromptTemplate:
        """The prompt template of every stage (SFT data, RL prompts, the sweep)."""
        return PromptTemplate(numbered_single=self.task.numbered_single)

    def seeds(self) -> list[int]:
        """The RL seeds (``rl_seeds``, or seed, seed + 1, seed + 2)."""
        return list(self.rl_seeds) if self.rl_seeds is not None else [self.seed, self.seed + 1, self.seed + 2]

    def stages(self) -> list[str]:
        """The stages this run executes, in order."""
        chosen = STAGES[STAGES.index(self.from_stage): STAGES.index(self.stop_after) + 1]
        return [s for s in chosen if s != "length" or self.length_baseline]


# The flat option names of earlier versions, and where each one lives now.
RENAMED = {
    "num_train_problems": "task.num_train_problems", "num_eval_problems": "task.num_eval_problems",
    "problem_steps": "task.problem_steps", "problem_digits": "task.problem_digits",
    "operators": "task.operators", "verify_loops": "task.verify_loops", "numbered_single": "task.numbered_single",
    "vocab_size": "model.vocab_size", "arch": "model.arch", "hidden_size": "model.hidden_size",
    "num_layers": "model.num_layers", "num_heads": "model.num_heads", "num_kv_heads": "model.num_kv_heads",
    "sft_n_values": "sft.n_values", "sft_steps": "sft.steps", "sft_batch_size": "sft.batch_size",
    "sft_learning_rate": "sft.learning_rate", "sft_weight_decay": "sft.weight_decay",
    "rl_n_values": "rl.n_problems (weights over N, e.g. {2: 1, 3: 1})", "rl_steps": "rl.max_steps",
    "max_completion_length": "rl.max_completion_length", "num_generations": "rl.num_generations",
    "bundles_per_step": "rl.bundles_per_step", "rl_learning_rate": "rl.learning_rate",
    "rl_temperature": "rl.temperature", "rl_loss_type": "rl.loss_type", "rl_beta": "rl.beta",
    "advantage_mode": "rl.advantage_mode",
    "length_max_completion_length": "length.max_completion_length", "length_penalty_weight": "length.penalty_weight",
    "eval_n_values": "eval.n_values", "eval_max_completion_length": "eval.max_completion_length",
    "eval_samples_per_bundle": "eval.samples_per_bundle", "eval_temperature": "eval.temperature",
    "eval_top_p": "eval.top_p", "eval_batch_size": "eval.batch_size",
}


def check_renamed(keys) -> None:
    """A clear error for an option name of the flat ``DemoConfig`` of earlier versions."""
    for key in keys:
        if key in RENAMED:
            raise ConfigError(f"option {key!r} of bcr demo is now {RENAMED[key]}; write it as "
                              f"{RENAMED[key].split()[0]}=VALUE")


def demo_help(prog: str = "bcr demo") -> str:
    """The options of ``bcr demo`` with the demo's defaults, sections as dotted keys."""
    cfg = DemoConfig()
    lines = [f"usage: {prog} [--config FILE.yaml] [--from-stage STAGE] [key=value ...] [section.key=value ...]",
             "", "options (key=value):"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            lines.append(f"  {f.name} = {value!r}\n      {f.metadata['help']}")
            continue
        lines += ["", f"{f.name}: {f.metadata['help']}"]
        owned = SET_BY_DEMO.get(f.name, {})
        for sub in dataclasses.fields(value):
            if sub.name not in owned:
                text = sub.metadata.get("help", "")
                lines.append(f"  {f.name}.{sub.name} = {getattr(value, sub.name)!r}" + (f"\n      {text}" if text else ""))
        if owned:
            lines.append(f"  (set by the demo for each stage: {', '.join(f'{f.name}.{n}' for n in owned)})")
    return "\n".join(lines)
