"""Discrete choices' options (s40 review): another mode's option is refused at the call
(`temperature` with REINFORCE, `baseline`/`decay` with relax were ignored); `hd.choose` without
options on string choices and `mix` of plain numbers are named or mixed (raw torch errors
before); a Gumbel sample's undrawn option whose value overflows no longer makes the drawn
one's NaN; finite differences refuse Gumbel choices (their differences are 0: a loop never
moved them). References: the drawn option's own value, reverse mode."""

from __future__ import annotations

import pytest
import torch

import hyperdiff as hd
from hyperdiff.hparams.discrete import with_states

D = torch.float64


@pytest.mark.parametrize("options, message", [
    ({"mode": "reinforce", "temperature": (5.0, 0.01)},
     r"temperature must be left out with mode='reinforce' \(only relax and gumbel read it"),
    ({"mode": "relax", "baseline": "leave_one_out"},
     r"baseline must be left out with mode='relax' \(only reinforce reads it"),
    ({"mode": "gumbel", "decay": 0.5}, r"decay must be left out with mode='gumbel'"),
])
def test_another_modes_option_is_refused(options, message):
    with pytest.raises(hd.HyperdiffError, match="categorical: " + message):
        hd.categorical(["tanh", "relu"], **options)
    hd.categorical(["tanh", "relu"], mode=options["mode"])


def test_string_choices_without_options_are_named_and_numbers_mix():
    hp = hd.HyperParameters(act=hd.categorical(["relu", "tanh"]),
                            k=hd.categorical([1, 3], init=[0.25, 0.75]))
    h = hp.view(hp.raw)
    with pytest.raises(hd.HyperdiffError, match=r"choose: options for 'act' must be callables "
                       r"or numbers"):
        hd.choose(h["act"])
    assert float(hd.discrete.mix(h["k"], [1, 3])) == pytest.approx(0.25 * 1 + 0.75 * 3)
    assert float(hd.choose(h["k"])) == pytest.approx(2.5)


def test_an_undrawn_gumbel_option_that_overflows_leaves_the_drawn_value():
    hp = hd.HyperParameters(act=hd.categorical(["tanh", "exp"], mode="gumbel",
                                               init=[0.999, 0.001]))
    x = torch.tensor([1.0, 2.0], dtype=D)
    options = {"tanh": torch.tanh, "exp": lambda v: torch.exp(1000 * v)}
    drawn = 0
    for seed in range(3):
        seeded = with_states(hp, {"act": {"noise_seed": seed}})
        choice = seeded.view(seeded.raw)["act"]
        if float(choice.weights[0]) != 1.0:
            continue  # this draw took the overflowing option: its value is inf, as it should
        drawn += 1
        assert torch.equal(hd.choose(choice, options, x), torch.tanh(x))  # NaN before
    assert drawn > 0


def test_finite_differences_refuse_gumbel_choices():
    x = torch.linspace(-1, 1, 8, dtype=D).reshape(4, 2)

    def loss(p, h, b):
        out = hd.choose(h["act"], {"tanh": torch.tanh, "id": lambda v: v}, b[0] @ p["w"])
        return ((out - b[1]) ** 2).mean()

    hparams = hd.HyperParameters(act=hd.categorical(["tanh", "id"], mode="gumbel"))
    problem = hd.make_problem(loss, loss, hparams, {"w": torch.zeros(2, dtype=D)},
                              optimizer=hd.sgd(0.1), train_data=(x, x.sum(1)),
                              val_data=(x, x.sum(1)), steps=3)
    with pytest.raises(hd.HyperdiffError, match=r"finite_difference: the Gumbel choices "
                       r"\['act'\] train one sampled configuration"):
        hd.finite_difference(warn=False).check(problem)
    hd.reverse().check(problem)
