"""Streamed data: read lazily, replayed exactly or refused.

Each streamed source (a shuffled DataLoader with its own generator, one with two workers, an
IterableDataset, a generator function) gives bit-identical hypergradients on repeated calls, the
same hypergradient as the list of the batches it produced (an independent replay), and reverse
= checkpointed = forward = reversible (SGD momentum 0.75, float64, <= 1e-10). A source that
reshuffles on every iteration with a private RNG raises an error naming it; a train loss with
unseeded noise makes checkpointed's replay check raise. One reverse call reads T * batch samples
of a 1,000-sample data set (nothing ahead: no workers).
"""

from __future__ import annotations

import itertools
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import hyperdiff as hd
from hyperdiff.engine.data import as_source
from hyperdiff.engine.data.permutation import permute

from conftest import decayed_mse_losses, quiet, rel_err, sine_data

D = torch.float64
STEPS, BATCH, N = 12, 4, 16  # 4 batches per epoch: 3 epochs, more steps than the window (8)


class NoisyTable(Dataset):
    """``(x_i + 0.01 * noise, y_i)``: the noise drawn from torch's RNG in ``__getitem__`` (an
    augmentation); ``reads`` counts the samples asked for (in this process)."""

    def __init__(self, n: int = N):
        self.x, self.y = sine_data(n)
        self.reads = 0

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i] + 0.01 * torch.randn(5, dtype=D), self.y[i]


class ShuffledStream(IterableDataset):
    """An IterableDataset yielding shuffled batches drawn from torch's global RNG."""

    def __init__(self, n: int = N):
        self.x, self.y = sine_data(n)

    def __iter__(self):
        order = torch.randperm(self.x.shape[0])
        for k in range(0, len(order), BATCH):
            rows = order[k : k + BATCH]
            yield self.x[rows], self.y[rows]


class ReshufflingIterable:
    """Reshuffles on every iteration from a private generator that nothing reseeds: replays
    differ."""

    def __init__(self):
        self.x, self.y = sine_data(N)
        self._rng = torch.Generator().manual_seed(0)

    def __iter__(self):
        order = torch.randperm(N, generator=self._rng)
        for k in range(0, N, BATCH):
            yield self.x[order[k : k + BATCH]], self.y[order[k : k + BATCH]]


def _generator_function():
    x, y = sine_data(N)
    order = torch.randperm(N)
    for k in range(0, N, BATCH):
        yield x[order[k : k + BATCH]], y[order[k : k + BATCH]]


def _source(kind: str):
    if kind == "loader_own_generator":
        return DataLoader(NoisyTable(), batch_size=BATCH, shuffle=True,
                          generator=torch.Generator().manual_seed(123))
    if kind == "iterable_dataset":
        return DataLoader(ShuffledStream(), batch_size=None)
    if kind == "generator_function":
        return _generator_function
    raise AssertionError(kind)


def _problem(train_data, *, steps: int = STEPS, train_loss=None):
    torch.manual_seed(1)
    net = hd.functional(nn.Linear(5, 1).double())
    fit_loss, val_loss = decayed_mse_losses(net)
    hp = hd.HyperParameters(wd=hd.per_tensor(net.params, 1e-2), lr=hd.scalar(0.1))
    return hd.make_problem(
        train_loss or fit_loss, val_loss, hp, net.params, optimizer=hd.sgd("lr", 0.75),
        train_data=train_data, val_data=sine_data(8, seed=1), steps=steps, seed=3,
    )


@pytest.mark.parametrize("kind", ["loader_own_generator", "iterable_dataset",
                                  "generator_function"])
def test_streamed_sources_replay_exactly_and_methods_agree(kind):
    data = _source(kind)
    problem = _problem(data)
    first, again = hd.reverse()(problem), hd.reverse()(problem)  # the second re-reads: T > window
    assert torch.equal(first.vector, again.vector)
    assert torch.equal(first.vector, hd.reverse()(_problem(data)).vector)  # a fresh source
    produced = [problem.train_data.batch(t, problem.seed) for t in range(STEPS)]
    assert torch.equal(first.vector, hd.reverse()(_problem(produced)).vector)
    for method in (hd.checkpointed(3), hd.forward(), hd.reversible()):
        assert rel_err(method(problem).vector, first.vector) < 1e-10, method
    if kind == "loader_own_generator":  # finite differences retrain 6 times: same batches
        reference = quiet(hd.finite_difference(), problem).vector
        assert rel_err(first.vector, reference) < 1e-7


def test_loader_with_two_workers_equals_the_main_process():
    loader = DataLoader(NoisyTable(), batch_size=BATCH, shuffle=True, num_workers=2, timeout=60)
    problem = _problem(loader)
    first = hd.reverse()(problem)
    assert torch.equal(first.vector, hd.reverse()(problem).vector)
    assert rel_err(hd.checkpointed(3)(problem).vector, first.vector) < 1e-10
    # sample seeds depend on (seed, step, position) only: the same augmentation in workers
    single = DataLoader(NoisyTable(), batch_size=BATCH, shuffle=True)
    assert torch.equal(first.vector, hd.reverse()(_problem(single)).vector)


def test_hyperdiff_owns_the_loader_shuffle():
    table = NoisyTable()
    table.x = torch.arange(N, dtype=D)[:, None].expand(N, 5)
    loaders = [DataLoader(table, batch_size=BATCH, shuffle=True,
                          generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    a, b = (as_source(loader) for loader in loaders)
    epoch = torch.cat([a.batch(t, seed=5)[1] for t in range(N // BATCH)])
    assert sorted(epoch.flatten().tolist()) == sorted(table.y.flatten().tolist())
    for t in range(6):
        assert all(torch.equal(u, v) for u, v in zip(a.batch(t, 5), b.batch(t, 5), strict=True))
    assert not torch.equal(a.batch(0, 5)[1], a.batch(0, 6)[1])  # the seed changes the order


def test_permutation_is_a_seeded_bijection():
    for n in (2, 3, 10, 97, 1000):
        p = permute(torch.arange(n), n, key=7)
        assert sorted(p.tolist()) == list(range(n))
        assert torch.equal(p[1:], permute(torch.arange(1, n), n, key=7))  # pointwise
    assert not torch.equal(permute(torch.arange(97), 97, 1), permute(torch.arange(97), 97, 2))


def test_a_source_that_reshuffles_on_replay_raises_naming_it():
    problem = _problem(ReshufflingIterable())
    hd.reverse()(problem)
    with pytest.raises(hd.HyperdiffError, match=r"ReshufflingIterable.*same batch every time "
                                                r"step 0 \(seed 3\).*DataLoader over a map-style"):
        hd.reverse()(problem)
    with pytest.raises(hd.HyperdiffError, match="ReshufflingIterable"):
        hd.checkpointed(3)(_problem(ReshufflingIterable()))


def test_checkpointed_raises_when_its_replay_differs():
    torch.manual_seed(1)
    net = hd.functional(nn.Linear(5, 1).double())
    fit, _ = decayed_mse_losses(net)

    calls = itertools.count()

    def noisy_loss(p, h, batch, ctx):  # state outside (step, seed): not a function of the step
        return fit(p, h, batch, ctx) + 0.1 * math.sin(next(calls)) * p["weight"].sum()

    problem = _problem(sine_data(N), train_loss=noisy_loss)
    with pytest.raises(hd.HyperdiffError, match=r"checkpointed: replaying steps .* must "
                                                r"reproduce the stored state"):
        hd.checkpointed(3)(problem)


def test_one_hypergradient_reads_only_the_batches_it_trains_on():
    table = NoisyTable(1000)
    problem = _problem(DataLoader(table, batch_size=BATCH, shuffle=True))  # reads steps 0, 1
    hd.reverse()(problem)
    # no workers: no prefetch window; the first sample is read twice (it draws from torch's
    # random state, so it is read again seeded, as every later sample is at once)
    assert table.reads == STEPS * BATCH + 1
    table.reads = 0
    problem.train_data.batch(10**6, problem.seed)  # random access: one batch of epoch 4000
    assert table.reads == BATCH


class _Once:
    """Re-iterable in name only: every iteration continues the same iterator."""

    def __init__(self, batches):
        self.iterator = iter(batches)

    def __iter__(self):
        return self.iterator


def test_clear_errors_for_data_that_is_not_a_stream_of_tensor_batches():
    x, y = sine_data(N)
    batches = [(x[k : k + BATCH], y[k : k + BATCH]) for k in range(0, N, BATCH)]
    cases = [
        ("abc", r"train_data must be a tensor.*got str 'abc': text is not data"),
        (b"abc", "text is not data"),
        ([1, 2], r"train_data\[0\] must be a tensor or a tuple/list/dict of tensors"),
        (DataLoader(["a", "b", "c", "d"], batch_size=2), "step 0 from train_data DataLoader"),
        (_Once(batches), r"_Once .*empty epoch 1 at step 4"),
        (DataLoader(ShuffledStream(0), batch_size=None), "empty epoch 0"),
        (DataLoader(NoisyTable(2), batch_size=4, drop_last=True), "got an empty epoch: 2 samp"),
        (iter(batches[:3]), "ran out after 3 batches, but steps=12"),
        (lambda: (x, y), "a function of no arguments, must return an iterator"),
    ]
    for data, message in cases:
        with pytest.raises(hd.HyperdiffError, match=message):
            hd.reverse()(_problem(data))
    workers = DataLoader(NoisyTable(N), batch_size=BATCH, num_workers=2)  # prefetch 2 x 2
    for window in ("8", None, 0):  # refused before the prefetch room is added
        with pytest.raises(hd.HyperdiffError, match="data: window must be a positive int"):
            hd.data.stream(workers, window=window)
    with pytest.raises(hd.HyperdiffError, match="val_data must be .*text is not data"):
        hd.make_problem(*decayed_mse_losses(hd.functional(nn.Linear(5, 1).double())),
                        hd.HyperParameters(lr=hd.scalar(0.1)),
                        hd.functional(nn.Linear(5, 1).double()).params,
                        optimizer=hd.sgd("lr"), train_data=(x, y), val_data="abc", steps=2)


class _TrackedIterable:
    """A re-iterable whose open iterators are counted (``live``) and seen at each ``iter``."""

    def __init__(self, batches):
        self.batches, self.live, self.most_live = batches, weakref.WeakSet(), 0

    def __iter__(self):
        self.most_live = max(self.most_live, len(self.live))  # open ones when a new one starts
        it = _TrackedIterator(iter(self.batches))
        self.live.add(it)
        return it


class _TrackedIterator:
    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)


def test_a_restarted_stream_releases_its_open_iteration_first(monkeypatch):
    from hyperdiff.engine.data import loader as loader_module

    x, y = sine_data(N)
    tracked = _TrackedIterable([(x[k : k + BATCH], y[k : k + BATCH]) for k in range(0, N, BATCH)])
    stream = hd.data.stream(tracked, window=1)
    stream.batch(2, 0)
    stream.batch(0, 0)  # behind the open iteration: the epoch restarts
    assert tracked.most_live == 0  # the old iterator was gone before the new one was made

    source = hd.data.stream(DataLoader(NoisyTable(), batch_size=BATCH), window=1)
    source.batch(5, 0)
    previous = weakref.ref(source.run.iterator)
    alive_at_start = []

    class Spy(loader_module.StepRequests):
        def __init__(self, *args):
            alive_at_start.append(previous() is not None)
            super().__init__(*args)

    monkeypatch.setattr(loader_module, "StepRequests", Spy)
    source.batch(0, 0)  # behind the run: a new loader (and workers, if any) starts
    assert alive_at_start == [False]
