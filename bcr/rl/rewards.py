r"""Per-instance rewards and GRPO-style advantages for N problems per completion.

* :func:`instance_rewards` — ``[G, N]`` accuracy rewards (1.0 correct, 0.0 wrong or missing; no
  format bonus) from parsed completions.

All of them score through :func:`bcr.task.scoring.score_completion`; ``extraction="strict"`` (default: the
answer format is part of the task) or ``"flexible"`` (``BCRConfig.reward_extraction``) picks how
answers are read.
* :func:`accuracy_reward` — the same as a TRL-style reward function
  ``f(prompts=..., completions=..., answer=..., **columns)`` returning one list of N floats per
  completion.
* :func:`score_completions` — parse + verify many completions, optionally in a process pool (the
  reward stage is CPU-bound: regexes and, for non-numeric answers, sympy).
* :func:`compute_advantages` — group / batch / no scaling, per instance or per sequence.
* :func:`length_penalty_rewards` — explicit length penalties (Kimi 1.5, L1), **baselines only**:
  BCR itself has no length term; these exist to compare against.

Standard deviation: like TRL's ``GRPOTrainer`` (``rewards.view(-1, G).std(dim=1)`` and, for
``scale_rewards="batch"``, ``rewards.std()``) we use ``torch.std`` with Bessel's correction
(unbiased, divisor ``n - 1``). With a single value (G = 1) the unbiased std is undefined; we use 0
there, so the advantage is ``(r - mean) / eps = 0``.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from typing import Any

import torch

from bcr.task.parsing import ParsedCompletion, parse_completion
from bcr.task.scoring import check_extraction, score_chunk, score_completion

__all__ = [
    "accuracy_reward",
    "compute_advantages",
    "instance_rewards",
    "length_penalty_rewards",
    "score_completions",
]

_SCALES = ("group", "batch", "none")
_MODES = ("instance", "sequence")


def _per_completion_answers(answers: Any, g: int) -> list[list[str]]:
    """``answers`` is either N references shared by all completions or one list per completion."""
    if isinstance(answers, str):
        return [[answers]] * g
    answers = list(answers)
    if answers and all(isinstance(a, (list, tuple)) for a in answers):
        if len(answers) != g:
            raise ValueError(
                f"instance_rewards: got {len(answers)} answer lists for {g} completions; pass one list "
                "of N reference answers per completion, or a single list of N shared by all"
            )
        return [[str(x) for x in a] for a in answers]
    return [[str(x) for x in answers]] * g


def instance_rewards(
    parsed: Sequence[ParsedCompletion],
    answers: Sequence[Any],
    *,
    extraction: str = "strict",
    texts: Sequence[str] | None = None,
    truncated: Sequence[bool] | None = None,
    timeout: float = 2.0,
) -> torch.Tensor:
    """Rewards ``[G, N]``: 1.0 where instance n of completion g matches its reference, else 0.0.

    ``answers`` holds the N reference answers of the prompt (shared by its G completions), or one
    list of N per completion. Missing answers score 0.0; there is no format bonus.
    ``extraction="flexible"`` needs the completion ``texts`` (and their ``truncated`` flags).
    """
    check_extraction(extraction)
    g = len(parsed)
    refs = _per_completion_answers(answers, g)
    if extraction == "flexible" and (texts is None or len(texts) != g):
        raise ValueError(
            f"instance_rewards: extraction='flexible' reads the completions: pass texts= (one per parsed "
            f"completion, {g}), got {None if texts is None else len(texts)}"
        )
    if g == 0:
        n = len(refs[0]) if refs else 0
        return torch.zeros(0, n, dtype=torch.float32)
    n = len(refs[0])
    out = torch.zeros(g, n, dtype=torch.float32)
    for i, (pc, ref) in enumerate(zip(parsed, refs)):
        if len(pc.instances) != len(ref) or len(ref) != n:
            raise ValueError(
                f"instance_rewards: completion {i} was parsed for {len(pc.instances)} problems but has "
                f"{len(ref)} reference answers (expected {n}); parse with n_problems = number of answers"
            )
        score = score_completion(
            pc,
            ref,
            text=texts[i] if texts is not None else None,
            truncated=bool(truncated[i]) if truncated is not None else False,
            extraction=extraction,
            timeout=timeout,
        )
        out[i] = torch.tensor(score.rewards, dtype=torch.float32)
    return out


def _completion_text(c: Any) -> str:
    """TRL passes plain strings, or conversational completions: a list of message dicts."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return str(c.get("content", ""))
    if isinstance(c, (list, tuple)):
        parts = [m.get("content", "") if isinstance(m, dict) else str(m) for m in c]
        return str(parts[-1]) if parts else ""
    return "" if c is None else str(c)


def accuracy_reward(
    prompts: Sequence[Any] | None,
    completions: Sequence[Any],
    answer: Sequence[Any],
    n_problems: Sequence[int] | None = None,
    *,
    extraction: str = "strict",
    **kw: Any,
) -> list[list[float]]:
    """TRL-style per-instance accuracy reward.

    ``completions[i]`` is a string (or a conversational list of messages; the last message's
    content is used); ``answer[i]`` is the list of N reference answers for completion i (a bare
    string means N = 1); ``n_problems[i]`` defaults to ``len(answer[i])``. An optional
    ``truncated`` column (list of bools) marks completions that hit the token budget. Returns one
    list of N floats (1.0 / 0.0) per completion. ``extraction`` is ``"strict"`` or ``"flexible"``
    (bind it with :func:`functools.partial`).
    """
    check_extraction(extraction)
    if len(answer) != len(completions):
        raise ValueError(
            f"accuracy_reward: {len(completions)} completions but {len(answer)} answer rows; the "
            "'answer' column must hold one list of N reference answers per completion"
        )
    truncated = kw.get("truncated")
    out: list[list[float]] = []
    for i, (c, refs) in enumerate(zip(completions, answer)):
        refs = [refs] if isinstance(refs, str) else [str(r) for r in refs]
        n = int(n_problems[i]) if n_problems is not None else len(refs)
        if n != len(refs):
            raise ValueError(
                f"accuracy_reward: completion {i} has n_problems={n} but {len(refs)} reference answers"
            )
        trunc = bool(truncated[i]) if truncated is not None else False
        text = _completion_text(c)
        pc = parse_completion(text, n, truncated=trunc)
        out.append(score_completion(pc, refs, text=text, truncated=trunc, extraction=extraction).rewards)
    return out


_POOL: ProcessPoolExecutor | None = None
_POOL_WORKERS = 0


def _get_pool(workers: int) -> ProcessPoolExecutor:
    global _POOL, _POOL_WORKERS
    if _POOL is None or _POOL_WORKERS != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL = ProcessPoolExecutor(max_workers=workers)
        _POOL_WORKERS = workers
    return _POOL


def score_completions(
    texts: Sequence[str],
    n_problems: int,
    answers: Sequence[Any],
    *,
    workers: int = 0,
    truncated: Sequence[bool] | None = None,
    timeout: float = 2.0,
    extraction: str = "strict",
) -> tuple[list[ParsedCompletion], torch.Tensor]:
    """Parse and verify ``texts``; returns ``(parsed, rewards [len(texts), n_problems])``.

    ``answers`` is N references shared by all texts or one list of N per text. With
    ``workers > 0`` the work is split into chunks over a :class:`ProcessPoolExecutor` of that many
    processes (kept alive between calls and reused while ``workers`` stays the same); with
    ``workers=0`` it runs in this process. ``extraction``: ``"strict"`` or ``"flexible"``.
    """
    check_extraction(extraction)
    texts = list(texts)
    g = len(texts)
    refs = _per_completion_answers(answers, g) if g else []
    for i, r in enumerate(refs):
        if len(r) != n_problems:
            raise ValueError(f"score_completions: text {i} has {len(r)} reference answers, n_problems={n_problems}")
    trunc = [False] * g if truncated is None else [bool(t) for t in truncated]
    if len(trunc) != g:
        raise ValueError(f"score_completions: {len(trunc)} truncated flags for {g} texts")
    items = [(t, n_problems, r, tr, float(timeout), extraction) for t, r, tr in zip(texts, refs, trunc)]
    if workers and workers > 0 and g > 1:
        pool = _get_pool(int(workers))
        n_chunks = min(g, int(workers) * 8)
        size = math.ceil(g / n_chunks)
        chunks = [items[i : i + size] for i in range(0, g, size)]
        results = []
        for part in pool.map(score_chunk, chunks):
            results.extend(part)
    else:
        results = score_chunk(items)
    parsed = [p for p, _ in results]
    rewards = torch.tensor([r for _, r in results], dtype=torch.float32).reshape(g, n_problems)
    return parsed, rewards


def _check_rewards(rewards: Any) -> list[torch.Tensor]:
    if isinstance(rewards, torch.Tensor):
        raise TypeError(
            "compute_advantages: pass a list of [G, N_b] tensors (one per prompt), not a single tensor; "
            "wrap it as [rewards]"
        )
    out = []
    for b, r in enumerate(rewards):
        r = torch.as_tensor(r)
        if r.dim() != 2 or r.shape[0] < 1 or r.shape[1] < 1:
            raise ValueError(
                f"compute_advantages: rewards[{b}] must be a non-empty [G, N] tensor "
                f"(G generations x N instances), got shape {tuple(r.shape)}"
            )
        r = r.to(torch.float32)
        if not torch.isfinite(r).all():
            raise ValueError(f"compute_advantages: rewards[{b}] holds NaN or inf values")
        out.append(r)
    return out


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std like TRL (torch.std), 0 where fewer than two values."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros(()) if dim is None else torch.zeros_like(x.select(dim, 0))
    return x.std() if dim is None else x.std(dim=dim)


def compute_advantages(
    rewards: Sequence[torch.Tensor],
    *,
    scale_rewards: str = "group",
    advantage_mode: str = "instance",
    eps: float = 1e-4,
    batch_std: float | None = None,
) -> list[torch.Tensor]:
    """Group-relative advantages for each prompt's ``[G, N_b]`` reward matrix.

    ``advantage_mode="instance"`` (BCR): each instance position n is its own group of G rewards;
    ``A[g, n] = (r[g, n] - mean_g r[:, n]) / (s + eps)`` with

    * ``scale_rewards="group"``: ``s = std_g r[:, n]`` (unbiased, as TRL);
    * ``"batch"``: ``s`` = std of *all* rewards of all prompts in ``rewards`` (as TRL's batch
      scaling: centred per group, scaled by the batch std);
    * ``"none"``: no division (``A = r - mean``; ``eps`` unused) — Dr. GRPO.

    ``advantage_mode="sequence"`` (the ordinary GRPO baseline on a bundle): the per-sample mean
    reward over the N instances, ``m[g] = mean_n r[g, n]``, is normalised over G the same way (batch
    std over all ``m`` values of all prompts) and broadcast to ``[G, N_b]``.
    ``batch_std`` (``"batch"`` scaling only) replaces the std computed from ``rewards``: a data-parallel
    trainer passes the std over the rewards of *all* ranks (the global batch), so the advantages do not
    depend on how the batch is split.
    Returns float32 tensors of the input shapes.
    """
    if scale_rewards not in _SCALES:
        raise ValueError(f"compute_advantages: scale_rewards must be one of {_SCALES}, got {scale_rewards!r}")
    if advantage_mode not in _MODES:
        raise ValueError(f"compute_advantages: advantage_mode must be one of {_MODES}, got {advantage_mode!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"compute_advantages: eps must be a finite number >= 0, got {eps!r}")
    rs = _check_rewards(rewards)
    if not rs:
        return []
    if advantage_mode == "sequence":
        vals = [r.mean(dim=1, keepdim=True) for r in rs]  # [G, 1]
    else:
        vals = rs
    if scale_rewards == "batch":
        if batch_std is None:
            batch_std = _std(torch.cat([v.reshape(-1) for v in vals]))
        elif not (math.isfinite(batch_std) and batch_std >= 0):
            raise ValueError(f"compute_advantages: batch_std must be a finite number >= 0, got {batch_std!r}")
    out = []
    for r, v in zip(rs, vals):
        centred = v - v.mean(dim=0, keepdim=True)
        if scale_rewards == "group":
            adv = centred / (_std(v, dim=0).unsqueeze(0) + eps)
        elif scale_rewards == "batch":
            adv = centred / (batch_std + eps)
        else:
            adv = centred
        out.append(adv.expand_as(r).contiguous() if advantage_mode == "sequence" else adv)
    return out


def length_penalty_rewards(
    lengths: Sequence[int] | torch.Tensor,
    correct: Sequence[float] | torch.Tensor,
    *,
    method: str = "kimi",
    target_length: int | Sequence[int] | torch.Tensor | None = None,
    alpha: float = 0.0003,
) -> torch.Tensor:
    """Explicit length-penalty rewards for G completions of one prompt — **baselines only**.

    ``lengths``: completion lengths in tokens ``[G]``; ``correct``: correctness ``[G]`` (bools or
    accuracies in [0, 1]; for N > 1 pass e.g. the per-sample mean instance accuracy, and a value
    > 0.5 counts as correct for ``"kimi"``).

    * ``method="kimi"`` — Kimi k1.5 (Kimi Team, "Kimi k1.5: Scaling Reinforcement Learning with
      LLMs", arXiv:2501.12599, Sec. 2.3.3): ``lam_i = 0.5 - (len_i - min_len) / (max_len - min_len)``
      over the group; the length reward is ``lam_i`` for a correct response and ``min(0, lam_i)`` for
      a wrong one (0 for everyone when all lengths are equal). It is *added* to the accuracy reward
      by the caller (the paper weights it and warms it up).
    * ``method="l1"`` — L1 / LCPO-Exact (Aggarwal & Welleck, "L1: Controlling How Long A Reasoning
      Model Thinks With Reinforcement Learning", arXiv:2503.04697): the full reward
      ``correct_i - alpha * |target_length - len_i|`` (alpha = 0.0003 as in the paper).
    * ``method="linear"`` — a plain per-token penalty: ``-alpha * len_i`` for every completion,
      correct or not (the caller adds it to the accuracy reward; with ``alpha = 1 / budget`` a
      completion that fills the budget costs 1).

    Returns float32 ``[G]``. BCR does not use these; they exist for comparisons.
    """
    ln = torch.as_tensor(lengths, dtype=torch.float32).reshape(-1)
    cr = torch.as_tensor(correct, dtype=torch.float32).reshape(-1)
    if ln.shape != cr.shape:
        raise ValueError(f"length_penalty_rewards: {ln.numel()} lengths but {cr.numel()} correctness values")
    if method == "kimi":
        if ln.numel() == 0:
            return ln
        lo, hi = ln.min(), ln.max()
        if hi <= lo:
            return torch.zeros_like(ln)
        lam = 0.5 - (ln - lo) / (hi - lo)
        return torch.where(cr > 0.5, lam, torch.clamp(lam, max=0.0))
    if method == "l1":
        if target_length is None:
            raise ValueError("length_penalty_rewards(method='l1') needs target_length (tokens)")
        tgt = torch.as_tensor(target_length, dtype=torch.float32)
        return cr - float(alpha) * (tgt - ln).abs()
    if method == "linear":
        return -float(alpha) * ln
    raise ValueError(f"length_penalty_rewards: method must be 'kimi', 'l1' or 'linear', got {method!r}")
