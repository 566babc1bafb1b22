"""Packing: target alignment, row splitting, and packed loss/gradients == a padded computation."""

from __future__ import annotations

import pytest
import torch

from bcr.rl.packing import Sample, pack_row, pack_samples
from bcr.rl.trainer import completion_logprobs, training_attention
from bcr_kernels import Objective, policy_loss, scatter_instance_advantages


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
    objective = Objective(reduction=loss_type, beta=kw["beta"], epsilon=kw["epsilon"],
                          epsilon_high=kw["epsilon_high"], max_completion_length=kw["max_completion_length"])

    model.zero_grad()
    total = 0.0
    for row in rows:
        logp = completion_logprobs(model, row, temperature=kw["temperature"], attn_implementation=attn).logp
        idx = row.sample_indices
        adv = scatter_instance_advantages(row.instance_advantages, row.completion_segment_ids,
                                          row.completion_cu_seqlens, num_instances=row.num_instances, shared="mean")
        loss, _ = policy_loss(logp, torch.tensor([x for i in idx for x in old[i]]), adv, torch.ones_like(logp),
                              row.completion_cu_seqlens, objective,
                              ref_logp=torch.tensor([x for i in idx for x in ref[i]]), normalizer=normalizer)
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


# ------------------------------------------------------------------------------------------------
# Completion fields padded to a multiple of 16 (vectorised kernel access) == unpadded
# ------------------------------------------------------------------------------------------------
def test_completion_padding_layout():
    s = Sample(prompt_ids=[10, 11], completion_ids=[20, 21, 2], advantages=[0.5, -1.0], segment_ids=[0, 1, -1])
    t = Sample(prompt_ids=[12], completion_ids=[22], advantages=[3.0], segment_ids=[0])
    plain, padded = pack_row([s, t]), pack_row([s, t], pad_to=16)
    assert plain.completion_padding == 0 and plain.completion_mask.all()
    assert padded.completion_padding == 12 and padded.num_completion_tokens == plain.num_completion_tokens == 4
    assert padded.completion_index.tolist() == [1, 2, 3, 5] + [0] * 12
    assert padded.completion_targets.tolist() == [20, 21, 2, 22] + [-100] * 12
    assert padded.completion_segment_ids.tolist() == [0, 1, -1, 0] + [-1] * 12
    assert padded.completion_mask.tolist() == [True] * 4 + [False] * 12
    assert padded.completion_weights(torch.zeros(16)).tolist() == [1.0] * 4 + [0.0] * 12
    # the row itself and the sequence boundaries are untouched: the padding lies after every sequence
    for name in ("input_ids", "position_ids", "cu_seqlens", "targets", "loss_mask", "segment_ids",
                 "completion_cu_seqlens", "instance_advantages", "num_instances"):
        assert torch.equal(getattr(padded, name), getattr(plain, name)), name
    exact = pack_row([Sample([1], list(range(5, 21)), [0.0])], pad_to=16)  # 16 completion tokens already
    assert exact.completion_padding == 0 and exact.completion_index.numel() == 16
    rows = pack_samples([s, t, s], max_tokens=8, pad_to=16)
    assert all(r.completion_index.numel() % 16 == 0 for r in rows)
    assert [r.sample_indices for r in rows] == [[0, 1], [2]] and [r.num_completion_tokens for r in rows] == [4, 3]
    with pytest.raises(ValueError, match="pad_to"):
        pack_row([s], pad_to=0)


def _update_with(tiny_tokenizer, tmp_path, multiple: int, samples, **cfg_kw):
    """One BCRTrainer update on ``samples`` with the completion fields padded to ``multiple``:
    (metrics, parameter change)."""
    from bcr.models.tiny import tiny_model
    from bcr.rl.config import BCRConfig
    from bcr.rl.trainer import BCRTrainer
    from bcr.task.synthetic import make_arithmetic_problems

    model = tiny_model(tiny_tokenizer, seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = BCRConfig(output_dir=str(tmp_path / f"pad{multiple}"), n_problems=3, num_generations=2,
                    max_completion_length=16, bundles_per_step=2, max_steps=1, disable_progress_bar=True,
                    learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, **cfg_kw)
    trainer = BCRTrainer(model, make_arithmetic_problems(4, seed=0), cfg, tokenizer=tiny_tokenizer)
    trainer.completion_multiple = multiple
    rows = trainer.microbatches(samples).rows
    assert all(r.completion_index.numel() % multiple == 0 for r in rows)
    metrics = trainer.update(samples).reduce()
    return metrics, {k: v.detach() - before[k] for k, v in model.named_parameters()}


@pytest.mark.parametrize("cfg_kw", [
    {"loss_type": "dapo"},  # the fused head + loss (num_iterations 1), token mean
    {"loss_type": "grpo", "beta": 0.1, "num_iterations": 2},  # old/ref log-probs, policy_loss, per-sequence weights
    {"loss_type": "dr_grpo", "max_tokens_per_microbatch": 30, "gradient_accumulation_steps": 2},
])
def test_padding_the_completions_changes_no_loss_gradient_or_metric(tiny_tokenizer, tmp_path, cfg_kw):
    gen = torch.Generator().manual_seed(3)
    samples = _random_samples(len(tiny_tokenizer), gen, count=6)
    plain, d_plain = _update_with(tiny_tokenizer, tmp_path, 1, samples, **cfg_kw)
    padded, d_padded = _update_with(tiny_tokenizer, tmp_path, 16, samples, **cfg_kw)
    assert max(float(d.abs().max()) for d in d_plain.values()) > 1e-4  # the update is not trivially zero
    assert set(plain) == set(padded) and {"loss", "entropy", "ratio_mean", "kl"} <= set(plain)
    for name in plain:
        assert padded[name] == pytest.approx(plain[name], rel=1e-5, abs=1e-7), name
    for k in d_plain:
        torch.testing.assert_close(d_padded[k], d_plain[k], rtol=1e-4, atol=1e-7, msg=k)


def test_the_completions_are_padded_by_default_only_on_cuda():
    """Padding helps the CUDA kernels' vector loads; on the CPU it buys nothing and would change the last
    bits of the demo's sums (another model after a run), so the trainer pads only on CUDA by default."""
    from bcr.rl.packing import COMPLETION_MULTIPLE
    from bcr.rl.trainer import default_completion_multiple

    assert default_completion_multiple(torch.device("cuda", 0)) == COMPLETION_MULTIPLE == 16
    assert default_completion_multiple(torch.device("cpu")) == 1
