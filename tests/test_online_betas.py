"""Issue 20 item 3: the outer Adam's betas online (``OnlinePlan(betas=...)``, ``outer.beta1`` /
``outer.beta2``, online default (0.5, 0.99)): the run's values against Adam written out by hand
over its own window hypergradients, the travel the online lr promises, a sign flip followed
within two windows, the config layer and its legacy values, and bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from test_online import recipe

import hyperdiff as hd
from hyperdiff.app.config import ONLINE_BETAS, legacy_values, load_config
from hyperdiff.app.plans import build_online
from hyperdiff.tuner.online_plan import OnlinePlan

GRU = Path(__file__).resolve().parents[1] / "benchmarks" / "suite_tasks" / "gru_seq.py:build"


def adam_by_hand(u0, grads, lrs, beta1, beta2, eps=1e-8):
    """Raw values after Adam's steps on ``grads`` (floats) with step sizes ``lrs``:
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, u -= lr (m / (1 - b1^k)) /
    (sqrt(v / (1 - b2^k)) + eps)."""
    u, m, v = u0, 0.0, 0.0
    for k, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        u -= lr * (m / (1 - beta1**k)) / (math.sqrt(v / (1 - beta2**k)) + eps)
    return u


@pytest.mark.parametrize("betas", [(0.5, 0.9), (0.0, 0.5), None])
def test_the_online_values_are_adam_by_hand_over_the_windows_hypergradients(betas):
    prob = recipe(steps=12)
    loop = hd.HyperOptimizer(prob, plan=OnlinePlan(window=3, betas=betas), method=hd.reverse(),
                             optimizer="adam", lr=0.1, schedule="cosine")
    result = loop.run()
    assert len(result.history) == 4
    b1, b2 = betas or (0.9, 0.999)  # None: torch's
    raw0 = prob.hparams.raw
    for name in raw0:
        grads = [float(r.grad[name]) for r in result.history]
        lrs = [r.lr for r in result.history]
        expected = adam_by_hand(float(raw0[name]), grads, lrs, b1, b2)
        assert float(result.final_raw[name]) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_after_a_sign_flip_the_old_direction_fades_within_three_windows():
    """The shapes_cnn pattern (its curvature hypergradients of lr_peak, docs/online.md): four
    large ones of one sign, then three small ones of the other, at the outer lr 0.7. With
    torch's betas the raw value keeps descending by 0.42, 0.35, 0.29 after the flip; with the
    online betas (0.5, 0.99) by 0.17 and 0.05, and it turns at the third."""
    grads = [1.7, 7.1, 3.1, 0.43, -0.37, -0.34, -0.29]

    def moves(b1, b2):
        u = [adam_by_hand(0.0, grads[:k], [0.7] * k, b1, b2) for k in range(len(grads) + 1)]
        return [b - a for a, b in itertools.pairwise(u)][4:]  # the flipped windows

    torchs, online = moves(0.9, 0.999), moves(*ONLINE_BETAS)
    assert all(step < -0.25 for step in torchs)
    assert online[0] > torchs[0] / 2 and online[1] > torchs[1] / 5 and online[2] > 0


def test_online_mode_alone_sets_the_betas_and_the_loop_uses_them():
    config = load_config(overrides=[f"task.name={GRU}", "outer.mode=online"])
    assert (config.outer.beta1, config.outer.beta2) == ONLINE_BETAS == (0.5, 0.99)
    _, loop = build_online(config)
    assert loop.optimizer.param_groups[0]["betas"] == (0.5, 0.99)
    # set by the user: theirs; offline keeps torch's (the keys are online only)
    mine = load_config(overrides=[f"task.name={GRU}", "outer.mode=online", "outer.beta1=0.8"])
    assert (mine.outer.beta1, mine.outer.beta2) == (0.8, 0.99)
    offline = load_config(overrides=[f"task.name={GRU}"])
    assert (offline.outer.beta1, offline.outer.beta2) == (0.9, 0.999)
    # an online run with SGD outer steps has no betas to set
    _, sgd = build_online(load_config(overrides=[f"task.name={GRU}", "outer.mode=online",
                                                 "outer.optimizer=sgd"]))
    assert "betas" not in sgd.optimizer.param_groups[0]


def test_a_stored_config_without_the_betas_reads_torchs():
    stored = {"outer": {"mode": "online", "window_growth": 0.2, "explore_when": "broken"}}
    assert legacy_values(stored)["outer"]["beta1"] == 0.9
    assert legacy_values(stored)["outer"]["beta2"] == 0.999
    current = {"outer": {"mode": "online", "window_growth": 0.2, "explore_when": "broken",
                         "beta1": 0.5, "beta2": 0.9, "rescue": 3, "settle": 0.75,
                         "schedule_over": "steps", "lowering": 1.0, "retry": 2,
                         "confirm": 1, "confirm_chaotic": 0, "revert": 0,
                         "common_seed": False}}
    assert legacy_values(current) == current


@pytest.mark.parametrize(("betas", "message"), [
    ((0.9, 1.0), "HyperOptimizer: betas[1] must be a finite number in [0, 1) (got 1.0)"),
    ((-0.1, 0.9), "HyperOptimizer: betas[0] must be a finite number in [0, 1) (got -0.1)"),
    (0.5, "HyperOptimizer: betas must be None or a pair (beta1, beta2) of numbers in [0, 1) "
          "(got 0.5)"),
])
def test_bad_betas_are_refused(betas, message):
    with pytest.raises(hd.HyperdiffError) as err:
        OnlinePlan(window=2, betas=betas)
    assert str(err.value) == message


def test_betas_with_a_non_adam_outer_optimizer_are_refused():
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: betas must be None with "
                       r"optimizer='sgd' \(they are the betas of adam and adamw\) "
                       r"\(got \(0\.5, 0\.9\)\)"):
        hd.HyperOptimizer(recipe(), plan=OnlinePlan(window=2, betas=(0.5, 0.9)),
                          method=hd.reverse(), optimizer="sgd", lr=0.1)


def test_bad_config_betas_are_refused():
    with pytest.raises(hd.HyperdiffError, match=r"config: outer\.beta1 must be"):
        load_config(overrides=[f"task.name={GRU}", "outer.mode=online", "outer.beta1=1"])
