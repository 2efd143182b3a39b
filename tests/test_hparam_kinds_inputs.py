"""Hyperparameter values held otherwise than given, and refusals that said the wrong thing (the
review of s42):

- An interval hyperparameter whose raw value holds another value (``hd.scalar(1e-17, (-1,
  1))`` held as 0) is refused naming the value and the bounds; its transform is unchanged.
- Complex and bool raw values (``with_raw``, ``raw=``) are refused, not cast.
- A categorical's probabilities read back from a run (``with_recorded``) are the recorded ones
  bit for bit.
- The still-moving warning measures a vector's entry that was 0 against the vector's scale
  instead of saying ``inf%``, and a value that was 0 everywhere by how far it moved.
- ``with_natural`` takes a dict parameter name -> tensor for ``per_element`` and
  ``hd.initialization`` (the form ``initial_values`` returns), and its errors give shapes,
  never the numbers of a tensor.
- ``Interval(torch.tensor(0.0), 1.0)`` says ``low`` must be a real number.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.constraints import Interval
from hyperdiff.hparams.initialization import initial_values
from hyperdiff.tuner.budget import relative_change, still_moving
from hyperdiff.tuner.history import StepRecord

D = torch.float64

# ------------------------------------------------------------------ 1: interval values


@pytest.mark.parametrize(("value", "bounds", "held"), [
    (1e-17, (-1.0, 1.0), "0"), (0.05, (-1e15, 1e15), "0"), (1.0, (-1e300, 1e300), "0")])
def test_an_interval_value_its_raw_value_cannot_hold_is_refused(value, bounds, held):
    # low + (high - low) sigmoid(u) rounds at ulps of the bounds: 1e-17 + 1 is 1 in float64
    assert (value - bounds[0]) - (0.0 - bounds[0]) == 0.0  # the value is lost next to a bound
    with pytest.raises(HyperdiffError) as error:
        hd.scalar(value, bounds)
    text = str(error.value)
    assert text.startswith("scalar: value must be held by its raw value to a relative "
                           "accuracy of 0.001 in float64 (got ")
    assert f"strictly between {bounds[0]} and {bounds[1]}, holds as {held})" in text
    assert f"got {value:.10g}," in text


def test_with_natural_and_per_feature_refuse_a_value_the_interval_cannot_hold():
    hp = hd.HyperParameters(a=hd.scalar(0.5, (-1.0, 1.0)))
    with pytest.raises(HyperdiffError, match=r"HyperParameters: natural value of 'a' must be "
                       r"held by its raw value .* \(got 1e-17, .* holds as 0\)"):
        hp.with_natural(a=1e-17)
    with pytest.raises(HyperdiffError, match=r"per_feature: value must be held .*\(got "
                       r"\[1e-17\], .*holds as \[0\]\)"):
        hd.per_feature([0.5, 1e-17], constraint=(-1.0, 1.0))


def test_interval_values_its_raw_value_holds_are_kept_as_before():
    # the transform is unchanged: natural = low + (high - low) / (1 + exp(-u)), written out
    for value, (low, high) in [(1e-7, (-1.0, 1.0)), (0.9, (0.0, 1.0)), (1e-300, (0.0, 1.0)),
                               (0.3, (-0.3, 0.7)), (0.0, (-1.0, 3.0)), (2.5, (-1e3, 1e3))]:
        hp = hd.HyperParameters(a=hd.scalar(value, (low, high)))
        u = float(hp.raw["a"])
        assert u == math.log((value - low) / (high - low)) - math.log1p(
            -(value - low) / (high - low))
        held = float(hp.natural()["a"])
        assert held == low + (high - low) * float(torch.sigmoid(torch.tensor(u, dtype=D)))
        # 0 in (-1, 3) is held as 2.2e-16: within the interval's rounding, accepted
        assert abs(held - value) <= max(1e-3 * abs(value), 4 * 2.0 ** -52 * max(-low, high))


def test_the_interval_transform_gradient_matches_float64_finite_differences():
    c = Interval(-2.0, 5.0)
    u = torch.tensor([-3.0, -0.2, 0.0, 1.7], dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(c.to_natural(u).sum(), u)
    h = 1e-6
    central = (c.to_natural(u.detach() + h) - c.to_natural(u.detach() - h)) / (2 * h)
    torch.testing.assert_close(grad, central, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(c.derivative(u.detach()), central, rtol=1e-8, atol=1e-10)


def test_a_recorded_value_near_an_interior_zero_still_reads_back_exactly():
    # a tuned value next to 0 in (-1, 1), 4 * 2^-53: the round-trip check does not refuse it
    hp = hd.HyperParameters(a=hd.scalar(0.5, (-1.0, 1.0)))
    recorded = Interval(-1.0, 1.0).to_natural(torch.tensor(1e-15, dtype=D))
    assert float(recorded) == 4 * 2.0 ** -53
    back = hp.with_recorded({"a": recorded.clone()})
    assert torch.equal(back.natural()["a"], recorded)


# ------------------------------------------------------------------ 2: complex and bool raw


@pytest.mark.parametrize(("value", "dtype"), [(torch.tensor(1 + 2j), "complex64"),
                                              (torch.tensor(True), "bool")])
def test_complex_and_bool_raw_values_are_refused(value, dtype):
    hp = hd.HyperParameters(lr=hd.scalar(0.1), fw=hd.per_feature([1.0, 2.0]))
    expected = (f"HyperParameters: the raw value of 'lr' must be a real tensor (got a {dtype} "
                "tensor of shape ())")
    with pytest.raises(HyperdiffError, match=re.escape(expected)):
        hp.with_raw({"lr": value, "fw": torch.zeros(2)})
    with pytest.raises(HyperdiffError, match=re.escape(expected)):
        hd.HyperParameters(lr=hd.scalar(0.1), raw={"lr": value})
    # a real raw value, integer included, is still taken: exp(1) for the log constraint
    back = hp.with_raw({"lr": torch.tensor(1), "fw": torch.zeros(2)})
    assert float(back.natural()["lr"]) == math.exp(1.0)


# ------------------------------------------------------------------ 3: categorical readback


def test_a_categoricals_recorded_probabilities_read_back_to_the_bit():
    hp = hd.HyperParameters(act=hd.categorical(["a", "b", "c", "d"]), lr=hd.scalar(0.1))
    centred_misses = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        raw = {"act": torch.randn(4, generator=g, dtype=D) * 3,
               "lr": torch.randn((), generator=g, dtype=D)}
        recorded = hp.with_raw(raw).natural()
        back = hp.with_recorded({k: v.clone() for k, v in recorded.items()}).natural()
        assert torch.equal(back["act"], recorded["act"]), seed
        assert torch.equal(back["lr"], recorded["lr"]), seed
        log = torch.log(recorded["act"])
        centred_misses += not torch.equal(torch.softmax(log - log.mean(), -1), recorded["act"])
    assert centred_misses > 50  # log p alone, what was read back before, misses often


# ------------------------------------------------------------------ 4: still moving from 0

BASE = StepRecord(0, {}, "ok", 1.0, 1.0, 0.0, None, 1.0, None, None, 0.1, False, 1, "", 0.0, 0.0)


def history(values: list[dict]) -> list[StepRecord]:
    return [replace(BASE, step=s, hparams=v) for s, v in enumerate(values)]


def test_a_zero_entry_is_measured_against_the_vectors_scale_not_as_inf():
    # a MAML initialisation: weights 0.5 and -0.25, a bias at 0 that moves to 0.1
    first, last = [0.5, -0.25, 0.0], [0.5, -0.25, 0.1]
    assert relative_change(first, last) == pytest.approx(0.1 / 0.5)
    values = [{"theta0": first, "lr": 1.0}] * 8 + [{"theta0": last, "lr": 1.25}]
    message = still_moving(history(values))
    assert message == ("still moving: theta0 changed by 20%, lr changed by 25% over the last 2 "
                       "of 9 outer steps (threshold 10%)")
    # a zero entry that moved by 2% of the scale is under the threshold: no warning
    settled = [{"theta0": first}] * 8 + [{"theta0": [0.5, -0.25, 0.01]}]
    assert still_moving(history(settled)) is None
    # entries that were not 0 keep their own relative change: 0.25 -> 0.3 is 20%
    assert relative_change([1.0, 0.25, 0.0], [1.0, 0.3, 0.0]) == pytest.approx(0.2)


def test_a_value_that_was_zero_everywhere_says_how_far_it_moved():
    values = [{"b": [0.0, 0.0], "s": 0.0}] * 8 + [{"b": [0.0, -0.05], "s": 0.0}]
    assert relative_change([0.0, 0.0], [0.0, -0.05]) == math.inf
    assert still_moving(history(values)) == (
        "still moving: b moved from 0 by 0.05 over the last 2 of 9 outer steps (threshold 10%)")


# ------------------------------------------------------------------ 5: with_natural dicts


def test_with_natural_takes_an_initialization_and_per_element_as_a_dict_of_tensors():
    params = {"w": torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(0)),
              "b": torch.zeros(3, dtype=D)}
    hp = hd.HyperParameters(theta0=hd.initialization(params), lr=hd.per_element(params, 0.1))
    start = initial_values(hp)
    moved = {"w": start["w"] + 1.0, "b": start["b"] - 2.0}
    back = hp.with_natural(theta0=moved, lr={"w": 0.5, "b": torch.full((3,), 0.25)})
    expected = torch.cat([params["w"].reshape(-1) + 1.0, params["b"] - 2.0])  # flat, in order
    assert torch.equal(back.natural()["theta0"], expected)
    assert torch.equal(initial_values(back)["w"], moved["w"])
    assert back.natural()["lr"].tolist() == [0.5] * 6 + [0.25] * 3
    assert torch.equal(hp.with_natural(theta0=start).raw["theta0"], hp.raw["theta0"])


def test_with_natural_errors_name_the_parameter_and_give_shapes_not_numbers():
    params = {"w": torch.full((3, 2), 0.123456, dtype=D), "b": torch.full((3,), 0.654321,
                                                                          dtype=D)}
    hp = hd.HyperParameters(theta0=hd.initialization(params), s=hd.scalar(0.1))
    cases = [
        ({"theta0": {"w": params["w"]}}, "HyperParameters.with_natural: theta0 is missing "
         "parameters ['b']"),
        ({"theta0": {**params, "x": params["b"]}}, "HyperParameters.with_natural: theta0 must "
         "name only the parameters ['w', 'b'] (got unknown ['x'])"),
        ({"theta0": {"w": params["w"], "b": torch.zeros(4)}}, "HyperParameters.with_natural: "
         "theta0['b'] must be a number or a tensor of shape (3,), the parameter's (got a "
         "tensor of shape (4,))"),
        ({"s": params}, "HyperParameters.with_natural: s must be a number or a tensor of shape "
         "() (got a dict {'w': a tensor of shape (3, 2), 'b': a tensor of shape (3,)})"),
        ({"theta0": params["b"]}, "HyperParameters.with_natural: theta0 must be a number or a "
         "tensor of shape (9,), or a dict parameter name -> tensor of the parameter's shape "
         "(got a tensor of shape (3,))"),
        ({"s": torch.tensor(0.5 + 1j)}, "HyperParameters.with_natural: s must be a real number, "
         "a list of numbers, a real NumPy array or a real tensor (got a complex64 tensor of "
         "shape ())"),
    ]
    for values, expected in cases:
        with pytest.raises(HyperdiffError) as error:
            hp.with_natural(**values)
        assert str(error.value) == expected
        assert "0.12" not in str(error.value) and "0.65" not in str(error.value)


# ------------------------------------------------------------------ 6: Interval bounds


def test_an_interval_bound_that_is_not_a_number_says_so():
    with pytest.raises(HyperdiffError, match=re.escape(
            "Interval: low must be a real number (got tensor(0.0))")):
        Interval(torch.tensor(0.0), 1.0)
    with pytest.raises(HyperdiffError, match=re.escape(
            "Interval: high must be a real number (got '1')")):
        Interval(0.0, "1")
    with pytest.raises(HyperdiffError, match=re.escape(
            "Interval: bounds must be finite with low < high (got low=1.0, high=0.0)")):
        Interval(1.0, 0.0)
