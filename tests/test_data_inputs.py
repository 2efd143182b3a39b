"""The data path's silent cases found in the review of 7 Dec: NumPy scalars hashed by type,
a validation DataLoader read unseeded, workers that cannot import a task file's Dataset, lazy
splits checked late, a Dataset failing while fingerprinted, an IterableDataset of samples
trained one sample at a time, replay advice for the wrong source, integer targets taken as
classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import hyperdiff as hd
from hyperdiff.app.tasks.metrics import split_metrics
from hyperdiff.app.tasks.spec import USER_TASK_MODULE
from hyperdiff.engine.data.fingerprint import split_fingerprint
from hyperdiff.engine.models import StepContext

X = torch.linspace(-1, 1, 120).reshape(40, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5])
W0 = {"w": torch.zeros(3)}


def mse(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


class NumpyRows(Dataset):
    """``(x[i], y[i])`` of NumPy arrays: ``y[i]`` is a NumPy scalar."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_numpy_scalars_are_fingerprinted_by_value():
    x, y = X.numpy(), Y.numpy()
    same = split_fingerprint(NumpyRows(x, y))
    assert split_fingerprint(NumpyRows(x.copy(), y.copy())) == same
    assert split_fingerprint(NumpyRows(x, -10 * y))["sha256"] != same["sha256"]


class Augmented(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return X[i] + 0.1 * torch.randn(3), Y[i]


def test_a_validation_loader_is_read_seeded_and_leaves_the_global_state():
    def value() -> float:
        return float(hd.hypergradient(mse, mse, hd.HyperParameters(lr=hd.scalar(0.1)), W0,
                                      optimizer=hd.sgd("lr"), train_data=(X, Y),
                                      val_data=DataLoader(Augmented(), batch_size=8), steps=3
                                      ).value)

    state = torch.get_rng_state()
    first = value()
    assert torch.equal(torch.get_rng_state(), state)
    assert value() == first


class Rows(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return X[i], Y[i]


def test_spawned_workers_that_cannot_import_a_task_files_dataset_are_refused(monkeypatch):
    monkeypatch.setattr(Rows, "__module__", USER_TASK_MODULE + "tmp_task_py")
    loader = DataLoader(Rows(), batch_size=8, num_workers=2, multiprocessing_context="spawn")
    spec = hd.task("t", model=W0, train_loss=mse, val_loss=mse,
                   hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                   data=hd.given_splits(train=loader, val=(X, Y), test=(X, Y)), steps=3)
    with pytest.raises(hd.HyperdiffError, match=r"the train DataLoader's Dataset Rows must be "
                       r"importable by its 'spawn' worker processes .* or "
                       r"multiprocessing_context='fork'"):
        spec.build()


def given(test, train=(X, Y), batch_size=None):
    return hd.task("t", model=W0, train_loss=mse, val_loss=mse,
                   hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                   data=hd.given_splits(train=train, val=(X, Y), test=test,
                                        allow_shared_rows=True), steps=3,
                   batch_size=batch_size)


def test_a_lazy_test_split_is_checked_when_the_task_is_built():
    wide = TensorDataset(torch.zeros(16, 4), torch.zeros(16))
    with pytest.raises(hd.HyperdiffError, match=r"metrics failed on the test split at the "
                       r"initial parameters \(RuntimeError: .*batch\[0\] \(16, 4\)"):
        given(wide).build()


def test_a_metrics_function_failing_in_a_report_names_the_split_and_batch():
    def metrics(p, h, b):
        if b[0].shape[0] < 8:
            raise ValueError("too few rows")
        return {"loss": float(mse(p, h, b))}

    batches = [(X[:8], Y[:8]), (X[:5], Y[:5])]
    with pytest.raises(hd.HyperdiffError, match=r"metrics raised ValueError on batch 1 of the "
                       r"test split \(batch\[0\] \(5, 3\) float32.*\): too few rows"):
        split_metrics(metrics, False, W0, {}, batches, StepContext(-1, 0, False), split="test")


class OffByOne(Rows):
    def __len__(self) -> int:
        return 41


def test_a_dataset_failing_while_fingerprinted_names_the_sample():
    with pytest.raises(hd.HyperdiffError, match=r"data: sample 40 of OffByOne \(read to "
                       r"fingerprint the run's data\) must be readable by the data's own code "
                       r"\(got IndexError"):
        split_fingerprint(OffByOne())


class Samples(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y, strict=True))


def test_an_iterable_dataset_of_samples_is_batched_like_a_map_style_one():
    task = given((X, Y), train=Samples(), batch_size=8).build()
    batch = task.problems[0].train_data.batch(0, 0)
    assert [tuple(t.shape) for t in batch] == [(8, 3), (8,)]
    with pytest.raises(hd.HyperdiffError, match=r"batch_size must be given when "
                       r"given_splits\(train=...\) is an IterableDataset"):
        given((X, Y), train=Samples()).build()


class NumpyNoise(Rows):
    def __getitem__(self, i: int):
        return X[i] + float(np.random.rand()), Y[i]


def test_a_loaders_replay_failure_names_the_datasets_own_randomness():
    problem = hd.make_problem(mse, mse, hd.HyperParameters(lr=hd.scalar(0.1)), W0,
                              optimizer=hd.sgd("lr"),
                              train_data=DataLoader(NumpyNoise(), batch_size=8, shuffle=True),
                              val_data=(X, Y), steps=20)  # more steps than the kept window
    hd.reverse()(problem)
    with pytest.raises(hd.HyperdiffError, match=r"hyperdiff owns this loader's shuffle .* "
                       r"NumPy's and Python's global generators are not replayed"):
        hd.reverse()(problem)


def test_integer_targets_that_are_not_classes_point_at_stratify():
    y = torch.arange(40)
    spec = hd.task("t", model=W0, train_loss=lambda p, h, b: mse(p, h, (b[0], b[1].float())),
                   val_loss=lambda p, h, b: mse(p, h, (b[0], b[1].float())),
                   hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                   data=(X, y), steps=3)
    with pytest.raises(hd.HyperdiffError, match=r"or hd.task\(\.\.\., stratify=False\) if the "
                       r"40 distinct integer targets are not classes"):
        spec.build()
