"""A new user's journey (s40 review): tuned hyperparameters passed where raw values go (a
``HyperParameters`` from ``hd.tuned_hparams``, a dict missing a name, a list, another shape)
are taken or named (AttributeError / KeyError from inside training before), and a task's
``defaults`` may not set ``task.name`` or ``task.params.*`` (they were silently dropped)."""

from __future__ import annotations

import pytest
import torch

import hyperdiff as hd

D = torch.float64


def problem() -> hd.Problem:
    x = torch.linspace(-1, 1, 12, dtype=D).reshape(6, 2)

    def loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + h["wd"] * (p["w"] ** 2).sum()

    hparams = hd.HyperParameters(lr=hd.per_step(4, 0.1), wd=hd.scalar(0.01))
    return hd.make_problem(loss, loss, hparams, {"w": torch.zeros(2, dtype=D)},
                           optimizer=hd.sgd("lr"), train_data=(x, x.sum(1)),
                           val_data=(x, x.sum(1)), steps=4)


def test_a_hyperparameters_collection_is_read_as_its_raw_values():
    prob = problem()
    tuned = prob.hparams.with_natural(wd=0.05)
    torch.testing.assert_close(hd.reverse()(prob, tuned).vector,
                               hd.reverse()(prob, tuned.raw).vector, rtol=0, atol=0)


@pytest.mark.parametrize("raw", [
    lambda raw: {"lr": raw["lr"]},                     # a name missing: KeyError before
    lambda raw: {"lr": raw["lr"][:2], "wd": raw["wd"]},  # another shape: a step error later
    lambda raw: {"lr": raw["lr"].tolist(), "wd": raw["wd"]},  # a list: AttributeError
])
def test_raw_values_that_do_not_fit_the_problem_are_named(raw):
    prob = problem()
    with pytest.raises(hd.HyperdiffError, match=r"hypergradient: raw must be a dict name -> "
                       r"raw tensor of the problem's hyperparameters, shaped \{'lr': \(4,\), "
                       r"'wd': \(\)\}"):
        hd.reverse()(prob, raw(prob.hparams.raw))


@pytest.mark.parametrize("key", ["task.name", "task.params.width"])
def test_task_defaults_may_not_set_the_tasks_name_or_params(key):
    x = torch.linspace(-1, 1, 40, dtype=D).reshape(20, 2)
    loss = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()  # noqa: E731
    with pytest.raises(hd.HyperdiffError, match=r"defaults must be config keys other than "
                       r"task.name and task.params"):
        hd.task("t", model={"w": torch.zeros(2, dtype=D)}, train_loss=loss, val_loss=loss,
                hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                data=(x, x.sum(1)), steps=3, defaults={key: 8})
