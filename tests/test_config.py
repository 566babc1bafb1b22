"""BCRConfig: defaults, TRL names, validation messages, YAML round trip and overrides."""

from __future__ import annotations

import dataclasses

import pytest

from bcr.config import BCRConfig
from bcr.dataclass_cli import ConfigError, dataclass_help, load_dataclass


def test_defaults_follow_trl():
    c = BCRConfig()
    assert (c.beta, c.epsilon, c.epsilon_high, c.loss_type, c.scale_rewards) == (0.0, 0.2, None, "dapo", "group")
    assert c.reduction == "token_mean"
    assert c.advantage_mode == "instance" and c.shared_advantage == "mean" and c.rollout_engine == "hf"
    trl_names = {"num_generations", "max_prompt_length", "max_completion_length", "learning_rate", "beta", "epsilon",
                 "epsilon_high", "loss_type", "temperature", "top_p", "num_iterations", "gradient_accumulation_steps",
                 "logging_steps", "save_steps", "save_total_limit", "output_dir", "seed", "max_steps",
                 "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "scale_rewards",
                 "gradient_checkpointing", "bf16", "report_to", "weight_decay"}
    assert trl_names <= {f.name for f in dataclasses.fields(BCRConfig)}


@pytest.mark.parametrize("loss_type,mode", [("dapo", "token_mean"), ("bnpo", "token_mean"),
                                            ("grpo", "seq_mean_token_mean"), ("dr_grpo", "seq_mean_token_sum_norm")])
def test_loss_type_maps_to_kernel_modes(loss_type, mode):
    assert BCRConfig(loss_type=loss_type).reduction == mode


@pytest.mark.parametrize("field,value", [
    ("loss_type", "ppo"), ("scale_rewards", "std"), ("advantage_mode", "token"), ("shared_advantage", "max"),
    ("lr_scheduler_type", "poly"), ("rollout_engine", "tgi"), ("num_generations", 1), ("max_completion_length", 0),
    ("temperature", 0.0), ("top_p", 1.5), ("beta", -0.1), ("max_steps", 0), ("n_problems", 0),
    ("n_problems", {2: -1.0}), ("bundles_per_step", 0), ("report_to", ["mlflow"]), ("warmup_ratio", 2.0),
    ("save_total_limit", 0), ("learning_rate", "fast"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        BCRConfig(**{field: value})


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
