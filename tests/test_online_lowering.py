"""Issue 20 item 3: an online outer step keeps only ``lowering`` of its move where the move lowers
the learning rate of the rest of the run (``OnlinePlan(lowering=...)``, ``outer.lowering``;
tuner/lowering.py). The direction of each raw value against float64 central differences of the
remaining optimization time written out step by step; the outer step (SGD written out by hand,
and Adam written out by hand over the recorded hypergradients) against the rule spelled out per
entry; resume bit for bit; checkpoints and configs keep the choice; old runs read 1."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from online_resume import assert_resumes_bit_for_bit
from test_online import problem, recipe
from test_online_schedule_over import stepped

import hyperdiff as hd
from hyperdiff.app.config import legacy_values, load_config
from hyperdiff.app.plans import build_online
from hyperdiff.tuner.lowering import lr_direction, shortened

STEPS, WINDOW, LR = 12, 3, 0.2


def schedule_problem(steps: int = 20) -> hd.Problem:
    """test_online's MLP trained by SGD on a warmup-cosine schedule (peak, warmup, final) with
    a tuned loss-term weight decay that the learning rate does not read."""
    lr = hd.schedule("warmup_cosine", steps)
    hp = hd.HyperParameters({**lr.hyperparameters(peak=0.1, warmup=0.3, final=0.2),
                             "wd": hd.scalar(1e-2)})
    return problem(hp, hd.sgd(lr, 0.5), steps)


def remaining_time(prob: hd.Problem, raw: dict[str, torch.Tensor], start: int) -> float:
    """sum_{start <= t < N} lr_t, each lr_t from the schedule's one-step ``value``."""
    coef = prob.optimizer.coefficients["lr"]
    natural = prob.hparams.natural(raw)
    return sum(float(coef.value(natural, t)) for t in range(start, prob.steps))


@pytest.mark.parametrize("start", [0, 3, 6, 10, 19])
def test_the_direction_is_the_sign_of_the_remaining_time_by_central_differences(start):
    prob = schedule_problem()
    raw = {n: v.double() for n, v in prob.hparams.raw.items()}
    direction = lr_direction(prob, raw, start)
    assert direction is not None
    eps = 1e-6
    for name in raw:
        plus, minus = dict(raw), dict(raw)
        plus[name], minus[name] = raw[name] + eps, raw[name] - eps
        fd = (remaining_time(prob, plus, start) - remaining_time(prob, minus, start)) / (2 * eps)
        expected = 0.0 if abs(fd) < 1e-9 else math.copysign(1.0, fd)
        assert float(direction[name]) == expected, (name, fd)
    assert float(direction["lr_peak"]) == 1.0 and float(direction["wd"]) == 0.0


def test_no_direction_without_a_named_learning_rate_or_a_step_left():
    prob = recipe(STEPS)
    raw = prob.hparams.raw
    assert {n: float(d) for n, d in lr_direction(prob, raw, 4).items()} == {
        "lr": 1.0, "momentum": 0.0, "wd": 0.0}
    assert lr_direction(prob, raw, STEPS) is None  # after the last step: nothing to lower
    fixed = problem(hd.HyperParameters(wd=hd.scalar(1e-2)), hd.sgd(0.1), STEPS)
    assert lr_direction(fixed, fixed.hparams.raw, 0) is None


def test_shortened_scales_only_the_moves_against_the_direction():
    before = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor(2.0)}
    after = {"a": torch.tensor([1.5, 0.5, 1.5, 0.5]), "b": torch.tensor(1.0)}
    direction = {"a": torch.tensor([1.0, 1.0, -1.0, 0.0]), "b": torch.tensor(1.0)}
    kept = shortened(before, after, direction, 0.25)
    # entry by entry: up along +1 kept, down along +1 a quarter, up along -1 a quarter, 0 kept
    torch.testing.assert_close(kept["a"], torch.tensor([1.5, 0.875, 1.125, 0.5]))
    torch.testing.assert_close(kept["b"], torch.tensor(1.75))


# ------------------------------------------------------------------------------ the outer step
def tuner(lowering: float | None, optimizer: str = "sgd") -> hd.HyperOptimizer:
    """An online loop on test_online's float64 MLP (SGD with tuned lr, momentum and a loss-term
    weight decay), windows of 3, a constant outer lr."""
    options = {} if lowering is None else {"lowering": lowering}
    plan = hd.plans.OnlinePlan(window=WINDOW, **options)
    return hd.HyperOptimizer(recipe(STEPS), plan=plan, method=hd.reverse(),
                             optimizer=optimizer, lr=LR, schedule="constant")


@pytest.mark.parametrize("keep", [0.3, 0.5, 1.0])
def test_the_sgd_step_keeps_a_fraction_of_every_lowering_of_the_lr(keep):
    """raw' = raw - LR g, except the log learning rate when its hypergradient is positive (the
    step lowers it): raw' = raw - keep LR g. Momentum and the weight decay step in full."""
    runs = stepped(tuner(keep))
    lowered = 0
    for (raw, record), (after, _) in itertools.pairwise(runs):
        assert record.status == "ok"
        for name, g in record.grad.items():  # the last window's too (s39: it sets the final
            g = float(g)  # values, which a fresh training runs over all N steps)
            scale = keep if name == "lr" and g > 0 else 1.0
            lowered += scale != 1.0
            expected = float(raw[name]) - scale * LR * g
            assert float(after[name]) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lowered > 0 or keep == 1.0  # the case is exercised


def test_adam_written_out_with_the_rule_gives_the_run():
    """The outer Adam (torch's betas) over the recorded hypergradients, its move shortened by
    hand where it lowers the learning rate."""
    keep, eps = 0.4, 1e-8
    runs = stepped(tuner(keep, "adam"))
    names = list(runs[0][0])
    raw = {n: runs[0][0][n].double().clone() for n in names}
    m = {n: torch.zeros_like(raw[n]) for n in names}
    v = {n: torch.zeros_like(raw[n]) for n in names}
    for t, (_, record) in enumerate(runs[:-1], start=1):
        for n in names:
            g = torch.as_tensor(record.grad[n], dtype=torch.float64)
            m[n] = 0.9 * m[n] + 0.1 * g
            v[n] = 0.999 * v[n] + 0.001 * g * g
            move = -LR * (m[n] / (1 - 0.9**t)) / ((v[n] / (1 - 0.999**t)).sqrt() + eps)
            if n == "lr" and float(move) < 0:
                move = keep * move
            raw[n] = raw[n] + move
    for n in names:
        assert float(runs[-1][0][n]) == pytest.approx(float(raw[n]), rel=1e-6, abs=1e-9)


def test_lowering_one_is_the_plain_step():
    a, b = tuner(None, "adam").run(), tuner(1.0, "adam").run()
    assert [r.without_timing() for r in a.history] == [r.without_timing() for r in b.history]
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_a_resumed_run_with_lowering_equals_the_straight_run(tmp_path):
    _, whole = assert_resumes_bit_for_bit(lambda: tuner(0.3, "adam"), tmp_path, windows=2)
    plain = tuner(1.0, "adam").run()
    assert [r.hparams["lr"] for r in whole.history] != [r.hparams["lr"] for r in plain.history]


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, math.nan, "half", None])
def test_the_plan_refuses_a_value_outside_zero_one(value):
    with pytest.raises(hd.HyperdiffError) as err:
        hd.plans.OnlinePlan(lowering=value)
    assert str(err.value).startswith("HyperOptimizer: lowering must be a ")
    assert str(err.value).endswith(f"(got {value!r})")


def test_a_checkpoint_resumes_only_with_its_lowering():
    first = tuner(0.3, "adam")
    first.step()
    state = first.state_dict()
    assert state["lowering"] == 0.3
    with pytest.raises(hd.HyperdiffError) as err:
        tuner(1.0, "adam").load_state_dict(state)
    assert str(err.value) == ("HyperOptimizer.load_state_dict: lowering must match the saved "
                              "run (0.3; got 1.0)")
    # a checkpoint written before the option (no entry) kept every move
    old = {k: v for k, v in tuner(1.0, "adam").state_dict().items() if k != "lowering"}
    with pytest.raises(hd.HyperdiffError, match=r"\(1\.0; got 0\.3\)$"):
        tuner(0.3, "adam").load_state_dict(old)
    tuner(1.0, "adam").load_state_dict(old)


# ------------------------------------------------------------------------------ the config
MLP = ["task.name=mlp_digits", "inner.steps=24", "outer.window=6"]


def test_online_runs_lower_at_a_fifth_by_default_and_the_key_reaches_the_plan():
    from hyperdiff.app.config import ONLINE_LOWERING

    online = [*MLP, "outer.mode=online"]
    assert load_config(overrides=online).outer.lowering == ONLINE_LOWERING == 0.2
    assert build_online(load_config(overrides=online))[1].plan.lowering == 0.2
    assert load_config(overrides=MLP[:-1]).outer.lowering == 1.0  # offline: unused
    assert hd.plans.OnlinePlan().lowering == 1.0  # the library keeps every move
    config = load_config(overrides=[*online, "outer.lowering=0.25"])
    assert build_online(config)[1].plan.lowering == 0.25
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(hd.HyperdiffError, match=r"outer\.lowering"):
            load_config(overrides=[*online, f"outer.lowering={bad}"])


def test_a_stored_config_without_the_key_reads_one(tmp_path):
    """A run directory written before the option kept every move: its config (read as stored,
    with ``legacy_values``) says so; a stored value is kept."""
    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "mlp_digits"\n[outer]\nmode = "online"\n'
                    'window_growth = 0.2\nbeta1 = 0.5\nbeta2 = 0.99\nexplore_when = "broken"\n'
                    'settle = 0.75\nrescue = 3\nschedule_over = "steps"\n')
    assert load_config(path, stored=True).outer.lowering == 1.0
    assert legacy_values({"outer": {"lowering": 0.3}})["outer"]["lowering"] == 0.3
