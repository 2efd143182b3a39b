"""The task API over torch data sets (tests/stream_task_example.py): a shuffled DataLoader with
its own generator trains through ``hyperdiff run`` and resumes exactly; the streamed
hypergradient equals the one from the same batches as a list; split metrics and the validation
loss are sample-weighted means (oracle: one pass over the whole split); a large test Dataset is
read batch by batch as the metrics consume it; bad data-set splits are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import stream_task_example as ex
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.tasks.base import trained_params

REF = f"{Path(__file__).parent / 'stream_task_example.py'}:build"
QUICK = ["--set", "report.seeds=1", "--quiet"]


def history(run_dir):
    lines = (Path(run_dir) / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "step_time_s")}
            for line in lines]


def test_a_dataloader_task_runs_resumes_checks_and_plots(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--task", REF, *QUICK, "--out", str(full)]) == 0
    table = capsys.readouterr().out
    for text in ("stream_user", "selection loss", "test accuracy"):
        assert text in table
    result = json.loads((full / "result.json").read_text())
    assert result["sizes"] == {"val": 30, "selection": 30, "test": 70}

    def interrupt(opt, record):
        if record.step == 1:
            raise KeyboardInterrupt

    config = load_config(overrides=[f"task.name={REF}", "report.seeds=1"])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out=cut, progress=False, log=lambda m: None,
                       callbacks=[interrupt])
    assert len(history(cut)) == 2
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    assert history(cut) == history(full) and len(history(full)) == 3
    assert json.loads((cut / "result.json").read_text())["tuned"] == result["tuned"]
    assert main(["plot", str(cut)]) == 0
    assert main(["check", REF, "--steps", "4", "--quiet"]) == 0
    assert "finite_difference" in capsys.readouterr().out


def test_streamed_hypergradient_equals_the_same_batches_as_a_list():
    task = ex.build().build(selection_fraction=0.5)
    problem = task.problems[0]
    raw = task.hparams.raw
    streamed = hd.reverse()(problem, raw)
    again = hd.reverse()(problem, raw)
    batches = [problem.train_data.batch(t, problem.seed) for t in range(problem.steps)]
    assert len({tuple(b[1].tolist()) for b in batches}) == len(batches)  # shuffled, not one batch
    listed = ex.build(train_batches=batches).build(selection_fraction=0.5).problems[0]
    reference = hd.reverse()(listed, raw)
    for name in raw:
        assert torch.equal(streamed.grad[name], again.grad[name])
        torch.testing.assert_close(streamed.grad[name], reference.grad[name], rtol=0, atol=1e-12)
    assert streamed.value == reference.value


def hand_metrics(net, params, x, y):
    logits = net(params, x)
    return {"loss": float(F.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(-1) == y).double().mean())}


def test_reported_metrics_are_sample_weighted_means_over_the_whole_split():
    test_set = ex.Blobs(70, 3)
    spec = ex.build(test=DataLoader(test_set, batch_size=32))  # batches of 32, 32, 6
    task = spec.build(selection_fraction=0.5)
    raw = task.hparams.with_natural(lr=0.8).raw
    report = task.evaluate(raw, seeds=(4,))
    params, _, _ = trained_params(task.final_problem, raw, seed=4)
    net = ex.make_net()
    oracle = hand_metrics(net, params, test_set.x, test_set.y)
    for key in ("loss", "accuracy"):
        assert report["test"][key] == pytest.approx(oracle[key], rel=0, abs=1e-12)
    per_batch = [hand_metrics(net, params, test_set.x[i:i + 32], test_set.y[i:i + 32])["loss"]
                 for i in (0, 32, 64)]
    assert abs(sum(per_batch) / 3 - oracle["loss"]) > 1e-4  # the unweighted mean is wrong here
    # the validation loss that hypergradients descend: batches of the val DataLoader are short
    # or not (25-sample batches over 30 rows), weighted the same way
    val = task.splits["val"]
    assert len({len(b[1]) for b in val}) > 1
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    hg = hd.reverse()(task.problems[0], raw)
    assert hg.value == pytest.approx(float(F.cross_entropy(net(hg.params, x), y)), abs=1e-12)
    assert report["val"]["loss"] == pytest.approx(hand_metrics(net, params, x, y)["loss"],
                                                  abs=1e-12)


class Generated(Dataset):
    """``n`` samples made in ``__getitem__`` (nothing stored), reads counted."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        gen = torch.Generator().manual_seed(i)
        return torch.randn(ex.FEATURES, generator=gen, dtype=torch.float64), i % ex.CLASSES


def test_a_large_test_dataset_is_read_batch_by_batch_never_whole():
    big = Generated(1_000_000)
    task = ex.build(test=DataLoader(big, batch_size=1000)).build(selection_fraction=0.5)
    assert big.reads == 1000  # building the task reads the test split's first batch only
    assert len(task.splits["test"]) == 1000 and task.info["sizes"]["test"] == 1_000_000
    split = task.splits["test"]
    seen = []
    for j, batch in enumerate(split):  # lazy: each batch is read when it is asked for
        assert big.reads == 1000 * (j + 2)
        seen.append(batch[0][0].clone())
        if j == 2:
            break
    first = next(iter(split))
    assert torch.equal(first[0][0], seen[0])  # a new pass starts again, same batch


def test_augmentation_in_an_evaluation_split_replays_on_every_pass():
    noisy = ex.Blobs(40, 7, noise=0.3)
    task = ex.build(test=DataLoader(noisy, batch_size=16, shuffle=True)).build(
        selection_fraction=0.5)
    raw = task.hparams.raw
    torch.manual_seed(123)
    first = task.evaluate(raw, seeds=(1,))["test"]
    torch.manual_seed(456)  # the user's random state does not change what the split reads
    assert task.evaluate(raw, seeds=(1,))["test"] == first
    workers = ex.build(test=DataLoader(noisy, batch_size=16, num_workers=2, timeout=60)).build(
        selection_fraction=0.5)  # the same samples and augmentation, fetched by two workers
    assert workers.evaluate(raw, seeds=(1,))["test"] == first


def test_a_lazy_split_moves_with_the_task():
    """task_to_device (hyperdiff run --device/--dtype) moves each lazily read test batch;
    oracle: the float64 report, to float32 rounding."""
    from hyperdiff.engine.device import task_to_device

    task = ex.build(test=DataLoader(ex.Blobs(70, 3), batch_size=32)).build(selection_fraction=0.5)
    moved = task_to_device(task, "cpu", torch.float32)
    batch = next(iter(moved.splits["test"]))
    assert batch[0].dtype == torch.float32 and batch[1].dtype == torch.int64
    assert next(iter(task.splits["test"]))[0].dtype == torch.float64  # the original is kept
    raw = task.hparams.raw
    low, high = moved.evaluate(raw, seeds=(2,))["test"], task.evaluate(raw, seeds=(2,))["test"]
    assert low["loss"] == pytest.approx(high["loss"], rel=1e-5)
    assert moved.info["sizes"]["test"] == 70


class NumpyNoise(ex.Blobs):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + float(np.random.rand()), y  # not seeded per sample by hyperdiff


class Blobstream(torch.utils.data.IterableDataset):
    def __iter__(self):
        data = ex.Blobs(30, 1)
        return iter(zip(data.x, data.y, strict=True))


def test_bad_dataset_splits_are_refused_with_clear_errors():
    task = ex.build(test=DataLoader(NumpyNoise(20, 3), batch_size=8, shuffle=True)).build(
        selection_fraction=0.5)
    list(task.splits["test"])
    with pytest.raises(hd.HyperdiffError, match="test split must yield the same batches"):
        list(task.splits["test"])
    net = ex.make_net()
    base = dict(model=net, train_loss=lambda p, h, b: F.cross_entropy(net(p, b[0]), b[1]),
                val_loss=lambda p, h, b: F.cross_entropy(net(p, b[0]), b[1]),
                hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"), steps=2)
    no_batch = hd.task("t", **base, data=hd.given_splits(train=ex.Blobs(20, 1),
                                                        val=ex.Blobs(20, 2), test=ex.Blobs(9, 3)))
    with pytest.raises(hd.HyperdiffError, match="batch_size must be given"):
        no_batch.build()
    with pytest.raises(hd.HyperdiffError, match="cv_folds must be 0"):
        no_batch.build(cv_folds=2)
    batched = hd.task("t", **base, batch_size=8, data=no_batch.data)
    built = batched.build(selection_fraction=0.5)  # a bare Dataset trains in batches of 8
    assert built.info["sizes"] == {"val": 10, "selection": 10, "test": 9}
    assert len(built.problems[0].train_data.batch(0, 0)[1]) == 8
    stream_val = hd.task("t", **base, batch_size=8, data=hd.given_splits(
        train=ex.Blobs(20, 1), val=DataLoader(Blobstream(), batch_size=10), test=ex.Blobs(9, 3)))
    with pytest.raises(hd.HyperdiffError, match=r"given_splits\(selection=...\) must be given"):
        stream_val.build(selection_fraction=0.5)
    assert stream_val.build(selection_fraction=0.0).info["sizes"]["val"] == 30
    mismatch = hd.task("t", **base, batch_size=8, data=hd.given_splits(
        train=DataLoader(ex.Blobs(20, 1), batch_size=4), val=ex.Blobs(20, 2), test=ex.Blobs(9, 3)))
    with pytest.raises(hd.HyperdiffError, match="DataLoader's batch_size 4"):
        mismatch.build()


class _Rows(Dataset):
    """Dict samples with a string id, as many real data sets have: default_collate gives
    ``{"x": tensor, "y": tensor, "id": [str, ...]}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i], "id": f"row{i}"}


def test_dataset_splits_with_string_ids_build_and_count_samples():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.ones(3, dtype=torch.float64)

    def mse(p, h, b):
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    def train_loss(p, h, b):
        return mse(p, h, b) + h["lam"] * p["w"].square().sum()

    spec = hd.task("ids", model={"w": torch.zeros(3, dtype=torch.float64)},
                   train_loss=train_loss, val_loss=mse, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), steps=2, batch_size=5, data=hd.given_splits(
                       train=_Rows(x[:20], y[:20]), val=_Rows(x[20:30], y[20:30]),
                       test=_Rows(x[30:], y[30:])))
    built = spec.build(selection_fraction=0.4)
    assert built.info["sizes"] == {"val": 6, "selection": 4, "test": 10}
    ids = [[i for b in built.splits[k] for i in b["id"]] for k in ("val", "selection")]
    assert sorted(ids[0] + ids[1]) == sorted(f"row{i}" for i in range(10))  # cut by index
