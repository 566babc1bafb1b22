"""Pack prompt + completion token ids of many samples into padding-free rows for the training forward.

A row is the concatenation of whole sequences (prompt then completion), described as flash-attn does:
``cu_seqlens`` (int32 prefix sums of the sequence lengths) and ``position_ids`` that restart at 0 for
each sequence. The model predicts token ``i + 1`` at position ``i``, so everything the loss needs is
aligned to *target positions*: position ``i`` counts iff token ``i + 1`` is a completion token of the
same sequence (EOS included), and carries that token's segment id (the instance it belongs to, -1
for shared text). The loss only needs those positions; ``completion_index`` lists them, and the
``completion_*`` fields are the same data compacted to them, with ``completion_cu_seqlens`` delimiting
each sequence's completion tokens.

``pad_to`` (the trainer passes :data:`COMPLETION_MULTIPLE`) pads the ``completion_*`` fields to a
multiple of that many entries, so the ``[C]``-sized kernels on them (the scatter of the advantages,
the policy losses) see a length divisible by 16 and use vectorised 128-bit loads and stores instead of
falling back to 32-bit ones (the LM head's per-token kernels are vectorised over V either way). A padding entry reads the hidden state of position 0, has the
target ``-100`` (log-prob and entropy 0, no gradient), segment -1 and lies after
``completion_cu_seqlens[-1]`` (outside every sequence: advantage 0, no sequence weight); the loss
masks it out with ``completion_mask``. ``num_completion_tokens`` counts the real tokens only.

Illustration, one sequence with prompt ``p0 p1`` and completion ``c0 c1 EOS``::

    input_ids    p0   p1   c0   c1   EOS
    targets      p1   c0   c1   EOS  -100
    loss_mask    0    1    1    1    0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from bcr_kernels import IGNORE_INDEX, packed_targets

#: The multiple the trainer pads the completion fields to: Triton specialises a length divisible by 16
#: and vectorises the loads and stores of the ``[C]``-sized kernels on it.
COMPLETION_MULTIPLE = 16


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
    shared_prompts: bool = False  # some completions continue a prompt packed once (see pack_row)
    completion_mask: torch.Tensor | None = None  # [C] bool, False at padding entries (None: no padding)
    completion_padding: int = 0  # padding entries at the end of the completion fields

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_completion_tokens(self) -> int:
        """Real completion tokens (the padding entries not counted)."""
        return int(self.completion_index.numel()) - self.completion_padding

    def completion_weights(self, like: torch.Tensor) -> torch.Tensor:
        """The loss mask of the completion fields in ``like``'s dtype and device: 1, and 0 at padding."""
        if self.completion_mask is None:
            return torch.ones_like(like)
        return self.completion_mask.to(device=like.device, dtype=like.dtype)

    def to(self, device) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**moved)


def _groups(samples: Sequence[Sample], share_prompts: bool) -> list[list[int]]:
    """Indices of the samples packed as one sequence: runs of equal prompts when sharing, else one each."""
    groups: list[list[int]] = []
    for i, s in enumerate(samples):
        if share_prompts and groups and list(samples[groups[-1][0]].prompt_ids) == list(s.prompt_ids):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pack_row(samples: Sequence[Sample], sample_indices: Sequence[int] | None = None, *,
             share_prompts: bool = False, pad_to: int = 1) -> PackedBatch:
    """Pack ``samples`` into one row (no padding between sequences).

    With ``share_prompts``, consecutive samples with the same prompt are packed as one sequence
    ``[prompt, completion 1, ..., completion G]`` whose completions all continue at position ``P``
    (see ``bcr_kernels.shared_prefix_attention``): the prompt is in the row once, and the first token
    of every completion is predicted at the prompt's last position. The ``completion_*`` fields list
    every completion token in sample order either way; the per-position fields (``targets``,
    ``loss_mask``, ``segment_ids``) follow each position's own branch, so at a shared prompt's last
    position they describe the first completion.

    ``pad_to`` > 1 pads the ``completion_*`` fields to a multiple of it (see the module docstring).
    """
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    if not samples:
        raise ValueError("pack_row needs at least one sample")
    ids: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []  # one per packed sequence (a group when sharing)
    branches: list[int] = []  # one per branch: a sequence's trunk, or a completion continuing its prompt
    predicted_at: list[int] = []  # the position whose hidden state predicts each completion token
    completion_targets: list[int] = []
    completion_segments: list[int] = []
    completion_lengths: list[int] = []
    n_max = max(max(len(s.advantages) for s in samples), 1)
    advantages = torch.zeros(len(samples), n_max, dtype=torch.float32)
    num_instances = torch.zeros(len(samples), dtype=torch.long)
    for group in _groups(samples, share_prompts):
        prompt = list(samples[group[0]].prompt_ids)
        P = len(prompt)
        if P == 0:
            raise ValueError("a sample needs at least one prompt token (the first completion token is predicted from it)")
        prompt_last = len(ids) + P - 1
        ids += prompt
        positions += range(P)
        for j, row in enumerate(group):
            s = samples[row]
            C = len(s.completion_ids)
            seg = [-1] * C if s.segment_ids is None else [int(x) for x in s.segment_ids]
            if len(seg) != C:
                raise ValueError(f"sample {row}: {len(seg)} segment ids for {C} completion tokens")
            start = len(ids)
            branches.append(P + C if j == 0 else C)
            ids += list(s.completion_ids)
            positions += range(P, P + C)
            # Position i predicts token i + 1 of its branch; a completion's first token is predicted at
            # the prompt's last position.
            predicted_at += [prompt_last] + list(range(start, start + C - 1)) if C else []
            completion_targets += list(s.completion_ids)
            completion_segments += seg
            completion_lengths.append(C)
            advantages[row, : len(s.advantages)] = torch.as_tensor(list(s.advantages), dtype=torch.float32)
            num_instances[row] = len(s.advantages)
        lengths.append(len(ids) - (prompt_last + 1 - P))
    input_ids = torch.tensor(ids, dtype=torch.long)
    targets = packed_targets(input_ids, _cumsum(branches))  # the next token of each position's branch
    loss_mask = torch.zeros(len(ids), dtype=torch.bool)
    loss_mask[torch.tensor(predicted_at, dtype=torch.long)] = True
    real = len(predicted_at)
    padding = -real % pad_to
    completion_mask = torch.arange(real + padding) < real
    completion_index = torch.tensor(predicted_at + [0] * padding, dtype=torch.long)
    segment_ids = torch.full((len(ids),), -1, dtype=torch.long)
    seen: set[int] = set()
    for at, seg in zip(predicted_at, completion_segments):
        if at not in seen:  # a shared prompt's last position: the first completion's segment
            segment_ids[at] = seg
            seen.add(at)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=_cumsum(lengths),
        max_seqlen=max(lengths),
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segment_ids,
        instance_advantages=advantages,
        num_instances=num_instances,
        completion_index=completion_index,
        completion_targets=torch.tensor(completion_targets + [IGNORE_INDEX] * padding, dtype=torch.long),
        completion_segment_ids=torch.tensor(completion_segments + [-1] * padding, dtype=torch.long),
        completion_cu_seqlens=_cumsum(completion_lengths),
        sample_indices=list(range(len(samples)) if sample_indices is None else sample_indices),
        shared_prompts=share_prompts and len(branches) > len(lengths),
        completion_mask=completion_mask,
        completion_padding=padding,
    )


def pack_samples(samples: Sequence[Sample], max_tokens: int | None = None, *,
                 share_prompts: bool = False, pad_to: int = 1) -> list[PackedBatch]:
    """Pack ``samples`` in order into rows of at most ``max_tokens`` tokens (one row when None).

    A sample longer than ``max_tokens`` gets a row of its own; sequences are never split. With
    ``share_prompts`` a run of samples with the same prompt costs its prompt once per row it lands in.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, s in enumerate(samples):
        shares = share_prompts and current and list(samples[current[-1]].prompt_ids) == list(s.prompt_ids)
        n = len(s.completion_ids) + (0 if shares else len(s.prompt_ids))
        if current and max_tokens is not None and used + n > max_tokens:
            rows.append(current)
            current, used = [], 0
            n = len(s.prompt_ids) + len(s.completion_ids)
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return [pack_row([samples[i] for i in row], row, share_prompts=share_prompts, pad_to=pad_to) for row in rows]


def _cumsum(lengths: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out
