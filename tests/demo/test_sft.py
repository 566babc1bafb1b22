"""The demo's SFT stage on the packed path (one padding-free row, varlen attention, the fused LM head at
the target tokens) computes the loss and the gradients of the padded path (the model's own loss), and
trains the same model; ``sft.packed=false`` still runs; the saved model loads with the default attention.

The one-batch equality runs on both kernel backends: ``auto`` (under ``TRITON_INTERPRET=1``, as in CI,
the Triton kernels in the interpreter) and ``torch`` (the CPU user's path). The multi-step tests run
on the ``torch`` backend: the interpreter takes seconds per step.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bcr.demo.config import DemoConfig, ModelConfig, SFTConfig, TaskConfig, demo_help
from bcr.demo.sft import pack, padded_loss, sft_batches, sft_bundle_batches, sft_loss, train_sft
from bcr.demo.stages import run_sft
from bcr.demo.task import build_tokenizer_and_model, make_task, sft_example
from bcr.runtime.dataclass_cli import ConfigError, load_dataclass

ARCHS = ("llama", "qwen2")


def _cfg(arch: str = "llama", tmp_path=None, styles=None, **sft) -> DemoConfig:
    """A tiny demo: 200 problems (worked solutions only unless ``styles``), a 1-layer width-32 model, short SFT."""
    sft = {"steps": 5, "style_steps": 2, "batch_size": 3, "n_values": [1, 2], "packed": True, **sft}
    return DemoConfig(output_dir=str(tmp_path or "runs/unused"), progress=False,
                      task=TaskConfig(num_train_problems=200, num_eval_problems=8, styles=styles or {"steps": 1.0}),
                      model=ModelConfig(arch=arch, vocab_size=400, hidden_size=32, num_layers=1, num_heads=2,
                                        num_kv_heads=1),
                      sft=SFTConfig(**sft))


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    cfg = _cfg(request.param)
    train, _ = make_task(cfg)
    tokenizer, model = build_tokenizer_and_model(cfg, train)
    return cfg, train, tokenizer, model


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", "torch")


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_packed_loss_and_gradients_equal_the_padded_ones(setup, backend, monkeypatch):
    monkeypatch.setenv("BCR_KERNEL_BACKEND", backend)
    cfg, train, tokenizer, model = setup
    model = copy.deepcopy(model).train()
    # one batch of mixed N: prompt and target lengths differ from example to example
    examples = [sft_example(train[i: i + n], tokenizer, cfg.template) for i, n in ((0, 1), (5, 3), (10, 2))]
    assert len({len(ids) for ids, _ in examples}) == 3 and len({n for _, n in examples}) == 3
    row = pack(examples)
    assert row.num_tokens == sum(len(ids) for ids, _ in examples)  # no padding
    assert row.num_completion_tokens == sum(len(ids) - n for ids, n in examples)
    padded = padded_loss(model, examples, tokenizer.pad_token_id)
    expected = _grads(model, padded)
    with sft_loss(model, cfg.sft, tokenizer.pad_token_id) as loss_fn:
        assert model.config._attn_implementation == "bcr_varlen"
        packed = loss_fn(examples)
        got = _grads(model, packed)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert packed.dtype == padded.dtype == torch.float32
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_train_sft_packed_and_padded_give_the_same_model(setup, torch_kernels):
    cfg, train, tokenizer, model = setup
    models, logs = {}, {}
    for packed in (True, False):
        models[packed] = copy.deepcopy(model)
        sft = SFTConfig(**{**vars(cfg.sft), "packed": packed})
        logs[packed] = train_sft(models[packed], sft_batches(train, tokenizer, cfg), sft,
                                 pad_token_id=tokenizer.pad_token_id, seed=cfg.seed, progress=False)
    assert len(logs[True]) == cfg.sft.steps
    for a, b in zip(logs[True], logs[False]):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    initial, trained = dict(model.named_parameters()), dict(models[False].named_parameters())
    for name, p in models[True].named_parameters():
        assert not torch.equal(p, initial[name]), name
        torch.testing.assert_close(p, trained[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert models[True].config._attn_implementation == "sdpa"


def test_the_batch_stream_is_seeded_and_has_one_n_per_batch(setup):
    cfg, train, tokenizer, _ = setup
    bundles = sft_bundle_batches(train, cfg)
    a, b = sft_batches(train, tokenizer, cfg), sft_batches(train, tokenizer, cfg)
    for _ in range(4):
        batch, bundle_batch = next(a), next(bundles)
        assert batch == next(b) and len(batch) == cfg.sft.batch_size
        assert len({len(bundle) for bundle in bundle_batch}) == 1
        assert batch == [sft_example(bundle, tokenizer, cfg.template) for bundle in bundle_batch]


@pytest.mark.parametrize("packed", [True, False])
def test_run_sft_saves_a_model_that_loads_with_the_default_attention(tmp_path, packed, torch_kernels):
    cfg = _cfg("llama", tmp_path, steps=2, packed=packed)
    record = run_sft(cfg)
    model_dir = tmp_path / "sft" / "model"
    assert record["model"] == str(model_dir) and record["final_loss"] > 0
    assert (tmp_path / "sft" / "metrics.jsonl").read_text().count("\n") == 2  # steps only: no style phase
    config = json.loads((model_dir / "config.json").read_text())
    assert "bcr_varlen" not in json.dumps(config)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert loaded.config._attn_implementation == "sdpa"


def test_sft_packed_is_an_option_of_bcr_demo():
    assert DemoConfig().sft.packed is False  # the README's demo tables come from the padded loop
    assert load_dataclass(DemoConfig, overrides=["sft.packed=true"]).sft.packed is True
    assert "sft.packed = False" in demo_help()


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def test_sft_learns_the_worked_solutions_first_then_the_mix_of_styles(tmp_path, torch_kernels):
    """Phase 1 trains on the steps style alone (the same model as a steps-only task's SFT), phase 2
    continues on task.styles for sft.style_steps; a steps-only task has no phase 2."""
    mix = DemoConfig().task.styles
    assert mix == {"steps": 3.0, "direct": 1.0}  # the demo's default mix
    styled = _cfg("llama", tmp_path / "styled", styles=mix, steps=3, style_steps=2, packed=False)
    run_sft(styled)
    rows = [json.loads(line) for line in (tmp_path / "styled" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("phase") for r in rows] == [None, None, None, "styles", "styles"]
    # each phase has its own warm-up and peak
    assert max(r["lr"] for r in rows[:3]) == styled.sft.learning_rate
    assert max(r["lr"] for r in rows[3:]) == styled.sft.style_learning_rate

    # no phase 2: the styled task's first phase is exactly the steps-only task's SFT
    first = _cfg("llama", tmp_path / "first", styles=mix, steps=3, style_steps=0, packed=False)
    plain = _cfg("llama", tmp_path / "plain", steps=3, style_steps=2, packed=False)
    run_sft(first)
    run_sft(plain)
    assert (tmp_path / "plain" / "sft" / "metrics.jsonl").read_text().count("\n") == 3  # nothing to mix in
    a, b = _weights(tmp_path / "first" / "sft" / "model"), _weights(tmp_path / "plain" / "sft" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the second phase changed the model
    c = _weights(tmp_path / "styled" / "sft" / "model")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_the_second_phase_trains_on_the_styles():
    from bcr.demo.task import worked_only

    cfg = _cfg(styles={"steps": 3.0, "direct": 1.0})
    train, _ = make_task(cfg)
    assert {p.meta["style"] for p in train} == {"steps", "direct"}
    worked, _ = make_task(worked_only(cfg))
    assert [(p.problem, p.answer) for p in worked] == [(p.problem, p.answer) for p in train]
    assert {p.meta["style"] for p in worked} == {"steps"}


def test_the_direct_phase_trains_on_the_direct_answers_alone_between_the_two(tmp_path, torch_kernels, monkeypatch):
    """sft.direct_steps: a phase between the worked and the styles phases, on the training problems the
    styles write 'direct' (their answer lines alone), with its own warm-up to sft.style_learning_rate."""
    import bcr.demo.stages as stages

    seen = []
    real = stages.sft_batches
    monkeypatch.setattr(stages, "sft_batches", lambda problems, *a: seen.append(problems) or real(problems, *a))
    cfg = _cfg("llama", tmp_path / "d", styles={"steps": 1.0, "direct": 1.0}, steps=3, direct_steps=2,
               style_steps=2, packed=False)
    run_sft(cfg)
    rows = [json.loads(line) for line in (tmp_path / "d" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r.get("phase") for r in rows] == [None] * 3 + ["direct"] * 2 + ["styles"] * 2
    assert max(r["lr"] for r in rows[3:5]) == cfg.sft.style_learning_rate
    worked, direct, styled = seen
    assert {p.meta["style"] for p in worked} == {"steps"}
    assert direct and {p.meta["style"] for p in direct} == {"direct"}
    assert [p.id for p in direct] == [p.id for p in styled if p.meta["style"] == "direct"]
    assert all(p.meta["steps"] == [] for p in direct)  # answer lines only
    # a direct phase needs direct answers in the task
    with pytest.raises(ConfigError, match="sft.direct_steps=5: no problem is written 'direct'"):
        load_dataclass(DemoConfig, overrides=["sft.direct_steps=5", "task.styles={steps: 1}"])
    with pytest.raises(ConfigError, match="sft.direct_steps=-1 must be >= 0"):
        load_dataclass(DemoConfig, overrides=["sft.direct_steps=-1"])
