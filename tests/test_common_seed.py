"""Common random numbers offline (``OfflinePlan(common_seed=True)``, ``outer.common_seed``).

On the small tanh network of test_online_train_seed.py (SGD on minibatches with a per-step
noise factor keyed by the seed), every step's selection loss is checked against SGD written
out by hand (test_confirm.py) at the record's values: with common seeds at step 0's minibatch
seed, without at each step's own. Two samples keep two seeds, the same at every step. A
resumed run repeats an uninterrupted one; the config key is offline only.
"""

from __future__ import annotations

import copy

import pytest
from test_confirm import SELECTION, selection_by_hand
from test_online_train_seed import problem

import hyperdiff as hd
from hyperdiff.app.config import legacy_values, load_config
from hyperdiff.seeds import minibatch_seed
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

SEED, STEPS = 4, 6


def loop(common: bool, samples: int = 1) -> HyperOptimizer:
    plan = OfflinePlan(explore=0, common_seed=common, samples=samples)
    return HyperOptimizer(problem(), plan=plan, method=hd.reverse(), lr=0.3,
                          selection=SELECTION, seed=SEED,
                          stopping=Stopping(max_steps=STEPS, patience=None))


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


def test_the_config_key_is_offline_only_and_old_runs_read_false(tmp_path):
    config = load_config(overrides=["task.name=mlp_digits", "outer.common_seed=true"])
    assert config.outer.common_seed is True
    from hyperdiff.app.plans import build_online
    with pytest.raises(hd.HyperdiffError, match=r"outer.common_seed must be False with "
                       r"outer.mode = 'online' \(.*; got True\)"):
        build_online(load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                            "outer.common_seed=true"]))
    assert legacy_values({"outer": {"mode": "offline"}})["outer"]["common_seed"] is False
    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "mlp_digits"\n[outer]\ncommon_seed = true\n')
    assert load_config(path, stored=True).outer.common_seed is True
