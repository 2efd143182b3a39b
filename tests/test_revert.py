"""The return to the best values (``OfflinePlan(revert=m)``, ``outer.revert``).

On the small tanh network of test_online_train_seed.py (SGD on minibatches with a per-step
noise factor), a run with a large outer learning rate overshoots. Every step of a run with
``revert = 2`` is checked against the rule written out here from the history alone: a record
says it went back exactly when the selection loss rose at each of the last ``m`` steps after
the best one and after the last return (``L_best < L_1 < L_2``); the next step trains the best step's
values at half the outer learning rate, and the step after that moves them by exactly that
learning rate times the sign of their hypergradient (a fresh ``signstep``: every scale 1).
Up to the first return the run is the run without returns step for step. A resumed run
repeats an uninterrupted one, and a damaged ``reverted`` entry is refused by name.
"""

from __future__ import annotations

import copy
import math

import pytest
from interrupt import interrupted_run
from test_online_train_seed import problem
from test_resume import histories as history
from test_resume import quiet

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

from conftest import sine_data

SELECTION = sine_data(16, 4, seed=3)
STEPS, LR, M = 14, 0.3, 2
NOTE = "back to the values of step"


def loop(revert: int, optimizer: str = "signstep") -> HyperOptimizer:
    plan = OfflinePlan(explore=0, revert=revert)
    return HyperOptimizer(problem(), plan=plan, method=hd.reverse(), lr=LR, optimizer=optimizer,
                          selection=SELECTION, seed=0,
                          stopping=Stopping(max_steps=STEPS, patience=None))


@pytest.fixture(scope="module")
def runs():
    return loop(0).run(), loop(M).run()


def test_every_step_follows_the_rule(runs):
    plain, reverting = runs
    best, last, returns = None, -1, []
    records = reverting.history
    for r in records:
        assert r.status == "ok"
        if best is None or r.selection_loss < best.selection_loss:
            best = r
        after = [q.selection_loss for q in records[max(best.step, last) + 1:r.step + 1]]
        tail = after[-M:]
        due = (len(tail) == M and tail[0] > best.selection_loss
               and all(tail[k + 1] > tail[k] for k in range(M - 1)))
        assert (NOTE in r.message) == due, r.step
        if due:
            assert f"{NOTE} {best.step}," in r.message
            last = r.step
            returns.append((r.step, best))
    assert len(returns) >= 2  # the overshooting run goes back more than once
    rises = [r.step for r in records[1:] if r.selection_loss > records[r.step - 1].selection_loss
             and not r.best]
    assert len(rises) > len(returns)  # not every step without a better loss goes back
    first = returns[0][0]
    assert [r.without_timing() for r in records[:first]] == [
        r.without_timing() for r in plain.history[:first]]
    for step, back_to in returns:
        if step + 2 >= STEPS:
            continue
        after, next_one = records[step + 1], records[step + 2]
        assert after.hparams == back_to.hparams
        assert after.lr == pytest.approx(records[step].lr / 2, rel=1e-15)
        for name, value in after.hparams.items():  # lr and wd: raw values are logs
            moved = math.log(next_one.hparams[name]) - math.log(value)
            expected = -after.lr * math.copysign(1.0, after.grad[name])
            assert moved == pytest.approx(expected, rel=1e-9, abs=1e-12), (step, name)


def tied_problem() -> hd.Problem:
    """``problem()`` with a per-step learning rate: ``tie_steps`` ties a hyperparameter of
    several entries (with scalars alone it is refused)."""
    base = problem()
    hp = hd.HyperParameters(lr=hd.per_step(base.steps, 0.2), wd=hd.scalar(1e-2))
    return hd.make_problem(base.train_loss, base.val_loss, hp, base.params,
                           optimizer=hd.sgd("lr"), train_data=base.train_data,
                           val_data=base.val_data, steps=base.steps, seed=0, probe=False)


@pytest.mark.parametrize("tied", [3, 6])
def test_with_tied_steps_the_rule_compares_one_kind_of_loss(tied):
    """``tie_steps = k`` ranks steps 0..k by the validation loss and later steps by the
    selection loss. A return compares losses of the kind that ranks the step it is due at
    (``L_best < L_1 < ... < L_m`` all in that kind), never a validation loss with a selection
    loss."""
    run = HyperOptimizer(tied_problem(), plan=OfflinePlan(explore=0, revert=M),
                         method=hd.reverse(), lr=LR, optimizer="signstep", selection=SELECTION,
                         seed=0, tie_steps=tied, stopping=Stopping(max_steps=STEPS, patience=None)).run()
    best, last, returns = None, -1, []
    for r in run.history:
        field = "val_loss" if r.step <= tied else "selection_loss"

        def loss(q, field=field):
            return getattr(q, field)

        if best is None or loss(r) < loss(best):
            best = r
        assert r.best == (best is r), r.step
        tail = [loss(q) for q in run.history[max(best.step, last) + 1:r.step + 1]][-M:]
        due = (len(tail) == M and tail[0] > loss(best)
               and all(tail[k + 1] > tail[k] for k in range(M - 1)))
        assert (NOTE in r.message) == due, r.step
        if due:
            assert f"{NOTE} {best.step}," in r.message
            last = r.step
            returns.append(r.step)
    assert returns


def test_a_failure_after_a_return_comes_back_to_the_best_values():
    run = loop(M)
    while not any(NOTE in r.message for r in run.history):
        run.step()
    best = run.best
    assert run.guard.good["raw"] == best["raw"] and run.raw == best["raw"]
    assert run.guard.good["optimizer"]["state"] == {}  # a fresh signstep
    run.guard.check_values = lambda *_: (_ for _ in ()).throw(
        hd.NonFiniteError("a failure made by the test"))
    failed = run.step()
    assert failed.status == "failed" and failed.hparams == run.history[best["step"]].hparams
    assert run.raw == best["raw"] and run.optimizer.state_dict()["state"] == {}


def test_without_returns_nothing_changes(runs):
    plain, _ = runs
    assert all(NOTE not in r.message and r.lr == LR for r in plain.history)


@pytest.mark.parametrize("stop_at", [2, 3, 6, 9])
def test_a_resumed_run_repeats_an_uninterrupted_one(runs, stop_at):
    first = loop(M)
    while first.step_index < stop_at:
        first.step()
    resumed = loop(M)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    result = resumed.run()
    assert [r.without_timing() for r in result.history] == [
        r.without_timing() for r in runs[1].history]


@pytest.mark.parametrize("reverted", [[13], [1, 1], "2", [3.0]])
def test_a_damaged_reverted_entry_is_refused(runs, reverted):
    first = loop(M)
    while first.step_index < 6:
        first.step()
    state = copy.deepcopy(first.state_dict())
    assert state["reverted"] == [2]
    state["reverted"] = reverted
    with pytest.raises(hd.HyperdiffError, match=r"reverted.*increasing steps of the history's "
                       r"successful gradient-phase records"):
        loop(M).load_state_dict(state, history=list(first.history))


def test_the_trust_optimizer_goes_back_too():
    result = loop(M, optimizer="trust").run()
    returns = [r.step for r in result.history if NOTE in r.message]
    assert returns
    for step in returns:
        if step + 1 < STEPS:
            back = int(result.history[step].message.split(NOTE)[1].split(",")[0])
            assert result.history[step + 1].hparams == result.history[back].hparams


@pytest.mark.parametrize("revert", [-1, 1.5, True])
def test_bad_revert_is_refused(revert):
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: revert must be .*got"):
        OfflinePlan(revert=revert)


SETTINGS = ["output.checkpoint_seconds=0", "task.name=mlp_digits", "inner.steps=10",
            "stop.max_steps=9", "stop.patience=0", "outer.explore=0", "report.seeds=1",
            "outer.revert=2", "outer.lr=1.5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("revert") / "straight"
    run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    return out


def test_this_run_goes_back(straight):
    assert any(NOTE in r["message"] for r in history(straight))


@pytest.mark.parametrize("at", [3, 6])
def test_an_interrupted_run_resumes_to_the_same_history(straight, tmp_path, at):
    out = tmp_path / "interrupted"
    interrupted_run(out, SETTINGS, at=at)
    assert len(history(out)) == at
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert history(out) == history(straight)
