"""Common random numbers offline (``OfflinePlan(common_seed=True)``, ``outer.common_seed``).

On the small tanh network of test_online_train_seed.py (SGD on minibatches with a per-step
noise factor keyed by the seed), every step's selection loss is checked against SGD written
out by hand (test_confirm.py) at the record's values: with common seeds at step 0's minibatch
seed, without at each step's own. Two samples keep two seeds, the same at every step. A
resumed run repeats an uninterrupted one (the config key: test_offline_only_keys.py).
"""

from __future__ import annotations

import copy

import pytest
from test_confirm import SEED, selection_by_hand
from test_confirm import loop as confirm_loop

import hyperdiff as hd
from hyperdiff.seeds import minibatch_seed
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.offline_plan import OfflinePlan


def loop(common: bool, samples: int = 1) -> HyperOptimizer:
    return confirm_loop(0, samples, common_seed=common)


@pytest.mark.parametrize("common", [True, False])
def test_every_step_trains_on_its_seed(common):
    for record in loop(common).run().history:
        seed = minibatch_seed(SEED, 0 if common else record.step, 1, 0)
        assert record.selection_loss == pytest.approx(
            selection_by_hand(record.hparams, seed), rel=1e-10, abs=1e-12)


def test_two_samples_keep_their_two_seeds():
    for record in loop(True, samples=2).run().history:
        by_hand = [selection_by_hand(record.hparams, minibatch_seed(SEED, 0, 2, i))
                   for i in range(2)]
        assert record.selection_loss == pytest.approx(sum(by_hand) / 2, rel=1e-10, abs=1e-12)


def test_the_runs_differ():
    common, own = loop(True).run(), loop(False).run()
    assert common.history[0].selection_loss == own.history[0].selection_loss  # both seed 0's
    assert [r.hparams for r in common.history[2:]] != [r.hparams for r in own.history[2:]]


@pytest.mark.parametrize("stop_at", [1, 4])
def test_a_resumed_run_repeats_an_uninterrupted_one(stop_at):
    straight = loop(True).run()
    first = loop(True)
    while first.step_index < stop_at:
        first.step()
    resumed = loop(True)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    assert [r.without_timing() for r in resumed.run().history] == [
        r.without_timing() for r in straight.history]


def test_bad_common_seed_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: common_seed must be True or "
                       r"False \(got 1\)"):
        OfflinePlan(common_seed=1)  # type: ignore[arg-type]
