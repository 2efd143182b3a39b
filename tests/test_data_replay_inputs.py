"""The data path's replay guarantee and its user-facing reads (s40 review): a batch written
into the memory of a kept batch is refused (a cache hit returned the later batch's rows and
forward mode's hypergradient was silently wrong); ``fn(step, knob=default)`` keeps its default
(it got the seed); NumPy fields are fingerprinted and checked for NaN; a dataset's
``__getitems__`` (a mixup) survives the seeded re-read; a bare ``IterableDataset`` is read as
batches as val_data too; a resumed loader's sampler and collate_fn are fingerprinted; a batch
with zero rows is a data error, not a divergence; an iterable val_data is read once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import hyperdiff as hd
from hyperdiff.engine.data import as_source, validation_batches
from hyperdiff.engine.data.failures import first_nonfinite
from hyperdiff.engine.data.fingerprint import fingerprint_changes, split_fingerprint
from hyperdiff.engine.data.replay import fingerprint

D = torch.float64


def rows(n: int = 16, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=D)
    return x, torch.sin(x.sum(1, keepdim=True))


def linear_problem(train_data, val_data=None, steps: int = 4) -> hd.Problem:
    x, y = rows(8)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1][:, 0]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["wd"] * (p["w"] ** 2).sum()

    return hd.make_problem(train, val, hd.HyperParameters(wd=hd.scalar(0.01), lr=hd.scalar(0.1)),
                           {"w": torch.zeros(5, dtype=D)}, optimizer=hd.sgd("lr", 0.5),
                           train_data=train_data, val_data=val_data or (x, y), steps=steps)


def test_a_collate_fn_that_fills_one_buffer_is_refused():
    x, y = rows()
    buf_x, buf_y = torch.empty(4, 5, dtype=D), torch.empty(4, 1, dtype=D)

    def reuse(samples):
        buf_x.copy_(torch.stack([s[0] for s in samples]))
        buf_y.copy_(torch.stack([s[1] for s in samples]))
        return buf_x, buf_y

    source = as_source(DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=reuse))
    source.batch(0, 0)
    with pytest.raises(hd.HyperdiffError, match=r"the batch of step 1 .* must be new tensors "
                       r"\(got tensors in the memory of the batch of step 0 \(seed 0\), whose "
                       r"values it overwrote"):
        source.batch(1, 0)


def test_batches_that_are_views_of_one_tensor_are_not_refused():
    """Overlapping windows of one tensor share memory but keep their values."""
    x, y = rows(12)

    class Windows(IterableDataset):
        def __iter__(self):
            for k in range(0, 8, 2):  # windows of 4 rows, 2 apart: each overlaps the next
                yield x[k:k + 4], y[k:k + 4]

    source = as_source(Windows())
    for step in range(6):
        assert torch.equal(source.batch(step, 0)[0], x[2 * (step % 4):2 * (step % 4) + 4])
    assert torch.equal(source.batch(0, 0)[0], x[:4])


def test_a_second_parameter_with_a_default_is_not_given_the_seed():
    x, y = rows(8)
    calls: list[tuple] = []

    def knob(step, noise=0.0):
        calls.append((step, noise))
        return x[:4] + noise, y[:4]

    def keyword(step, *, seed):
        calls.append((step, seed))
        return x[:4], y[:4]

    def positional(step, seed):
        calls.append((step, seed))
        return x[:4], y[:4]

    as_source(knob).batch(3, 7)
    as_source(keyword).batch(3, 7)
    as_source(positional).batch(3, 7)
    assert calls == [(3, 0.0), (3, 7), (3, 7)]
    reference = hd.reverse()(linear_problem(lambda step: (x[:4], y[:4])))
    found = hd.reverse()(linear_problem(knob))
    assert torch.equal(found.vector, reference.vector)  # it trained on x + 7 before


def test_numpy_fields_are_fingerprinted_and_checked_for_nan():
    x, _ = rows(4)
    a = (x, np.array([0.0, 1.0, 2.0, 3.0]))
    b = (x, np.array([0.0, 1.0, 2.0, 4.0]))
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint((x, np.array([0.0, 1.0, 2.0, 3.0])))
    assert first_nonfinite((x, np.array([0.0, np.nan]))) == ("[1]", 1, 1)

    class Drifting(Dataset):  # numpy targets that differ on a re-read
        reads = 0

        def __len__(self):
            return 4

        def __getitem__(self, i):
            Drifting.reads += 1
            return x[i], np.float64(Drifting.reads)

    def keep_numpy(samples):
        return torch.stack([s[0] for s in samples]), np.array([s[1] for s in samples])

    source = as_source(DataLoader(Drifting(), batch_size=2, collate_fn=keep_numpy))
    for step in range(12):  # past the window of kept batches: step 0 is read again
        source.batch(step, 0)
    with pytest.raises(hd.HyperdiffError, match="must yield the same batch every time step 0"):
        source.batch(0, 0)


def test_a_mixup_in_getitems_survives_the_seeded_read():
    """Once the dataset is seen drawing, the batch is read again seeded; with __getitems__ in
    one call (it was per sample by __getitem__, which dropped the mixup)."""
    x, y = rows(16)

    class Mixup(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return x[i], y[i]

        def __getitems__(self, idx):
            lam = torch.rand(()).item()
            pairs = zip(idx, reversed(idx), strict=True)
            return [(lam * x[i] + (1 - lam) * x[j], lam * y[i] + (1 - lam) * y[j])
                    for i, j in pairs]

    first = as_source(DataLoader(Mixup(), batch_size=4)).batch(0, 0)[0]
    again = as_source(DataLoader(Mixup(), batch_size=4)).batch(0, 0)[0]
    assert torch.equal(first, again)  # replayed in a new source
    # row 0 is lam x0 + (1 - lam) x3 for one lam in (0, 1), the same for every column
    lam = (first[0] - x[3]) / (x[0] - x[3])
    assert 0 < float(lam[0]) < 1
    torch.testing.assert_close(lam, lam[0].expand(5), rtol=0, atol=1e-12)


def test_a_bare_iterable_dataset_is_batches_as_val_data_too():
    x, y = rows(16)

    class BatchStream(IterableDataset):
        def __iter__(self):
            for k in range(0, 16, 4):
                yield x[k:k + 4], y[k:k + 4]

    got = validation_batches(BatchStream())
    assert [tuple(b[0].shape) for b in got] == [(4, 5)] * 4  # was one (4, 4, 5) batch
    assert tuple(as_source(BatchStream()).batch(0, 0)[0].shape) == (4, 5)


def test_an_iterable_val_data_is_read_once():
    x, y = rows(16)
    passes = []

    class Stream(IterableDataset):
        def __iter__(self):
            passes.append(1)
            for k in range(0, 16, 4):
                yield x[k:k + 4], y[k:k + 4]

    validation_batches(DataLoader(Stream(), batch_size=None))
    assert len(passes) == 1


def test_a_loaders_sampler_and_collate_fn_are_fingerprinted():
    x, y = rows(40)
    data = TensorDataset(x, y)
    start = split_fingerprint(DataLoader(data, batch_size=8, shuffle=True))
    unshuffled = split_fingerprint(DataLoader(data, batch_size=8, shuffle=False))
    own_collate = split_fingerprint(DataLoader(data, batch_size=8, shuffle=True,
                                               collate_fn=lambda s: s))
    assert fingerprint_changes("train", start, unshuffled) == [
        "split 'train': DataLoader sampler RandomSampler at the start, SequentialSampler now"]
    assert fingerprint_changes("train", start, own_collate) == [
        "split 'train': DataLoader collate_fn default_collate at the start, "
        "test_a_loaders_sampler_and_collate_fn_are_fingerprinted.<locals>.<lambda> now"]
    old = {k: v for k, v in start.items() if k not in ("sampler", "collate_fn")}
    assert fingerprint_changes("train", old, start) == []  # a run recorded before 7 Dec


def test_a_batch_with_zero_rows_is_a_data_error():
    x, y = rows(16)

    class Flagged(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return x[i], y[i], torch.tensor(8 <= i < 12)

    def drop_flagged(samples):
        keep = [s for s in samples if not s[2]]
        return (torch.stack([s[0] for s in keep]) if keep else torch.zeros(0, 5, dtype=D),
                torch.stack([s[1] for s in keep]) if keep else torch.zeros(0, 1, dtype=D))

    problem = linear_problem(DataLoader(Flagged(), batch_size=4, collate_fn=drop_flagged))
    with pytest.raises(hd.HyperdiffError, match=r"the batch of step 2 .* must have at least one "
                       r"row \(got field \[0\] of shape \(0, 5\)\)"):
        hd.reverse()(problem)  # was NonFiniteError: "lower the learning rate"
    with_empty_field = {"x": x[:4], "boxes": torch.zeros(0, 4, dtype=D)}
    assert as_source(lambda step: with_empty_field).batch(0, 0) is with_empty_field


def test_an_empty_loader_epoch_names_drop_last():
    x, y = rows(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True, sampler=[0, 1, 2])
    with pytest.raises(hd.HyperdiffError, match=r"a DataLoader yields none when its sampler is "
                       r"empty or, with drop_last=True, draws fewer samples than batch_size=4"):
        as_source(loader).batch(0, 0)


def test_the_data_package_does_not_export_a_shadowed_fingerprint():
    import hyperdiff.engine.data as data

    assert "fingerprint" not in data.__all__
    assert callable(data.replay.fingerprint)


def test_a_run_started_before_evaluation_honoured_drop_last_is_a_changed_input():
    # s42: evaluation splits leave out a drop_last loader's short batch; a run started before
    # evaluated all 10 rows, so resuming it would rank steps over two row sets without a word
    x, y = rows(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    now = split_fingerprint(loader)
    before = {k: v for k, v in now.items() if k != "evaluates_drop_last"}  # as recorded then
    for split in ("val", "selection"):
        assert fingerprint_changes(split, before, now) == [
            f"split {split!r}: a DataLoader with drop_last=True, whose short last batch this "
            "run's steps so far evaluated (hyperdiff read every row of an evaluation split "
            "then) and now leaves out, as the loader does"]
    assert fingerprint_changes("train", before, now) == []  # training always honoured it
    assert fingerprint_changes("val", now, now) == []
    kept = split_fingerprint(DataLoader(TensorDataset(x, y), batch_size=4))
    assert "evaluates_drop_last" not in kept  # without drop_last: recorded as before s42
