"""Chaotic steps are ranked below calm ones (``Stopping.chaos_ratio``, ``stop.chaos_ratio``; off
by default).

A stand-in method returns, per outer step (found from its minibatch seed), a chosen validation
loss and a hypergradient of a chosen norm, so the ranking's every case is set by hand: the
expected best steps below are read off the tables, not computed by the code under test.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from test_driver import ridge_problem

import hyperdiff as hd
from hyperdiff.methods.base import Method, finish
from hyperdiff.seeds import minibatch_seed
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan


def scripted(losses: list[float], norms: list[float]) -> Method:
    """Step ``s`` (seed ``minibatch_seed(0, s, 1, 0)``) returns validation loss ``losses[s]``
    and a hypergradient of norm ``norms[s]`` (a tiny step's worth, pointing down)."""
    step_of = {minibatch_seed(0, s, 1, 0): s for s in range(len(losses))}

    def run(problem, raw):
        s = step_of[problem.seed]
        grad = {name: torch.full_like(v, norms[s]) for name, v in raw.items()}
        loss = torch.tensor(losses[s], dtype=torch.float64)
        return finish(problem, raw, method="scripted", value=loss, grad=grad,
                      params=problem.params, buffers=problem.buffers,
                      train_losses=loss.reshape(1), started=time.perf_counter())

    return Method("scripted", run)


def run(losses, norms, ratio=30.0, patience=None, stop_at=None):
    problem, _ = ridge_problem(lam=0.05)
    loop = HyperOptimizer(problem, method=scripted(losses, norms), lr=1e-6,
                          plan=OfflinePlan(explore=0),
                          stopping=Stopping(max_steps=len(losses), patience=patience,
                                            chaos_ratio=ratio))
    while not loop.done and (stop_at is None or loop.step_index < stop_at):
        loop.step()
    return loop


# losses and hypergradient norms; chaotic where norm > 30 x max(|loss|, 1), i.e. > 30 here
LOSSES = [1.0, 0.8, 0.5, 0.7, 0.6, 0.4]
NORMS = [0.1, 0.2, 100.0, 0.3, 0.2, 31.0]


def test_a_chaotic_step_with_the_lowest_loss_is_not_the_result():
    loop = run(LOSSES, NORMS)
    result = loop.result()
    assert [r.best for r in result.history] == [True, True, False, True, True, False]
    assert result.best_step == 4 and result.best_loss == pytest.approx(0.6)
    for step in (2, 5):
        message = result.history[step].message
        assert "chaotic" in message and "chaos_ratio 30 x" in message, message
    # a calm loss that is not lower says nothing
    assert result.history[3].message == ""


def test_without_the_rule_the_lowest_loss_wins():
    result = run(LOSSES, NORMS, ratio=None).result()
    assert result.best_step == 5 and result.best_loss == pytest.approx(0.4)
    assert all("chaotic" not in r.message for r in result.history)


def test_a_calm_step_replaces_a_chaotic_best_whatever_its_loss():
    # step 0 chaotic, then calm steps: the first calm one wins though its loss is higher
    result = run([0.5, 0.9, 0.95, 0.85], [500.0, 0.1, 0.1, 0.1]).result()
    assert [r.best for r in result.history] == [True, True, False, True]
    assert result.best_step == 3
    # the edge: a norm of exactly 30 x max(|L|, 1) is calm
    result = run([0.5, 0.3], [0.1, 30.0]).result()
    assert result.best_step == 1


def test_all_chaotic_steps_rank_by_their_loss():
    result = run([2.0, 1.5, 1.8], [1e3, 1e3, 1e3]).result()
    assert result.best_step == 1  # 30 x max(|1.5|, 1) = 45 < 1e3: chaotic, like the others


def test_a_chaotic_step_does_not_reset_early_stopping():
    # best calm step 0; steps 1-2 lower but chaotic: patience 2 stops after step 2
    loop = run([1.0, 0.5, 0.4, 0.3, 0.2], [0.1, 100.0, 100.0, 0.1, 0.1], patience=2)
    result = loop.result()
    assert len(result.history) == 3 and result.best_step == 0
    assert result.stop_reason.startswith("early stopping")


@pytest.mark.parametrize("stop_at", [2, 3, 5])
def test_a_resumed_run_ranks_as_the_straight_one(stop_at):
    straight = run(LOSSES, NORMS).history
    first = run(LOSSES, NORMS, stop_at=stop_at)
    problem, _ = ridge_problem(lam=0.05)
    resumed = HyperOptimizer(problem, method=scripted(LOSSES, NORMS), lr=1e-6,
                             plan=OfflinePlan(explore=0),
                             stopping=Stopping(max_steps=len(LOSSES), patience=None,
                                               chaos_ratio=30.0))
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    resumed.run()
    assert [r.without_timing() for r in resumed.history] == [r.without_timing()
                                                             for r in straight]


def test_bad_ratios_are_refused():
    for bad in (0.0, -1.0, math.nan, math.inf, "30"):
        with pytest.raises(hd.HyperdiffError, match="chaos_ratio must be"):
            Stopping(chaos_ratio=bad)


def test_off_by_default_on_when_set_and_a_stored_config_without_the_key(tmp_path):
    from hyperdiff.app.config import legacy_values, load_config
    from hyperdiff.app.plans import build

    config = load_config(overrides=["task.name=ridge_diabetes"])
    assert config.stop.chaos_ratio == 0.0 and Stopping().chaos_ratio is None
    assert build(config)[1].stopping.chaos_ratio is None
    on = load_config(overrides=["task.name=ridge_diabetes", "stop.chaos_ratio=30"])
    assert build(on)[1].stopping.chaos_ratio == 30.0
    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "ridge_diabetes"\n[stop]\ntravel = 3\nextend = 0\n')
    assert load_config(path, stored=True).stop.chaos_ratio == 0.0  # written before the rule
    assert legacy_values({"stop": {"travel": 3, "extend": 0}})["stop"]["chaos_ratio"] == 0.0


def test_a_meta_plan_ranks_by_loss_alone():
    from hyperdiff.tuner.meta_plan import MetaPlan
    from hyperdiff.tuner.online_plan import OnlinePlan

    assert OfflinePlan.reads_chaos and not MetaPlan.reads_chaos and not OnlinePlan.reads_chaos
