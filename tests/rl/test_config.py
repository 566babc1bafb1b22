"""BCRConfig: defaults, TRL names, validation messages, YAML round trip and overrides."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from bcr.rl.config import BCRConfig
from bcr.runtime.dataclass_cli import ConfigError, check_fields, dataclass_help, load_dataclass


def test_defaults_follow_trl():
    c = BCRConfig()
    assert (c.beta, c.epsilon, c.epsilon_high, c.loss_type, c.scale_rewards) == (0.0, 0.2, None, "dapo", "group")
    assert c.reduction == "token_mean"
    assert c.advantage_mode == "instance" and c.shared_advantage == "mean"


def test_rollout_engine_auto_is_hf_without_vllm():
    """``auto`` (the default) resolves when the config is made: hf where vllm is not installed (this
    venv; tests/with_vllm checks the other side), and the explicit names stay as given."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; tests/with_vllm/test_vllm_cli.py checks auto -> vllm")
    assert BCRConfig().rollout_engine == "hf" and BCRConfig(rollout_engine="auto").rollout_engine == "hf"
    assert BCRConfig(rollout_engine="vllm").rollout_engine == "vllm"
    with pytest.raises(ConfigError, match="rollout_engine"):
        BCRConfig(rollout_engine="sglang")
    trl_names = {"num_generations", "max_prompt_length", "max_completion_length", "learning_rate", "beta", "epsilon",
                 "epsilon_high", "loss_type", "temperature", "top_p", "num_iterations", "gradient_accumulation_steps",
                 "logging_steps", "save_steps", "save_total_limit", "output_dir", "seed", "max_steps",
                 "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "scale_rewards",
                 "gradient_checkpointing", "bf16", "report_to", "weight_decay"}
    assert trl_names <= {f.name for f in dataclasses.fields(BCRConfig)}


@pytest.mark.parametrize("loss_type,objective,mode", [
    ("dapo", "clip", "token_mean"), ("bnpo", "clip", "token_mean"), ("grpo", "clip", "seq_mean_token_mean"),
    ("dr_grpo", "clip", "seq_mean_token_sum_norm"), ("cispo", "cispo", "token_mean"),
    ("sapo", "sapo", "seq_mean_token_mean"), ("luspo", "clip", "seq_mean_token_sum"), ("vespo", "vespo", "token_mean"),
])
def test_loss_type_maps_to_kernel_modes(loss_type, objective, mode):
    c = BCRConfig(loss_type=loss_type)
    assert (c.objective, c.reduction) == (objective, mode)
    o = c.policy_objective()
    assert (o.kind, o.reduction) == (objective, mode)


def test_policy_objective_is_the_kernels():
    """The config hands the loss one bcr_kernels.Objective with its options under the kernels' names."""
    from bcr_kernels import Objective

    c = BCRConfig(loss_type="sapo", importance_sampling_level="instance", delta=1.4, off_policy_mask_threshold=0.3,
                  vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="instance_truncate",
                  vllm_importance_sampling_clip_min=0.5, beta=0.04, max_completion_length=64,
                  top_entropy_quantile=0.2, entropy_coef=0.01)
    o = c.policy_objective()
    assert isinstance(o, Objective)
    assert (o.kind, o.reduction, o.importance_sampling_level, o.max_completion_length) == (
        "sapo", "seq_mean_token_mean", "instance", 64)
    assert o.importance_sampling_mode == "instance_truncate" and o.importance_sampling_clip_min == 0.5
    assert (o.delta, o.off_policy_mask_threshold, o.beta, o.use_bias_correction_kl) == (1.4, 0.3, 0.04, True)
    assert (o.top_entropy_quantile, o.entropy_coef) == (0.2, 0.01)
    assert BCRConfig().policy_objective().importance_sampling_mode is None  # hf: no correction


def test_policy_loss_kwargs_still_works_with_a_warning():
    import bcr_kernels

    c = BCRConfig(loss_type="cispo", epsilon_high=4.0, beta=0.1)
    with pytest.warns(FutureWarning, match="policy_objective"):
        kw = c.policy_loss_kwargs()
    with pytest.warns(FutureWarning):
        old = bcr_kernels.objective.resolve(None, kw, "policy_loss")
    assert old == dataclasses.replace(c.policy_objective(), max_completion_length=None)


def test_the_loss_checks_live_in_the_kernels():
    """One home for the loss options' values and checks: bcr_kernels.objective (the config has no copy)."""
    import bcr.rl.config as config
    from bcr_kernels import objective

    assert config.IS_MODES is objective.IS_MODES and config.IMPORTANCE_SAMPLING_LEVELS is objective.LEVELS
    kernel_fields = set(objective.Objective.__dataclass_fields__) | set(config.OBJECTIVE_NAMES.values())
    assert not kernel_fields & (set(config.RANGES) | set(config.CHOICES) - {"loss_type"})
    with pytest.raises(objective.ObjectiveError) as kernel:
        objective.Objective(delta=0.0)
    with pytest.raises(ConfigError) as ours:
        BCRConfig(delta=0.0)
    assert str(ours.value) == str(kernel.value)


@pytest.mark.parametrize("field,value", [
    ("loss_type", "ppo"), ("scale_rewards", "std"), ("advantage_mode", "token"), ("shared_advantage", "max"),
    ("lr_scheduler_type", "poly"), ("rollout_engine", "tgi"), ("num_generations", 1), ("max_completion_length", 0),
    ("temperature", 0.0), ("top_p", 1.5), ("beta", -0.1), ("max_steps", 0), ("n_problems", 0),
    ("n_problems", {2: -1.0}), ("bundles_per_step", 0), ("report_to", ["mlflow"]), ("warmup_ratio", 2.0),
    ("save_total_limit", 0), ("learning_rate", "fast"), ("learning_rate", 1e38), ("learning_rate", -1e-6),
    ("importance_sampling_level", "bundle"), ("delta", 0.0), ("sapo_temperature_neg", 0.0), ("vespo_k_pos", -1.0),
    ("vllm_importance_sampling_mode", "sequence"), ("vllm_importance_sampling_clip_max", 0.0),
    ("off_policy_mask_threshold", -0.5), ("mask_truncated_scope", "tail"),
    ("vllm_importance_sampling_correction", "maybe"), ("top_entropy_quantile", 1.5), ("top_entropy_quantile", -0.1),
    ("entropy_coef", math.nan), ("entropy_coef_delta", -0.1), ("entropy_target", -1.0),
    ("use_adaptive_entropy", "maybe"), ("epsilon", -0.1), ("vllm_importance_sampling_clip_min", -1.0),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        BCRConfig(**{field: value})


def test_cross_field_checks_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="vllm_importance_sampling_clip_min.*must be < vllm_importance_sampling_clip_max"):
        BCRConfig(vllm_importance_sampling_clip_min=3.0)
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode.*clip_min or vllm_importance_sampling_clip_max"):
        BCRConfig(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
    with pytest.raises(ConfigError, match="vespo.*token_truncate"):
        BCRConfig(loss_type="vespo", vllm_importance_sampling_correction=True)
    BCRConfig(loss_type="vespo", vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_mask")
    BCRConfig(loss_type="vespo")  # hf without correction: the mode does not apply
    with pytest.raises(ConfigError, match="entropy_coef_min=0.5: must be <= entropy_coef_max"):
        BCRConfig(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1)


def test_n_problems_forms():
    assert BCRConfig(n_problems=3).n_values == [3]
    mixed = BCRConfig(n_problems={"3": 1, 1: 2})
    assert mixed.n_problems == {3: 1.0, 1: 2.0} and mixed.n_values == [1, 3]
    assert BCRConfig(n_problems="{1: 0.5, 2: 0.5}").n_problems == {1: 0.5, 2: 0.5}


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    original = BCRConfig(n_problems={1: 0.5, 3: 0.5}, learning_rate=3e-6, report_to=["tensorboard"])
    original.to_yaml(path)
    assert BCRConfig.from_yaml(path) == original
    c = load_dataclass(BCRConfig, path, ["learning_rate=1e-4", "loss_type=grpo", "epsilon_high=0.28", "max_steps=7"])
    assert (c.learning_rate, c.loss_type, c.epsilon_high, c.max_steps) == (1e-4, "grpo", 0.28, 7)
    assert c.n_problems == {1: 0.5, 3: 0.5}
    with pytest.raises(ConfigError, match="num_generation"):
        load_dataclass(BCRConfig, path, ["num_generation=4"])


def test_help_lists_every_option_with_its_default():
    text = dataclass_help(BCRConfig, "bcr train")
    for f in dataclasses.fields(BCRConfig):
        assert f"  {f.name} = " in text, f.name
    assert "bundles_per_step = 8" in text and "GLOBAL number of bundles" in text
    assert "importance_sampling_level = 'token'" in text and "'instance' (BCR:" in text
    assert "mask_truncated_scope = 'unanswered'" in text and "vllm_importance_sampling_mode = 'sequence_mask'" in text


@pytest.mark.parametrize("field,value,words", [
    ("max_steps", 1.5, "expected an integer"), ("seed", 0.5, "expected an integer"),
    ("max_steps", [1], "not a list"), ("learning_rate", [1], "not a list"), ("num_generations", {"a": 1}, "mapping"),
    ("learning_rate", math.inf, "finite"), ("temperature", math.nan, "finite"), ("max_grad_norm", math.nan, "finite"),
    ("max_grad_norm", "nan", "finite"), ("warmup_ratio", -math.inf, "finite"), ("epsilon_high", math.nan, "finite"),
    ("limit", 2.5, "expected an integer"), ("bf16", "maybe", "true or false"), ("gradient_checkpointing", 1, "true"),
    ("output_dir", ["a"], "expected a string"), ("seed", True, "expected an integer"),
    ("lora_dropout", 1.0, "[0, 1)"), ("report_to", {"tensorboard": 1}, "expected a list"),
])
def test_types_come_from_the_annotations(field, value, words):
    with pytest.raises(ConfigError, match=rf"^{field}=") as err:
        BCRConfig(**{field: value})
    assert words in str(err.value)


def test_values_are_converted_to_their_field_type():
    c = load_dataclass(BCRConfig, None, ["max_steps=2.0", "seed=3", "limit=None", "run_name=123", "learning_rate=1e-4",
                                         "report_to=tensorboard", "warmup_steps=1e1"])
    assert (c.max_steps, c.seed, c.limit, c.run_name, c.learning_rate, c.report_to, c.warmup_steps) == (
        2, 3, None, "123", 1e-4, ["tensorboard"], 10)
    assert all(type(v) is int for v in (c.max_steps, c.seed, c.warmup_steps))
    assert BCRConfig(max_steps="7").max_steps == 7 and BCRConfig().overwrite_output_dir is False
    assert BCRConfig(output_dir=Path("/tmp/x")).output_dir == "/tmp/x"


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("temperature", 0.0), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("samples_per_bundle", "abc"), ("n_values", [1, 2.5]), ("verify_timeout", 0.0), ("seed", 0.5),
    ("max_completion_length", [16]),
])
def test_eval_config_rejects_impossible_sampling(field, value):
    from bcr.eval.sweep import EvalConfig

    with pytest.raises(ConfigError, match=field):
        EvalConfig(**{field: value})


def test_check_fields_on_any_dataclass():
    @dataclasses.dataclass
    class Cfg:
        steps: int = 1
        rate: float | None = None
        names: list[str] = dataclasses.field(default_factory=list)
        mixed: int | dict = 3  # more than one type: left to the class

        def __post_init__(self):
            check_fields(self)

    assert Cfg(steps="4", rate=1, names=["a"], mixed="anything") == Cfg(4, 1.0, ["a"], "anything")
    assert Cfg(names=2).names == "2"  # one item is checked; wrapping it is the class's call
    assert Cfg(names=[1, "b"]).names == ["1", "b"]
    with pytest.raises(ConfigError, match="rate=inf"):
        Cfg(rate=math.inf)
    with pytest.raises(ConfigError, match="steps=None: a value is required"):
        Cfg(steps=None)


def test_config_choices_match_the_modules_that_implement_them():
    from bcr.models import loading as model_loading
    from bcr.rl import config
    from bcr.task import scoring

    assert config.REWARD_EXTRACTIONS == scoring.EXTRACTIONS
    assert config.MODEL_DTYPES == model_loading.DTYPES
    with pytest.raises(ConfigError, match="reward_extraction"):
        BCRConfig(reward_extraction="fuzzy")
