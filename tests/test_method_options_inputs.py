"""Method options (s40 review): finite_difference reads its coordinates once (a generator was
used up by the repr and the call computed nothing: NaN, and a tuning loop never moved) and
refuses none or a non-sequence; truncated's curvature head names itself in its errors and its
check refuses only where the head runs (k >= T is exact reverse mode, and was refused).
References: reverse mode on the same problem."""

from __future__ import annotations

import pytest
import torch

import hyperdiff as hd

D = torch.float64


def problem(optimizer=None, steps: int = 4) -> hd.Problem:
    x = torch.linspace(-1, 1, 12, dtype=D).reshape(6, 2)
    y = x @ torch.tensor([1.0, -2.0], dtype=D)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["reg"] * (p["w"] ** 2).sum()

    hparams = hd.HyperParameters(lr=hd.scalar(0.1), reg=hd.scalar(0.05))
    return hd.make_problem(train, val, hparams, {"w": torch.zeros(2, dtype=D)},
                           optimizer=optimizer or hd.sgd("lr", 0.9), train_data=(x, y),
                           val_data=(x, y), steps=steps)


def test_coordinates_from_a_generator_are_computed():
    method = hd.finite_difference(coordinates=(i for i in (0, 1)), warn=False)
    found = method(problem())
    exact = hd.reverse()(problem())
    torch.testing.assert_close(found.vector, exact.vector, rtol=1e-6, atol=1e-10)
    assert found.diagnostics["coordinates"] == [0, 1]


@pytest.mark.parametrize("coordinates, message", [
    ([], "coordinates must name at least one coordinate"),
    (3, r"coordinates must be a sequence of ints, or None for all of them \(got 3\)"),
])
def test_bad_coordinates_are_refused_when_the_method_is_made(coordinates, message):
    with pytest.raises(hd.HyperdiffError, match="finite_difference: " + message):
        hd.finite_difference(coordinates=coordinates)


def test_truncateds_curvature_head_names_itself_and_is_checked_only_where_it_runs():
    nesterov = problem(hd.sgd("lr", 0.9, nesterov=True))
    with pytest.raises(hd.HyperdiffError, match=r"truncated: head='curvature' carries the "
                       r"tangents of heavy-ball SGD .* use head=None, method 'reverse' or"):
        hd.truncated(2, head="curvature")(nesterov)
    whole = hd.truncated(fraction=1.0, head="curvature")  # k = T: no head, reverse mode
    whole.check(nesterov)  # refused before, with the curvature method's message
    torch.testing.assert_close(whole(nesterov).vector, hd.reverse()(nesterov).vector,
                               rtol=0, atol=0)
    with pytest.raises(hd.HyperdiffError, match="truncated: head='curvature'"):
        hd.truncated(2, head="curvature").check(nesterov)
