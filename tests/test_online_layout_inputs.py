"""Online windows, lowering and keys (s40 review): a window from step t trains exactly
``K + floor(growth t)`` steps for the decimal growth as written (``0.7 * 90`` rounded to 62 in
floats); the lowering rule's direction for a per-step learning rate counts only the steps
still to train (moves of entries already trained were cut to a fifth); the CLI refuses outer
betas with an optimizer that has none and ``outer.schedule_over`` with a constant schedule
(both were stored and ignored). References: exact rational arithmetic and the rule's formula
``d_i = sign(d/du_i sum_{t >= start} lr_t)`` written out."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build_online as build
from hyperdiff.tuner.lowering import lr_direction
from hyperdiff.tuner.windows import window_starts, window_stop


@pytest.mark.parametrize("growth", [0.2, 0.29, 0.35, 0.41, 0.57, 0.58, 0.69, 0.7, 0.82, 1.3])
def test_windows_grow_by_the_exact_floor(growth):
    steps, k = 2000, 5
    exact = Fraction(str(growth))
    for start in window_starts(steps, k, growth)[:-1]:
        stop = window_stop(start, steps, k, growth)
        wanted = min(start + k + math.floor(exact * start), steps)
        assert stop == (steps if steps - wanted < k else wanted), (growth, start)


def test_a_window_from_90_at_growth_0_7_trains_68_steps():
    assert window_stop(90, 600, 5, 0.7) == 90 + 5 + 63  # 0.7 * 90 = 62.99999999999999


def per_step_problem(steps: int = 12) -> hd.Problem:
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
    loss = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()  # noqa: E731
    hparams = hd.HyperParameters(lr=hd.per_step(steps, 0.1), wd=hd.scalar(0.01))
    return hd.make_problem(loss, loss, hparams, {"w": torch.zeros(2, dtype=torch.float64)},
                           optimizer=hd.sgd("lr", weight_decay="wd"),
                           train_data=(x, x.sum(1)), val_data=(x, x.sum(1)), steps=steps)


def test_the_lowering_direction_of_a_per_step_rate_counts_the_steps_left():
    problem = per_step_problem()
    direction = lr_direction(problem, problem.raw_tensors(), start=5)
    wanted = torch.tensor([0.0] * 5 + [1.0] * 7, dtype=torch.float64)  # log lr: d lr_t/du_t > 0
    assert torch.equal(direction["lr"], wanted)  # every entry was +1 before
    assert torch.equal(direction["wd"], torch.zeros((), dtype=torch.float64))


TINY = ["task.name=mlp_digits", "outer.mode=online", "inner.steps=20"]


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_online_betas_with_an_optimizer_without_betas_are_refused(optimizer):
    with pytest.raises(hd.HyperdiffError, match=r"config: outer.beta1 and outer.beta2 must be "
                       rf"left at their defaults \(0.5, 0.99\) with outer.optimizer = "
                       rf"'{optimizer}' \(they are the betas of adam and adamw; got \(0.3, 0.5\)"):
        build(load_config(overrides=[*TINY, f"outer.optimizer={optimizer}", "outer.beta1=0.3",
                                     "outer.beta2=0.5"]))
    build(load_config(overrides=[*TINY, f"outer.optimizer={optimizer}"]))


def test_schedule_over_with_a_constant_schedule_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"config: outer.schedule_over must be left at "
                       r"its default 'steps' with a constant outer schedule"):
        build(load_config(overrides=[*TINY, "outer.schedule=constant",
                                     "outer.schedule_over=windows"]))
    build(load_config(overrides=[*TINY, "outer.schedule_over=windows"]))  # cosine: read
