"""Issue 20 item 3: the online outer learning rate's cosine over the run's inner steps
(``OnlinePlan(schedule_over="steps")``, ``outer.schedule_over``) instead of its windows. The
rate of every window, recorded and applied (an SGD outer step written out), against the
cosine of the window's first step written out for growing windows listed by hand, and the
library's default, the cosine over the windows; a resumed run equals the straight one and a
checkpoint resumes only with its choice; online configs take the steps by default, old run
directories read the windows."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from online_resume import assert_resumes_bit_for_bit
from test_online import recipe

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build_online

STEPS, WINDOW, GROWTH, LR = 30, 3, 0.2, 0.02
# a window from step t trains 3 + floor(0.2 t) steps: 0-2, 3-5, 6-9, 10-14, 15-20, and 21-27
# would leave 2 < 3 steps, so the last one is 21-29 (tuner/windows.py)
STARTS = [0, 3, 6, 10, 15, 21]


def tuner(schedule_over: str | None, optimizer: str = "sgd") -> hd.HyperOptimizer:
    """An online loop on test_online's float64 MLP (SGD with tuned lr, momentum, weight
    decay), growing windows, a cosine outer schedule."""
    options = {} if schedule_over is None else {"schedule_over": schedule_over}
    plan = hd.plans.OnlinePlan(window=WINDOW, growth=GROWTH, **options)
    return hd.HyperOptimizer(recipe(STEPS), plan=plan, method=hd.reverse(),
                             optimizer=optimizer, lr=LR, schedule="cosine")


def stepped(loop: hd.HyperOptimizer) -> list[tuple[dict[str, torch.Tensor], object]]:
    """The raw values before each window and the window's record, to the run's end."""
    out = []
    while loop.stop_reason() is None:
        before = {n: v.detach().clone() for n, v in loop.raw.items()}
        out.append((before, loop.step()))
    return [*out, ({n: v.detach().clone() for n, v in loop.raw.items()}, None)]


@pytest.mark.parametrize("schedule_over", ["steps", "windows", None])
def test_each_windows_rate_is_the_cosine_written_out_and_the_sgd_step_uses_it(schedule_over):
    """Window h starting at step t_h: lr_h = LR (1 + cos(pi t_h / N)) / 2 over the steps,
    LR (1 + cos(pi h / W)) / 2 over the windows (the default); the outer SGD step moves every
    raw value by -lr_h g_h."""
    runs = stepped(tuner(schedule_over))
    assert len(runs) - 1 == len(STARTS)
    for h, ((raw, record), (after, _)) in enumerate(itertools.pairwise(runs)):
        assert record.status == "ok"
        position = STARTS[h] / STEPS if schedule_over == "steps" else h / len(STARTS)
        lr = LR * (1.0 + math.cos(math.pi * position)) / 2.0
        assert record.lr == pytest.approx(lr, rel=1e-14, abs=0.0)
        for name, g in record.grad.items():
            expected = raw[name].double() - lr * torch.as_tensor(g, dtype=torch.float64)
            torch.testing.assert_close(after[name].double(), expected, rtol=1e-12, atol=1e-15)


def test_the_steps_cosine_decays_slower_early_with_growing_windows():
    """Over the steps the second window (t = 3 of 30) keeps 97.6% of the rate; over the
    windows (h = 1 of 6) 93.3%: the windows' index runs ahead of the training."""
    steps = [r.lr for _, r in stepped(tuner("steps"))[:-1]]
    windows = [r.lr for _, r in stepped(tuner("windows"))[:-1]]
    assert steps[0] == windows[0] == pytest.approx(LR)
    assert steps[1] / LR == pytest.approx((1 + math.cos(math.pi * 0.1)) / 2)
    assert windows[1] / LR == pytest.approx((1 + math.cos(math.pi / 6)) / 2)
    assert all(s > w for s, w in zip(steps[1:], windows[1:], strict=True))


def test_a_constant_schedule_ignores_it():
    plan = hd.plans.OnlinePlan(window=WINDOW, growth=GROWTH, schedule_over="steps")
    loop = hd.HyperOptimizer(recipe(STEPS), plan=plan, method=hd.reverse(), optimizer="sgd",
                             lr=LR, schedule="constant")
    assert [r.lr for _, r in stepped(loop)[:-1]] == [LR] * len(STARTS)


def test_a_resumed_run_over_the_steps_equals_the_straight_run(tmp_path):
    _, whole = assert_resumes_bit_for_bit(lambda: tuner("steps", "adam"), tmp_path,
                                                windows=2)
    windows = tuner("windows", "adam").run()
    assert [r.lr for r in whole.history] != [r.lr for r in windows.history]
    assert not torch.equal(whole.params["W1"], windows.params["W1"])


@pytest.mark.parametrize("value", ["epochs", "Steps", None, 1])
def test_the_plan_refuses_another_value(value):
    with pytest.raises(hd.HyperdiffError) as err:
        hd.plans.OnlinePlan(schedule_over=value)
    assert str(err.value) == ("HyperOptimizer: schedule_over must be one of ['windows', "
                              f"'steps'] (got {value!r})")


def test_a_checkpoint_resumes_only_with_its_schedule():
    first = tuner("steps", "adam")
    first.step()
    state = first.state_dict()
    assert state["schedule_over"] == "steps"
    with pytest.raises(hd.HyperdiffError) as err:
        tuner("windows", "adam").load_state_dict(state)
    assert str(err.value) == ("HyperOptimizer.load_state_dict: schedule_over must match the "
                              "saved run ('steps'; got 'windows')")
    # a checkpoint written before the choice (no entry) ran its cosine over the windows
    old = {k: v for k, v in tuner("windows", "adam").state_dict().items()
           if k != "schedule_over"}
    with pytest.raises(hd.HyperdiffError, match=r"\('windows'; got 'steps'\)$"):
        tuner("steps", "adam").load_state_dict(old)
    tuner("windows", "adam").load_state_dict(old)


# ------------------------------------------------------------------------------ the config
MLP = ["task.name=mlp_digits", "inner.steps=24", "outer.window=6"]


def test_online_runs_take_the_steps_by_default_and_the_key_reaches_the_plan():
    from hyperdiff.app.config import ONLINE_SCHEDULE_OVER

    online = [*MLP, "outer.mode=online"]
    assert load_config(overrides=online).outer.schedule_over == ONLINE_SCHEDULE_OVER == "steps"
    assert build_online(load_config(overrides=online))[1].plan.schedule_over == "steps"
    config = load_config(overrides=[*online, "outer.schedule_over=windows"])
    assert build_online(config)[1].plan.schedule_over == "windows"
    assert load_config(overrides=MLP[:-1]).outer.schedule_over == "windows"  # offline: unused
    with pytest.raises(hd.HyperdiffError, match=r"outer\.schedule_over"):
        load_config(overrides=[*online, "outer.schedule_over=epochs"])


def test_a_stored_config_without_the_key_reads_the_windows(tmp_path):
    """A run directory written before the choice ran its cosine over the windows: its config
    (read as stored, with ``legacy_values``) says so; a stored value is kept."""
    from hyperdiff.app.config import legacy_values

    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "mlp_digits"\n[outer]\nmode = "online"\n'
                    'window_growth = 0.2\nbeta1 = 0.5\nbeta2 = 0.99\nexplore_when = "broken"\n'
                    'settle = 0.75\nrescue = 3\n')
    assert load_config(path, stored=True).outer.schedule_over == "windows"
    assert legacy_values({"outer": {"schedule_over": "steps"}})["outer"]["schedule_over"] == (
        "steps")


def test_constant_windows_that_divide_the_run_give_the_same_run_either_way():
    """Without growth and with K dividing N, t_h / N = h K / N = h / W: the same rates, bit for
    bit (``horizon_digits``' 100 windows of 20 of 2000 steps keep their runs)."""
    runs = []
    for schedule_over in ("windows", "steps"):
        plan = hd.plans.OnlinePlan(window=WINDOW, schedule_over=schedule_over)
        runs.append(hd.HyperOptimizer(recipe(STEPS), plan=plan, method=hd.reverse(),
                                      optimizer="adam", lr=LR, schedule="cosine").run())
    assert len(runs[0].history) == STEPS // WINDOW
    assert [r.without_timing() for r in runs[0].history] == [
        r.without_timing() for r in runs[1].history]
