"""Discrete hyperparameters composed with the online plan, the online report and the
leave-one-out baseline under sign-based outer steps.

* The online selection loss read the model through the base specs (relax: the schedule's start
  temperature; gumbel: one seed-0 draw; reinforce: the argmax), not the window's state; the
  offline plan reads each training's own (until s41).
* The online report's "run's own model" read relax at the start temperature and gumbel as a
  seed-0 draw (until s41), also giving a false "ends worse" warning.
* Leave-one-out REINFORCE gave a choice no sample drew (or every sample drew) a rounding residue
  of ~1e-17 with a sign, which ``signstep`` followed by the full outer step (until s41).
"""

from __future__ import annotations

import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import _online_summary, build_online
from hyperdiff.tuner.discrete_outer import DiscreteOuter
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

ACTS = {"tanh": torch.tanh, "square": torch.square, "zero": lambda z: 0.0 * z}
INIT = [0.5, 0.3, 0.2]


def toy_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ w).sum(1) + 0.05 * torch.randn(40, generator=gen, dtype=torch.float64)
    return (x[:24], y[:24]), (x[24:], y[24:])


def val_loss(p, h, batch):
    x, y = batch
    return (hd.choose(h["act"], ACTS, x @ p["W"]) @ p["v"] - y).square().mean()


def train_loss(p, h, batch):
    return val_loss(p, h, batch) + 0.5 * h["wd"] * (p["W"].square().sum() + p["v"].square().sum())


def make_toy(act, steps=8):
    gen = torch.Generator().manual_seed(1)
    params = {"W": 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64),
              "v": 0.5 * torch.randn(4, generator=gen, dtype=torch.float64)}
    train, val = toy_data()
    hp = hd.HyperParameters(act=act, wd=hd.scalar(1e-2), lr=hd.scalar(0.1))
    return hd.make_problem(train_loss, val_loss, hp, params, optimizer=hd.sgd("lr", 0.5),
                           train_data=train, val_data=val, steps=steps, probe=False)


def online(mode, **plan):
    extra = {"temperature": (2.0, 0.1)} if mode != "reinforce" else {}
    problem = make_toy(hd.categorical(list(ACTS), mode=mode, init=INIT, **extra))
    # outer lr 0: the values never move, so a window's selection loss on the validation
    # batch is its validation loss
    return HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=2, **plan), lr=0.0,
                          selection=[toy_data()[1]], seed=1)


# ------------------------------------------------------------------ 1. online selection loss
def test_the_online_selection_loss_reads_the_relaxed_choice_at_the_windows_temperature():
    loop = online("relax", eval_every=1)
    history = loop.run().history
    assert [r.selection_loss for r in history] == [r.val_loss for r in history]
    # by hand: the mixture softmax(u / tau) of the last window's temperature at the final state
    tau = history[-1].discrete["temperature"]["act"]
    assert tau == 0.1
    weights = torch.softmax(loop.raw["act"].detach() / tau, -1)
    p = loop.plan.state.params
    x, y = toy_data()[1]
    z = x @ p["W"]
    mixed = sum(w * f(z) for w, f in zip(weights, ACTS.values(), strict=True))
    by_hand = float(((mixed @ p["v"]) - y).square().mean())
    assert abs(history[-1].selection_loss - by_hand) < 1e-12


def test_the_online_selection_loss_reads_the_windows_gumbel_and_reinforce_draws():
    for mode in ("gumbel", "reinforce"):
        history = online(mode, eval_every=1).run().history
        assert len(history) == 4
        assert [r.selection_loss for r in history] == [r.val_loss for r in history], mode


def test_the_selection_loss_after_a_resume_reads_the_last_windows_specs():
    for mode in ("relax", "gumbel", "reinforce"):
        first = online(mode)
        for _ in range(2):
            first.step()
        expected = first.plan.selection_at(first, first.plan.state)
        assert expected == first.history[-1].val_loss, mode
        second = online(mode)
        second.load_state_dict(first.state_dict())
        assert second.plan.selection_at(second, second.plan.state) == expected, mode


# ------------------------------------------------------------------ 2. the online report's model
TASK = """
import torch
import hyperdiff as hd

ACTS = {"tanh": torch.tanh, "square": torch.square, "zero": lambda z: 0.0 * z}


def build(steps=10, data_seed=0, mode="relax"):
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(120, 3, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(3, 4, generator=gen, dtype=torch.float64)).sum(1)
    params = {"W": 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64),
              "v": 0.5 * torch.randn(4, generator=gen, dtype=torch.float64)}

    def error(p, h, batch):
        return (hd.choose(h["act"], ACTS, batch[0] @ p["W"]) @ p["v"] - batch[1]).square().mean()

    def train_loss(p, h, batch):
        return error(p, h, batch) + 0.5 * h["wd"] * p["W"].square().sum()

    act = hd.categorical(list(ACTS), mode=mode, init=[0.5, 0.3, 0.2], temperature=(2.0, 0.1))
    return hd.task("toy_choice", model=params, train_loss=train_loss, val_loss=error,
                   hparams=hd.HyperParameters(act=act, wd=hd.scalar(1e-2)),
                   optimizer=hd.sgd(0.05), data=(x, y), steps=steps, batch_size=16,
                   stratify=False)
"""


def test_the_online_reports_own_model_is_the_mixture_at_the_last_windows_temperature(tmp_path):
    (tmp_path / "toy_choice.py").write_text(TASK)
    for mode in ("relax", "gumbel"):
        config = load_config(None, [f"task.name={tmp_path / 'toy_choice.py'}:build",
                                    "outer.mode=online", "inner.steps=10", "outer.window=5",
                                    "outer.retry=0", "method.name=reverse", "report.seeds=1",
                                    f"task.params.mode={mode}"])
        task, loop = build_online(config)
        outcome = loop.run()
        tau = loop.history[-1].discrete["temperature"]["act"]
        assert tau == 0.1, mode
        plan = loop.plan
        raw = plan.problem.raw_tensors(loop.raw)
        # by hand: the noise-free mixture softmax(u / tau) at the last window's temperature
        mixture = hd.HyperParameters(act=hd.categorical(list(ACTS), mode="relax",
                                                        init=INIT, temperature=tau),
                                     wd=hd.scalar(1e-2)).view(raw)
        assert torch.allclose(mixture["act"].weights, torch.softmax(raw["act"] / tau, -1),
                              rtol=0, atol=1e-15)
        expected = task.metrics_at(plan.state.params, plan.state.buffers, mixture)
        report = {"initial": {"metrics": expected}, "tuned": {"metrics": expected}}
        extra = _online_summary(task, loop, outcome, config).extra(report, (0,), None, None)
        assert extra["online_model"] == expected, mode
        assert not any("ends worse" in w for w in extra["warnings"]), mode


# ------------------------------------------------------------------ 3. leave-one-out zeros
def leave_one_out_by_hand(losses, drawn, n):
    """``S/(S-1) mean_i (L_i - Lbar) onehot(z_i)``: the leave-one-out estimate written out
    (``L_i - b_i = L_i - (sum_j L_j - L_i)/(S-1) = S/(S-1) (L_i - Lbar)``, which sums to 0, so
    the ``- p`` term of the score vanishes)."""
    count = len(losses)
    mean = sum(losses) / count
    out = [0.0] * n
    for loss, z in zip(losses, drawn, strict=True):
        out[z] += count / (count - 1) * (loss - mean) / count
    return torch.tensor(out, dtype=torch.float64)


def adjusted(baseline, losses, drawn, *, folds=1, moving_average=None):
    hp = hd.HyperParameters(act=hd.categorical(list(ACTS), mode="reinforce", init=INIT,
                                               baseline=baseline), wd=hd.scalar(1e-2))
    outer = DiscreteOuter(hp, seed=0, max_steps=5, samples=len(losses), folds=folds)
    outer.moving_average = moving_average
    outer.drawn = {i: {"act": z} for i, z in enumerate(drawn)}
    rows = torch.zeros(folds * len(losses), hp.flatten(hp.raw).numel(), dtype=torch.float64)
    values = torch.tensor(losses * folds, dtype=torch.float64)
    new, info = outer.adjust(0, hp.raw, rows, values)
    return hp, new, info


def test_leave_one_out_gives_exact_zeros_to_choices_no_sample_or_every_sample_drew():
    losses = [0.7310585786300049, 0.1234567891011121, 0.4142135623730951]
    for drawn in ([0, 0, 0], [0, 1, 0], [2, 2, 1]):
        for folds in (1, 2):
            hp, rows, _ = adjusted("leave_one_out", losses, drawn, folds=folds)
            estimate = hp.unflatten(rows.mean(0))["act"]
            reference = leave_one_out_by_hand(losses, drawn, 3)
            assert torch.allclose(estimate, reference, rtol=1e-12, atol=1e-15), drawn
            for k in range(3):
                if drawn.count(k) in (0, 3):
                    assert estimate[k].item() == 0.0, (drawn, k)


def test_signstep_with_leave_one_out_does_not_move_on_rounding_residue():
    problem = make_toy(hd.categorical(list(ACTS), mode="reinforce", baseline="leave_one_out",
                                      init=INIT))
    loop = HyperOptimizer(problem, plan=OfflinePlan(samples=3, explore=0),
                          optimizer="signstep", lr=0.1, stopping=Stopping(max_steps=4), seed=3)
    seen = set()
    for _ in range(4):
        before = loop.raw["act"].clone()
        record = loop.step()
        drawn = record.discrete["samples"]["act"]
        moved = loop.raw["act"] - before
        for k, name in enumerate(ACTS):
            if drawn.count(name) in (0, 3):
                seen.add(drawn.count(name))
                assert record.grad["act"][k] == 0.0, (record.step, name)
                assert moved[k].item() == 0.0, (record.step, name)
    assert seen == {0, 3}  # both cases occurred: an undrawn choice and an all-drawn one


def test_the_moving_average_and_the_recorded_variance_are_unchanged():
    """Controls: the documented per-sample terms ``(L_i - b_i) (onehot(z_i) - p)``, bit for bit
    (moving average: the rows; leave-one-out: the recorded variance)."""
    losses, drawn = [0.7310585786300049, 0.1234567891011121, 0.4142135623730951], [0, 1, 0]
    onehot = torch.eye(3, dtype=torch.float64)
    for baseline, base in (("moving_average", [0.3] * 3),
                           ("leave_one_out", [(sum(losses) - v) / 2 for v in losses])):
        hp, rows, info = adjusted(baseline, losses, drawn, moving_average=0.3)
        probs = torch.softmax(hp.raw["act"].double(), -1)
        terms = torch.stack([(torch.tensor(v, dtype=torch.float64) - b) * (onehot[z] - probs)
                             for v, b, z in zip(losses, base, drawn, strict=True)])
        if baseline == "moving_average":
            assert torch.equal(torch.stack([hp.unflatten(r)["act"] for r in rows]), terms)
            assert info["estimate_variance"] == float(terms.var(0).sum())
        else:  # the baseline by hand sums in another order: equal to rounding
            assert abs(info["estimate_variance"] - float(terms.var(0).sum())) < 1e-14
