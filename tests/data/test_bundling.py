"""Tests for bcr.data.bundling: coverage per epoch, determinism, mixes of N, errors."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcr.data.bundling import Bundler, BundleStream, bundle_sequential
from bcr.task.synthetic import make_arithmetic_problems


def _ids(bundles):
    return [p for b in bundles for p in b]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 60), n=st.integers(1, 60), seed=st.integers(-5, 2**40), epoch=st.integers(0, 50),
       drop_last=st.booleans())
def test_int_n_each_problem_once(size, n, seed, epoch, drop_last):
    n = min(n, size)
    items = list(range(size))
    b = Bundler(items, n, seed=seed, drop_last=drop_last)
    bundles = b.epoch_bundles(epoch)
    flat = _ids(bundles)
    assert len(flat) == len(set(flat))
    assert all(len(x) == n for x in bundles[:-1])
    if drop_last:
        assert all(len(x) == n for x in bundles)
        assert len(flat) == size - size % n
    else:
        assert sorted(flat) == items
    assert len(b) == len(bundles) == b.num_bundles(epoch)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 80),
       weights=st.dictionaries(st.integers(1, 8), st.floats(0.01, 10.0), min_size=1, max_size=4),
       seed=st.integers(0, 1000), epoch=st.integers(0, 20), drop_last=st.booleans())
def test_weighted_n_each_problem_once(size, weights, seed, epoch, drop_last):
    weights = {k: w for k, w in weights.items() if k <= size} or {1: 1.0}
    items = list(range(size))
    b = Bundler(items, weights, seed=seed, drop_last=drop_last)
    bundles = b.epoch_bundles(epoch)
    flat = _ids(bundles)
    assert len(flat) == len(set(flat))
    assert all(len(x) in weights for x in bundles[:-1])
    if drop_last:
        assert all(len(x) in weights for x in bundles)
        assert size - len(flat) < max(weights)  # only a final partial bundle is dropped
    else:
        assert sorted(flat) == items
    assert bundles == b.epoch_bundles(epoch)
    assert b.num_bundles(epoch) == len(bundles)


def test_deterministic_and_epochs_differ():
    probs = make_arithmetic_problems(64, seed=0)
    a = Bundler(probs, 4, seed=1)
    b = Bundler(list(probs), 4, seed=1)
    assert a.epoch_bundles(0) == b.epoch_bundles(0)
    assert a.epoch_bundles(3) == b.epoch_bundles(3)
    assert a.epoch_bundles(0) != a.epoch_bundles(1)
    assert a.epoch_bundles(0) != Bundler(probs, 4, seed=2).epoch_bundles(0)
    assert [p.id for p in _ids(a.epoch_bundles(0))] != [p.id for p in probs]  # actually shuffled
    assert len(a) == 16


def test_no_global_rng_used_or_disturbed():
    import numpy as np
    import torch

    probs = list(range(50))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ref = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    first = Bundler(probs, {2: 1, 3: 2}, seed=5).epoch_bundles(2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == ref
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert Bundler(probs, {2: 1, 3: 2}, seed=5).epoch_bundles(2) == first


def test_weighted_mix_follows_weights():
    b = Bundler(list(range(4000)), {1: 1.0, 4: 3.0}, seed=0)
    sizes = Counter(len(x) for x in b.epoch_bundles(0))
    frac_1 = sizes[1] / (sizes[1] + sizes[4])
    assert 0.18 < frac_1 < 0.32  # expected 0.25
    assert b.n_problems == {1: 0.25, 4: 0.75}


def test_drop_last_false_keeps_partial():
    b = Bundler(list(range(10)), 4, drop_last=False)
    bundles = b.epoch_bundles(0)
    assert [len(x) for x in bundles] == [4, 4, 2] and len(b) == 3
    assert len(Bundler(list(range(10)), 4)) == 2


@pytest.mark.parametrize("n,exc", [
    (0, ValueError), (-1, ValueError), (11, ValueError), ({}, ValueError), ({2: 0.0}, ValueError),
    ({2: -1.0}, ValueError), ({2: float("nan")}, ValueError), ({0: 1.0}, ValueError), ({20: 1.0}, ValueError),
    (2.5, TypeError), (True, TypeError),
])
def test_errors(n, exc):
    with pytest.raises(exc):
        Bundler(list(range(10)), n)


def test_error_messages_name_the_fix():
    with pytest.raises(ValueError, match="n_problems <= 3"):
        Bundler([1, 2, 3], 4)
    with pytest.raises(ValueError, match="positive"):
        Bundler([1, 2, 3], {1: 0})
    with pytest.raises(ValueError, match="empty"):
        Bundler([], 1)
    with pytest.raises(ValueError):
        Bundler([1, 2], 1).epoch_bundles(-1)


def test_bundle_sequential():
    assert bundle_sequential(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert bundle_sequential(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert bundle_sequential([1, 2], 5) == [[1, 2]]
    assert bundle_sequential([], 2) == []
    with pytest.raises(ValueError):
        bundle_sequential([1], 0)


@pytest.mark.parametrize("n", [3, {1: 1.0, 2: 2.0}])
def test_bundle_stream_walks_epoch_after_epoch_and_splits_steps_over_ranks(n):
    bundler = Bundler(list(range(20)), n, seed=4)
    epochs = [bundler.epoch_bundles(e) for e in range(4)]
    flat = [b for e in epochs for b in e]  # the endless stream, written out
    stream = BundleStream(bundler, 3)
    assert [stream.bundle(j) for j in range(len(flat))] == flat
    assert [b for s in range(4) for _, b in stream.step_bundles(s)] == flat[:12]
    assert [j for j, _ in stream.step_bundles(2)] == [6, 7, 8]
    for world in (2, 3):  # the ranks' shares of a step are disjoint and cover it, in order
        shares = [BundleStream(bundler, 3, rank=r, world_size=world).step_bundles(5) for r in range(world)]
        assert sorted(j for share in shares for j, _ in share) == [15, 16, 17]
        assert shares[0][0] == (15, flat[15])
    sizes = [len(e) for e in epochs]
    assert stream.locate(sizes[0]) == (1, 0) and stream.locate(sizes[0] + sizes[1] + 1) == (2, 1)
    assert stream.epoch_progress(0) == 0.0
    step = sizes[0] // 3 + 1
    assert stream.epoch_progress(step) == pytest.approx(1 + (step * 3 - sizes[0]) / sizes[1])
    assert stream.total_steps(7, 2.0) == 7
    assert stream.total_steps(-1, 2.0) == (sizes[0] + sizes[1]) // 3
    assert stream.total_steps(-1, 1.5) == (sizes[0] + int(0.5 * sizes[1])) // 3
    assert stream.total_steps(-1, 0.01) == 1


def test_bundle_stream_needs_a_bundle_per_rank():
    with pytest.raises(ValueError, match="raise bundles_per_step"):
        BundleStream(Bundler(list(range(10)), 2), 1, rank=0, world_size=2)
