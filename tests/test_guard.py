"""The divergence guard against silent degeneration: overflowed and underflowed values,
absurd losses. Each is a failed step handled exactly like a diverged training."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from interrupt import interrupted_run
from test_driver import flaky, ridge_problem

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import build, run_experiment
from hyperdiff.app.rundir import HISTORY, RESULT, RunDir
from hyperdiff.methods.base import Method
from hyperdiff.methods.reverse import reverse
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.guard import DivergenceGuard
from hyperdiff.tuner.offline_plan import OfflinePlan

OVERFLOW = ["task.name=ridge_diabetes", "inner.steps=20", "outer.lr=1000", "stop.max_steps=6",
            "stop.patience=0", "report.seeds=1"]


def quiet(_: str) -> None:
    return None


def strict_json(text: str):
    """``json.loads`` that refuses ``Infinity`` and ``NaN``."""
    def refuse(name):
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


def exploding(on: set[int], value: float = 1e39, grad: float = 1e30) -> Method:
    """Reverse mode whose result on the given calls is a huge but finite loss and gradient."""
    calls = {"n": 0}
    inner = reverse()

    def run(problem, raw):
        hg = inner.run(problem, raw)
        n = calls["n"]
        calls["n"] += 1
        if n in on:
            return replace(hg, value=value,
                           grad={k: torch.full_like(g, grad) for k, g in hg.grad.items()})
        return hg

    return Method("exploding", run)


def test_an_overflowing_update_is_a_failed_step_and_the_run_finishes_and_resumes(tmp_path):
    """outer.lr=1000 moves log(lam) by ~1000: lam = exp(995) = inf. That step must fail
    like a diverged training (restore, shrink), the history must stay valid JSON, and a run
    interrupted in the middle must resume to the same history."""
    straight = tmp_path / "straight"
    result = run_experiment(load_config(overrides=OVERFLOW), out=straight, log=quiet,
                            progress=False)
    lines = [strict_json(line) for line in (straight / HISTORY).read_text().splitlines()]
    strict_json((straight / RESULT).read_text())
    assert [r["status"] for r in lines][:2] == ["ok", "failed"]
    assert lines[1]["hparams"] == {"lam": None}  # inf, written as null
    assert "lam = inf is outside its constraint (finite and > 0)" in lines[1]["message"]
    assert lines[2]["lr"] < lines[0]["lr"] * 0.5 + 1e-9  # the step was shrunk
    assert lines[2]["hparams"] == lines[0]["hparams"]  # the last good value was restored
    for record in lines:
        if record["status"] == "ok":
            assert 0 < record["hparams"]["lam"] < math.inf
    assert 0 < result["tuned"]["hparams"]["lam"] < math.inf

    interrupted = tmp_path / "interrupted"
    interrupted_run(interrupted, OVERFLOW, at=3)
    resumed = run_experiment(None, resume=interrupted, log=quiet, progress=False)

    def without_timing(path):
        return [r.without_timing() for r in RunDir(path).read_history()]

    assert without_timing(interrupted) == without_timing(straight)
    assert resumed["tuned"] == result["tuned"]


def test_an_absurd_loss_is_handled_exactly_like_a_diverged_training():
    """Call 2 returns a validation loss of 1e39 (finite) with a 1e30 hypergradient. The
    oracle: the same run where call 2 raises NonFiniteError instead."""
    problem, selection = ridge_problem(batch_size=6)

    def history(method):
        opt = HyperOptimizer(problem, method=method, plan=OfflinePlan(explore=0),
                             selection=selection, stopping=Stopping(max_steps=5, patience=None),
                             lr=0.2)
        return opt.run().history

    absurd, diverged = history(exploding({2})), history(flaky({2}))
    assert [r.status for r in absurd] == ["ok", "ok", "failed", "ok", "ok"]
    assert "the validation loss 1e+39 is absurd" in absurd[2].message
    strip = ("message",)
    assert [{k: v for k, v in r.without_timing().items() if k not in strip} for r in absurd] \
        == [{k: v for k, v in r.without_timing().items() if k not in strip} for r in diverged]
    assert all(1e39 not in (r.val_loss, r.selection_loss) for r in absurd)


def test_an_absurd_loss_is_resumable_from_a_checkpoint(tmp_path):
    """Two steps, state_dict through torch.save(weights_only load), three more: the same as
    five straight, with the absurd step (and the guard's reference loss) after the resume."""
    problem, selection = ridge_problem(batch_size=6)

    def driver(on):
        return HyperOptimizer(problem, method=exploding(on), selection=selection,
                              stopping=Stopping(max_steps=5, patience=None), lr=0.2)

    straight = driver({3}).run().history
    first = driver({3})
    first.step()
    first.step()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = driver({1})  # the new process counts calls from 0
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True),
                           list(first.history))
    resumed = second.run().history
    assert [r.status for r in straight] == ["ok", "ok", "ok", "failed", "ok"]
    assert [r.without_timing() for r in resumed] == [r.without_timing() for r in straight]


def test_without_the_loss_rule_the_update_underflows_to_zero_and_that_step_fails():
    """With the absurd-loss rule off, a 1e30 hypergradient and outer SGD push log(lam) to
    -1e29: lam = exp(-1e29) = 0.0 exactly. The next step must fail (not train at lam = 0,
    and never report it as the best)."""
    problem, _ = ridge_problem()
    opt = HyperOptimizer(problem, method=exploding({1}), optimizer="sgd", lr=0.1,
                         max_loss_ratio=math.inf, stopping=Stopping(max_steps=4, patience=None))
    history = opt.run().history
    assert [r.status for r in history] == ["ok", "ok", "failed", "ok"]
    assert history[2].hparams == {"lam": 0.0}
    assert "lam = 0 is outside its constraint (finite and > 0)" in history[2].message
    assert "rounds onto a bound" in history[2].message
    assert all(r.hparams["lam"] > 0 for r in history if r.status == "ok")
    assert float(opt.result().best_hparams.natural()["lam"]) > 0


@pytest.mark.parametrize(
    ("spec", "raw", "expected"),
    [(hd.scalar(0.5), torch.tensor(1000.0, dtype=torch.float64), "lam = inf"),
     (hd.scalar(0.5), torch.tensor(-1000.0, dtype=torch.float64), "lam = 0 "),
     (hd.scalar(0.5, "softplus"), torch.tensor(-1000.0, dtype=torch.float64), "lam = 0 "),
     (hd.scalar(0.5, (0.0, 1.0)), torch.tensor(40.0, dtype=torch.float64), "lam = 1 "),
     (hd.scalar(0.5, (0.0, 1.0)), torch.tensor(-800.0, dtype=torch.float64), "lam = 0 "),
     (hd.scalar(0.5, "free"), torch.tensor(math.nan, dtype=torch.float64), "lam = nan"),
     (hd.per_feature(0.5, size=4), torch.tensor([0.0, -1e4, 2.0, -1e4], dtype=torch.float64),
      "lam[1] = 0 is outside its constraint (finite and > 0; 2 entries are)")],
)
def test_values_outside_their_constraint_are_caught(spec, raw, expected):
    hparams = hd.HyperParameters(lam=spec)
    guard = DivergenceGuard()
    guard.check_values(hparams, {"lam": torch.zeros_like(raw)})  # inside: no error
    with pytest.raises(hd.NonFiniteError, match="is outside its constraint") as info:
        guard.check_values(hparams, {"lam": raw})
    assert expected in str(info.value)


def test_the_absurd_loss_rule():
    """|L| > ratio * max(|L_0|, 1), L_0 from the first call, per kind of loss."""
    guard = DivergenceGuard(max_loss_ratio=100.0)
    guard.check_losses([2.0, 4.0], selection=0.01)  # references: 3.0 and 0.01
    guard.check_losses([299.0], selection=99.0)  # 299 < 300; the floor makes 100 the limit
    with pytest.raises(hd.NonFiniteError, match="validation loss -301 is absurd"):
        guard.check_losses([1.0, -301.0], selection=0.5)
    with pytest.raises(hd.NonFiniteError, match="selection loss 101 is absurd"):
        guard.check_losses([1.0], selection=101.0)
    restored = DivergenceGuard(max_loss_ratio=100.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.reference == {"validation": 3.0, "selection": 0.01}
    with pytest.raises(hd.HyperdiffError, match="max_loss_ratio must be a number > 1"):
        DivergenceGuard(max_loss_ratio=1.0)


def test_the_config_key_reaches_the_guard():
    _, driver = build(load_config(overrides=["task.name=ridge_diabetes",
                                             "guard.max_loss_ratio=50"]))
    assert driver.guard.max_loss_ratio == 50.0
    with pytest.raises(hd.HyperdiffError, match="guard.max_loss_ratio must be a number > 1"):
        load_config(overrides=["guard.max_loss_ratio=0.5"])


@pytest.mark.parametrize("shrink", ["0.5", None, [0.5]])
def test_the_guard_refuses_a_shrink_that_is_not_a_number(shrink):
    # the guard's own check (not only HyperOptimizer's): no TypeError from comparing a str
    with pytest.raises(hd.HyperdiffError, match="guard shrink must be in \\(0, 1\\)"):
        DivergenceGuard(shrink=shrink)
    with pytest.raises(hd.HyperdiffError, match="guard shrink must be in \\(0, 1\\)"):
        HyperOptimizer(ridge_problem()[0], shrink=shrink)
