"""The global phase with the loop's other inputs: tied steps, training dtypes, resumed states,
the still-moving warning's discrete values and one-entry vectors."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.tuner import global_phase
from hyperdiff.tuner.budget import recent_changes, still_moving
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.global_phase import explored_names
from hyperdiff.tuner.guard import DivergenceGuard
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.offline_plan import OfflinePlan

D = torch.float64


def data(dtype: torch.dtype = D, n: int = 16, p: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen, dtype=dtype)
    w = torch.randn(p, generator=gen, dtype=dtype)
    y = x @ w + 0.5 * torch.randn(n, generator=gen, dtype=dtype)
    xv = torch.randn(n, p, generator=gen, dtype=dtype)
    yv = xv @ w + 0.5 * torch.randn(n, generator=gen, dtype=dtype)
    return (x, y), (xv, yv)


def val_loss(params, h, batch):
    return ((batch[0] @ params["w"] - batch[1]) ** 2).mean()


def train_loss(params, h, batch):
    """Ridge with whatever penalties ``h`` holds: ``lam`` and ``frac`` scale the squared
    norm, ``l2`` weighs each entry."""
    penalty = 0.0
    for name, value in h.items():
        if name in ("lam", "frac"):
            penalty = penalty + value * (params["w"] ** 2).sum()
        elif name == "l2":
            penalty = penalty + (value * params["w"] ** 2).sum()
    return val_loss(params, h, batch) + penalty


def problem(hp, dtype: torch.dtype = D, loss=train_loss):
    train, val = data(dtype)
    return hd.make_problem(loss, val_loss, hp, {"w": torch.zeros(3, dtype=dtype)},
                           optimizer=hd.sgd(0.1), train_data=train, val_data=val, steps=6)


SELECTION = tuple(torch.randn(16, *shape, generator=torch.Generator().manual_seed(5),
                              dtype=D) for shape in ((3,), ()))


# ---------------------------------------------------------------- tie_steps


@pytest.mark.parametrize("hp", [
    {"lam": hd.scalar(0.05)},
    {"lam": hd.scalar(0.05), "l2": hd.per_feature([0.1])},  # one entry: no vector to tie
], ids=["scalar", "one-entry vector"])
def test_tie_steps_without_a_hyperparameter_of_several_entries_is_refused(hp):
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: tie_steps must be 0 when no "
                       r"hyperparameter has more than one entry \(tying .* changes no value "
                       r".*\(got 4\)$"):
        HyperOptimizer(problem(hd.HyperParameters(**hp)), tie_steps=4, selection=SELECTION)
    HyperOptimizer(problem(hd.HyperParameters(**hp)), tie_steps=0)  # off: accepted


def test_tie_steps_with_a_vector_is_accepted():
    hp = hd.HyperParameters(lam=hd.scalar(0.05), l2=hd.per_feature([1e-3, 0.1, 1.0]))
    assert HyperOptimizer(problem(hp), tie_steps=4).tie_steps == 4


def tied_run(explore: int, tie: int, steps: int):
    hp = hd.HyperParameters(lam=hd.scalar(0.05), l2=hd.per_feature([1e-3, 1e-1, 3.0]))
    loop = HyperOptimizer(problem(hp), plan=OfflinePlan(explore=explore, explore_when="always"),
                          lr=0.1, tie_steps=tie, selection=SELECTION,
                          stopping=Stopping(max_steps=steps, patience=None))
    return loop.run()


@pytest.mark.parametrize("explore", [0, 3])  # 0: the run without a phase, unchanged
def test_tied_steps_count_from_the_gradient_phase(explore):
    """With ``tie_steps = k`` the updates of the gradient phase's first k steps ``g .. g+k-1``
    move every ``l2`` entry by the same log factor (signstep on the mean hypergradient), the
    next one does not; a global phase (``g = 1 + explore``) used them up before."""
    tie, first = 3, 1 + explore if explore else 0
    result = tied_run(explore, tie, first + tie + 2)
    history = result.history
    for step in range(first, first + tie + 1):
        before, after = history[step].hparams["l2"], history[step + 1].hparams["l2"]
        moves = [math.log(b) - math.log(a) for a, b in zip(before, after, strict=True)]
        same = max(moves) - min(moves) < 1e-12
        assert same == (step < first + tie), (step, moves)
        assert max(map(abs, moves)) > 0.01  # each update moved


@pytest.mark.parametrize("explore", [0, 3])
def test_tied_steps_rank_by_validation_loss_up_to_the_gradient_phase_plus_k(explore):
    """Steps ``0 .. g+k`` are ranked by the validation loss, later ones by the selection loss
    (each against the best step's loss of the same kind), written out."""
    tie, first = 3, 1 + explore if explore else 0
    result = tied_run(explore, tie, first + tie + 4)
    best = None
    for record in result.history:
        field = "val_loss" if record.step <= first + tie else "selection_loss"
        better = best is None or getattr(record, field) < getattr(best, field)
        best = record if better else best
        assert record.best == better, record.step
    assert result.best_step == best.step
    assert result.criterion == (
        "val_loss (global phase and tied steps <= 7), then selection_loss" if explore else
        "val_loss (tied steps <= 3), then selection_loss")


# ---------------------------------------------------------------- training dtype


def test_a_point_that_rounds_onto_a_bound_in_float32_fails_like_an_invalid_value():
    """A point valid in float64 (0.999999999998 in ``(0, 1)``) that training would read as
    1.0 in float32, which make_problem refuses as a start, fails before it trains; float64
    trains it."""
    seen: list[float] = []

    def watched(params, h, batch):
        seen.append(float(h["frac"].detach()))
        return train_loss(params, h, batch)

    def run(dtype):
        seen.clear()
        hp = hd.HyperParameters(frac=hd.scalar(0.99, (0.0, 1.0)))
        plan = OfflinePlan(explore=8, explore_decades=10.0, explore_when="always")
        return HyperOptimizer(problem(hp, dtype, watched), plan=plan,
                              stopping=Stopping(max_steps=4, patience=None)).run()

    single = run(torch.float32)
    assert all(0.0 < v < 1.0 for v in seen)  # training never read the bound
    point = single.history[3]
    assert point.hparams["frac"] < 1.0 and float(torch.tensor(point.hparams["frac"],
                                                              dtype=torch.float32)) == 1.0
    assert point.status == "failed"
    assert ("frac = 0.99999999999822697 is outside its constraint (strictly between 0.0 and "
            "1.0) in float32, the dtype training computes it in: it rounds to 1 there"
            in point.message)
    assert "does not count toward the failures in a row" in point.message
    assert [r.status for r in single.history] == ["ok", "ok", "ok", "failed"]
    with pytest.raises(hd.HyperdiffError, match="in float32, the dtype training computes it"):
        problem(hd.HyperParameters(frac=hd.scalar(point.hparams["frac"], (0.0, 1.0))),
                torch.float32)
    double = run(D)
    assert double.history[3].status == "ok" and double.history[3].hparams == point.hparams


def test_the_guard_reads_each_training_dtype():
    hp = hd.HyperParameters(frac=hd.scalar(0.5, (0.0, 1.0)), lam=hd.scalar(1.0))
    guard = DivergenceGuard()
    raw = {"frac": torch.tensor(30.0, dtype=D), "lam": torch.tensor(0.0, dtype=D)}
    guard.check_values(hp, raw)  # sigmoid(30) = 1 - 9.4e-14 in float64
    guard.check_values(hp, raw, (D,))
    with pytest.raises(hd.NonFiniteError, match=r"^frac = 0\.9999999999999\d+ is outside its "
                       r"constraint \(strictly between 0.0 and 1.0\) in float32"):
        guard.check_values(hp, raw, (D, torch.float32))


# ---------------------------------------------------------------- resumed states


def resumable(lam: float = 0.05, seed: int = 0) -> HyperOptimizer:
    hp = hd.HyperParameters(lam=hd.scalar(lam), frac=hd.scalar(0.3, (0.0, 1.0)))
    return HyperOptimizer(problem(hp), plan=OfflinePlan(explore=4, explore_when="always"),
                          seed=seed, stopping=Stopping(max_steps=7, patience=None))


@pytest.fixture(scope="module")
def saved():
    """A run stopped after 2 of its 4 global-phase points: its state and history."""
    loop = resumable()
    for _ in range(2):
        loop.step()
    return copy.deepcopy(loop.state_dict()), list(loop.history)


def test_a_state_is_refused_by_a_loop_with_another_start(saved):
    state, history = saved
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: the start values must be "
                       r"the saved run's, those its history's step 0 records .* \(got lam=0.5 "
                       r"where the history has 0.05000000000000001\)$"):
        resumable(lam=0.5).load_state_dict(copy.deepcopy(state), history)


def test_a_state_is_refused_by_a_loop_with_another_seed(saved):
    state, history = saved
    assert state["seed"] == 0
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: seed must be the saved "
                       r"run's, 0 \(the global phase's points .*\) \(got 3\)$"):
        resumable(seed=3).load_state_dict(copy.deepcopy(state), history)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_resumed_run_is_the_uninterrupted_one(saved, legacy):
    """The same start and seed resume to the uninterrupted run's records; a state saved
    before the seed was recorded is accepted as before."""
    state, history = saved
    state = copy.deepcopy(state)
    if legacy:
        state.pop("seed", None)  # absent before s42
    resumed = resumable()
    resumed.load_state_dict(state, history)
    whole = resumable().run()
    assert [(r.step, r.hparams, r.val_loss) for r in resumed.run().history] == [
        (r.step, r.hparams, r.val_loss) for r in whole.history]


# ---------------------------------------------------------------- still moving


BASE = StepRecord(0, {}, "ok", 1.0, 1.0, 0.0, None, 1.0, None, None, 0.1, False, 1, "", 0.0, 0.0)


def moving_history(discrete: dict | None):
    probs = [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]
    return [dataclasses.replace(BASE, step=s, hparams={"act": p, "lr": 1.0 + s},
                                discrete=discrete) for s, p in enumerate(probs)]


@pytest.mark.parametrize("entry", [{"temperature": {"act": 1.0}},  # relaxed
                                   {"temperature": {}, "samples": {"act": ["a", "b"]},
                                    "baseline": [0.0, 0.0], "estimate_variance": 0.1}])
def test_the_still_moving_warning_leaves_out_discrete_choices(entry):
    """Over the last 2 of 3 steps lr went 1 -> 3 (200%); the choice's probabilities moved
    too (140%), but they are no value of a continuous hyperparameter (budget's docstring)."""
    history = moving_history(entry)
    assert still_moving(history) == ("still moving: lr changed by 200% over the last 2 of 3 "
                                      "outer steps (threshold 10%)")
    assert recent_changes(history) == (2, {"lr": 2.0})


def test_the_discrete_names_can_be_given():
    history = moving_history(None)  # records without a discrete entry
    assert "act changed by 140%" in still_moving(history)  # nothing names it discrete
    assert still_moving(history, discrete=["act"]) == (
        "still moving: lr changed by 200% over the last 2 of 3 outer steps (threshold 10%)")


def test_a_real_run_with_a_choice_names_it_discrete_in_its_records():
    def loss(params, h, batch):
        out = hd.choose(h["act"], {"id": lambda v: v, "half": lambda v: 0.5 * v},
                        batch[0] @ params["w"])
        return ((out - batch[1]) ** 2).mean() + h["lam"] * (params["w"] ** 2).sum()

    hp = hd.HyperParameters(lam=hd.scalar(0.05), act=hd.categorical(["id", "half"]))
    result = HyperOptimizer(problem(hp, loss=loss), plan=OfflinePlan(explore=0), lr=0.5,
                            stopping=Stopping(max_steps=5, patience=None)).run()
    assert "act" not in recent_changes(result.history)[1]
    assert "act" not in (still_moving(result.history, threshold=0.0) or "")


# ---------------------------------------------------------------- one-entry vectors


def test_one_entry_hyperparameters_of_every_kind_are_explored_as_documented():
    """The docs say what the code does: a hyperparameter with one entry is explored whatever
    its kind (log-positive or interval); vectors of more entries are not."""
    hp = hd.HyperParameters(l2=hd.per_feature([0.1]), sched=hd.per_step(1, 0.1),
                            pt=hd.per_tensor({"w": torch.zeros(3)}, 0.1),
                            pe=hd.per_element({"b": torch.zeros(1)}, 0.1),
                            vec=hd.per_feature([0.1, 0.2]))
    assert explored_names(hp) == ["l2", "sched", "pt", "pe"]
    doc = " ".join(global_phase.__doc__.split())
    assert "the hyperparameters with one entry, whatever their kind" in doc
