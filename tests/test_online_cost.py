"""What makes online tuning cheaper (issue 20 item 3): the curvature tangents kept for the raw
values the learning rate reads only, checked against the written-out recurrence and reverse mode;
windows that grow as the run goes on, against hand-counted windows and the plain training
(float64, tiny problems)."""

from __future__ import annotations

import pytest
import test_online_curvature as written_out
import torch
from online_resume import assert_resumes_bit_for_bit
from test_online import mlp_params, val_loss

import hyperdiff as hd
from hyperdiff.engine.training import initial_state, train_step
from hyperdiff.methods.curvature import initial_tangent
from hyperdiff.methods.curvature_rule import carried_rows
from hyperdiff.tuner.history import to_number
from hyperdiff.tuner.windows import window_index, window_starts, window_stop

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


# --- growing windows (tuner/windows.py) ---------------------------------------------------

def test_windows_grow_by_a_fraction_of_the_steps_trained_hand_counted():
    # t -> t + 5 + floor(0.2 t): 0 5 11 18 26 36 48 62 79, then 79 + 5 + 15 = 99 leaves 1 < 5
    assert window_starts(100, 5, 0.2) == [0, 5, 11, 18, 26, 36, 48, 62, 79]
    assert window_stop(79, 100, 5, 0.2) == 100
    assert [window_index(t, 100, 5, 0.2) for t in (0, 4, 5, 17, 18, 99)] == [0, 0, 1, 2, 3, 8]
    # no growth: K steps each and a shorter last window, as before
    assert window_starts(12, 5) == [0, 5, 10] and window_stop(10, 12, 5) == 12


def growing_loop(lr=0.0, growth=0.5, steps=15):
    prob = written_out.make(written_out.mlp_train_loss, steps)
    return prob, hd.HyperOptimizer(prob, plan=hd.plans.OnlinePlan(window=2, growth=growth),
                                   method=hd.methods.curvature(horizon=20), optimizer="adam",
                                   lr=lr, seed=3)


def test_a_growing_window_run_trains_its_windows_and_the_plain_training():
    """Windows 0-1, 2-4, 5-8, 9-14 (2 + floor(0.5 t)); at outer lr 0 the run's model is the
    plain training's, step by step."""
    prob, loop = growing_loop()
    result = loop.run()
    assert result.hyper_steps == 4 and result.steps == 15
    assert loop.plan.windows == 4
    hview = prob.hparams.view(prob.raw_tensors())
    state = initial_state(prob, differentiable=False)
    for t in range(15):
        params, buffers, opt_state, _ = train_step(prob, state.params, state.buffers,
                                                   state.opt_state, hview, t,
                                                   differentiable=False)
        state = type(state)(params, buffers, opt_state)
    for k, p in state.params.items():
        assert torch.allclose(result.params[k], p, rtol=0, atol=1e-14), k


def test_a_growing_window_run_resumes_bit_for_bit(tmp_path):
    assert_resumes_bit_for_bit(lambda: growing_loop(lr=0.3)[1], tmp_path)


def test_a_checkpoint_of_other_windows_is_refused():
    _, first = growing_loop(lr=0.3)
    first.step()
    state = first.state_dict()
    _, other = growing_loop(lr=0.3, growth=0.0)
    with pytest.raises(hd.HyperdiffError, match=r"growth must match the saved run \(0.5; got "
                       r"0.0\)"):
        other.load_state_dict(state)


@pytest.mark.parametrize("growth", [-0.1, float("nan"), "0.2", True])
def test_a_growth_that_is_not_a_number_at_least_0_is_refused(growth):
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: growth must be a finite "
                       r"number >= 0 \(got "):
        hd.plans.OnlinePlan(window=5, growth=growth)


# --- a start that diverges, and the records --------------------------------------------------

def test_a_start_that_diverges_is_refused_naming_its_values():
    """shapes_cnn from a 10x too large learning rate diverged in its first window; the
    refusal names the values to change (here a learning rate far past SGD's limit on a tiny
    regression: the loss after the first window is over 1e3 x the untrained model's)."""
    prob = written_out.make(written_out.mlp_train_loss, 8)
    hot = prob.hparams.with_natural(lr_peak=300.0)
    prob = hd.make_problem(written_out.mlp_train_loss, val_loss, hot, mlp_params(),
                           optimizer=prob.optimizer, train_data=prob.train_data,
                           val_data=prob.val_data, steps=8, seed=0, probe=False)
    loop = hd.HyperOptimizer(prob, plan=hd.plans.OnlinePlan(window=4),
                             method=hd.methods.curvature(), lr=0.1)
    with pytest.raises(hd.NonFiniteError, match=r"already fail at step 0: .*Start from safer "
                       r"values than lr_peak=300, lr_warmup=0\.2, lr_final=0\.3 \(e\.g\."):
        loop.run()


def test_records_hold_a_vector_as_floats_and_none_where_not_finite():
    assert to_number(torch.tensor([1.5, 2.0], dtype=DT)) == [1.5, 2.0]
    assert to_number(torch.tensor([1.5, float("nan"), float("inf")])) == [1.5, None, None]
    assert to_number(torch.tensor(float("-inf"))) is None
