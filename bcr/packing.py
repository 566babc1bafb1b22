"""Pack prompt + completion token ids of many samples into padding-free rows for the training forward.

A row is the concatenation of whole sequences (prompt then completion), described as flash-attn does:
``cu_seqlens`` (int32 prefix sums of the sequence lengths) and ``position_ids`` that restart at 0 for
each sequence. The model predicts token ``i + 1`` at position ``i``, so everything the loss needs is
aligned to *target positions*: position ``i`` counts iff token ``i + 1`` is a completion token of the
same sequence (EOS included), and carries that token's segment id (the instance it belongs to, -1
for shared text). The loss only needs those positions; ``completion_index`` lists them, and the
``completion_*`` fields are the same data compacted to them, with ``completion_cu_seqlens`` delimiting
each sequence's completion tokens.

Illustration, one sequence with prompt ``p0 p1`` and completion ``c0 c1 EOS``::

    input_ids    p0   p1   c0   c1   EOS
    targets      p1   c0   c1   EOS  -100
    loss_mask    0    1    1    1    0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from bcr_kernels import packed_targets


@dataclass
class Sample:
    """One rollout to train on."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantages: Sequence[float]  # one per instance of the bundle (length N)
    segment_ids: Sequence[int] | None = None  # one per completion token; None = all shared (-1)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [T] long, restarting per sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32
    max_seqlen: int
    targets: torch.Tensor  # [T] long, next token or -100 at the end of each sequence
    loss_mask: torch.Tensor  # [T] bool, at target positions
    segment_ids: torch.Tensor  # [T] long, at target positions (-1 where loss_mask is 0)
    instance_advantages: torch.Tensor  # [S, N_max] fp32
    num_instances: torch.Tensor  # [S] long
    completion_index: torch.Tensor  # [C] long: positions where loss_mask is 1
    completion_targets: torch.Tensor  # [C]
    completion_segment_ids: torch.Tensor  # [C]
    completion_cu_seqlens: torch.Tensor  # [S + 1] int32
    sample_indices: list[int] = field(default_factory=list)  # which input samples this row holds

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_index.numel())

    def to(self, device) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**moved)


def pack_row(samples: Sequence[Sample], sample_indices: Sequence[int] | None = None) -> PackedBatch:
    """Pack ``samples`` into one row (no padding)."""
    if not samples:
        raise ValueError("pack_row needs at least one sample")
    ids: list[int] = []
    positions: list[int] = []
    mask: list[bool] = []
    segments: list[int] = []
    lengths: list[int] = []
    completion_lengths: list[int] = []
    n_max = max(max(len(s.advantages) for s in samples), 1)
    advantages = torch.zeros(len(samples), n_max, dtype=torch.float32)
    num_instances = torch.zeros(len(samples), dtype=torch.long)
    for row, s in enumerate(samples):
        P, C = len(s.prompt_ids), len(s.completion_ids)
        if P == 0:
            raise ValueError("a sample needs at least one prompt token (the first completion token is predicted from it)")
        seg = [-1] * C if s.segment_ids is None else [int(x) for x in s.segment_ids]
        if len(seg) != C:
            raise ValueError(f"sample {row}: {len(seg)} segment ids for {C} completion tokens")
        ids += list(s.prompt_ids) + list(s.completion_ids)
        positions += range(P + C)
        # Position i predicts token i + 1: the completion tokens are predicted at P - 1 .. P + C - 2.
        mask += [False] * (P - 1) + [True] * C + [False]
        segments += [-1] * (P - 1) + seg + [-1]
        lengths.append(P + C)
        completion_lengths.append(C)
        advantages[row, : len(s.advantages)] = torch.as_tensor(list(s.advantages), dtype=torch.float32)
        num_instances[row] = len(s.advantages)
    input_ids = torch.tensor(ids, dtype=torch.long)
    cu_seqlens = _cumsum(lengths)
    loss_mask = torch.tensor(mask, dtype=torch.bool)
    segment_ids = torch.tensor(segments, dtype=torch.long)
    targets = packed_targets(input_ids, cu_seqlens)
    completion_index = loss_mask.nonzero().squeeze(-1)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segment_ids,
        instance_advantages=advantages,
        num_instances=num_instances,
        completion_index=completion_index,
        completion_targets=targets[completion_index],
        completion_segment_ids=segment_ids[completion_index],
        completion_cu_seqlens=_cumsum(completion_lengths),
        sample_indices=list(range(len(samples)) if sample_indices is None else sample_indices),
    )


def pack_samples(samples: Sequence[Sample], max_tokens: int | None = None) -> list[PackedBatch]:
    """Pack ``samples`` in order into rows of at most ``max_tokens`` tokens (one row when None).

    A sample longer than ``max_tokens`` gets a row of its own; sequences are never split.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, s in enumerate(samples):
        n = len(s.prompt_ids) + len(s.completion_ids)
        if current and max_tokens is not None and used + n > max_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return [pack_row([samples[i] for i in row], row) for row in rows]


def _cumsum(lengths: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out
