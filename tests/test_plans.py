"""Issue 19 item 3: one outer loop, two plans. Every online-capable method x {offline, online}
runs through the one ``HyperOptimizer``; the guard, resuming bit for bit and the callbacks
work for both plans; REINFORCE and temperature annealing work online.

References: a hand-written float64 unroll of the inner SGD with central finite differences
(the exact methods' hypergradients), the enumerated expected loss ``J(u) = sum_z p_z L(z)``
differentiated by autograd (REINFORCE), and the geometric schedule written out (annealing).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer

DT = torch.float64
STEPS, INNER_LR = 6, 0.1
X = torch.linspace(-1.0, 1.0, 24, dtype=DT).reshape(8, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.1 * torch.cos(torch.arange(8, dtype=DT))
XV, YV = X.flip(0) * 0.9, Y.flip(0) + 0.05


def _mse(w, x, y):
    return ((x @ w - y) ** 2).mean()


def ridge(steps: int = STEPS, lam: float = 0.3, momentum: float = 0.0) -> hd.Problem:
    """Ridge regression trained by full-batch SGD (heavy-ball ``momentum``): ``steps`` steps
    from w = 0."""
    return hd.make_problem(
        lambda p, h, b: _mse(p["w"], *b) + h["lam"] * p["w"].square().sum(),
        lambda p, h, b: _mse(p["w"], *b), hd.HyperParameters(lam=hd.scalar(lam)),
        {"w": torch.zeros(3, dtype=DT)}, optimizer=hd.sgd(INNER_LR, momentum),
        train_data=(X, Y), val_data=(XV, YV), steps=steps)


def unrolled_val_loss(raw_lam: float, steps: int = STEPS, momentum: float = 0.0) -> float:
    """The validation loss after ``steps`` SGD steps at raw value ``raw_lam``, written out."""
    lam = float(ridge().hparams.natural({"lam": torch.tensor(raw_lam, dtype=DT)})["lam"])
    w, v = torch.zeros(3, dtype=DT), torch.zeros(3, dtype=DT)
    for _ in range(steps):
        grad = 2 * X.T @ (X @ w - Y) / len(Y) + 2 * lam * w
        v = momentum * v + grad
        w = w - INNER_LR * v
    return float(_mse(w, XV, YV))


def finite_difference(raw_lam: float, eps: float = 1e-6, momentum: float = 0.0) -> float:
    return (unrolled_val_loss(raw_lam + eps, momentum=momentum)
            - unrolled_val_loss(raw_lam - eps, momentum=momentum)) / (2 * eps)


PLANS = {"offline": lambda: hd.plans.OfflinePlan(),
         "online": lambda: hd.plans.OnlinePlan(window=STEPS)}
ONLINE_AND_OFFLINE = {"reverse": hd.reverse, "forward": hd.forward, "implicit": hd.implicit,
                      "truncated": lambda: hd.truncated(3), "checkpointed": hd.checkpointed,
                      "reversible": hd.reversible,
                      "finite_difference": lambda: hd.finite_difference(warn=False),
                      "curvature": lambda: hd.methods.curvature(horizon=None)}
EXACT = ("reverse", "forward", "checkpointed", "reversible")
MOMENTUM = {"reversible": 0.5}  # it reverses heavy-ball SGD only


def loop(plan_name: str, method, **kwargs) -> HyperOptimizer:
    """One window of the whole run online (``[0, T)`` from theta_0), one retraining offline."""
    steps = kwargs.pop("steps", STEPS)
    plan = kwargs.pop("plan", None) or PLANS[plan_name]()
    problem = ridge(steps, momentum=MOMENTUM.get(method.name, 0.0))
    stopping = hd.Stopping(max_steps=3) if plan.ranks else None  # online: one run, no rule
    return HyperOptimizer(problem, plan=plan, method=method, lr=0.05,
                          schedule="constant", stopping=stopping, **kwargs)


def test_every_online_method_is_a_row_of_the_methods_x_plans_table():
    online = set(hd.methods.registry.methods_where(online=True, offline=True))
    assert online == set(ONLINE_AND_OFFLINE)


@pytest.mark.filterwarnings("ignore:HyperOptimizer. no selection split")
@pytest.mark.filterwarnings("ignore:implicit. training did not reach a stationary point")
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("name", list(ONLINE_AND_OFFLINE))
def test_methods_x_plans_run_through_the_one_loop(name, plan_name):
    """The first step's hypergradient is the segment [0, T) from theta_0 in both plans: the
    unroll's central difference for exact methods, the same method offline for the others."""
    opt = loop(plan_name, ONLINE_AND_OFFLINE[name]())
    record = opt.step()
    assert record.status == "ok" and opt.step_index == 1
    raw, momentum = float(ridge().hparams.raw["lam"]), MOMENTUM.get(name, 0.0)
    if name in EXACT:
        assert record.grad["lam"] == pytest.approx(finite_difference(raw, momentum=momentum),
                                                   rel=1e-6)
    else:
        reference = loop("offline", ONLINE_AND_OFFLINE[name]()).step().grad["lam"]
        assert record.grad["lam"] == pytest.approx(reference, rel=1e-9, abs=1e-14)
    assert record.val_loss == pytest.approx(unrolled_val_loss(raw, momentum=momentum),
                                            rel=1e-12)


@pytest.mark.parametrize("name", ["reverse", "forward", "curvature"])
def test_online_windows_run_to_the_end_of_the_training(name):
    method = {"reverse": hd.reverse, "forward": hd.forward,
              "curvature": lambda: hd.methods.curvature(horizon=50)}[name]()
    opt = HyperOptimizer(ridge(12), plan=hd.plans.OnlinePlan(window=4), method=method,
                         lr=0.01, schedule="constant")
    result = opt.run()
    assert isinstance(result, hd.plans.OnlineResult)
    assert result.steps == 12 and result.hyper_steps == 3 == len(result.history)
    assert opt.stop_reason() == "one run of 12 inner steps" and opt.done
    assert opt.where() == "inner step 12"


@pytest.mark.filterwarnings("ignore:HyperOptimizer. no selection split")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_the_guard_restores_the_last_good_step_in_both_plans(plan_name):
    opt = loop(plan_name, hd.reverse(), steps=12 if plan_name == "online" else STEPS,
               plan=hd.plans.OnlinePlan(window=3) if plan_name == "online" else None)
    good = opt.raw
    assert opt.step().status == "ok"
    opt.set_raw({"lam": torch.tensor(-1e4, dtype=DT)})  # exp(-1e4) rounds onto the bound 0
    record = opt.step()
    assert record.status == "failed" and "outside its constraint" in record.message
    assert torch.equal(opt.raw["lam"], good["lam"]) and opt.guard.scale == 0.5
    assert opt.step().status == "ok"


def resumable(plan_name: str, method_name: str) -> HyperOptimizer:
    if plan_name == "online":
        return HyperOptimizer(ridge(12), plan=hd.plans.OnlinePlan(window=2),
                              method=ONLINE_AND_OFFLINE[method_name](), lr=0.05,
                              schedule="cosine")
    return HyperOptimizer(ridge(), plan=hd.plans.OfflinePlan(warm_start=True),
                          method=ONLINE_AND_OFFLINE[method_name](), lr=0.05,
                          stopping=hd.Stopping(max_steps=6))


@pytest.mark.filterwarnings("ignore:HyperOptimizer. no selection split")
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("method_name", ["reverse", "forward"])
def test_a_resumed_run_equals_the_whole_run_bit_for_bit(plan_name, method_name):
    whole = resumable(plan_name, method_name)
    whole.run()
    first = resumable(plan_name, method_name)
    for _ in range(3):
        first.step()
    state, history = copy.deepcopy(first.state_dict()), list(first.history)
    second = resumable(plan_name, method_name)
    second.load_state_dict(state, history)
    second.run()
    assert torch.equal(second.raw["lam"], whole.raw["lam"])
    assert [r.without_timing() for r in second.history] == [
        r.without_timing() for r in whole.history]


@pytest.mark.filterwarnings("ignore:HyperOptimizer. no selection split")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_callbacks_see_every_step_of_both_plans(plan_name):
    seen = []
    opt = loop(plan_name, hd.reverse(), steps=12 if plan_name == "online" else STEPS,
               plan=hd.plans.OnlinePlan(window=4) if plan_name == "online" else None)
    opt.run(callbacks=[lambda o, r: seen.append((o, r.step))])
    assert seen == [(opt, s) for s in range(3)]


def test_the_deprecated_online_tuner_is_the_one_loop_with_the_online_plan():
    with pytest.warns(DeprecationWarning, match=r"hd.online.OnlineTuner is deprecated; use "
                      r"hd.HyperOptimizer"):
        tuner = hd.online.OnlineTuner(ridge(12), window=4, method="reverse", lr=0.01)
    plain = HyperOptimizer(ridge(12), plan=hd.plans.OnlinePlan(window=4), method=hd.reverse(),
                           lr=0.01, schedule="constant")
    assert isinstance(tuner, HyperOptimizer) and isinstance(tuner.plan, hd.plans.OnlinePlan)
    shim, new = tuner.run(), plain.run()
    assert torch.equal(shim.final_raw["lam"], new.final_raw["lam"])
    assert [r.without_timing() for r in shim.history] == [
        r.without_timing() for r in new.history]


def test_what_the_online_plan_cannot_do_is_refused_with_the_fix():
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: samples must be its "
                       r"default 1 when a plan is given \(the plan takes it: "
                       r"hd.plans.OfflinePlan; hd.plans.OnlinePlan\(samples=...\) for "
                       r"validation samples per window\) \(got 4\)"):
        HyperOptimizer(ridge(), plan=hd.plans.OnlinePlan(window=2), samples=4)
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: problem must be one Problem "
                       r"\(an online run is one training; cross-validation folds are for the "
                       r"offline plan\) \(got '2 problems'\)"):
        HyperOptimizer([ridge(), ridge()], plan=hd.plans.OnlinePlan(window=2))
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: method must be a Method with "
                       r"a segment or one of \['checkpointed', 'curvature', "
                       r"'finite_difference', 'forward', 'implicit', 'reverse', 'reversible', "
                       r"'truncated'\] \(got fomaml\(\)\)"):
        HyperOptimizer(ridge(), plan=hd.plans.OnlinePlan(window=2), method="fomaml")


@pytest.mark.filterwarnings("ignore:HyperOptimizer. no selection split")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_a_plan_serves_one_loop(plan_name):
    plan = PLANS[plan_name]()
    HyperOptimizer(ridge(), plan=plan)
    with pytest.raises(hd.HyperdiffError, match=r"plan must be a new \w+Plan for each "
                       r"HyperOptimizer \(it holds one run's state; got one already given to "
                       r"another\)"):
        HyperOptimizer(ridge(), plan=plan)


def test_the_cli_refuses_auto_samples_online():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    config = load_config(overrides=["task.name=ridge_diabetes", "outer.mode=online",
                                    "task.cv_folds=0", "outer.auto_samples=true"])
    with pytest.raises(hd.HyperdiffError, match=r"^config: outer.auto_samples must be false "
                       r"with outer.mode = 'online' \(a window draws a fixed outer.samples "
                       r"validation samples; got true\)"):
        build_online(config)


# ------------------------------------------------------------------ discrete choices online
CHOICES = (0.0, 1.0, 2.5)
TARGET = 1.3


def choice_problem(*, mode: str = "reinforce", baseline: str = "moving_average",
                   temperature=1.0, steps: int = 300, init=(0.2, 0.5, 0.3)) -> hd.Problem:
    """A trained ridge part (its validation loss A_t drifts with training, whatever is
    chosen) plus the choice's own loss ``L(z) = (z - 1.3)^2``; the mode's own options only."""
    options = ({"baseline": baseline} if mode == "reinforce" else {"temperature": temperature})
    hparams = hd.HyperParameters(
        lam=hd.scalar(0.3),
        c=hd.categorical(CHOICES, mode=mode, init=list(init), **options))
    return hd.make_problem(
        lambda p, h, b: _mse(p["w"], *b) + h["lam"] * p["w"].square().sum(),
        lambda p, h, b: _mse(p["w"], *b) + (hd.choose(h["c"]) - TARGET) ** 2, hparams,
        {"w": torch.zeros(3, dtype=DT)}, optimizer=hd.sgd(INNER_LR), train_data=(X, Y),
        val_data=(XV, YV), steps=steps)


def enumerated_gradient(logits: torch.Tensor) -> torch.Tensor:
    """d/du sum_z softmax(u)_z L(z) by autograd on the enumeration."""
    u = logits.detach().clone().requires_grad_()
    losses = (torch.tensor(CHOICES, dtype=DT) - TARGET) ** 2
    (torch.softmax(u, -1) * losses).sum().backward()
    assert u.grad is not None
    return u.grad


@pytest.mark.parametrize("baseline", ["moving_average", "none"])
def test_reinforce_online_matches_the_enumerated_expected_loss_gradient(baseline):
    """lr = 0 keeps the logits at u_0; each window's logit hypergradient is one REINFORCE
    sample; their mean is within 4 standard errors of dJ/du, which is not zero."""
    problem = choice_problem(baseline=baseline)
    opt = HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=1), method=hd.reverse(),
                         lr=0.0, schedule="constant", seed=3)
    opt.run()
    grads = torch.tensor([r.grad["c"] for r in opt.history], dtype=DT)  # (300, 3)
    assert torch.equal(opt.raw["c"], problem.hparams.raw["c"])  # the logits never moved
    exact = enumerated_gradient(problem.hparams.raw["c"])
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert exact.abs().min() > 0.05 and (mean.abs() > 0).all()
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)
    drawn = {z for r in opt.history for z in r.discrete["samples"]["c"]}
    assert len(drawn) == 3  # every choice was drawn and trained with


@pytest.mark.parametrize("baseline", ["moving_average", "leave_one_out"])
def test_reinforce_online_estimates_each_window_from_its_sample_and_loss(baseline, caplog):
    """One sample per window: leave-one-out has no other sample, so the moving average of the
    past windows' losses is the baseline (logged)."""
    opt = HyperOptimizer(choice_problem(baseline=baseline, steps=6),
                         plan=hd.plans.OnlinePlan(window=2), method=hd.reverse(), lr=0.0)
    assert ("the moving average of the past windows' losses (decay 0.9) is the baseline "
            "instead" in caplog.text) == (baseline == "leave_one_out")
    probs = torch.softmax(opt.raw["c"], -1)
    average = None
    for _ in range(3):
        record = opt.step()
        [label] = record.discrete["samples"]["c"]
        z = CHOICES.index(label)
        score = torch.nn.functional.one_hot(torch.tensor(z), 3).to(DT) - probs
        baseline = 0.0 if average is None else average
        assert record.discrete["baseline"] == [pytest.approx(baseline, rel=1e-12)]
        expected = (record.val_loss - baseline) * score
        assert torch.allclose(torch.tensor(record.grad["c"], dtype=DT), expected, rtol=1e-12,
                              atol=1e-15)
        average = record.val_loss if average is None else 0.9 * average + 0.1 * record.val_loss


@pytest.mark.parametrize("mode", ["relax", "gumbel"])
def test_relaxed_choices_anneal_over_the_windows_as_offline_over_the_steps(mode):
    start, end, windows = 2.0, 0.1, 5
    problem = choice_problem(mode=mode, temperature=(start, end), steps=windows * 3)
    opt = HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=3), method=hd.reverse(),
                         lr=0.01)
    used = []
    segments = opt.plan.segments

    def recording(problem, *args):
        used.append(problem.hparams["c"].current_temperature)
        return segments(problem, *args)

    opt.plan.segments = recording  # type: ignore[method-assign]
    opt.run()
    schedule = [start * (end / start) ** (w / (windows - 1)) for w in range(windows)]
    assert used == pytest.approx(schedule, rel=1e-12)
    assert [r.discrete["temperature"]["c"] for r in opt.history] == pytest.approx(schedule)
    offline_run = HyperOptimizer(choice_problem(mode=mode, temperature=(start, end), steps=3),
                                 lr=0.01, stopping=hd.Stopping(max_steps=windows))
    offline_run.run()
    assert [r.discrete["temperature"]["c"] for r in offline_run.history] == pytest.approx(
        schedule, rel=1e-12)


def test_an_online_reinforce_run_resumes_bit_for_bit():
    def make() -> HyperOptimizer:
        return HyperOptimizer(choice_problem(steps=12), plan=hd.plans.OnlinePlan(window=2),
                              method=hd.reverse(), lr=0.05)

    whole = make()
    whole.run()
    first = make()
    for _ in range(3):
        first.step()
    second = make()
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    second.run()
    assert torch.equal(second.raw["c"], whole.raw["c"])
    assert [r.without_timing() for r in second.history] == [
        r.without_timing() for r in whole.history]
