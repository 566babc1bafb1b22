"""The configuration plumbing shared by every ``bcr`` command, and the tiny local model builders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bcr.cli import main
from bcr.dataclass_cli import ConfigError, dataclass_help, load_dataclass, parse_cli, to_yaml


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = 10
    n_problems: object = 3
    name: str = "run"
    values: list = dataclasses.field(default_factory=lambda: [1, 2], metadata={"help": "the Ns to sweep"})


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 4\nn_problems: {2: 1.0, 3: 2.0}\n")
    cfg = load_dataclass(_Cfg, path, ["steps=7", "values=[1, 4, 8]", "name=my run"])
    assert cfg == _Cfg(lr=0.5, steps=7, n_problems={2: 1.0, 3: 2.0}, name="my run", values=[1, 4, 8])


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\n")
    assert load_dataclass(_Cfg, path).lr == 1e-4
    assert load_dataclass(_Cfg, None, ["lr=3E5", "name=1e2x"]) == _Cfg(lr=3e5, name="1e2x")


def test_round_trip_through_yaml(tmp_path):
    cfg = _Cfg(lr=2e-5, values=[3])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_dataclass(_Cfg, path) == cfg


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean steps"):
        load_dataclass(_Cfg, None, ["stpes=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataclass(_Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_dataclass(_Cfg, bad)


def test_parse_cli_forms(capsys):
    assert parse_cli(_Cfg, ["--help"], "bcr x") is None
    out = capsys.readouterr().out
    assert "steps = 10" in out and "the Ns to sweep" in out
    cfg = parse_cli(_Cfg, ["--steps", "5", "--lr=0.25", "name=a"], "bcr x")
    assert (cfg.steps, cfg.lr, cfg.name) == (5, 0.25, "a")
    assert "lr = 0.001" in dataclass_help(_Cfg)


def test_top_level_cli_usage(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny_tokenizer):
    text = "### Problem 2\nStep 1: 7 + 12 = 19\nAnswer 2: \\boxed{\\frac{1}{2}} — ü"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_is_seeded_and_saveable(tiny_tokenizer, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from bcr.tiny import tiny_model

    a = tiny_model(tiny_tokenizer, arch=arch, seed=3)
    b = tiny_model(tiny_tokenizer, arch=arch, seed=3)
    c = tiny_model(tiny_tokenizer, arch=arch, seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    a.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[1, 5, 9, 11]])
    torch.testing.assert_close(loaded(x).logits, a(x).logits)
