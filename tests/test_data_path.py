"""The replayable data path read fast: batched fetches, seeding only where the data draws, no
swap of the global generators for data that draws nothing.

Oracles, each independent of the code under test: the shuffle against a permutation written out
on Python integers from its definition (a 6-round Feistel network with cycle walking); batches
of a map-style loader against rows picked by that permutation and collated by hand; a dataset
that draws from torch's generator against samples read one by one after seeding torch from
``mix(seed, step, position)``; an iterable that draws from the global generators against its
epoch read with the three global generators set from ``mix(seed, epoch)`` by hand. Around
them: the user's global generator states are equal before and after every read, the state an
iterable sees while it runs is the user's own when it draws nothing, and a dataset whose items
change is refused on its replay.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

import hyperdiff as hd
from hyperdiff.engine.data.evaluation import EVAL_KEY, evaluation_split
from hyperdiff.engine.data.loader import IndexPlan
from hyperdiff.engine.data.permutation import mix, permute

N, WIDTH = 50, 3


def reference_permutation(position: int, n: int, key: int) -> int:
    """``pi_key(position)`` on Python integers, from the definition in permutation.py."""
    if n <= 1:
        return position
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, low31 = (1 << half) - 1, (1 << 31) - 1
    keys = [mix(key, r) & low31 for r in range(6)]

    def round_function(right: int, round_key: int) -> int:
        y = ((right ^ round_key) & low31) * 0x2545F491
        y ^= y >> 31
        y = (y & low31) * 0x4F6CDD1D
        return y ^ (y >> 29)

    x = position
    while True:  # cycle walking: apply the network until the value falls inside [0, n)
        left, right = x >> half, x & mask
        for round_key in keys:
            left, right = right, left ^ (round_function(right, round_key) & mask)
        x = (left << half) | right
        if x < n:
            return x


def reference_indices(step: int, seed: int, n: int, batch: int, shuffle: bool = True,
                      drop_last: bool = False) -> list[int]:
    per_epoch = n // batch if drop_last or n % batch == 0 else n // batch + 1
    epoch, j = divmod(step, per_epoch)
    positions = range(j * batch, min(j * batch + batch, n))
    return [reference_permutation(p, n, mix(seed, epoch)) if shuffle else p for p in positions]


def table(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, WIDTH, generator=g, dtype=torch.float64), torch.arange(n)


class Rows(Dataset):
    """Map-style, no ``__getitems__``; ``reads`` counts ``__getitem__`` calls."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        self.reads += 1
        return {"x": self.x[i], "y": self.y[i]}


class ManyRows(Rows):
    """With ``__getitems__``, as torch's ``DataLoader`` reads it."""

    def __getitems__(self, indices: list[int]):
        return [self[i] for i in indices]


class Augmented(Rows):
    """Noise from torch's global generator, on odd samples only (draws now and then)."""

    def __getitem__(self, i: int):
        self.reads += 1
        noise = torch.randn(WIDTH, dtype=torch.float64) if i % 2 else 0.0
        return {"x": self.x[i] + noise, "y": self.y[i]}


def collated_by_hand(rows: Rows, indices: list[int]):
    return {"x": torch.stack([rows.x[i] for i in indices]),
            "y": torch.stack([rows.y[i] for i in indices])}


def global_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_states(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert all(np.array_equal(a, b) for a, b in zip(before[2], after[2], strict=True))


def test_permutation_equals_the_integer_definition():
    for n, key in [(2, 1), (7, 0), (50, 9), (1000, 2**62 + 3), (80_000, 17)]:
        positions = torch.arange(n) if n <= 1000 else torch.randint(0, n, (300,))
        expected = [reference_permutation(p, n, key) for p in positions.tolist()]
        assert permute(positions, n, key).tolist() == expected
    square = permute(torch.arange(36).reshape(6, 6), 40, 5)  # any shape, pointwise
    assert square.shape == (6, 6)
    assert square.flatten().tolist() == [reference_permutation(p, 40, 5) for p in range(36)]


@pytest.mark.parametrize(("n", "batch", "drop_last", "shuffle"),
                         [(50, 8, False, True), (50, 8, True, True), (48, 8, False, False),
                          (1000, 3, False, True)])
def test_steps_read_in_chunks_are_the_steps_read_one_by_one(n, batch, drop_last, shuffle):
    plan = IndexPlan(n, batch, drop_last, shuffle)
    steps = 3 * plan.per_epoch + 2  # across epoch ends, several chunks
    chunked = [t.tolist() for t in plan.step_indices(1, steps, seed=4)]
    assert len(chunked) == steps - 1
    for step, indices in enumerate(chunked, 1):
        assert indices == reference_indices(step, 4, n, batch, shuffle, drop_last)
        assert indices == plan.indices(step, 4)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["TensorDataset", "Dataset", "__getitems__"])
def test_batches_of_data_that_draw_nothing_are_the_rows_of_the_permutation(kind, workers):
    x, y = table()
    rows = ManyRows(x, y) if kind == "__getitems__" else Rows(x, y)
    dataset = TensorDataset(x, y) if kind == "TensorDataset" else rows
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers,
                        timeout=60 if workers else 0)
    source = hd.data.stream(loader)
    source.check(20, 5)
    before = global_states()
    for step in [*range(20), 3, 40]:  # 7 batches per epoch; re-reads and random access
        indices = reference_indices(step, 5, N, 8)
        expected = collated_by_hand(rows, indices)
        batch = source.batch(step, 5)
        if kind == "TensorDataset":  # default_collate of tuples gives a list
            assert isinstance(batch, list)
            batch = {"x": batch[0], "y": batch[1]}
        assert torch.equal(batch["x"], expected["x"]) and torch.equal(batch["y"], expected["y"])
    assert_same_states(before, global_states())
    if workers == 0 and kind != "TensorDataset":  # each sample once per step read, not twice
        read = [*range(20), 3, 40]  # 3 again: it left the window of 8
        assert rows.reads == sum(len(reference_indices(s, 5, N, 8)) for s in read)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_that_draws_gets_each_sample_seeded_from_its_step_and_position(workers):
    x, y = table()
    rows = Augmented(x, y)
    source = hd.data.stream(DataLoader(rows, batch_size=8, shuffle=True, num_workers=workers,
                                       timeout=60 if workers else 0))
    source.check(10, 2)
    torch.manual_seed(99)
    before = global_states()
    batches = [source.batch(step, 2) for step in range(10)]
    assert_same_states(before, global_states())  # the user's generators as they were
    for step, batch in enumerate(batches):
        samples = []
        with torch.random.fork_rng(devices=[]):
            for k, i in enumerate(reference_indices(step, 2, N, 8)):
                torch.manual_seed(mix(2, step, k))
                samples.append(rows[i])
        expected = default_collate(samples)
        assert torch.equal(batch["x"], expected["x"]) and torch.equal(batch["y"], expected["y"])
    assert not torch.equal(batches[0]["x"], collated_by_hand(
        rows, reference_indices(0, 2, N, 8))["x"])  # the noise is there


def test_a_batch_that_changes_is_refused_on_its_replay():
    x, y = table()
    source = hd.data.stream(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
                            window=1)
    source.batch(0, 0)
    source.batch(1, 0)  # step 0 leaves the window
    x.mul_(2)  # the data set changes under the loader (read by index tensor)
    with pytest.raises(hd.HyperdiffError, match=r"must yield the same batch every time step 0 "
                                                r"\(seed 0\) is replayed"):
        source.batch(0, 0)


class PythonNoise(Rows):
    def __getitem__(self, i: int):
        return {"x": self.x[i] * random.random(), "y": self.y[i]}


def test_a_dataset_drawing_from_python_random_is_refused_on_its_replay():
    x, y = table()
    source = hd.data.stream(DataLoader(PythonNoise(x, y), batch_size=8, shuffle=True), window=1)
    source.batch(0, 0)
    source.batch(1, 0)
    with pytest.raises(hd.HyperdiffError, match="must yield the same batch"):
        source.batch(0, 0)


class DrawsThenFails(Rows):
    def __getitem__(self, i: int):
        torch.rand(())
        if i == 3:
            raise OSError("sample 3 is unreadable")
        return {"x": self.x[i], "y": self.y[i]}


def test_a_sample_that_draws_and_fails_is_named_and_leaves_the_users_state():
    x, y = table()
    source = hd.data.stream(DataLoader(DrawsThenFails(x, y), batch_size=4))
    torch.manual_seed(5)
    before = global_states()
    with pytest.raises(hd.HyperdiffError, match=r"sample 3 of DrawsThenFails raised OSError"):
        source.batch(0, 0)
    assert_same_states(before, global_states())


class FailingMany(Rows):
    def __getitems__(self, indices: list[int]):
        raise KeyError("no such rows")


def test_a_failing_getitems_is_named_with_its_samples():
    x, y = table()
    source = hd.data.stream(DataLoader(FailingMany(x, y), batch_size=4))
    with pytest.raises(hd.HyperdiffError, match=r"samples \[0, 1, 2, 3\] of FailingMany \(its "
                                                r"__getitems__\) raised KeyError"):
        source.batch(0, 0)


class Watched(IterableDataset):
    """Rows in order; records whether torch's global state inside equals ``expected``, and
    draws from ``draw`` (``"torch"``, ``"python"``, ``"numpy"``) from batch ``after`` on."""

    def __init__(self, draw: str | None = None, after: int = 0):
        self.x, self.y = table()
        self.draw, self.after = draw, after
        self.expected: torch.Tensor | None = None
        self.saw_own_state: list[bool] = []

    def __iter__(self):
        for k in range(0, N, 5):
            if self.expected is not None:
                self.saw_own_state.append(torch.equal(torch.get_rng_state(), self.expected))
            scale = 1.0
            if self.draw is not None and k // 5 >= self.after:
                scale = {"torch": lambda: float(torch.rand(())), "python": random.random,
                         "numpy": lambda: float(np.random.rand())}[self.draw]()
            yield self.x[k : k + 5] * scale, self.y[k : k + 5]


def test_an_iterable_that_draws_nothing_runs_under_the_users_own_state():
    data = Watched()
    source = hd.data.stream(DataLoader(data, batch_size=None))
    torch.manual_seed(7)
    data.expected = torch.get_rng_state()
    before = global_states()
    for step in range(25):  # 10 batches per epoch: three epochs, the last re-read
        source.batch(step, 1)
    source.batch(0, 1)
    assert data.saw_own_state and all(data.saw_own_state)  # never swapped
    assert_same_states(before, global_states())


def batches_under_private_state(data: Watched, key: int, count: int) -> list:
    """The first ``count`` batches of ``data`` read with torch's, Python's and NumPy's global
    generators seeded with ``key`` (and restored afterwards)."""
    saved = global_states()
    torch.manual_seed(key)
    random.seed(key)
    np.random.seed(key % (1 << 32))
    try:
        loader = DataLoader(data, batch_size=None,
                            generator=torch.Generator().manual_seed(mix(key, 1)))
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


@pytest.mark.parametrize("draw", ["torch", "python", "numpy"])
def test_an_iterable_that_draws_from_a_global_generator_gets_its_seeded_epoch(draw):
    data = Watched(draw, after=3)  # starts drawing at batch 3: its epoch is read again
    loader = DataLoader(data, batch_size=None, generator=torch.Generator().manual_seed(0))
    source = hd.data.stream(loader)
    torch.manual_seed(11)
    before = global_states()
    batches = [source.batch(step, 6) for step in range(6)]
    assert_same_states(before, global_states())
    expected = batches_under_private_state(Watched(draw, after=3), mix(6, 0), 6)  # epoch 0
    for got, want in zip(batches, expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(batches[4][0], data.x[20:25])  # scaled by a draw
    again = hd.data.stream(loader)  # a fresh source: the same seeded epoch
    assert all(torch.equal(again.batch(s, 6)[0], batches[s][0]) for s in range(6))


def test_an_evaluation_pass_that_starts_drawing_is_read_again_seeded():
    data = Watched("torch", after=2)
    split = evaluation_split("test", DataLoader(data, batch_size=None,
                                                generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(3)
    before = global_states()
    first, second = list(split), list(split)
    assert_same_states(before, global_states())
    assert len(first) == N // 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    expected = batches_under_private_state(Watched("torch", after=2), mix(EVAL_KEY, 1), N // 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, expected, strict=True))


def test_sample_seeds_mixed_at_once_equal_the_seeds_mixed_one_by_one():
    from hyperdiff.engine.data.permutation import mix_each

    rng = random.Random(0)
    for prefix in [(), (3,), (-(2**70), 12), (2**64 + 5, 0, 7)]:
        lasts = [0, 1, 2**63, 2**64 - 1, *(rng.randrange(2**64) for _ in range(50))]
        assert mix_each(prefix, lasts) == [mix(*prefix, k) for k in lasts]


def test_finite_data_whose_sum_overflows_is_not_called_non_finite():
    from hyperdiff.engine.data.failures import first_nonfinite

    big = torch.tensor([[60000.0, 60000.0], [1.0, 2.0]], dtype=torch.float16)  # sum: inf
    assert first_nonfinite([big]) is None
    big[1, 1] = float("nan")
    assert first_nonfinite([big]) == ("[0]", 1, 1)
    assert first_nonfinite({"z": torch.tensor([1 + 1j, complex(0, float("inf"))])}) == ("['z']", 1, 1)
