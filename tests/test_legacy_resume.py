"""Run directories and checkpoints written before growing windows, online samples and the
curvature tangents' carried rows resume: a stored config without ``outer.window_growth`` reads
growth 0 and (online) one sample, as the code that wrote it ran; a checkpoint without
``growth`` and with every raw value's tangent rows (zeros where no carried coefficient reads
the value) continues exactly as the run that never stopped. Each old layout is built here from
today's checkpoint by hand (what the old code wrote: the rows it carried were 0)."""

from __future__ import annotations

import pytest
import torch
from test_online_cost import penalized_problem

import hyperdiff as hd
from hyperdiff.app.config import legacy_values, load_config
from hyperdiff.methods.curvature_rule import carried_rows


def stored(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, stored=True)


def test_a_stored_online_config_without_window_growth_reads_growth_0_and_one_sample(tmp_path):
    config = stored(tmp_path, '[task]\nname = "mlp_digits"\n[outer]\nmode = "online"\n'
                    'samples = 2\nwindow = 10\n')
    assert config.outer.window_growth == 0.0 and config.outer.samples == 1
    assert config.outer.window == 10


def test_a_stored_offline_config_without_window_growth_keeps_its_samples(tmp_path):
    config = stored(tmp_path, '[task]\nname = "mlp_digits"\n[outer]\nsamples = 3\n')
    assert config.outer.window_growth == 0.0 and config.outer.samples == 3


def test_a_stored_config_with_window_growth_is_read_as_written(tmp_path):
    config = stored(tmp_path, '[task]\nname = "mlp_digits"\n[outer]\nmode = "online"\n'
                    'samples = 2\nval_batch = 64\nwindow_growth = 0.1\n')
    assert config.outer.window_growth == 0.1 and config.outer.samples == 2
    fresh = load_config(data={"task": {"name": "mlp_digits"}, "outer": {"mode": "online"}})
    assert fresh.outer.window_growth == 0.2  # a new run gets today's default
    today = {"outer": {"window_growth": 0.3, "explore": 8, "explore_when": "broken",
                       "beta1": 0.5, "beta2": 0.9, "rescue": 3, "settle": 0.75,
                       "schedule_over": "steps", "lowering": 0.5, "retry": 2, "confirm": 1,
                       "confirm_chaotic": 3, "revert": 3, "common_seed": True}}
    assert legacy_values(today) == today
    assert legacy_values({"outer": {"window_growth": 0.3, "beta1": 0.5, "beta2": 0.9,
                                    "settle": 0.5}}) == {
        "outer": {"window_growth": 0.3, "beta1": 0.5, "beta2": 0.9, "settle": 0.5,
                  "explore": 0, "explore_when": "always", "rescue": 0,
                  "schedule_over": "windows", "lowering": 1.0, "retry": 0, "confirm": 0,
                  "confirm_chaotic": 0, "revert": 0, "common_seed": False}}


def loop():
    return hd.HyperOptimizer(penalized_problem(12), plan=hd.plans.OnlinePlan(window=3),
                             method=hd.methods.curvature(horizon=20), optimizer="adam",
                             lr=0.2, seed=3)


def old_layout(state: dict, problem) -> dict:
    """``state`` as the code before growing windows and carried rows wrote it: no ``growth``
    entry, every raw value's row in the tangents (z, zb: (P, n)), 0 where not carried."""
    rows = carried_rows(problem)
    numel = problem.hparams.numel
    tangent = []
    for t in state["tangent"]:
        if t.dim() == 2:
            full = torch.zeros(numel, t.shape[1], dtype=t.dtype)
            full[rows] = t
            t = full
        tangent.append(t)
    return {**{k: v for k, v in state.items() if k != "growth"}, "tangent": tangent}


def test_a_checkpoint_in_the_old_layout_continues_as_the_run_that_never_stopped():
    whole = loop().run()
    first = loop()
    first.step()
    first.step()
    state = old_layout(first.state_dict(), first.plan.problem)
    assert state["tangent"][0].shape == (penalized_problem(12).hparams.numel, 28)
    second = loop()
    second.load_state_dict(state)
    resumed = second.run()
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k])
    assert [r.without_timing() for r in resumed.history] == [
        r.without_timing() for r in whole.history]


def test_an_old_layout_tangent_with_a_non_zero_row_that_is_not_carried_is_refused():
    first = loop()
    first.step()
    state = old_layout(first.state_dict(), first.plan.problem)
    rows = set(carried_rows(first.plan.problem).tolist())
    other = next(i for i in range(state["tangent"][0].shape[0]) if i not in rows)
    state["tangent"][0][other, 0] = 1e-3  # not what the old code could have written
    with pytest.raises(hd.HyperdiffError, match="damaged"):
        loop().load_state_dict(state)


@pytest.mark.parametrize("other", [{"samples": 3}, {"val_batch_size": 3}])
def test_a_checkpoint_of_other_samples_or_validation_rows_is_refused(other):
    """Loading a checkpoint into a loop that draws other validation samples would continue
    with other draws than the saved run's: refused, naming the entry."""
    from test_online_samples import online, regression

    settings = {"samples": 2, "val_batch_size": 2, **other}
    first = online(regression(), hd.reverse(), 2)
    first.step()
    key, value = next(iter(other.items()))
    with pytest.raises(hd.HyperdiffError, match=rf"{key} must match the saved run \(2; got "
                       rf"{value}\)"):
        online(regression(), hd.reverse(), settings["samples"],
               val_batch_size=settings["val_batch_size"]).load_state_dict(first.state_dict())


def test_a_checkpoint_without_samples_entries_loads_as_one_sample():
    """Checkpoints written before online samples hold neither entry: one sample."""
    from test_online_samples import online, regression

    first = online(regression(), hd.reverse(), 1)
    first.step()
    state = {k: v for k, v in first.state_dict().items()
             if k not in ("samples", "val_batch_size")}
    online(regression(), hd.reverse(), 1).load_state_dict(state)
    with pytest.raises(hd.HyperdiffError, match=r"samples must match the saved run \(1; got 2"):
        online(regression(), hd.reverse(), 2).load_state_dict(state)
