"""Cutting a problem set into bundles of N problems (one bundle = one BCR prompt).

:class:`Bundler` makes the training bundles of each epoch: the problems are shuffled by a private
``numpy.random.Generator`` seeded from ``(seed, epoch)`` (no global RNG is touched), then cut into
bundles, so every rank of a distributed job computes the same list and the trainer slices it.
``n_problems`` is a fixed N or a ``{N: weight}`` mix, in which case each bundle's N is drawn from
the normalised weights by the same generator until the problems run out. Each problem appears
exactly once per epoch, except those of a final partial bundle when ``drop_last=True``.

:class:`BundleStream` is the trainer's endless stream of them: epoch 0's bundles, then epoch 1's, ...;
step ``s`` takes global bundles ``s * B .. (s + 1) * B - 1`` (``B = bundles_per_step``) and rank ``r``
of ``W`` takes every ``W``-th of those, starting at ``r``.

:func:`bundle_sequential` is for evaluation: order kept, the last partial bundle kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

__all__ = ["BundleStream", "Bundler", "bundle_sequential"]

T = TypeVar("T")

_SEED_TAG = 0xBC7B  # separates this generator's stream from other users of (seed, epoch)


def _check_n(n, num_problems: int, what: str = "n_problems") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"{what}={n}: a bundle holds at least 1 problem; use n_problems >= 1")
    if n > num_problems:
        raise ValueError(
            f"{what}={n} exceeds the {num_problems} problem(s) available; use n_problems <= {num_problems} "
            "or load more problems"
        )
    return n


class Bundler:
    """Deterministic per-epoch bundles of problems.

    Args:
        problems: the problems (any objects; kept in a tuple, never mutated).
        n_problems: N, or ``{N: weight}`` with positive finite weights (normalised internally).
        seed: shuffling seed; ``epoch_bundles(e)`` depends only on (problems, n_problems, seed, e).
        drop_last: drop a final bundle smaller than its N (else keep it).

    ``len(bundler)`` is the number of bundles per epoch for an int N. For a weighted N the count
    varies from epoch to epoch; ``len`` then gives epoch 0's count and :meth:`num_bundles` gives any
    epoch's.
    """

    def __init__(self, problems: Sequence[T], n_problems: int | Mapping[int, float], *, seed: int = 0,
                 drop_last: bool = True):
        self.problems: tuple = tuple(problems)
        if not self.problems:
            raise ValueError("Bundler needs at least one problem; the problem list is empty")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        total = len(self.problems)
        if isinstance(n_problems, Mapping):
            if not n_problems:
                raise ValueError("n_problems weights are empty; give at least one {N: weight}")
            sizes, weights = [], []
            for n, w in n_problems.items():
                sizes.append(_check_n(n, total, f"n_problems key {n!r}"))
                try:
                    wf = float(w)
                except (TypeError, ValueError):
                    raise ValueError(f"weight of N={n} must be a number, got {w!r}") from None
                if not math.isfinite(wf) or wf <= 0:
                    raise ValueError(f"weight of N={n} is {w!r}; weights must be positive and finite "
                                     "(remove sizes you do not want)")
                weights.append(wf)
            s = sum(weights)
            self.n_problems: int | dict[int, float] = {n: w / s for n, w in zip(sizes, weights)}
            self._sizes = np.array(sizes, dtype=np.int64)
            self._probs = np.array(weights, dtype=np.float64) / s
        else:
            self.n_problems = _check_n(n_problems, total)
            self._sizes = None
            self._probs = None

    def _generator(self, epoch: int) -> np.random.Generator:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        seq = np.random.SeedSequence([self.seed % (1 << 64), int(epoch), _SEED_TAG, int(self.seed < 0)])
        return np.random.Generator(np.random.PCG64(seq))

    def epoch_bundles(self, epoch: int) -> list[list]:
        """The bundles of ``epoch``: deterministic in (seed, epoch), identical on every rank."""
        rng = self._generator(epoch)
        order = rng.permutation(len(self.problems))
        items = [self.problems[i] for i in order]
        bundles: list[list] = []
        pos = 0
        while pos < len(items):
            if self._sizes is None:
                n = self.n_problems  # type: ignore[assignment]
            else:
                n = int(self._sizes[rng.choice(len(self._sizes), p=self._probs)])
            chunk = items[pos:pos + n]
            pos += n
            if len(chunk) < n and self.drop_last:
                break
            bundles.append(chunk)
        return bundles

    def num_bundles(self, epoch: int = 0) -> int:
        """Bundles in ``epoch`` (the same for every epoch when N is an int)."""
        if self._sizes is None:
            n, total = int(self.n_problems), len(self.problems)  # type: ignore[arg-type]
            return total // n if self.drop_last else -(-total // n)
        return len(self.epoch_bundles(epoch))

    def __len__(self) -> int:
        return self.num_bundles(0)

    def __repr__(self) -> str:
        return (f"Bundler({len(self.problems)} problems, n_problems={self.n_problems!r}, seed={self.seed}, "
                f"drop_last={self.drop_last})")


class BundleStream:
    """The endless stream of training bundles of ``bundler`` (epoch after epoch), cut into steps.

    Args:
        bundler: the per-epoch bundles.
        bundles_per_step: global bundles per training step (over all ranks).
        rank, world_size: this process's share of each step.

    Epoch counts are cached (with a weighted N each one builds the epoch) and the bundles of the
    last few epochs are kept, so walking the stream step by step builds each epoch once.
    """

    def __init__(self, bundler: Bundler, bundles_per_step: int, *, rank: int = 0, world_size: int = 1):
        if bundles_per_step < world_size:
            raise ValueError(f"bundles_per_step={bundles_per_step} is smaller than the {world_size} processes; "
                             "every rank needs a bundle: raise bundles_per_step")
        self.bundler = bundler
        self.bundles_per_step = bundles_per_step
        self.rank, self.world_size = rank, world_size
        self._sizes: dict[int, int] = {}
        self._epochs: dict[int, list] = {}

    def num_bundles(self, epoch: int) -> int:
        """Bundles in ``epoch``."""
        if epoch not in self._sizes:
            self._sizes[epoch] = self.bundler.num_bundles(epoch)
        return self._sizes[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """Global bundle ``index`` -> (epoch, index within the epoch)."""
        epoch = 0
        while index >= self.num_bundles(epoch):
            index -= self.num_bundles(epoch)
            epoch += 1
        return epoch, index

    def bundle(self, index: int) -> list:
        """The problems of global bundle ``index`` (the same on every rank)."""
        epoch, offset = self.locate(index)
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = self.bundler.epoch_bundles(epoch)
        return self._epochs[epoch][offset]

    def step_bundles(self, step: int) -> list[tuple[int, list]]:
        """This rank's (global index, problems) pairs of ``step``."""
        B = self.bundles_per_step
        return [(j, self.bundle(j)) for j in range(step * B, (step + 1) * B)][self.rank :: self.world_size]

    def total_steps(self, max_steps: int, num_train_epochs: float) -> int:
        """``max_steps`` when > 0, else the steps of ``num_train_epochs`` epochs (at least 1)."""
        if max_steps > 0:
            return max_steps
        whole, frac = int(num_train_epochs), num_train_epochs - int(num_train_epochs)
        total = sum(self.num_bundles(e) for e in range(whole))
        total += int(frac * self.num_bundles(whole))
        return max(1, total // self.bundles_per_step)

    def epoch_progress(self, step: int) -> float:
        """Epochs completed after ``step`` steps, as a fraction (1.5 = half way through epoch 1)."""
        epoch, offset = self.locate(step * self.bundles_per_step)
        return epoch + offset / self.num_bundles(epoch)


def bundle_sequential(problems: Sequence[T], n_problems: int) -> list[list[T]]:
    """Consecutive bundles of ``n_problems`` in the given order; the last one may be smaller (eval).

    An empty ``problems`` gives ``[]``; ``n_problems`` larger than the set gives one bundle.
    """
    if isinstance(n_problems, bool) or not isinstance(n_problems, (int, np.integer)) or n_problems < 1:
        raise ValueError(f"n_problems must be an int >= 1, got {n_problems!r}")
    items = list(problems)
    n = int(n_problems)
    return [items[i:i + n] for i in range(0, len(items), n)]
