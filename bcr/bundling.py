"""Cutting a problem set into bundles of N problems (one bundle = one BCR prompt).

:class:`Bundler` makes the training bundles of each epoch: the problems are shuffled by a private
``numpy.random.Generator`` seeded from ``(seed, epoch)`` (no global RNG is touched), then cut into
bundles, so every rank of a distributed job computes the same list and the trainer slices it.
``n_problems`` is a fixed N or a ``{N: weight}`` mix, in which case each bundle's N is drawn from
the normalised weights by the same generator until the problems run out. Each problem appears
exactly once per epoch, except those of a final partial bundle when ``drop_last=True``.

:func:`bundle_sequential` is for evaluation: order kept, the last partial bundle kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

__all__ = ["Bundler", "bundle_sequential"]

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


def bundle_sequential(problems: Sequence[T], n_problems: int) -> list[list[T]]:
    """Consecutive bundles of ``n_problems`` in the given order; the last one may be smaller (eval).

    An empty ``problems`` gives ``[]``; ``n_problems`` larger than the set gives one bundle.
    """
    if isinstance(n_problems, bool) or not isinstance(n_problems, (int, np.integer)) or n_problems < 1:
        raise ValueError(f"n_problems must be an int >= 1, got {n_problems!r}")
    items = list(problems)
    n = int(n_problems)
    return [items[i:i + n] for i in range(0, len(items), n)]
