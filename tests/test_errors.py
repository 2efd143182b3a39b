"""Bad input gets a clear error that names the problem."""

import warnings

import pytest
import torch

import hyperdiff as hd


def _setup():
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, dtype=torch.float64)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    hp = hd.HyperParameters(lam=hd.scalar(0.1), lr=hd.scalar(0.1))

    def train_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + h["lam"] * (p["w"] ** 2).sum()

    def val_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    return dict(train_loss=train_loss, val_loss=val_loss, hparams=hp, params=params,
                optimizer=hd.sgd("lr"), train_data=(x, y), val_data=(x, y), steps=3)


def _call(**changes):
    kwargs = {**_setup(), **changes}
    return hd.hypergradient(
        kwargs.pop("train_loss"), kwargs.pop("val_loss"), kwargs.pop("hparams"),
        kwargs.pop("params"), **kwargs,
    )


def test_baseline_runs():
    assert torch.isfinite(_call().vector).all()


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"steps": 0}, r"steps must be a positive int \(got 0\)"),
        ({"steps": 2.5}, r"steps must be a positive int \(got 2.5\)"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"optimizer": torch.optim.SGD}, "optimizer must be made by hd.sgd"),
        ({"optimizer": hd.sgd("learning_rate")}, "coefficient lr='learning_rate' must name a hyperparameter"),
        ({"params": {"w": torch.zeros(3, dtype=torch.long)}}, r"params\['w'\] must be a floating-point tensor"),
        ({"params": {"w": torch.full((3,), float("nan"))}}, r"params\['w'\] must be finite"),
        ({"params": torch.nn.Linear(3, 1)}, r"params must be hd\.functional\(module\), not the module"),
        ({"train_loss": lambda p, h, b: (b[0] @ p["w"]) ** 2}, r"train_loss return value must be a scalar tensor .*got shape \(12,\)"),
        ({"val_loss": lambda p, h, b: 1.0}, "val_loss return value must be a scalar torch.Tensor"),
        ({"train_loss": lambda p, h: p}, "train_loss must accept"),
        ({"method": "reverse"}, "method must be made by hd.reverse"),
        ({"train_data": iter([(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))] * 2)},
         "iterator ran out after 2 batches, but steps=3 needs 3"),
        ({"val_data": []}, "val_data must hold at least one batch"),
        ({"train_data": None}, "train_data must be given"),
    ],
)
def test_bad_input(changes, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        _call(**changes)


@pytest.mark.parametrize(("entries", "why"), [(2, r"\(got 2\)"),
                                               (40, r"\(got 40; the entries past the run would "
                                                    r"never train, get an exact 0")])
def test_a_per_step_schedule_of_another_length_than_training(entries, why):
    """A longer one was accepted until s39: entries past the run got an exact 0, the report
    averaged them in, and the export stretched all 40 over the run."""
    base = _setup()
    hp = hd.HyperParameters(lam=hd.scalar(0.1), lr=hd.per_step(entries, 0.1))
    with pytest.raises(hd.HyperdiffError, match=r"'lr' must have one entry per step, steps=3 "
                       + why):
        _call(hparams=hp)
    assert base


def test_shape_that_does_not_fit_is_reported_with_shapes():
    hp = hd.HyperParameters(lam=hd.per_feature(0.1, size=5), lr=hd.scalar(0.1))

    def train_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + (h["lam"] * p["w"] ** 2).sum()

    with pytest.raises(hd.HyperdiffError, match=r"shapes \{'lam': \(5,\), 'lr': \(\)\}"):
        _call(hparams=hp, train_loss=train_loss)


def test_unused_hyperparameter_warns():
    hp = hd.HyperParameters(lam=hd.scalar(0.1), lr=hd.scalar(0.1), ghost=hd.scalar(1.0))
    with pytest.warns(UserWarning, match="'ghost' never reaches the losses"):
        result = _call(hparams=hp)
    assert float(result.grad["ghost"]) == 0.0


def test_no_warning_when_all_hyperparameters_are_used():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call()


def test_divergence_names_the_step():
    hp = hd.HyperParameters(lam=hd.scalar(0.1), lr=hd.scalar(1e3))
    with pytest.raises(hd.NonFiniteError, match=r"reverse: inner training diverged at step \d+"):
        _call(hparams=hp, steps=200)
