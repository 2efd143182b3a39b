"""Discrete hyperparameters' inputs and noise (s39): samples='auto' with REINFORCE refused (a
torch reshape error before), with_natural of a discrete value checked as init is (rescaled
silently before), the straight-through Gumbel noise of a direct call following its seed (seed
0's whatever the seed before) and varying per outer step under common_seed (frozen before), and
choices whose outputs differ in shape refused (broadcast before)."""

from __future__ import annotations

import logging

import pytest
import torch

import hyperdiff as hd
import hyperdiff.hparams.gumbel as gumbel
from hyperdiff.tuner.offline_plan import OfflinePlan

D = torch.float64
OPTS = {"tanh": torch.tanh, "sq": torch.square, "sin": torch.sin}


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)


def loss(p, h, b):
    return ((hd.choose(h["act"], OPTS, b[0] @ p["W"]) @ p["v"] - b[1]) ** 2).mean()


def problem(mode: str, seed: int = 0) -> hd.Problem:
    x, y = data()
    hp = hd.HyperParameters(act=hd.categorical(list(OPTS), mode=mode))
    return hd.make_problem(loss, loss, hp, {"W": 0.5 * torch.ones(3, 4, dtype=D),
                                            "v": 0.5 * torch.ones(4, dtype=D)},
                           optimizer=hd.sgd(0.1), train_data=(x[:12], y[:12]),
                           val_data=(x[12:], y[12:]), steps=2, seed=seed, probe=False)


def test_auto_samples_with_reinforce_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"samples must be a fixed number with REINFORCE "
                       r"choices \('act'\)"):
        hd.HyperOptimizer(problem("reinforce"), method="reverse",
                          plan=OfflinePlan(samples="auto"))


@pytest.mark.parametrize("value", [3, [2.0, 1.0, 1.0], [0.5, 0.5]])
def test_with_natural_of_a_discrete_value_must_be_its_probabilities(value):
    hp = hd.HyperParameters(act=hd.categorical(list(OPTS)))
    with pytest.raises(hd.HyperdiffError, match=r"with_natural: act must be probabilities of "
                       r"its 3 choices, shape \(3,\), that sum to 1"):
        hp.with_natural(act=value)
    moved = hp.with_natural(act=[0.2, 0.3, 0.5])
    assert torch.allclose(torch.softmax(moved.raw["act"], -1),
                          torch.tensor([0.2, 0.3, 0.5], dtype=moved.raw["act"].dtype))


def noise_of(run) -> list[tuple[float, ...]]:
    """The Gumbel noise vectors ``run()`` draws, in order."""
    drawn, draw = [], gumbel.gumbel_noise

    def spy(shape, seed, like):
        noise = draw(shape, seed, like)
        drawn.append(tuple(noise.tolist()))
        return noise

    gumbel.gumbel_noise = spy
    try:
        run()
    finally:
        gumbel.gumbel_noise = draw
    return drawn


def test_a_direct_calls_gumbel_noise_follows_its_seed():
    per_seed = {s: noise_of(lambda s=s: hd.reverse()(problem("gumbel", seed=s)))[0]
                for s in range(4)}
    assert len(set(per_seed.values())) == 4
    assert noise_of(lambda: hd.reverse()(problem("gumbel", seed=2)))[0] == per_seed[2]


@pytest.mark.parametrize("common", [False, True])
def test_gumbel_noise_is_drawn_anew_each_outer_step(common, caplog):
    with caplog.at_level(logging.ERROR):
        opt = hd.HyperOptimizer(problem("gumbel"), method="reverse", lr=0.1,
                                stopping=hd.Stopping(max_steps=4),
                                plan=OfflinePlan(explore_when="broken", common_seed=common))
        per_step = [noise_of(opt.step)[0] for _ in range(4)]
    assert len(set(per_step)) == 4


def test_choices_whose_outputs_differ_in_shape_are_refused():
    hp = hd.HyperParameters(head=hd.categorical(["col", "flat"]))
    options = {"col": lambda z: z[:, None], "flat": lambda z: z}
    with pytest.raises(hd.HyperdiffError, match=r"mix: the values of 'head''s choices must be "
                       r"tensors of one shape .* \(got \[\(3, 1\), \(3,\)\]\)"):
        hd.choose(hp.view(hp.raw)["head"], options, torch.arange(3.0, dtype=D))
