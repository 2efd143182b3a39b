"""The guard, the global phase and the stopping rules on small designed problems: warm starts
have no global phase, ``revert`` reads gradient-phase steps only, a run whose every step fails
ends after the phase, the guard's give-up names the good values its last steps re-trained and
the failures it did not count, a step outside its constraint trains nothing, the still-moving
warning names gradient-phase steps, and ``Stopping(patience=0)`` says how to turn it off."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.experiment import _still_moving
from hyperdiff.methods.base import Method
from hyperdiff.methods.reverse import reverse
from hyperdiff.tuner.budget import still_moving
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.offline_plan import OfflinePlan

DT = torch.float64
DOCS = Path(__file__).resolve().parents[1] / "docs" / "driver.md"


def one_step_problem(val, *, noisy: bool):
    """``h`` (log-positive, start 1): ``w`` from 0, one SGD step (lr 0.5) on ``(w - x)^2 / 2``
    for a minibatch ``x`` (one of 0, 1, 2, 3 when ``noisy``, else 1), so ``w_T = x / 2``; the
    validation and selection losses are ``val(h, w_T)``."""
    xs = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=DT) if noisy else torch.ones(4, 1,
                                                                                      dtype=DT)
    problem = hd.make_problem(lambda p, h, b: 0.5 * ((p["w"] - b[0]) ** 2).mean(),
                              lambda p, h, b: val(h["h"], p["w"][0]),
                              hd.HyperParameters(h=hd.scalar(1.0)),
                              {"w": torch.zeros(1, dtype=DT)}, optimizer=hd.sgd(0.5),
                              train_data=hd.minibatches(xs, batch_size=1),
                              val_data=(torch.zeros(1, 1, dtype=DT),), steps=1, probe=False)
    return problem, (torch.zeros(1, 1, dtype=DT),)


def scripted(values: dict[int, float]) -> tuple[Method, list[int]]:
    """Reverse mode whose n-th call returns the loss ``values[n]`` where given."""
    calls: list[int] = []
    inner = reverse()

    def run(problem, raw):
        found = inner.run(problem, raw)
        calls.append(len(calls))
        n = calls[-1]
        return replace(found, value=values[n]) if n in values else found

    return Method("scripted", run), calls


# ------------------------------------------------------------------ 1: warm starts, no phase
def quadratic_lr_problem():
    """GD at rate ``lr`` on ``(w - 1)^2`` (curvature 2), 2 steps per outer step, ``lr`` 0.005
    (a weak start: the default plan would run its global phase)."""
    dummy = (torch.zeros(1, 1, dtype=DT),)
    return hd.make_problem(lambda p, h, b: ((p["w"] - 1.0) ** 2).sum(),
                           lambda p, h, b: 0.5 * ((p["w"] - 1.0) ** 2).sum(),
                           hd.HyperParameters(lr=hd.scalar(0.005)),
                           {"w": torch.zeros(1, dtype=DT)}, optimizer=hd.sgd("lr"),
                           train_data=dummy, val_data=dummy, steps=2, probe=False)


def test_a_warm_start_run_has_no_global_phase():
    """Each step trains on from the last theta_T: the values are those of a run without the
    phase, and every loss is the hand-written chain of 2 GD steps per outer step."""
    run = HyperOptimizer(quadratic_lr_problem(), warm_start=True,
                         stopping=Stopping(max_steps=8, patience=None)).run()
    plain = HyperOptimizer(quadratic_lr_problem(), plan=OfflinePlan(warm_start=True, explore=0),
                           stopping=Stopping(max_steps=8, patience=None)).run()
    assert not any("global phase" in r.message for r in run.history)
    assert [r.hparams for r in run.history] == [r.hparams for r in plain.history]
    w = 0.0
    for record in run.history:
        for _ in range(2):
            w -= record.hparams["lr"] * 2.0 * (w - 1.0)
        assert record.val_loss == pytest.approx(0.5 * (w - 1.0) ** 2, rel=1e-12)
    assert run.history[-1].hparams["lr"] > run.history[0].hparams["lr"]  # the lr rose


@pytest.mark.parametrize("options, name, valid", [
    ({"explore": 3}, "explore", "0 or its default 8"),
    ({"explore_when": "always"}, "explore_when", "its default 'weak'"),
    ({"explore_decades": 1.0}, "explore_decades", "its default 2.0"),
])
def test_warm_starts_refuse_an_explicit_global_phase(options, name, valid):
    with pytest.raises(hd.HyperdiffError, match=rf"^HyperOptimizer: {name} must be "
                       rf"{re.escape(valid)} with warm_start=True \(a warm-started step .* "
                       r"warm-start runs have no global phase\) \(got "):
        OfflinePlan(warm_start=True, **options)


def test_warm_starts_accept_no_phase_or_the_default_one():
    """A control: 0 and the default 8 (which then does not run) are accepted."""
    OfflinePlan(warm_start=True, explore=0, explore_when="always")
    OfflinePlan(warm_start=True, explore=8)


def test_a_warm_start_checkpoint_that_ran_the_phase_is_refused():
    def loop():
        return HyperOptimizer(quadratic_lr_problem(), warm_start=True,
                              stopping=Stopping(max_steps=4, patience=None))

    run = loop()
    run.step(), run.step()
    state = {**run.state_dict(), "explored": True}
    with pytest.raises(hd.HyperdiffError, match="warm-start run that ran a global phase"):
        loop().load_state_dict(state, list(run.history))
    resumed = loop()  # a checkpoint saved before, whose phase did not run, resumes
    resumed.load_state_dict({**run.state_dict(), "explored": False}, list(run.history))
    assert resumed.step().hparams == run.step().hparams


# ------------------------------------------------------------------ 2: revert after the phase
def rising_gradient_steps(history, gradient_start: int, m: int) -> list[int]:
    """``revert=m`` written out: the gradient-phase steps at which the selection loss rose at
    each of the last ``m`` successful gradient-phase steps after the best one and the last
    return, the first of them above the best loss."""
    reverted: list[int] = []
    for record in history:
        if record.step < gradient_start or record.status != "ok":
            continue
        best = [r for r in history if r.best and r.step <= record.step][-1]
        after = max(reverted[-1] if reverted else -1, best.step, gradient_start - 1)
        tail = [r.selection_loss for r in history
                if r.status == "ok" and after < r.step <= record.step][-m:]
        rising = all(tail[i + 1] > tail[i] for i in range(len(tail) - 1))
        if len(tail) == m and rising and tail[0] > best.selection_loss:
            reverted.append(record.step)
    return reverted


def test_revert_does_not_count_the_global_phase_points():
    """Outer seed 6: point 3 of the phase scored 0.036, the first gradient step 0.102. The
    points are no gradient-phase steps, so the first gradient step cannot be a return."""

    def val(h, w):
        return 0.002 * (torch.log(h) - 1.0) ** 2 + 0.1 * w

    problem, selection = one_step_problem(val, noisy=True)
    loop = HyperOptimizer(problem, selection=selection, seed=6,
                          plan=OfflinePlan(explore=3, explore_when="always", revert=2),
                          stopping=Stopping(max_steps=9, patience=None))
    history = loop.run().history
    assert history[3].selection_loss < history[4].selection_loss  # the case
    assert "rose" not in history[4].message
    expected = rising_gradient_steps(history, 4, 2)
    assert loop.plan.reverted == expected
    assert [r.step for r in history if "rose" in r.message] == expected


# ------------------------------------------------------------------ 3: every step fails
def test_a_run_whose_every_step_fails_ends_after_the_global_phase():
    """SGD at 2.5x the stability limit diverges at any weight decay: the start and the 8
    points fail, and the run ends there with the error that names step 0's failure (before,
    steps 9.. retrained the start's values and ended on '5 outer steps in a row failed')."""
    dummy = (torch.zeros(1, 1, dtype=DT),)
    problem = hd.make_problem(
        lambda p, h, b: 0.5 * ((p["w"] - 1.0) ** 2).sum() + h["wd"] * (p["w"] ** 2).sum(),
        lambda p, h, b: 0.5 * ((p["w"] - 1.0) ** 2).sum(), hd.HyperParameters(wd=hd.scalar(1e-3)),
        {"w": torch.zeros(1, dtype=DT)}, optimizer=hd.sgd(5.0), train_data=dummy,
        val_data=dummy, steps=200, probe=False)
    loop = HyperOptimizer(problem, stopping=Stopping(max_steps=30))
    with pytest.raises(hd.NonFiniteError, match=r"^HyperOptimizer: all 9 outer steps failed, "
                       r"the start and the global phase's points tried after it; step 0: "
                       r"global phase: the start: step 0 failed \(the validation loss") as err:
        loop.run()
    assert [r.status for r in loop.history] == ["failed"] * 9
    assert loop.history[-1].message == str(err.value)
    assert loop.stop_reason() == "diverged"


# ------------------------------------------------------------------ 4: the guard's give-up
def test_the_guard_names_the_good_values_its_last_steps_retrained():
    """Steps 2..6 return an absurd loss: step 2 moved from step 1's values, steps 3-6 trained
    at them again (the guard restored them), where the outer learning rate plays no part."""

    def val(h, w):
        return (torch.log(h) - 2.0) ** 2 + 0 * w

    problem, selection = one_step_problem(val, noisy=False)
    method, _ = scripted({n: 1e40 for n in range(2, 9)})
    loop = HyperOptimizer(problem, method=method, selection=selection, max_failures=5,
                          plan=OfflinePlan(explore=0), stopping=Stopping(max_steps=14))
    with pytest.raises(hd.NonFiniteError) as err:
        loop.run()
    history = loop.history
    good = history[1].hparams["h"]
    assert [r.hparams["h"] for r in history[3:7]] == [good] * 4 != [history[2].hparams["h"]]
    message = str(err.value)
    assert message.startswith("HyperOptimizer: 5 outer steps in a row failed (last at step 6: ")
    assert (f"The last 4 failed steps (steps 3-6) trained at the last good values themselves "
            f"(h={good:.3g}), which a smaller outer step does not change: training diverges "
            "there on some minibatch orders") in message
    assert "Lower the inner learning rate" in message
    assert "Lower the outer learning rate" not in message


def test_a_single_failure_at_moved_values_keeps_the_outer_step_advice():
    """A control: with max_failures=1 the failed step moved from the good values."""
    problem, selection = one_step_problem(lambda h, w: (torch.log(h) - 2.0) ** 2 + 0 * w,
                                          noisy=False)
    method, _ = scripted({1: 1e40})
    loop = HyperOptimizer(problem, method=method, selection=selection, max_failures=1,
                          plan=OfflinePlan(explore=0), stopping=Stopping(max_steps=4))
    with pytest.raises(hd.NonFiniteError, match=r"1 outer steps in a row failed .* Lower the "
                       "outer learning rate"):
        loop.run()


def test_the_guard_names_the_failures_in_a_row_it_did_not_count():
    """Explore 3, max_failures 2: the gradient phase fails at the best point and starts over
    from the next best three times (not counted), then fails twice at the last one (counted):
    five failed steps in a row, two of them counted."""
    problem, selection = one_step_problem(lambda h, w: (torch.log(h) - 0.5) ** 2 + 0 * w,
                                          noisy=False)
    method, _ = scripted({n: math.nan for n in range(1, 6)})
    loop = HyperOptimizer(problem, method=method, selection=selection, max_failures=2,
                          plan=OfflinePlan(explore=3, explore_when="always"),
                          stopping=Stopping(max_steps=10, patience=None))
    with pytest.raises(hd.NonFiniteError) as err:
        loop.run()
    statuses = [r.status for r in loop.history]
    assert statuses == ["ok"] * 4 + ["failed"] * 5
    assert str(err.value).startswith(
        "HyperOptimizer: 2 outer steps in a row failed, after 3 more failed steps at other "
        "values before them, which do not count toward max_failures (last at step 8: ")
    assert "The last 2 failed steps (steps 7-8) trained at the last good values" in str(err.value)


# ------------------------------------------------------------------ 5: trainings
def test_a_step_outside_its_constraint_counts_no_training():
    """Outer lr 1000 overflows h = exp(u) to inf at step 1: that step trains nothing, so the
    trainings are the method's calls, step by step."""
    problem, selection = one_step_problem(lambda h, w: (torch.log(h) - 3.0) ** 2 + 0 * w,
                                          noisy=False)
    method, calls = scripted({})
    loop = HyperOptimizer(problem, method=method, lr=1000, selection=selection,
                          plan=OfflinePlan(explore=0), stopping=Stopping(max_steps=4,
                                                                        patience=None))
    seen = []
    for _ in range(4):
        record = loop.step()
        seen.append((record.status, record.trainings, len(calls)))
    assert "outside its constraint" in loop.history[1].message
    assert seen == [("ok", 1, 1), ("failed", 1, 1), ("ok", 2, 2), ("ok", 3, 3)]
    assert loop.trainings == len(calls) == loop.state_dict()["trainings"]


# ------------------------------------------------------------------ 6: still moving
def records(values: list[float]) -> list[StepRecord]:
    base = StepRecord(0, {"lam": 1.0}, "ok", 1.0, 1.0, 0.0, None, 1.0, None, None, 0.1, True, 1,
                      "", 0.0, 0.0)
    return [replace(base, step=s, hparams={"lam": v}) for s, v in enumerate(values)]


def driver(history, gradient_start):
    return SimpleNamespace(history=history, plan=SimpleNamespace(gradient_start=gradient_start),
                           stop_reason=lambda: f"budget: {len(history)} outer steps")


def test_the_still_moving_warning_names_gradient_phase_steps_after_a_phase():
    """A 7-step run whose phase took steps 0-3: the window is over its 3 gradient-phase steps
    (k = max(2, ceil(0.2 x 3)) = 2: 1.0 -> 1.5, 50%)."""
    history = records([1.0, 9.0, 0.1, 5.0, 1.0, 1.2, 1.5])
    config = SimpleNamespace(stop=SimpleNamespace(max_steps=7))
    moving = _still_moving(driver(history, 4), config, Path("RUN"))
    assert moving is not None and moving.startswith(
        "still moving: lam changed by 50% over the last 2 of the 3 gradient-phase steps "
        "(threshold 10%); give it more steps")


def test_the_still_moving_warning_without_a_phase_is_unchanged():
    """A control: without a phase the run's steps are its outer steps (tests match this)."""
    history = records([1.0, 2.0, 3.0, 4.0, 5.0])
    config = SimpleNamespace(stop=SimpleNamespace(max_steps=5))
    assert _still_moving(driver(history, 0), config, Path("RUN")).startswith(
        "still moving: lam changed by 67% over the last 2 of 5 outer steps (threshold 10%)")
    assert still_moving(history) == ("still moving: lam changed by 67% over the last 2 of 5 "
                                     "outer steps (threshold 10%)")


# ------------------------------------------------------------------ 7, 8: Stopping
def test_the_docs_give_the_library_step_budget():
    """Stopping()'s max_steps is 50, the config's stop.max_steps 30: the docs say both."""
    from hyperdiff.app.config import load_config

    assert Stopping().max_steps == 50 and load_config().stop.max_steps == 30
    text = " ".join(DOCS.read_text().split())
    assert "except the step budget: `Stopping()` has `max_steps=50`" in text


def test_patience_zero_names_none_to_turn_it_off():
    with pytest.raises(hd.HyperdiffError, match=r"^Stopping: patience must be a positive int, "
                       r"or None to turn early stopping off \(got 0\)$"):
        Stopping(patience=0)
