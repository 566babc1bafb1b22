"""Rollout engines: sample ``num_generations`` completions for each prompt.

Every engine implements the small ``RolloutEngine`` protocol:

- ``generate(prompts, *, num_generations, max_new_tokens, temperature, top_p, top_k, seed)`` returns one list of
  ``Generation`` per prompt; ``max_new_tokens`` is one budget for all prompts or one per prompt;
  ``seed`` is an int (prompt ``i`` then uses the seed derived from ``(seed, i)``) or one seed per prompt.
  Each completion is a pure function of (prompt, its seed, its index in the group, the weights): it does
  not depend on which other prompts share the call. The trainer relies on this for exact resume and
  for results that do not depend on the number of processes.
- ``sync_weights(model)`` makes the engine sample from the trainer's current weights (checked, or it raises).
- ``context_length``: the most tokens (prompt + completion) one sequence may hold (None: unknown).

Every engine reports, per completion token, the log-prob of the distribution the token was drawn from
(``Generation.sampling_logprobs``): ``log_softmax(logits / temperature)``, and with top-p / top-k the
log-prob renormalised over the kept tokens. That is the rollout correction's denominator (the sampler's
policy); at ``top_p = 1``, ``top_k = 0`` it equals the tempered log-prob the trainer recomputes.

``HFEngine`` decodes with the trainer's own ``transformers`` model (batched over prompts x G, left padding,
KV cache). It draws each sampled token itself from a per-row ``torch.Generator`` (``_SeededSampler``), so
the global RNG is never touched. Two decoding paths give the same tokens for the same seeds:
``decode="loop"`` (default) is a short prefill + one-token-per-step loop over a ``DynamicCache`` that drops
finished rows from the batch; ``decode="generate"`` runs ``model.generate`` with the sampler as a logits
processor. With ``shared_prefill`` (default; loop only) each distinct prompt of a batch is prefilled once
and its KV cache and last logits are copied to its G rows, so the prompt costs one forward, not G.
``VLLMEngine`` (vLLM in this process, :mod:`bcr.models.vllm_engine`) is ``make_engine("vllm", ...)``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when the model stopped by itself
    text: str  # decoded completion, special tokens skipped
    truncated: bool  # True when no EOS came within max_new_tokens
    #: the engine's log-prob of each completion token under the distribution it was drawn from:
    #: log softmax(logits / temperature), renormalised over the top-p / top-k set when those are set
    #: (the rollout correction's denominator). None: not reported.
    #: Not part of equality: the same tokens drawn in another batch (padding, prefill sharing) carry
    #: log-probs equal only up to float noise.
    sampling_logprobs: list[float] | None = field(default=None, compare=False)


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: list[str],
        *,
        num_generations: int,
        max_new_tokens: int | list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Generation]]: ...

    def sync_weights(self, model) -> None: ...

    context_length: int | None


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (order matters)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _prompt_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, (int, np.integer)):
        return [derive_seed(int(seed), i) for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt or a single int")
    return seeds


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, (int, np.integer)) else list(max_new_tokens)
    if len(budgets) != n:
        raise ValueError(f"got {len(budgets)} max_new_tokens values for {n} prompts")
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 1, got {budgets}")
    return budgets


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation_config EOS."""
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end")
    return ids


class _SeededSampler:
    """A logits processor that samples each row's next token from that row's own ``torch.Generator``.

    It applies temperature, top-k and top-p, draws the token, records the token's log-prob under that
    (renormalised) distribution, and returns scores that are -inf everywhere but at the drawn token, so
    greedy decoding (``do_sample=False``) emits exactly that token.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, top_k: int = 0):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.logprobs: list[list[float]] = [[] for _ in seeds]  # per row, one per drawn token

    def sample(self, scores: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """One token per row of ``scores`` ([B, vocab]); row ``j`` uses generator ``rows[j]`` (default ``j``)."""
        generators = self.generators if rows is None else [self.generators[i] for i in rows]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        log_kept = torch.zeros_like(probs[:, :1])  # log of the tempered mass that top-k / top-p keep
        if 0 < self.top_k < probs.shape[-1]:  # keep the k most likely tokens
            kth = probs.topk(self.top_k, dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)
            log_kept = log_kept + probs.sum(-1, keepdim=True).log()
            probs = probs / probs.sum(-1, keepdim=True)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = (cum - sorted_p) >= self.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            log_kept = log_kept + probs.sum(-1, keepdim=True).log()
            probs = probs / probs.sum(-1, keepdim=True)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
        cdf = probs.double().cumsum(-1)
        cdf = cdf / cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u.to(cdf.device)[:, None]).clamp(max=probs.shape[-1] - 1)
        tokens = torch.where(probs.gather(-1, tokens) > 0, tokens, probs.argmax(-1, keepdim=True))
        tempered = torch.log_softmax(scores.float() / self.temperature, dim=-1).gather(-1, tokens)
        drawn = (tempered - log_kept)[:, 0].tolist()  # the log-prob under the distribution drawn from
        for j, lp in enumerate(drawn):
            self.logprobs[j if rows is None else rows[j]].append(lp)
        return tokens[:, 0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The logits-processor form (for ``model.generate``): -inf everywhere but at the drawn token."""
        tokens = self.sample(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, tokens[:, None], 0.0)


class HFEngine:
    """Sampling on the trainer's own model (so ``sync_weights`` is a no-op).

    ``decode="loop"`` (default): ``_decode_loop``, a plain prefill + KV-cache decode loop, 1.05-1.25x
    faster than ``model.generate`` on small models (benchmarks/profile_rollout.py), same tokens.
    ``decode="generate"``: ``model.generate`` with the seeded sampler as its logits processor. Note that
    ``generate`` also applies processors named in the model's own ``generation_config`` (e.g. a
    ``repetition_penalty``); the loop samples from the plain tempered (top-p) model distribution, the one
    the trainer scores. ``compact_finished`` (loop only): drop finished rows from the batch and the KV
    cache once at most half of the current rows are still running. ``shared_prefill`` (loop only): prefill
    each distinct prompt of a batch once and give its KV cache to every row that continues it.
    """

    DECODE_MODES = ("loop", "generate")

    def __init__(self, model, tokenizer, *, max_prompt_length: int | None = None, batch_size: int | None = None,
                 decode: str = "loop", compact_finished: bool = True, shared_prefill: bool = True):
        if decode not in self.DECODE_MODES:
            raise ValueError(f"unknown decode {decode!r}; use one of {self.DECODE_MODES}")
        self.decode = decode
        self.compact_finished = compact_finished
        self.shared_prefill = shared_prefill
        self.prefill_tokens = 0  # prompt tokens (padding included) the prefills of this engine processed
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self._warned_truncation = False

    @property
    def context_length(self) -> int | None:
        """The model config's ``max_position_embeddings`` (None when it has none)."""
        value = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(value) if value else None

    def sync_weights(self, model) -> None:
        self.model = model  # the trainer's own model: nothing to copy

    def _encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            if not self._warned_truncation:
                warnings.warn(
                    f"a prompt of {len(ids)} tokens is longer than max_prompt_length={self.max_prompt_length}; "
                    "it is cut from the left (raise max_prompt_length or lower n_problems)",
                    stacklevel=3,
                )
                self._warned_truncation = True
            ids = ids[-self.max_prompt_length :]
        return ids

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        num_generations: int,
        max_new_tokens: int | list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Generation]]:
        seeds = _prompt_seeds(seed, len(prompts))
        budgets = _budgets(max_new_tokens, len(prompts))
        prompt_ids = [self._encode(p) for p in prompts]
        # One row per (prompt, sample); rows with the same budget are generated together.
        rows = [(p, g) for p in range(len(prompts)) for g in range(num_generations)]
        by_budget: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for p, g in rows:
            by_budget[budgets[p]].append((p, g))
        results: dict[tuple[int, int], Generation] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            for budget, group in by_budget.items():
                step = self.batch_size or len(group)
                for start in range(0, len(group), step):
                    chunk = group[start : start + step]
                    row_seeds = [derive_seed(seeds[p], g) for p, g in chunk]
                    outs = self._generate_rows([prompt_ids[p] for p, _ in chunk], row_seeds, budget, temperature, top_p,
                                               top_k)
                    results.update(zip(chunk, outs))
        finally:
            self.model.train(was_training)
        return [[results[(p, g)] for g in range(num_generations)] for p in range(len(prompts))]

    def _generate_rows(self, prompts: list[list[int]], seeds: list[int], budget: int, temperature: float, top_p: float,
                       top_k: int = 0):
        device = next(self.model.parameters()).device
        sampler = _SeededSampler(seeds, temperature, top_p, top_k)
        if self.decode == "loop":
            unique, source = _distinct(prompts) if self.shared_prefill else (prompts, None)
            # the same padded width as the unshared batch, so a row's prefill sees the same shapes
            input_ids, attention_mask = _left_pad(unique, self.pad_id, width=max(len(p) for p in prompts))
            new = self._decode_loop(input_ids.to(device), attention_mask.to(device), sampler, budget, source)
        else:
            input_ids, attention_mask = _left_pad(prompts, self.pad_id)
            new = self._decode_generate(input_ids.to(device), attention_mask.to(device), sampler, budget)
        generations = []
        for ids, completion, logprobs in zip(prompts, new, sampler.logprobs):
            completion, truncated = _cut_at_eos(completion, self.eos_ids)
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            generations.append(Generation(list(ids), completion, text, truncated, logprobs[: len(completion)]))
        return generations

    def _decode_generate(self, input_ids, attention_mask, sampler: _SeededSampler, budget: int) -> list[list[int]]:
        from transformers import GenerationConfig, LogitsProcessorList

        config = GenerationConfig(
            do_sample=False,  # _SeededSampler draws the token; greedy then picks it
            num_beams=1,
            max_new_tokens=budget,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
        return out[:, input_ids.shape[1] :].tolist()

    def _decode_loop(self, input_ids, attention_mask, sampler: _SeededSampler, budget: int,
                     source: list[int] | None = None) -> list[list[int]]:
        """Prefill the left-padded prompts, then feed one sampled token per step through the KV cache.

        ``source[j]`` is the prefilled row that output row ``j`` continues (None: row ``j`` itself): the
        prefill runs once per distinct prompt, then the cache and the last logits are gathered to the
        output rows, and decoding goes on as if every row had been prefilled on its own.
        Returns each row's new tokens (pad after its EOS; cut by the caller). ``rows`` maps the current
        batch to the original rows; with ``compact_finished`` the finished rows leave the batch (and
        the cache) once they are at least half of it, so the later steps run on fewer rows.
        """
        from transformers import DynamicCache

        model, device = self.model, input_ids.device
        mask = attention_mask
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate derives from the mask
        cache = DynamicCache(config=model.config)
        cache_kw = {_cache_kwarg(model): cache}
        if _accepts(model, "logits_to_keep"):
            cache_kw["logits_to_keep"] = 1
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw)
        self.prefill_tokens += input_ids.numel()
        cache_kw.pop("logits_to_keep", None)
        logits = out.logits[:, -1, :]
        if source is not None:
            index = torch.tensor(source, device=device)
            cache.batch_select_indices(index)
            logits, mask, positions = logits[index], mask[index], positions[index]
        B = logits.shape[0]
        eos = torch.tensor(self.eos_ids, device=device)
        tokens = torch.full((B, budget), self.pad_id, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)  # original row of each current batch row
        rows_list = list(range(B))
        done = torch.zeros(B, dtype=torch.bool, device=device)
        position = positions[:, -1:]
        for step in range(budget):
            nxt = sampler.sample(logits.float(), rows_list)
            nxt = nxt.masked_fill(done, self.pad_id)
            tokens[rows, step] = nxt
            done = done | torch.isin(nxt, eos)
            n_done = int(done.sum())
            if n_done == len(rows_list) or step == budget - 1:
                break
            if self.compact_finished and 2 * n_done >= len(rows_list):
                keep = (~done).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, mask, position, nxt, done = rows[keep], mask[keep], position[keep], nxt[keep], done[keep]
                rows_list = rows.tolist()
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            position = position + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position, use_cache=True, **cache_kw)
            logits = out.logits[:, -1, :]
        return tokens[:, : step + 1].tolist()


def _distinct(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and for each input the index of its distinct prompt."""
    index: dict[tuple[int, ...], int] = {}
    source = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], source


def _left_pad(prompts: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts) if width is None else width
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        if ids:
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def _forward_params(model) -> set[str]:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return set(inspect.signature(type(inner).forward).parameters)


def _cache_kwarg(model) -> str:
    """The forward's KV-cache argument: ``cache`` (recent transformers) or ``past_key_values``."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _accepts(model, name: str) -> bool:
    return name in _forward_params(model)


def _cut_at_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], False
    return ids, True


def default_engine() -> str:
    """What ``rollout_engine="auto"`` (the trainer's default) and ``bcr solve``'s ``engine=auto`` mean:
    ``"vllm"`` where the vllm package is installed, else ``"hf"``. Why (``benchmarks/RESULTS.md``, 2-core
    CPU, 256 new tokens): vLLM generated 3.7-6.7x the HF engine's tokens per second for SmolLM2-135M at
    batch 8-64, and 4.5-5.4x for the demo's 0.55M model at batch 32-64 (a tie at batch 8); its start-up
    (7-15 s) and syncs (0.03-2 s a step) are repaid within a training run's first steps. On a GPU
    nothing is measured here; vLLM is there only if the user installed it."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(name: str, model, tokenizer, **kw) -> RolloutEngine:
    """``"hf"`` -> ``HFEngine``; ``"vllm"`` -> :class:`bcr.models.vllm_engine.VLLMEngine` (one clear
    ImportError without a working vllm); ``"served"``, or a model given as an ``http(s)://`` URL ->
    :class:`bcr.models.served.ServedEngine` (an OpenAI-compatible server)."""
    if name == "served" or (isinstance(model, str) and model.lower().startswith(("http://", "https://"))):
        from .served import ServedEngine

        return ServedEngine(model, tokenizer, **kw)
    if name == "hf":
        return HFEngine(model, tokenizer, **kw)
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, **kw)
    raise ValueError(f"unknown rollout engine {name!r}; use 'hf', 'vllm' or 'served'")
