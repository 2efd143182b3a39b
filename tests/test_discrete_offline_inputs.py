"""Discrete hyperparameters in the offline loop: exact zeros where the estimate is identically 0
(tied steps, equal leave-one-out losses), options that would be ignored are refused (decay
without the moving average, a temperature for a REINFORCE choice), and the auto-samples
refusal names the option as the user set it."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from test_discrete import ACTS, make_toy

import hyperdiff as hd
from hyperdiff.app.discrete_report import relaxation_gap, relaxed
from hyperdiff.hparams.discrete import DiscreteParameter, Softmax
from hyperdiff.tuner import reinforce
from hyperdiff.tuner.discrete_outer import DiscreteOuter, outer_hook
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.stopping import tied
from hyperdiff.wording import config_syntax

D = torch.float64


def flag_problem(value: float = 0.1) -> hd.Problem:
    """A REINFORCE flag (leave-one-out) that the validation loss ignores: every sample's loss
    is ``value``."""
    hp = hd.HyperParameters(flag=hd.boolean(mode="reinforce", baseline="leave_one_out"),
                            lr=hd.scalar(0.1))
    x = torch.zeros(4, 2, dtype=D)

    def train_loss(p, h, batch):
        return (p["w"] - 1).square().sum() * h["lr"]

    def val_loss(p, h, batch):
        return value + 0.0 * p["w"].sum()

    return hd.make_problem(train_loss, val_loss, hp, {"w": torch.zeros(2, dtype=D)},
                           optimizer=hd.sgd("lr"), train_data=x, val_data=x, steps=2,
                           probe=False)


# ------------------------------------------------------------------ 1: tied steps
def test_tied_gives_a_discrete_hyperparameter_an_exact_zero():
    hp = hd.HyperParameters(act=hd.categorical(["a", "b", "c"]),
                            wd=hd.per_feature([0.1, 0.1, 0.1]))
    # a softmax gradient p * (v - p.v): sums to 0, but its float mean is a residue
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    v = torch.tensor([0.3, -0.7, 0.11], dtype=D)
    act = p * (v - (p * v).sum())
    assert act.mean().item() != 0.0  # the residue the sign step would follow
    wd = torch.tensor([1.0, 2.0, 6.0], dtype=D)
    out = tied({"act": act, "wd": wd}, hp)
    assert out["act"].tolist() == [0.0, 0.0, 0.0]
    assert out["wd"].tolist() == [3.0, 3.0, 3.0]  # (1 + 2 + 6) / 3
    plain = tied({"act": act, "wd": wd})  # without the specs: every entry's mean
    assert plain["act"].tolist() == [act.mean().item()] * 3


# ------------------------------------------------------------------ 2: leave-one-out
def test_leave_one_out_advantage_is_exactly_zero_for_equal_losses():
    losses = torch.tensor([0.1, 0.1, 0.1], dtype=D)
    assert (losses - reinforce.baselines(losses, "leave_one_out")).abs().max() > 0  # residue
    assert reinforce.advantages(losses, "leave_one_out").tolist() == [0.0, 0.0, 0.0]
    hp = flag_problem().hparams
    outer = DiscreteOuter(hp, seed=0, max_steps=3, samples=3, folds=1)
    outer.drawn = {0: {"flag": 0}, 1: {"flag": 0}, 2: {"flag": 1}}
    grads, info = outer.adjust(0, hp.raw, torch.zeros(3, 3, dtype=D), losses)
    assert grads[:, :2].abs().max().item() == 0.0
    assert info["baseline"] == reinforce.baselines(losses, "leave_one_out").tolist()


def test_leave_one_out_advantage_is_the_loss_minus_the_others_mean():
    gen = torch.Generator().manual_seed(3)
    losses = torch.rand(5, generator=gen, dtype=D)
    expected = [float(losses[i]) - (float(losses.sum()) - float(losses[i])) / 4 for i in range(5)]
    assert reinforce.advantages(losses, "leave_one_out").tolist() == pytest.approx(
        expected, rel=1e-13, abs=1e-15)
    for kind, average in (("none", None), ("moving_average", 0.25)):
        base = 0.0 if average is None else average
        assert reinforce.advantages(losses, kind, average).tolist() == [
            float(x) - base for x in losses]


def test_leave_one_out_estimate_matches_the_enumerated_gradient():
    """E over all S-tuples of draws of mean_i (L_i - b_i)(onehot(z_i) - p) equals
    dJ/du = p * (L - p.L), the expectation enumerated exactly (a control: true before too)."""
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    by_choice = torch.tensor([0.7, 0.2, 1.3], dtype=D)
    expected = torch.zeros(3, dtype=D)
    for z in itertools.product(range(3), repeat=3):
        weight = math.prod(float(probs[k]) for k in z)
        adv = reinforce.advantages(by_choice[list(z)], "leave_one_out")
        scores = torch.stack([torch.eye(3, dtype=D)[k] - probs for k in z])
        expected += weight * (adv.unsqueeze(-1) * scores).mean(0)
    exact = probs * (by_choice - (probs * by_choice).sum())
    assert torch.allclose(expected, exact, rtol=1e-12, atol=1e-15), (expected, exact)


def test_equal_losses_leave_the_reinforce_probabilities_where_they_are():
    driver = HyperOptimizer(flag_problem(), lr=0.3, plan=OfflinePlan(samples=3, explore=0),
                            stopping=Stopping(max_steps=4, patience=None))
    for _ in range(4):
        record = driver.step()
        assert record.grad["flag"] == [0.0, 0.0]
    assert driver.raw["flag"].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ 3: decay
@pytest.mark.parametrize("baseline", ["leave_one_out", "none"])
def test_decay_without_the_moving_average_is_refused(baseline):
    with pytest.raises(hd.HyperdiffError, match=rf"^categorical: decay must be left out with "
                       rf"baseline='{baseline}' \(only the 'moving_average' baseline reads it; "
                       r"it would be ignored\) \(got 0\.5\)$"):
        hd.categorical(["a", "b"], mode="reinforce", baseline=baseline, decay=0.5)
    with pytest.raises(hd.HyperdiffError, match=r"^boolean: decay must be left out"):
        hd.boolean(mode="reinforce", baseline=baseline, decay=0.9)
    assert hd.categorical(["a", "b"], mode="reinforce", baseline=baseline).decay == 0.9
    spec = DiscreteParameter(torch.tensor([0.5, 0.5], dtype=D), Softmax(), "categorical",
                             choices=("a", "b"), mode="reinforce", baseline=baseline, decay=0.5)
    with pytest.raises(hd.HyperdiffError, match=r"categorical 'x': decay must be left at 0\.9 "
                       rf"with baseline='{baseline}' .* \(got 0\.5\)$"):
        hd.HyperParameters(x=spec)


def test_moving_average_decay_is_kept_and_compared_only_there():
    assert hd.categorical(["a", "b"], mode="reinforce", decay=0.5).decay == 0.5
    mixed = hd.HyperParameters(a=hd.boolean(mode="reinforce", decay=0.5),
                               b=hd.boolean(mode="reinforce", baseline="none"))
    with pytest.raises(hd.HyperdiffError, match=r"must share one baseline, and with "
                       r"'moving_average' one decay \(got \[\('moving_average', 0\.5\), "
                       r"'none'\]\)"):
        outer_hook(mixed, seed=0, max_steps=2, samples=2, folds=1)
    loo = hd.HyperParameters(a=hd.boolean(mode="reinforce", baseline="leave_one_out"),
                             b=hd.boolean(mode="reinforce", baseline="leave_one_out"))
    assert outer_hook(loo, seed=0, max_steps=2, samples=2, folds=1) is not None


# ------------------------------------------------------------------ 4: relaxed
def test_a_temperature_for_a_reinforce_choice_is_refused():
    hp = hd.HyperParameters(act=hd.categorical(["relu", "tanh"]),
                            depth=hd.integer(1, 3, mode="reinforce"), lr=hd.scalar(0.1))
    for value in (0.5, -1.0):
        with pytest.raises(hd.HyperdiffError, match=r"^relaxed: temperatures must name relax "
                           r"or gumbel hyperparameters among \['act'\], not REINFORCE ones, "
                           r"which train plain choices and have no relaxed model "
                           r"\(got \['depth'\]\)$"):
            relaxed(hp, {"depth": value})
    with pytest.raises(hd.HyperdiffError, match=r"^relaxed: temperatures must name discrete "
                       r"hyperparameters among \['act'\] \(got \['lr'\]\)$"):
        relaxed(hp, {"lr": 0.5})
    task = SimpleNamespace(final_problem=SimpleNamespace(hparams=hp))  # refused before training
    with pytest.raises(hd.HyperdiffError, match=r"not REINFORCE ones"):
        relaxation_gap(task, hp.raw, temperatures={"depth": 0.5})  # type: ignore[arg-type]
    assert relaxed(hp, {"act": 0.5})["act"].current_temperature == 0.5


# ------------------------------------------------------------------ 5: auto samples
def test_auto_samples_refusal_names_the_option_as_set():
    with pytest.raises(hd.HyperdiffError) as library:
        HyperOptimizer(flag_problem(), plan=OfflinePlan(samples="auto"))
    text = str(library.value)
    assert text.startswith("HyperOptimizer: samples must be a fixed number with REINFORCE "
                           "choices ('flag')")
    assert "(got samples='auto'); set samples=k (k >= 2" in text
    with config_syntax(), pytest.raises(hd.HyperdiffError) as cli:
        HyperOptimizer(flag_problem(), plan=OfflinePlan(samples="auto"))
    text = str(cli.value)
    assert text.startswith("HyperOptimizer: outer.auto_samples must be false with REINFORCE "
                           "choices ('flag')")
    assert ("(got outer.auto_samples = true); set outer.auto_samples = false and "
            "outer.samples = k (k >= 2") in text
    assert "outer.samples must" not in text and "'auto'" not in text


def test_tied_steps_do_not_move_a_discrete_hyperparameters_logits():
    problem = make_toy(hd.categorical(list(ACTS), init=[0.5, 0.3, 0.2]), steps=3)
    driver = HyperOptimizer(problem, lr=0.3, tie_steps=2, plan=OfflinePlan(samples=1, explore=0),
                            stopping=Stopping(max_steps=3, patience=None))
    start = driver.raw["act"].clone()
    for _ in range(2):  # the tied steps
        driver.step()
        assert torch.equal(driver.raw["act"], start)
