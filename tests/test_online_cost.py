"""What makes online tuning cheaper (issue 20 item 3): the curvature tangents kept for the raw
values the learning rate reads only, checked against the written-out recurrence and reverse mode
(float64, tiny problems)."""

from __future__ import annotations

import pytest
import test_online_curvature as written_out
import torch
from test_online import mlp_params, val_loss

import hyperdiff as hd
from hyperdiff.methods.curvature import initial_tangent
from hyperdiff.methods.curvature_rule import carried_rows

from conftest import sine_data

pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64


def penalized_loss(p, h, batch):
    """The MLP's loss plus one L2 penalty per parameter tensor (hyperparameter ``l2``, per
    tensor): a loss hyperparameter that the learning rate does not read."""
    penalty = sum(h["l2"][i] * (v ** 2).sum() for i, v in enumerate(p.values()))
    return val_loss(p, h, batch) + penalty


def penalized_problem(steps, optimizer="sgd"):
    sched = hd.schedule("warmup_cosine", steps)
    params = mlp_params()
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.2, warmup=0.2, final=0.3),
                            l2=hd.per_tensor(params, 1e-2))
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    opt = hd.sgd(sched, 0.7) if optimizer == "sgd" else hd.adamw(sched, weight_decay=0.0)
    return hd.make_problem(penalized_loss, val_loss, hp, params, optimizer=opt,
                           train_data=hd.minibatches(x, y, batch_size=6), val_data=(xv, yv),
                           steps=steps, seed=0, probe=False)


def test_carried_rows_are_the_learning_rate_s_raw_values():
    prob = penalized_problem(10)
    assert carried_rows(prob).tolist() == [0, 1, 2]  # lr_peak, lr_warmup, lr_final; not l2
    assert initial_tangent(prob, prob.hparams.raw).z.shape == (3, 28)
    plain = written_out.make(written_out.mlp_train_loss, 10)  # every raw value is the lr's
    assert carried_rows(plain) is None


def test_the_learning_rate_rows_equal_the_written_out_recurrence(monkeypatch):
    """With a loss hyperparameter beside the schedule the tangents have 3 rows, not 6, and the
    schedule's hypergradients are still the recurrence written out over all raw values."""
    steps, window, horizon = 10, 5, 7
    prob = penalized_problem(steps)
    monkeypatch.setattr(written_out, "mlp_train_loss", penalized_loss)
    tuner = hd.online.OnlineTuner(prob, window=window, method="curvature", lr=0.0,
                                  horizon=horizon)
    records = tuner.run().history
    assert tuner.tangent.z.shape == (3, 28)
    for j, record in enumerate(records):
        expected, _ = written_out.reference(prob, (j + 1) * window, horizon, 6.0)
        assert float(expected["l2"].abs().max()) == 0.0  # its tangent row is 0 throughout
        for name in ("lr_peak", "lr_warmup", "lr_final"):
            g = float(expected[name])
            assert abs(record.grad[name] - g) <= 1e-10 * max(1.0, abs(g)), name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_loss_hyperparameter_gets_reverse_mode_s_last_step(optimizer):
    """The rows not carried get the window's last step exactly: reverse mode through one step
    (``hd.truncated(1)``) on the same trajectory (outer lr 0)."""
    prob = penalized_problem(8, optimizer)
    ours = hd.online.OnlineTuner(prob, window=4, method="curvature", lr=0.0).run().history
    reverse = hd.online.OnlineTuner(prob, window=4, method="reverse", backprop=1,
                                    lr=0.0).run().history
    for a, b in zip(ours, reverse, strict=True):
        assert torch.allclose(torch.as_tensor(a.grad["l2"]), torch.as_tensor(b.grad["l2"]),
                              rtol=1e-10, atol=1e-14)
        assert any(abs(g) > 1e-6 for g in a.grad["l2"])
