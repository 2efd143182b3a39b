"""The outer loop (hyperdiff.tuner.driver): updates, variance reduction, guard, stopping rules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.methods.base import Method
from hyperdiff.methods.registry import METHODS, make_method
from hyperdiff.methods.reverse import reverse
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

DT = torch.float64



def ridge_problem(*, n=24, p=4, steps=20, batch_size=None, lam=0.5, noise_seed=0, lr=0.1):
    """A small ridge problem: ``mean((x w - y)^2) + lam |w|^2`` by SGD from w = 0."""
    gen = torch.Generator().manual_seed(noise_seed)
    x = torch.randn(n, p, generator=gen, dtype=DT)
    w_true = torch.randn(p, generator=gen, dtype=DT)
    y = x @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=DT)
    xv = torch.randn(n, p, generator=gen, dtype=DT)
    yv = xv @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=DT)

    def train_loss(params, h, batch):
        xb, yb = batch
        return ((xb @ params["w"] - yb) ** 2).mean() + h["lam"] * (params["w"] ** 2).sum()

    def val_loss(params, h, batch):
        xb, yb = batch
        return ((xb @ params["w"] - yb) ** 2).mean()

    data = (x, y) if batch_size is None else hd.minibatches(x, y, batch_size=batch_size)
    problem = hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(lam=hd.scalar(lam)),
        {"w": torch.zeros(p, dtype=DT)}, optimizer=hd.sgd(lr), train_data=data,
        val_data=(xv, yv), steps=steps,
    )
    return problem, (xv, -yv)


def flaky(fail_on: set[int]) -> Method:
    """Reverse mode that raises NonFiniteError on the given call numbers (0-based)."""
    calls = {"n": 0}
    inner = reverse()

    def run(problem, raw):
        n = calls["n"]
        calls["n"] += 1
        if n in fail_on:
            raise hd.NonFiniteError("flaky: inner training diverged")
        return inner.run(problem, raw)

    return Method("flaky", run)


def test_run_lowers_validation_loss_and_keeps_best():
    problem, _ = ridge_problem(lam=5.0)
    opt = HyperOptimizer(problem, lr=0.3, schedule="constant",
                         stopping=Stopping(max_steps=8, patience=None))
    result = opt.run()
    losses = result.history.column("val_loss")
    assert result.steps == 8 and result.stop_reason.startswith("budget")
    assert losses[-1] < losses[0]
    assert result.best_loss == min(losses)
    assert result.best_step == losses.index(min(losses))
    # the best raw value is the one that step evaluated (recorded in natural units)
    assert float(result.best_hparams.natural()["lam"]) == pytest.approx(
        result.history[result.best_step].hparams["lam"], rel=1e-12)


def test_step_applies_the_outer_optimizer_to_the_hypergradient():
    """One step with SGD outer: u_1 = u_0 - lr * dL/du, dL/du from reverse mode directly."""
    problem, _ = ridge_problem()
    u0 = problem.hparams.raw["lam"]
    expected_grad = reverse()(problem).grad["lam"]
    opt = HyperOptimizer(problem, optimizer="sgd", lr=0.7, schedule="constant")
    record = opt.step()
    assert record.grad["lam"] == pytest.approx(float(expected_grad), rel=1e-12)
    assert float(opt.raw["lam"]) == pytest.approx(float(u0 - 0.7 * expected_grad), rel=1e-12)
    with pytest.raises(AttributeError):
        record.step = 5  # records are frozen


def test_clipping_scales_the_update_to_the_clip_norm():
    problem, _ = ridge_problem()
    g = float(reverse()(problem).grad["lam"])
    clip = abs(g) / 4
    opt = HyperOptimizer(problem, optimizer="sgd", lr=1.0, clip=clip, schedule="constant")
    u0 = float(problem.hparams.raw["lam"])
    opt.step()
    # torch.nn.utils.clip_grad_norm_ scales by clip / (norm + 1e-6)
    assert float(opt.raw["lam"]) == pytest.approx(u0 - g * clip / (abs(g) + 1e-6), rel=1e-12)
    assert abs(float(opt.raw["lam"]) - u0) == pytest.approx(clip, rel=1e-2)


def test_samples_average_hypergradients_over_seeds_and_report_spread():
    problem, _ = ridge_problem(batch_size=6)
    opt = HyperOptimizer(problem, samples=3, seed=4)
    record = opt.step()
    grads = torch.stack([
        reverse()(replace(problem, seed=opt.plan.seed_for(0, i))).grad["lam"] for i in range(3)
    ])
    assert len({float(g) for g in grads}) == 3  # the minibatch orders differ
    assert record.grad["lam"] == pytest.approx(float(grads.mean()), rel=1e-12)
    assert record.grad_std == pytest.approx(float(grads.std()), rel=1e-9)
    assert record.trainings == 3
    assert HyperOptimizer(problem).step().grad_std is None


def test_methods_from_the_registry_agree():
    problem, _ = ridge_problem(steps=8)
    grads = {}
    for name in ("reverse", "forward", "finite_difference"):
        options = {"warn": False} if name == "finite_difference" else {}
        opt = HyperOptimizer(problem, method=make_method(name, **options))
        grads[name] = opt.step().grad["lam"]
    assert grads["forward"] == pytest.approx(grads["reverse"], rel=1e-10)
    assert grads["finite_difference"] == pytest.approx(grads["reverse"], rel=1e-6)
    assert set(METHODS) >= {"reverse", "forward", "finite_difference"}


def test_cross_validation_problems_are_averaged():
    folds = [ridge_problem(noise_seed=s)[0] for s in (1, 2)]
    record = HyperOptimizer(folds, optimizer="sgd", lr=1e-3).step()
    expected = [reverse()(p) for p in folds]
    assert record.val_loss == pytest.approx(sum(h.value for h in expected) / 2, rel=1e-12)
    assert record.grad["lam"] == pytest.approx(
        float(sum(h.grad["lam"] for h in expected) / 2), rel=1e-12)


def test_warm_start_continues_from_the_last_theta():
    problem, _ = ridge_problem(steps=5)
    opt = HyperOptimizer(problem, warm_start=True, lr=0.1)
    first = reverse()(problem)
    opt.step()
    raw1 = opt.raw
    second = opt.step()
    oracle = reverse()(replace(problem, params=first.params), raw1)
    assert second.val_loss == pytest.approx(oracle.value, rel=1e-12)
    assert second.grad["lam"] == pytest.approx(float(oracle.grad["lam"]), rel=1e-12)


def test_selection_split_drives_best_step_and_early_stopping():
    """Hypergradients see one split, selection another that disagrees: the validation loss
    keeps falling, but the best step is the first and early stopping fires."""
    problem, selection = ridge_problem(lam=5.0)
    # explore=0: the disagreeing selection split would call the start broken (its selection
    # loss above the untrained model's) and try the global phase's points first
    opt = HyperOptimizer(problem, lr=0.3, selection=selection, schedule="constant",
                         plan=OfflinePlan(explore=0),
                         stopping=Stopping(max_steps=30, patience=3, travel=0))
    result = opt.run()
    val = result.history.column("val_loss")
    assert val[-1] < val[0]
    assert result.criterion == "selection_loss"
    assert result.best_step == 0 and result.steps == 4
    assert result.stop_reason.startswith("early stopping")
    # the default stop.travel = 3 waits while lam travels (its hypergradient keeps its sign
    # down to lam 0.0098, steps 1-6), then stops after 3 more: the same best step, 8 steps
    waiting = HyperOptimizer(problem, lr=0.3, selection=selection, schedule="constant",
                             plan=OfflinePlan(explore=0),
                             stopping=Stopping(max_steps=30, patience=3)).run()
    assert waiting.best_step == 0 and waiting.steps == 8
    assert waiting.stop_reason.startswith("early stopping")


def test_stops_on_time_budget_and_on_convergence():
    problem, _ = ridge_problem()
    timed = HyperOptimizer(problem, stopping=Stopping(max_steps=50, max_time_s=1e-9)).run()
    assert timed.steps == 1 and timed.stop_reason.startswith("time")
    converged = HyperOptimizer(problem, stopping=Stopping(max_steps=50, grad_tol=1e6)).run()
    assert converged.steps == 1 and converged.stop_reason.startswith("converged")


def test_cosine_schedule():
    problem, _ = ridge_problem()
    opt = HyperOptimizer(problem, lr=0.2, schedule="cosine", stopping=Stopping(max_steps=10))
    assert opt.learning_rate(0) == pytest.approx(0.2)
    assert opt.learning_rate(5) == pytest.approx(0.1)
    assert opt.learning_rate(10) == pytest.approx(0.0, abs=1e-15)


def test_guard_restores_last_good_lam_and_shrinks_the_step():
    problem, _ = ridge_problem()
    opt = HyperOptimizer(problem, method=flaky({2}), lr=0.2, schedule="constant",
                         stopping=Stopping(max_steps=5, patience=None), shrink=0.25)
    result = opt.run()
    h = result.history
    assert [r.status for r in h] == ["ok", "ok", "failed", "ok", "ok"]
    assert "restored" in h[2].message and "step 2" in h[2].message
    assert h[3].hparams == h[1].hparams  # back to the last good lam
    assert h[3].lr == pytest.approx(0.2 * 0.25) and h[1].lr == pytest.approx(0.2)
    assert h[2].val_loss is None and h[2].grad is None


def test_guard_gives_up_with_a_clear_message():
    problem, _ = ridge_problem()
    opt = HyperOptimizer(problem, method=flaky({1, 2, 3}), max_failures=3,
                         stopping=Stopping(max_steps=10))
    seen = []
    with pytest.raises(hd.NonFiniteError, match="3 outer steps in a row failed"):
        opt.run(callbacks=[lambda o, r: seen.append(r.status)])
    assert seen == ["ok", "failed", "failed", "failed"]
    assert opt.stop_reason() == "diverged"


def test_diverging_initial_hyperparameters_fail_at_once():
    """Real divergence: an inner learning rate far above 2/L blows training up."""
    problem, _ = ridge_problem()
    problem = replace(problem, optimizer=hd.sgd(100.0)).with_steps(200)
    with pytest.raises(hd.NonFiniteError, match="initial hyperparameters"):
        HyperOptimizer(problem, plan=OfflinePlan(explore=0)).step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "newton"}, "method must be one of"),
     ({"optimizer": "lbfgs"}, "optimizer must be one of"),
     ({"samples": 0}, "samples must be a positive int"),
     ({"lr": -1.0}, "lr must be a positive finite number"),
     ({"schedule": "step"}, "schedule must be one of"),
     ({"shrink": 1.5}, "shrink must be in \\(0, 1\\)")],
)
def test_bad_arguments_are_rejected(kwargs, message):
    problem, _ = ridge_problem()
    with pytest.raises(hd.HyperdiffError, match=message):
        HyperOptimizer(problem, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_steps": 0}, "max_steps must be a positive int"),
     ({"patience": 0}, "patience must be a positive int"),
     ({"max_time_s": -1.0}, "max_time_s must be a positive finite number"),
     ({"grad_tol": float("nan")}, "grad_tol must be a finite number >= 0")],
)
def test_bad_stopping_rules_are_rejected(kwargs, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        Stopping(**kwargs)


def per_feature_ridge(lam, *, p=4, n=30, seed=1):
    """Ridge with a penalty ``h["lam"] * w^2`` that is either one scalar or one per feature."""
    gen = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, p, generator=gen, dtype=DT), torch.randn(n, p, generator=gen, dtype=DT)
    w_true = torch.randn(p, generator=gen, dtype=DT) * torch.tensor([3.0, 1.0, 0.1, 0.0])
    y = x @ w_true + torch.randn(n, generator=gen, dtype=DT)
    yv = xv @ w_true + torch.randn(n, generator=gen, dtype=DT)

    def val_loss(params, h, batch):
        return ((batch[0] @ params["w"] - batch[1]) ** 2).mean()

    def train_loss(params, h, batch):
        return val_loss(params, h, batch) + (h["lam"] * params["w"] ** 2).sum()

    return hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(lam=lam), {"w": torch.zeros(p, dtype=DT)},
        optimizer=hd.sgd(0.1), train_data=(x, y), val_data=(xv, yv), steps=15,
    ), (xv[: n // 2], yv[: n // 2])


def test_tied_steps_move_a_vector_hyperparameter_like_one_shared_value():
    """Reference: the same penalty as one scalar hyperparameter. Its raw gradient is the sum
    over features, the tied update uses the mean, so outer SGD with lr * p matches exactly."""
    p, steps = 4, 6
    vector, _ = per_feature_ridge(hd.per_feature(0.3, p))
    shared, _ = per_feature_ridge(hd.scalar(0.3))
    tied = HyperOptimizer(vector, optimizer="sgd", lr=0.2 * p, tie_steps=steps,
                          schedule="constant", stopping=Stopping(max_steps=steps + 3))
    one = HyperOptimizer(shared, optimizer="sgd", lr=0.2, schedule="constant",
                         stopping=Stopping(max_steps=steps))
    tied_path = [r.hparams["lam"] for r in tied.run().history]
    shared_path = [r.hparams["lam"] for r in one.run().history]
    for entries, value in zip(tied_path[: steps + 1], shared_path, strict=False):
        assert entries == pytest.approx([value] * p, rel=1e-12)
    assert shared_path[-1] != pytest.approx(shared_path[0], rel=1e-3)  # it did move
    assert max(tied_path[-1]) / min(tied_path[-1]) > 1.01  # entries spread once untied


def test_tied_steps_are_picked_by_validation_then_guarded_by_selection():
    """A selection split that disagrees with validation (negated targets): the tied steps
    still follow the validation loss; no later step beats the best tied step on selection."""
    vector, (xs, ys) = per_feature_ridge(hd.per_feature(2.0, 4))
    # Adam (the default before signstep): its path is the one whose best step is pinned below
    opt = HyperOptimizer(vector, optimizer="adam", lr=0.3, tie_steps=5, selection=(xs, -ys),
                         schedule="constant", stopping=Stopping(max_steps=12))
    result = opt.run()
    assert result.criterion.startswith("val_loss (tied steps <= 5), then selection_loss")
    best, flags = None, []
    for r in result.history:
        key = "val_loss" if r.step <= 5 else "selection_loss"  # step 5: values of tied updates
        better = best is None or getattr(r, key) < getattr(best, key)
        flags.append(better)
        best = r if better else best
    assert [r.best for r in result.history] == flags
    assert result.best_step == best.step == 5
    untied = HyperOptimizer(vector, optimizer="adam", lr=0.3, selection=(xs, -ys),
                            schedule="constant", stopping=Stopping(max_steps=12)).run()
    assert untied.best_step == 0  # by selection loss alone


def test_tie_steps_must_be_a_nonnegative_int():
    problem, _ = ridge_problem()
    with pytest.raises(hd.HyperdiffError, match="tie_steps must be"):
        HyperOptimizer(problem, tie_steps=-1)
