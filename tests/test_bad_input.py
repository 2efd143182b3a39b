"""Each class of bad input of the robustness review gets one clear error that names the
argument and what is valid, or a warning that says what is really wrong."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.tasks import build_task
from hyperdiff.engine.problem import takes_context

D = torch.float64
X = torch.linspace(-1, 1, 36, dtype=D).reshape(12, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D)


def val_loss(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def train_loss(p, h, b):
    return val_loss(p, h, b) + h["lam"] * p["w"].square().sum()


def problem(**changes):
    kwargs = dict(optimizer=hd.sgd(0.1), train_data=(X, Y), val_data=(X, Y), steps=3)
    kwargs.update(changes)
    hparams = kwargs.pop("hparams", hd.HyperParameters(lam=hd.scalar(0.1)))
    return hd.make_problem(kwargs.pop("train_loss", train_loss), kwargs.pop("val_loss", val_loss),
                           hparams, {"w": torch.zeros(3, dtype=D)}, **kwargs)


# --- raw tracebacks become one message -----------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: hd.scalar([0.1, 0.2]), r"scalar: value must be a single number .*per_feature"),
    (lambda: hd.scalar("0.1"), r"scalar: value must be a real number.*got '0.1'"),
    (lambda: hd.per_step(3, "0.1"), r"per_step: value must be a real number"),
    (lambda: hd.per_feature(["a", "b"]), r"per_feature: value must be a real number"),
    (lambda: hd.per_tensor({"w": torch.zeros(2)}, "x"), r"per_tensor: value must be"),
    (lambda: hd.per_element({"w": torch.zeros(2)}, [1.0, 2.0]), r"per_element: value must be"),
    (lambda: hd.scalar(0.5, (0.0, "1")), r"scalar: constraint bounds .*low < high"),
])
def test_hyperparameter_constructors_name_the_value(make, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        make()


def test_loss_with_too_many_required_arguments():
    with pytest.raises(hd.HyperdiffError, match=r"train_loss must have 3 required arguments .*"
                       r"\(got 5 required: p, h, b, c, d\)"):
        problem(train_loss=lambda p, h, b, c, d: train_loss(p, h, b))


def test_selection_split_that_does_not_fit_fails_up_front():
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: selection must be batches "
                       r"that val_loss accepts.*selection batch: batch\[0\] \(4, 5\)"):
        hd.HyperOptimizer(problem(), selection=(torch.zeros(4, 5, dtype=D),
                                                torch.zeros(4, dtype=D)))
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(hd.HyperdiffError, match="selection must be finite"):
        hd.HyperOptimizer(problem(), selection=(bad, Y))


def test_config_file_that_is_not_utf8_or_a_directory(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[outer]\nlr = 0.1 # caf\xe9\n'.encode("latin-1"))
    with pytest.raises(hd.HyperdiffError, match=r"must be UTF-8 text.*0xe9 at offset"):
        load_config(path)
    with pytest.raises(hd.HyperdiffError, match="must be a TOML file .got a directory"):
        load_config(tmp_path)


# --- silently accepted before, refused now (as torch.optim does) ----------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: hd.sgd(-0.05), r"sgd: lr must be a finite number >= 0 \(got -0.05\)"),
    (lambda: hd.sgd(0.1, -0.9), r"sgd: momentum must be a finite number >= 0"),
    (lambda: hd.sgd(0.1, 0.9, dampening=1.5), r"sgd: dampening must be a finite number in \[0, 1\]"),
    (lambda: hd.sgd(0.1, weight_decay=-1e-4), r"sgd: weight_decay must be"),
    (lambda: hd.adam(betas=(1.5, 0.999)), r"adam: betas\[0\] must be a finite number in \[0, 1\)"),
    (lambda: hd.adamw(betas=(0.9, 1.0)), r"adamw: betas\[1\] must be"),
    (lambda: hd.adam(eps=0.0), r"adam: eps must be a finite number > 0"),
    (lambda: hd.adam(lr=float("nan")), r"adam: lr must be a finite number >= 0 \(got nan\)"),
])
def test_optimizer_coefficients_out_of_range(make, match):
    torch_refuses = [lambda: torch.optim.SGD([torch.zeros(1)], lr=-0.05),
                     lambda: torch.optim.Adam([torch.zeros(1)], betas=(1.5, 0.999))]
    for refused in torch_refuses:  # the same inputs torch.optim refuses
        with pytest.raises(ValueError):
            refused()
    with pytest.raises(hd.HyperdiffError, match=match):
        make()


def test_hyperparameter_coefficient_starting_out_of_range():
    hparams = hd.HyperParameters(lam=hd.scalar(0.1), mu=hd.scalar(-0.5, "free"))
    with pytest.raises(hd.HyperdiffError, match=r"hyperparameter 'mu', the sgd momentum, must "
                       r"be a finite number >= 0 \(got \[-0.5\]\)"):
        problem(hparams=hparams, optimizer=hd.sgd(0.1, "mu"))


def test_per_element_coefficient_for_other_shapes_is_refused():
    # built for w of shape (1,), trained on w of shape (3,): accepted, and the learning rate
    # broadcast silently (or a (3,) rate turned a (1,) parameter into a (3,) one)
    hparams = hd.HyperParameters(lam=hd.scalar(0.1),
                                 lr=hd.per_element({"w": torch.zeros(1)}, 0.1))
    with pytest.raises(hd.HyperdiffError, match=r"per_element hyperparameter 'lr' must have the "
                       r"shapes of the trained parameters \{'w': \(3,\)\} \(got \{'w': \(1,\)\}\)"):
        problem(hparams=hparams, optimizer=hd.sgd("lr"))
    ok = hd.HyperParameters(lam=hd.scalar(0.1), lr=hd.per_element({"w": torch.zeros(3)}, 0.1))
    assert problem(hparams=ok, optimizer=hd.sgd("lr")).hparams["lr"].shape == (3,)


def test_constraint_that_allows_invalid_coefficients_is_logged(caplog):
    hparams = hd.HyperParameters(lam=hd.scalar(0.1), b1=hd.scalar(0.9, "free"))
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        problem(hparams=hparams, optimizer=hd.adam(0.1, betas=("b1", 0.999)), probe=False)
    assert "'b1', the adam beta1, has a free constraint" in caplog.text
    caplog.clear()
    hparams = hd.HyperParameters(lam=hd.scalar(0.1), b1=hd.scalar(0.9, (0.0, 1.0)))
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        problem(hparams=hparams, optimizer=hd.adam(0.1, betas=("b1", 0.999)), probe=False)
    assert "constraint" not in caplog.text


def test_check_refuses_zero_steps(capsys):
    assert main(["check", "ridge_diabetes", "--steps", "0"]) == 2
    assert "steps must be a positive int (got 0)" in capsys.readouterr().err


# --- misleading messages now say what is wrong ---------------------------------------------

def test_nan_in_training_data_is_named_not_called_divergence():
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(hd.HyperdiffError, match=r"train_data must be finite \(got 1 NaN or "
                       r"infinite entries of 36 in train_data\[0\], first at row 3\)"):
        problem(train_data=(bad, Y))
    with pytest.raises(hd.HyperdiffError, match="train_data must be finite"):
        problem(train_data=hd.minibatches(bad, Y, batch_size=4))  # a row no probe would see
    with pytest.raises(hd.HyperdiffError, match="val_data must be finite"):
        problem(val_data=(bad, Y))


def test_zero_training_rows_is_named():
    with pytest.raises(hd.HyperdiffError, match=r"train_data must have at least one row "
                       r"\(got train_data\[0\] of shape \(0, 3\)\)"):
        problem(train_data=(X[:0], Y[:0]))


def test_selection_fraction_that_empties_validation_is_refused_with_sizes():
    with pytest.raises(hd.HyperdiffError, match=r"every split must keep at least one row \(got "
                       r"\d+ rows: test \d+, validation 0, selection \d+, train \d+\); lower "
                       r"selection_fraction"):
        build_task("ridge_diabetes", steps=2, selection_fraction=0.999)


def test_train_loss_without_params_is_named():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem(train_loss=lambda p, h, b: h["lam"] * b[1].square().mean())
    text = " | ".join(str(w.message) for w in caught)
    assert "train_loss does not depend on the parameters" in text
    assert "'lam' never reaches the validation loss: train_loss does not depend" in text


def test_shape_errors_print_hyperparameter_parameter_and_data_shapes():
    hparams = hd.HyperParameters(lam=hd.per_feature(0.1, size=5))

    def bad_train(p, h, b):
        return val_loss(p, h, b) + (h["lam"] * p["w"] ** 2).sum()

    with pytest.raises(hd.HyperdiffError) as info:
        problem(hparams=hparams, train_loss=bad_train)
    text = str(info.value)
    assert "hyperparameter shapes {'lam': (5,)}" in text
    assert "parameter shapes {'w': (3,)}" in text
    assert "train batch of step 0: batch[0] (12, 3) float64, batch[1] (12,) float64" in text


# --- which losses receive the context -------------------------------------------------------

def test_optional_arguments_do_not_receive_the_context():
    seen = []

    def with_default(p, h, b, lam=0.1):
        seen.append(lam)
        return train_loss(p, h, b)

    assert not takes_context(with_default, "train_loss")
    problem(train_loss=with_default)
    assert seen and all(v == 0.1 for v in seen)
    assert takes_context(lambda p, h, b, ctx: 0, "train_loss")
    assert takes_context(lambda p, h, b, ctx, *rest: 0, "train_loss")
    assert not takes_context(lambda p, h, b, *rest: 0, "train_loss")


def test_with_context_marks_a_loss():
    seen = []

    def optional_ctx(p, h, b, ctx=None):
        seen.append(ctx)
        return train_loss(p, h, b)

    problem(train_loss=hd.with_context(optional_ctx))
    assert seen and all(isinstance(c, hd.models.StepContext) for c in seen)
    assert not takes_context(hd.with_context(lambda p, h, b, c: 0, False), "val_loss")
    with pytest.raises(hd.HyperdiffError, match="with_context: takes_context must be True or"):
        hd.with_context(optional_ctx, "yes")
    with pytest.raises(hd.HyperdiffError, match="required keyword-only arguments"):
        takes_context(lambda p, h, b, *, lam: 0, "train_loss")


def test_messages_go_through_the_hyperdiff_logger(capsys):
    from hyperdiff.logs import StderrHandler, configure, get_logger, level_for

    assert [level_for(v) for v in (-3, -2, -1, 0, 1, 5)] == [
        logging.ERROR, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]
    root = logging.getLogger("hyperdiff")
    try:
        configure(-1)  # -q
        get_logger("test").info("progress line")
        get_logger("test").warning("a warning")
        err = capsys.readouterr().err
        assert "a warning" in err and "progress line" not in err
        configure(0)
        get_logger("test").info("progress line")
        assert "progress line" in capsys.readouterr().err
        assert sum(isinstance(h, StderrHandler) for h in root.handlers) == 1
    finally:
        for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.NOTSET)
