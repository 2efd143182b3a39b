"""Online plan inputs that were accepted and ignored, or refused with the wrong words (s39):
samples drawing every validation row, settle dropped with discrete choices, the shim's options
of other methods, lowering at the last window, callbacks and plan classes, an online state
loaded offline without a history."""

from __future__ import annotations

import logging

import pytest
import torch
from test_online_state_checks import online, problem

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.lowering import lr_direction
from hyperdiff.tuner.plans import OnlinePlan


@pytest.mark.parametrize("size", [16, 100])
def test_samples_that_draw_every_validation_row_are_refused(size):
    """16 validation rows: every sample of val_batch_size >= 16 is the same (the mean was the
    one-sample hypergradient and grad_snr 7e15 until s39)."""
    plan = OnlinePlan(window=3, samples=4, val_batch_size=size)
    with pytest.raises(hd.HyperdiffError, match=r"val_batch_size must be below the rows of "
                       r"every validation batch \(16 in the smallest\) with samples=4"):
        HyperOptimizer(problem(), plan=plan, method=hd.reverse(), lr=0.05)
    HyperOptimizer(problem(), plan=OnlinePlan(window=3, samples=4, val_batch_size=15),
                   method=hd.reverse(), lr=0.05)


def test_settle_dropped_with_discrete_choices_is_said(caplog):
    hp = hd.HyperParameters(lr=hd.scalar(0.3), momentum=hd.scalar(0.6, (0.0, 1.0)),
                            act=hd.categorical(["tanh", "relu"]))
    base = problem()
    prob = hd.make_problem(lambda p, h, b: base.train_loss(p, h, b), base.val_loss, hp,
                           base.params, optimizer=base.optimizer, train_data=base.train_data,
                           val_data=base.val_data, steps=base.steps, probe=False)
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        HyperOptimizer(prob, plan=OnlinePlan(window=3, settle=0.5), method=hd.reverse(),
                       lr=0.05)
    assert any("settle=0.5 and settle_tol=0 are not applied" in r.getMessage()
               and "every window of a run with discrete hyperparameters tunes" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize(("method", "option"), [("reverse", {"engine": "jvp"}),
                                                ("reverse", {"solver": "neumann"}),
                                                ("forward", {"solver": hd.solvers.cg(maxiter=3)}),
                                                ("implicit", {"engine": "jvp"})])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_shim_refuses_options_its_method_does_not_read(method, option):
    key = next(iter(option))
    with pytest.raises(hd.HyperdiffError, match=rf"OnlineTuner: {key} must be its default"):
        hd.online.OnlineTuner(problem(), window=3, method=method, **option)


def test_lowering_shortens_the_last_windows_move_too():
    """The last window's move sets the final values a fresh training runs over all N steps:
    a move lowering their learning rate keeps lowering of its length there as well (s39: it
    was kept whole). Outer SGD, so the whole move is -lr g, g the window's recorded
    hypergradient."""
    moves = []

    def record(loop, rec):
        moves.append(dict(loop.raw))

    keep = 0.25
    opt = HyperOptimizer(problem(12), plan=OnlinePlan(window=3, lowering=keep),
                         method=hd.reverse(), optimizer="sgd", lr=0.05)
    result = opt.run([record])
    # outer SGD: the unshortened move is -lr * g; the last window's hypergradient is in the
    # history, so its expected kept move is computable by hand
    last = opt.history[-1]
    before = moves[-2]
    direction = lr_direction(opt.plan.problem, before, 0)
    grad = torch.tensor(last.grad["lr"], dtype=torch.float64)
    full = -last.lr * grad  # the outer lr of that window (its cosine)
    lowers = float(full * direction["lr"]) < 0
    assert lowers  # the case this test is about
    assert float(result.final_raw["lr"] - before["lr"]) == pytest.approx(keep * float(full),
                                                                         rel=1e-9)


def test_callbacks_and_plan_classes_are_checked_before_training():
    opt = online()
    with pytest.raises(hd.HyperdiffError, match=r"callbacks must be a sequence of functions "
                       r"callback\(optimizer, record\) \(one function: callbacks=\[fn\]\)"):
        opt.run(lambda loop, record: None)
    with pytest.raises(hd.HyperdiffError, match="callbacks must be a sequence"):
        opt.run([1])
    assert len(opt.history) == 0 and opt.plan.inner_step == 0  # nothing trained
    with pytest.raises(hd.HyperdiffError, match=r"plan must be a plan instance, e.g. "
                       r"OnlinePlan\(...\), not the class itself"):
        HyperOptimizer(problem(), plan=OnlinePlan)


def test_an_online_state_loaded_offline_without_history_is_named_as_such():
    loop = online()
    loop.step()
    with pytest.raises(hd.HyperdiffError, match="the state must be an offline run's \\(got an "
                       "online run's"):
        HyperOptimizer(problem(), method=hd.reverse()).load_state_dict(loop.state_dict())
