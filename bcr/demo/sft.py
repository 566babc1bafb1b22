"""Stage 1 of the demo, the SFT warm-up: its stream of batches and its training loop.

A batch is ``sft.batch_size`` bundles of one N (similar lengths), each one example: prompt +
target + EOS (:func:`bcr.demo.task.sft_example`). The loss is the mean negative log-likelihood of
the target tokens over the whole batch, computed one of two ways on the very same batches:

- packed (``sft.packed=true``), the RL step's forward: the examples as
  :class:`bcr.rl.packing.Sample` objects in one padding-free row (:func:`bcr.rl.packing.pack_row`),
  the decoder with varlen attention (:func:`bcr.rl.trainer.training_attention`, set on the model
  once for the whole loop) and the fused LM head at the target tokens only
  (:func:`bcr.rl.trainer.completion_logprobs`); loss = ``-logprobs.mean()``;
- padded (the default): right-padded ``[B, L]`` batches and the model's own loss (``labels`` -100 on prompt and
  padding tokens: the same token mean).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bcr.data.bundling import Bundler
from bcr.data.problems import Problem
from bcr.rl.packing import PackedBatch, Sample, pack_row
from bcr.rl.trainer import attention_implementation, completion_logprobs, training_attention
from bcr.runtime.metrics import progress_bar
from bcr_kernels.transformers_attention import ATTN_IMPLEMENTATION, check_supported

from .config import DemoConfig, SFTConfig
from .task import sft_example

#: one SFT example: the token ids of prompt + target + EOS, and the number of prompt tokens
Example = tuple[list[int], int]
LossFn = Callable[[list[Example]], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The batch stream
# ----------------------------------------------------------------------------------------------
def sft_bundle_batches(train: list[Problem], cfg: DemoConfig) -> Iterator[list[list[Problem]]]:
    """An endless stream of batches of bundles; each batch has one N (similar lengths, little padding)."""
    size = cfg.sft.batch_size
    bundler = Bundler(train, {n: 1.0 for n in cfg.sft.n_values}, seed=cfg.seed)
    epoch = 0
    while True:
        by_n: dict[int, list] = {}
        for bundle in bundler.epoch_bundles(epoch):
            by_n.setdefault(len(bundle), []).append(bundle)
        batches = [bundles[i: i + size] for bundles in by_n.values() for i in range(0, len(bundles) - size + 1, size)]
        random.Random(f"demo-sft:{cfg.seed}:{epoch}").shuffle(batches)
        yield from batches
        epoch += 1


def sft_batches(train: list[Problem], tokenizer, cfg: DemoConfig) -> Iterator[list[Example]]:
    """The stream of SFT batches, each a list of :func:`bcr.demo.task.sft_example` (either path's input)."""
    for bundles in sft_bundle_batches(train, cfg):
        yield [sft_example(b, tokenizer, cfg.template) for b in bundles]


# ----------------------------------------------------------------------------------------------
# The two losses
# ----------------------------------------------------------------------------------------------
def collate(examples: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels are -100 on prompt and padding tokens."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, labels


def pack(examples: list[Example]) -> PackedBatch:
    """The examples in one padding-free row: prompt ids, then target ids (EOS included) as the completion."""
    samples = [Sample(prompt_ids=ids[:n_prompt], completion_ids=ids[n_prompt:], advantages=[1.0])
               for ids, n_prompt in examples]
    return pack_row(samples)


def padded_loss(model, examples: list[Example], pad: int) -> torch.Tensor:
    """The model's own token-mean cross-entropy over the target tokens of a right-padded batch."""
    input_ids, attention, labels = collate(examples, pad)
    return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss


def packed_loss(model, examples: list[Example], attn_implementation: str) -> torch.Tensor:
    """``-mean`` of the target tokens' log-probs on the packed row (the same token mean as :func:`padded_loss`)."""
    row = pack(examples)
    return -completion_logprobs(model, row, attn_implementation=attn_implementation).logp.mean()


@contextlib.contextmanager
def sft_loss(model, sft: SFTConfig, pad: int) -> Iterator[LossFn]:
    """The loss of ``sft.packed``'s path, as ``loss(examples)``. The packed path sets the training
    attention on ``model`` once, for the whole block (a backward that recomputes activations must see
    the same implementation), and restores the previous one afterwards, so a model saved after
    training loads with its default attention anywhere."""
    if not sft.packed:
        yield lambda examples: padded_loss(model, examples, pad)
        return
    name = training_attention()
    if name == ATTN_IMPLEMENTATION:
        check_supported(model)  # an attention feature bcr_varlen lacks fails here, not mid-training
    with attention_implementation(model, name):
        yield lambda examples: packed_loss(model, examples, name)


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
def warmup_cosine(steps: int):
    """Linear warm-up over a twentieth of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_at


def make_optimizer(model, sft: SFTConfig):
    """AdamW at ``sft.learning_rate`` and its warm-up + cosine schedule over ``sft.steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=sft.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(sft.steps))


def sft_step(model, optimizer, scheduler, loss_fn: LossFn, examples: list[Example]) -> float:
    """One optimizer step on one batch: loss, backward, gradient-norm clipping at 1, AdamW, schedule."""
    loss = loss_fn(examples)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def train_sft(model, batches: Iterator[list[Example]], sft: SFTConfig, *, pad_token_id: int, seed: int,
              progress: bool, checkpoint: Path | None = None) -> list[dict]:
    """The plain AdamW loop of stage 1; returns one ``{"step", "loss", "lr"}`` row per step.

    With ``checkpoint`` (a file) and ``sft.checkpoint_every``: the loop's whole state (weights,
    AdamW, schedule, torch's RNG, the log so far, the seconds spent) is saved there every that many
    steps and at the end, and a loop that finds the file continues from it (the batches before it
    are drawn and dropped), so a run killed and started again trains the same model as one that was
    not (``tests/demo/test_sft_checkpoint.py``). The caller makes sure the file is this run's."""
    torch.manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, sft)
    log: list[dict] = []
    spent = {"wall": 0.0, "cpu": 0.0}
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        log, spent = state["log"], state["spent"]
        for _ in range(len(log)):
            next(batches)
    every = sft.checkpoint_every if checkpoint is not None else 0
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def save() -> None:
        now = {"wall": spent["wall"] + time.perf_counter() - wall0, "cpu": spent["cpu"] + time.process_time() - cpu0}
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "log": log, "spent": now}, tmp)
        os.replace(tmp, checkpoint)

    model.train()
    smooth = log[-1]["loss"] if log else None
    with sft_loss(model, sft, pad_token_id) as loss_fn, progress_bar(progress) as bar:
        task = bar.add_task("sft", total=sft.steps, completed=len(log), info="")
        for step in range(len(log), sft.steps):
            value = sft_step(model, optimizer, scheduler, loss_fn, next(batches))
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            log.append({"step": step + 1, "loss": value, "lr": scheduler.get_last_lr()[0]})
            bar.update(task, advance=1, info=f"loss {smooth:.3f}")
            if every and ((step + 1) % every == 0 or step + 1 == sft.steps):
                save()
    model.eval()
    return log


def checkpoint_seconds(folder: Path) -> dict[str, float]:
    """Wall and CPU seconds of training kept in the SFT checkpoints of ``folder`` (work done by
    earlier, killed attempts of the stage; the steps after their last save are not counted)."""
    total = {"wall": 0.0, "cpu": 0.0}
    for path in sorted(Path(folder).glob("*.pt")):
        spent = torch.load(path, weights_only=False)["spent"]
        total = {k: total[k] + spent[k] for k in total}
    return total
