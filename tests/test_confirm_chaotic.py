"""A would-be best with a chaotic hypergradient is confirmed on other minibatch seeds
(``OfflinePlan(confirm_chaotic=c)``, ``outer.confirm_chaotic``; on by default, c = 2).

The run of test_confirm.py (a small tanh network, SGD on minibatches with a per-step noise
factor) with a stand-in method: reverse mode, whose hypergradient is multiplied by 1e6 at the
steps of ``CHAOTIC`` (chaotic: its norm far above 30 x max(|L_val|, 1)) and left as it is at
the others (calm: checked). The default outer step (signstep) follows the sign only, so every
run below goes through the same values. Every step's selection loss is checked against
trainings written out by hand: the step's own training at its minibatch seed, and where the
step is chaotic and its own loss beats the best so far (recomputed here from the expected
values), the mean with two more at ``confirm_seed(seed, step, k)``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from test_confirm import SEED, SELECTION, STEPS, selection_by_hand
from test_online_train_seed import problem

import hyperdiff as hd
from hyperdiff.engine.data import FullBatch
from hyperdiff.methods.base import Method
from hyperdiff.seeds import confirm_seed, minibatch_seed
from hyperdiff.tuner.confirm import chaotic_skipped
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

from conftest import sine_data

CHAOTIC = {0, 2, 4, 7}  # 0 and 4 would be bests by their own loss, 2 and 7 would not
INFLATE = 1e6


def inflated(chaotic_steps: set[int] = CHAOTIC) -> Method:
    """Reverse mode, its hypergradient x ``INFLATE`` at the steps of ``chaotic_steps`` (the
    step read from the training's minibatch seed)."""
    exact = hd.reverse()
    step_of = {minibatch_seed(SEED, s, 1, 0): s for s in range(STEPS)}

    def run(prob: hd.Problem, raw: dict[str, torch.Tensor]) -> Any:
        found = exact(prob, raw)
        if step_of[prob.seed] not in chaotic_steps:
            return found
        return dataclasses.replace(
            found, grad={k: v * INFLATE for k, v in found.grad.items()},
            grad_natural={k: v * INFLATE for k, v in found.grad_natural.items()})

    return Method("inflated", run)


def loop(prob: hd.Problem | None = None, chaotic_steps: set[int] = CHAOTIC,
         **options: Any) -> HyperOptimizer:
    plan = OfflinePlan(explore=0, **options)
    return HyperOptimizer(problem() if prob is None else prob, plan=plan,
                          method=inflated(chaotic_steps), lr=0.3, selection=SELECTION,
                          seed=SEED, stopping=Stopping(max_steps=STEPS, patience=None))


def own_loss(values: dict[str, float], step: int) -> float:
    """The step's own training (sample 0 of fold 0), by hand."""
    return selection_by_hand(values, minibatch_seed(SEED, step, 1, 0))


def test_the_stand_in_makes_exactly_the_chosen_steps_chaotic():
    history = loop(confirm_chaotic=0).run().history
    for record in history:
        bound = 30 * max(abs(record.val_loss), 1.0)
        assert (record.grad_norm > bound) == (record.step in CHAOTIC), record


def test_every_step_against_trainings_by_hand():
    checked = loop().run()  # the default: confirm_chaotic = 2
    best, confirmed_steps, passed_over = None, 0, 0
    for record in checked.history:
        own = own_loss(record.hparams, record.step)
        if record.step in CHAOTIC and (best is None or own < best):
            extra = [selection_by_hand(record.hparams, confirm_seed(SEED, record.step, k))
                     for k in range(2)]
            expected = (own + sum(extra)) / 3
            confirmed_steps += 1
            assert "chaotic hypergradient" in record.message
            assert "confirmed on 2 more minibatch seeds" in record.message
        else:
            expected = own
            assert "chaotic" not in record.message
            passed_over += record.step in CHAOTIC
        assert record.selection_loss == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert record.best == (best is None or expected < best)
        best = expected if record.best else best
        assert record.trainings == record.step + 1 + 2 * confirmed_steps
    assert confirmed_steps >= 2 and passed_over >= 1  # both branches of the rule are seen
    assert checked.best_loss == best


def test_the_confirmations_leave_the_values_alone_and_change_the_pick():
    plain, checked = loop(confirm_chaotic=0).run(), loop().run()
    for p, c in zip(plain.history, checked.history, strict=True):
        assert c.hparams == p.hparams and c.grad == p.grad
    assert (plain.best_step, checked.best_step) == (4, 1)  # read off the runs


def test_confirm_counts_calm_steps_and_the_larger_count_wins():
    """With ``confirm = 1`` every would-be best gets one confirmation, a chaotic one two;
    with ``confirm = 3`` every would-be best three."""
    for confirm, chaotic_count in ((1, 2), (3, 3)):
        history = loop(confirm=confirm).run().history
        best, extra = None, 0
        for record in history:
            own = own_loss(record.hparams, record.step)
            count = 0
            if best is None or own < best:
                count = chaotic_count if record.step in CHAOTIC else confirm
            seeds = [confirm_seed(SEED, record.step, k) for k in range(count)]
            expected = (own + sum(selection_by_hand(record.hparams, s) for s in seeds)) / (
                1 + count)
            assert record.selection_loss == pytest.approx(expected, rel=1e-10, abs=1e-12)
            extra += count
            assert record.trainings == record.step + 1 + extra
            best = expected if best is None or expected < best else best


@pytest.mark.parametrize("stop_at", [1, 3, 6])
def test_a_resumed_run_repeats_an_uninterrupted_one(stop_at):
    straight = loop().run()
    first = loop()
    while first.step_index < stop_at:
        first.step()
    resumed = loop()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    result = resumed.run()
    assert [r.without_timing() for r in result.history] == [
        r.without_timing() for r in straight.history]


def full_batch_problem() -> hd.Problem:
    """:func:`problem` on its whole training set at every step (a fixed batch)."""
    x, y = sine_data(30, 4, seed=1)
    base = problem()
    return dataclasses.replace(base, train_data=FullBatch((x, y)))


@pytest.mark.parametrize(("make", "options", "why"), [
    (full_batch_problem, {}, "a fixed training batch"),
    (problem, {"warm_start": True}, "warm starts"),
])
def test_skipped_where_a_confirmation_would_not_tell(make, options, why):
    prob = make()
    assert chaotic_skipped([prob], warm_start=bool(options), discrete=False,
                           data_parallel=False) == why
    run = loop(prob, **options)
    assert run.plan.chaotic_count == 0
    history = run.run().history
    assert [r.trainings for r in history] == list(range(1, STEPS + 1))
    assert all("chaotic" not in r.message for r in history)


def test_the_reasons_to_skip():
    prob = problem()
    assert chaotic_skipped([prob], warm_start=False, discrete=False, data_parallel=False) == ""
    assert chaotic_skipped([prob], warm_start=False, discrete=True,
                           data_parallel=False) == "discrete hyperparameters"
    assert chaotic_skipped([prob], warm_start=False, discrete=False,
                           data_parallel=True) == "a data-parallel method"
    # one fold on minibatches is enough for the rule to apply
    assert chaotic_skipped([full_batch_problem(), prob], warm_start=False, discrete=False,
                           data_parallel=False) == ""


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_counts_are_refused(bad):
    with pytest.raises(hd.HyperdiffError, match=rf"confirm_chaotic must be .*\(got {bad!r}|"
                       rf"confirm_chaotic must be .*\(got {bad}\)"):
        OfflinePlan(confirm_chaotic=bad)


def test_the_config_default_a_stored_config_and_other_modes(tmp_path):
    from hyperdiff.app.config import legacy_values, load_config
    from hyperdiff.app.plans import build, build_online

    config = load_config(overrides=["task.name=ridge_diabetes"])
    assert config.outer.confirm_chaotic == 2 and OfflinePlan().confirm_chaotic == 2
    assert build(config)[1].plan.confirm_chaotic == 2
    off = load_config(overrides=["task.name=ridge_diabetes", "outer.confirm_chaotic=0"])
    assert build(off)[1].plan.confirm_chaotic == 0
    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "ridge_diabetes"\n[outer]\nconfirm = 0\n')
    assert load_config(path, stored=True).outer.confirm_chaotic == 0  # before the rule
    assert legacy_values({"outer": {"confirm": 0}})["outer"]["confirm_chaotic"] == 0
    online = ["task.name=ridge_diabetes", "outer.mode=online"]
    for allowed in (0, 2):  # off, or the default, which an online run leaves alone
        build_online(load_config(overrides=[*online, f"outer.confirm_chaotic={allowed}"]))
    with pytest.raises(hd.HyperdiffError, match=r"outer.confirm_chaotic must be 2 or 0 with "
                       r"outer.mode = 'online' .*got 3\)"):
        build_online(load_config(overrides=[*online, "outer.confirm_chaotic=3"]))


def test_a_data_parallel_method_skips_it():
    """In one process the data-parallel method runs unsharded; the plan still skips the rule
    (a plain confirmation would not shard the batch as the method's trainings do)."""
    run = HyperOptimizer(problem(), method=hd.distributed.data_parallel("reverse"), lr=0.3,
                         selection=SELECTION, seed=SEED, plan=OfflinePlan(explore=0),
                         stopping=Stopping(max_steps=2, patience=None))
    assert run.plan.data_parallel and run.plan.chaotic_count == 0
    plain = loop().plan
    assert not plain.data_parallel and plain.chaotic_count == 2
