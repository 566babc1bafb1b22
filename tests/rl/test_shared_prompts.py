"""Shared prompts in the training forward: a group packed once as [prompt, completion 1, ..., G] gives
the same log-probs and the same gradients as the G separate [prompt, completion g] sequences."""

from __future__ import annotations

import random

import pytest
import torch

from bcr.rl.packing import Sample, pack_row, pack_samples
from bcr.models.tiny import tiny_model
from bcr.rl.trainer import completion_logprobs
from bcr_kernels import _shared_prefix_attention, branch_layout, shared_prefix_attention
from bcr_kernels.reference import varlen_attention as reference_varlen


def _branch_rows(layout):
    """Unshared equivalent of a layout: each branch as its own sequence of [prefix; branch] rows."""
    cq, ck = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    keep = []  # rows of the unshared packing that belong to the branch itself (not its prefix copy)
    for qs, qe, ke in zip(cq[:-1], cq[1:], ck[1:]):
        keep += list(range(ke - (qe - qs), ke))
    return torch.tensor(keep, dtype=torch.long)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 3, 8), (6, 1, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pad_budget", [0, 40, 1 << 15], ids=["no-padding", "some-groups", "one-group"])
def test_shared_prefix_attention_matches_unshared_reference(hq, hkv, d, seed, pad_budget, monkeypatch):
    """The CPU path pads branches of similar shape into one SDPA call each; every grouping it can
    choose (each branch alone, a few groups, one group) gives the reference's values and gradients."""
    monkeypatch.setattr(_shared_prefix_attention, "_PAD_BUDGET", pad_budget)
    rng = random.Random(seed)
    positions: list[int] = []
    for _ in range(rng.randint(1, 3)):  # sequences: a prompt, then G completions continuing it
        P = rng.randint(1, 9)
        positions += range(P + rng.randint(0, 5))  # the trunk: prompt + completion 1
        for _ in range(rng.randint(0, 4)):
            positions += range(P, P + rng.randint(1, 6))
    pos = torch.tensor(positions)
    layout = branch_layout(pos)
    T = pos.numel()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    out = shared_prefix_attention(q, k, v, layout, softmax_scale=0.3)
    groups, _ = _shared_prefix_attention._plans.get(layout, q.device, q.dtype)
    if pad_budget == 0:  # only branches of one shape share a call: no padded key at all
        assert sum(g.S * g.Lk for g in groups) == layout.kv_index.numel()
    elif pad_budget == 1 << 15:
        assert len(groups) == 1
    # reference: every branch as its own sequence [prefix copy; branch]
    idx = layout.kv_index
    keep = _branch_rows(layout)
    ref = reference_varlen(q[idx], k[idx], v[idx], layout.cu_seqlens_k, causal=True, softmax_scale=0.3)[keep]
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prompt,completions,causal", [(40, [3, 5, 2], False), (3, [40, 35, 50], True)],
                         ids=["long-prompt-masked", "short-prompt-causal"])
def test_each_group_takes_the_cheaper_form(prompt, completions, causal, monkeypatch):
    """A branch of a long prompt with a short completion is attended with a mask (fewer scores than
    shifting its queries past the prompt); short prompts with long completions with plain causal
    attention. (No padding budget: every branch is its own group, so each makes its own choice.)"""
    monkeypatch.setattr(_shared_prefix_attention, "_PAD_BUDGET", 0)
    positions = list(range(prompt + completions[0]))
    for c in completions[1:]:
        positions += range(prompt, prompt + c)
    layout = branch_layout(torch.tensor(positions))
    T = len(positions)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = shared_prefix_attention(q, k, v, layout)
    groups, _ = _shared_prefix_attention._plans.get(layout, q.device, q.dtype)
    branches = [grp for grp in groups if grp.Lk != prompt + completions[0]]  # all but the trunk
    assert len(branches) == len(completions) - 1 and all((grp.mask is None) == causal for grp in branches)
    idx = layout.kv_index
    ref = reference_varlen(q[idx], k[idx], v[idx], layout.cu_seqlens_k, causal=True)[_branch_rows(layout)]
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_branch_layout_of_plain_rows_and_errors():
    layout = branch_layout(torch.tensor([0, 1, 2, 0, 1]))
    assert layout.is_plain and layout.cu_seqlens_q.tolist() == [0, 3, 5]
    layout = branch_layout(torch.tensor([0, 1, 2, 3, 2, 3, 2]))  # prompt 2, completions 2, 2, 1
    assert not layout.is_plain
    assert layout.cu_seqlens_q.tolist() == [0, 4, 6, 7] and layout.cu_seqlens_k.tolist() == [0, 4, 8, 11]
    assert layout.kv_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 0, 1, 6]
    with pytest.raises(ValueError, match="no trunk of 5 tokens"):
        branch_layout(torch.tensor([0, 1, 2, 5, 6]))
    with pytest.raises(ValueError, match="no trunk"):
        branch_layout(torch.tensor([3, 4]))


def _group_samples(rng, vocab, n_groups, G, prompt_len):
    samples = []
    for _ in range(n_groups):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len + rng.randint(0, 7))]
        for _ in range(G):
            C = rng.randint(1, 9)
            n = rng.randint(1, 3)
            samples.append(Sample(prompt, [rng.randrange(3, vocab) for _ in range(C)], [rng.random() for _ in range(n)],
                                  [rng.randrange(-1, n) for _ in range(C)]))
    return samples


def test_packing_shares_each_prompt_once_and_keeps_the_completion_fields():
    rng = random.Random(0)
    samples = _group_samples(rng, 50, 3, 4, 5)
    plain, shared = pack_row(samples), pack_row(samples, share_prompts=True)
    prompts = sum(len(s.prompt_ids) for s in samples[::4])
    assert shared.num_tokens == plain.num_tokens - 3 * prompts and shared.shared_prompts
    for name in ("completion_targets", "completion_segment_ids", "completion_cu_seqlens", "instance_advantages",
                 "num_instances"):
        assert torch.equal(getattr(plain, name), getattr(shared, name)), name
    # the predicting position of every completion token holds the token before it in its own sequence
    prev_plain = plain.input_ids[plain.completion_index]
    prev_shared = shared.input_ids[shared.completion_index]
    assert torch.equal(prev_plain, prev_shared)
    assert not pack_row(samples[:1], share_prompts=True).shared_prompts  # G = 1: nothing shared


def test_pack_samples_splits_a_group_over_rows_and_repeats_its_prompt():
    samples = [Sample([1, 2, 3], [4] * 5, [1.0]) for _ in range(4)]
    rows = pack_samples(samples, max_tokens=14, share_prompts=True)  # 3 + 5 + 5 = 13 fits, a third does not
    assert [r.sample_indices for r in rows] == [[0, 1], [2, 3]]
    assert [r.num_tokens for r in rows] == [13, 13]
    assert [r.num_tokens for r in pack_samples(samples, share_prompts=True)] == [23]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("n_groups,G,prompt_len", [(2, 1, 3), (1, 2, 11), (2, 8, 5), (3, 3, 30)])
def test_shared_row_equals_unshared_rows(arch, n_groups, G, prompt_len):
    """Log-probs, entropies and parameter gradients (fp32) of the shared row equal the plain row's."""
    torch.manual_seed(0)
    vocab = 97
    model = tiny_model(vocab, arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    samples = _group_samples(random.Random(n_groups * 100 + G), vocab, n_groups, G, prompt_len)
    out = {}
    for share in (False, True):
        row = pack_row(samples, share_prompts=share)
        model.zero_grad(set_to_none=True)
        logp, entropy = completion_logprobs(model, row, return_entropy=True, attn_implementation="bcr_varlen")
        w = torch.linspace(-1, 1, logp.numel())
        ((logp * w).sum() + 0.1 * entropy.sum()).backward()
        out[share] = (logp.detach(), entropy.detach(), _grads(model))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)
    assert out[True][2].keys() == out[False][2].keys()
    for name, g in out[False][2].items():
        rel = (out[True][2][name] - g).norm() / g.norm().clamp(min=1e-12)
        assert rel <= 1e-5, (name, float(rel))


def test_shared_row_needs_bcr_varlen():
    model = tiny_model(50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    row = pack_row([Sample([1, 2], [3, 4], [1.0]), Sample([1, 2], [5], [1.0])], share_prompts=True)
    with pytest.raises(ValueError, match="shared_prompt=false"):
        completion_logprobs(model, row, attn_implementation="sdpa")


def _instance_token_reward(completion_ids, n_problems, **kw):
    return [[sum(t % (n + 1) == k for t in ids) / max(len(ids), 1) for k in range(n)]
            for ids, n in zip(completion_ids, n_problems)]


_LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_accumulation_steps": 2}, {"max_tokens_per_microbatch": 250}, {"gradient_checkpointing": True},
     {"num_iterations": 2}, {"beta": 0.1}, _LORA, {**_LORA, "beta": 0.1}],
    ids=["plain", "accumulation", "row-cap", "checkpointing", "num_iterations", "kl-ref", "lora", "lora-kl-ref"],
)
def test_trainer_update_is_the_same_with_shared_prompts(tmp_path, tiny_tokenizer, options):
    """One BCRTrainer step with shared_prompt=true gives the update of shared_prompt=false, and logs the
    tokens it did not process. lr = 1 with adam_epsilon = 1 makes the update -g / (|g| + 1), smooth in g.
    With LoRA only the adapters move, and the KL reference is the base model with them disabled."""
    if options.get("use_peft"):
        pytest.importorskip("peft", reason="the LoRA cases need peft (pip install -e '.[peft]'; make test installs it)")
    from bcr.rl.config import BCRConfig
    from bcr.task.synthetic import make_arithmetic_problems
    from bcr.rl.trainer import BCRTrainer

    problems = make_arithmetic_problems(12, seed=0)
    deltas, metrics = {}, {}
    for share in ("false", "true"):
        model = tiny_model(tiny_tokenizer, seed=0)
        torch.manual_seed(0)  # LoRA's adapters are initialised from the global generator
        cfg = BCRConfig(output_dir=str(tmp_path / share), n_problems=2, num_generations=3, max_completion_length=16,
                        bundles_per_step=2, max_steps=1, learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0,
                        disable_progress_bar=True, shared_prompt=share, **options)
        trainer = BCRTrainer(model, problems, cfg, tokenizer=tiny_tokenizer, reward_fn=_instance_token_reward)
        assert trainer.share_prompts == (share == "true")
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}  # after LoRA is applied
        trainer.train()
        deltas[share] = {k: v.detach() - before[k] for k, v in trainer.model.named_parameters()}
        metrics[share] = trainer.last_metrics
    assert max(float(d.abs().max()) for d in deltas["false"].values()) > 1e-4
    if options.get("use_peft"):  # only the adapters train
        moved = {k for k, d in deltas["true"].items() if float(d.abs().max()) > 0}
        assert moved and all("lora_" in k for k in moved), sorted(moved)
    for k, d in deltas["false"].items():
        torch.testing.assert_close(deltas["true"][k], d, rtol=1e-4, atol=1e-6, msg=k)
    assert metrics["false"]["tokens/saved_by_shared_prompt"] == 0
    assert metrics["true"]["tokens/saved_by_shared_prompt"] > 0
    assert (metrics["true"]["tokens/processed"] + metrics["true"]["tokens/saved_by_shared_prompt"]
            == metrics["false"]["tokens/processed"])
