"""Packing: target alignment, row splitting, and packed loss/gradients == a padded computation."""

from __future__ import annotations

import pytest
import torch

from bcr.rl.packing import Sample, pack_row, pack_samples
from bcr.rl.trainer import completion_logprobs, training_attention
from bcr_kernels import policy_loss, scatter_instance_advantages


def test_alignment_on_a_hand_example():
    s = Sample(prompt_ids=[10, 11], completion_ids=[20, 21, 2], advantages=[0.5, -1.0], segment_ids=[0, 1, -1])
    t = Sample(prompt_ids=[12], completion_ids=[22], advantages=[3.0], segment_ids=[0])
    b = pack_row([s, t])
    assert b.input_ids.tolist() == [10, 11, 20, 21, 2, 12, 22]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 5, 7]
    assert b.max_seqlen == 5
    # position i predicts token i + 1; the last token of each sequence predicts nothing
    assert b.targets.tolist() == [11, 20, 21, 2, -100, 22, -100]
    assert b.loss_mask.tolist() == [False, True, True, True, False, True, False]
    assert b.segment_ids.tolist() == [-1, 0, 1, -1, -1, 0, -1]
    assert b.completion_index.tolist() == [1, 2, 3, 5]
    assert b.completion_targets.tolist() == [20, 21, 2, 22]
    assert b.completion_segment_ids.tolist() == [0, 1, -1, 0]
    assert b.completion_cu_seqlens.tolist() == [0, 3, 4]
    assert b.num_instances.tolist() == [2, 1]
    assert b.instance_advantages.tolist() == [[0.5, -1.0], [3.0, 0.0]]
    # every completion token (EOS included) is a target exactly once
    assert sorted(b.completion_targets.tolist()) == sorted(s.completion_ids + t.completion_ids)


def test_rows_respect_the_token_cap_and_keep_sequences_whole():
    samples = [Sample([1] * 3, [2] * (i + 1), [0.0]) for i in range(6)]  # lengths 4..9
    rows = pack_samples(samples, max_tokens=12)
    assert [r.sample_indices for r in rows] == [[0, 1], [2], [3], [4], [5]]  # 4+5, 6, 7, 8, 9
    assert sum(r.num_sequences for r in rows) == 6
    assert [i for r in rows for i in r.sample_indices] == list(range(6))
    assert all(r.num_tokens <= 12 for r in rows)
    big = pack_samples([Sample([1] * 10, [2] * 10, [0.0])], max_tokens=5)  # longer than the cap: own row
    assert len(big) == 1 and big[0].num_tokens == 20
    assert len(pack_samples(samples)) == 1


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="prompt token"):
        pack_row([Sample([], [1, 2], [0.0])])
    with pytest.raises(ValueError, match="segment ids"):
        pack_row([Sample([1], [1, 2], [0.0], segment_ids=[0])])


# ------------------------------------------------------------------------------------------------
# Packed == padded
# ------------------------------------------------------------------------------------------------
def _random_samples(vocab: int, gen: torch.Generator, count: int = 5) -> list[Sample]:
    samples = []
    for i in range(count):
        n = 1 + i % 3
        P = int(torch.randint(2, 9, (1,), generator=gen))
        C = int(torch.randint(1, 9, (1,), generator=gen))
        samples.append(Sample(
            prompt_ids=torch.randint(5, vocab, (P,), generator=gen).tolist(),
            completion_ids=torch.randint(5, vocab, (C,), generator=gen).tolist(),
            advantages=torch.randn(n, generator=gen).tolist(),
            segment_ids=torch.randint(-1, n, (C,), generator=gen).tolist(),
        ))
    return samples


def _padded_loss(model, samples, old, ref, *, loss_type, temperature, beta, epsilon, epsilon_high,
                 max_completion_length, shared):
    """The same loss with a right-padded batch, an ordinary forward and plain torch."""
    S = len(samples)
    L = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    ids = torch.zeros(S, L, dtype=torch.long)
    attn = torch.zeros(S, L, dtype=torch.long)
    mask = torch.zeros(S, L)
    adv = torch.zeros(S, L)
    old_p = torch.zeros(S, L)
    ref_p = torch.zeros(S, L)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        P = len(s.prompt_ids)
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        a = torch.tensor(s.advantages)
        fill = a.mean() if shared == "mean" else 0.0
        for j, seg in enumerate(s.segment_ids):
            pos = P - 1 + j  # the position whose logits predict completion token j
            mask[i, pos] = 1
            adv[i, pos] = a[seg] if seg >= 0 else fill
            old_p[i, pos] = old[i][j]
            ref_p[i, pos] = ref[i][j]
    logits = model(input_ids=ids, attention_mask=attn).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logp = torch.cat([logp, torch.zeros(S, 1)], 1)  # pad back to L (last position predicts nothing)
    ratio = torch.exp(logp - old_p)
    eh = epsilon if epsilon_high is None else epsilon_high
    per_tok = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + eh) * adv)
    d = ref_p - logp
    per_tok = per_tok + beta * (torch.exp(d) - d - 1)
    if loss_type == "token_mean":
        return (per_tok * mask).sum() / mask.sum()
    if loss_type == "seq_mean_token_mean":
        return ((per_tok * mask).sum(1) / mask.sum(1)).mean()
    return (per_tok * mask).sum() / (S * max_completion_length)


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("max_tokens", [None, 20])
@pytest.mark.parametrize("attn", sorted({"sdpa", training_attention()}))
def test_packed_loss_and_grads_equal_padded(tiny_tokenizer, tiny_qwen2, loss_type, max_tokens, attn):
    model = tiny_qwen2
    gen = torch.Generator().manual_seed(1)
    samples = _random_samples(model.config.vocab_size, gen)
    old = [(torch.randn(len(s.completion_ids), generator=gen) * 0.3 - 6.0).tolist() for s in samples]
    ref = [(torch.randn(len(s.completion_ids), generator=gen) * 0.3 - 6.0).tolist() for s in samples]
    kw = {"temperature": 0.7, "beta": 0.05, "epsilon": 0.2, "epsilon_high": 0.28, "max_completion_length": 10,
          "shared": "mean"}
    rows = pack_samples(samples, max_tokens=max_tokens)
    if max_tokens is not None:
        assert len(rows) > 1
    normalizer = {"token_mean": sum(len(s.completion_ids) for s in samples), "seq_mean_token_mean": len(samples),
                  "seq_mean_token_sum_norm": len(samples) * kw["max_completion_length"]}[loss_type]

    model.zero_grad()
    total = 0.0
    for row in rows:
        logp = completion_logprobs(model, row, temperature=kw["temperature"], attn_implementation=attn).logp
        idx = row.sample_indices
        adv = scatter_instance_advantages(row.instance_advantages, row.completion_segment_ids,
                                          row.completion_cu_seqlens, num_instances=row.num_instances, shared="mean")
        loss, _ = policy_loss(logp, torch.tensor([x for i in idx for x in old[i]]), adv, torch.ones_like(logp),
                              row.completion_cu_seqlens, ref_logp=torch.tensor([x for i in idx for x in ref[i]]),
                              beta=kw["beta"], epsilon=kw["epsilon"], epsilon_high=kw["epsilon_high"],
                              reduction=loss_type, max_completion_length=kw["max_completion_length"],
                              normalizer=normalizer)
        loss.backward()
        total += float(loss.detach())
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    ref_loss = _padded_loss(model, samples, old, ref, loss_type=loss_type, **kw)
    ref_loss.backward()
    assert total == pytest.approx(float(ref_loss.detach()), rel=1e-4, abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_packed_sequences_do_not_see_each_other(tiny_tokenizer, tiny_qwen2):
    """A sequence's log-probs are the same alone or packed behind other sequences (no cross-attention)."""
    gen = torch.Generator().manual_seed(3)
    samples = _random_samples(tiny_qwen2.config.vocab_size, gen, count=3)
    attn = training_attention()
    with torch.no_grad():
        together = completion_logprobs(tiny_qwen2, pack_row(samples), attn_implementation=attn).logp
        alone = torch.cat([completion_logprobs(tiny_qwen2, pack_row([s]), attn_implementation=attn).logp
                           for s in samples])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
