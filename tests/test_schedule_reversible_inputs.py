"""Schedules and reversible mode: values that used to come back wrong or pass silently (review
of 8 Dec). A schedule's cached value across autograd modes and backward passes, a warmup over
one step, ignored or non-int arguments, ``resampled`` moving kept raw values by ulps; reversible
mode wrapping int64 past its range, and a NaN gradient reported as a range overflow."""

from __future__ import annotations

import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.hparams.schedules import resample, resampled
from hyperdiff.methods.reverse import reverse
from hyperdiff.methods.reversible import reversible

D = torch.float64
PEAK, WARMUP, FINAL = 0.1, 0.2, 0.1


def leaves() -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=D, requires_grad=True)
            for k, v in {"lr_peak": PEAK, "lr_warmup": WARMUP, "lr_final": FINAL}.items()}


def cosine_over_peak(step: int, steps: int) -> float:
    """d value / d peak of warmup_cosine at ``step`` (module doc's formula, written out)."""
    s = step / (steps - 1)
    p = min(max((s - WARMUP) / (1 - WARMUP), 0.0), 1.0)
    return min(s / WARMUP, 1.0) * (FINAL + (1 - FINAL) * 0.5 * (1 + math.cos(math.pi * p)))


# --- the one-entry cache of Schedule.value ---------------------------------------------------

@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_value_read_without_grad_is_not_handed_to_a_differentiable_read(mode):
    s, h = hd.schedule("warmup_cosine", 10), leaves()
    with mode():
        logged = s(h, 5)
    assert float(logged) == pytest.approx(PEAK * cosine_over_peak(5, 10), rel=1e-15)
    value = s(h, 5)
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value, h["lr_peak"])
    assert float(grad) == pytest.approx(cosine_over_peak(5, 10), rel=1e-15)


def test_a_value_is_read_afresh_after_a_backward_pass_through_it():
    s, h = hd.schedule("warmup_cosine", 10), leaves()
    s(h, 5).backward()
    s(h, 5).backward()  # the first graph is freed: the cache must not hand it back
    assert float(h["lr_peak"].grad) == pytest.approx(2 * cosine_over_peak(5, 10), rel=1e-15)


def test_reads_in_one_step_and_mode_still_share_one_value():
    """Control (passes before): an optimizer reads the value once per parameter tensor."""
    s, h = hd.schedule("warmup_cosine", 10), leaves()
    assert s(h, 5, "w") is s(h, 5, "b")
    with torch.no_grad():
        assert s(h, 5, "w") is s(h, 5, "b")


# --- a warmup over one step ------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: hd.schedule("warmup_cosine", 1),
    lambda: hd.schedule("warmup_linear", 1),
    lambda: hd.schedule("warmup_cosine", 100).with_steps(1),
])
def test_a_warmup_schedule_over_one_step_is_refused(make):
    with pytest.raises(hd.HyperdiffError, match=r"steps must be at least 2 .*\(got 1\)"):
        make()


def test_other_families_over_one_step_keep_their_peak():
    """Control (passes before): at s = 0 exponential and step_decay are ``peak``."""
    for family, fields in (("exponential", {"lr_final": 0.5}), ("step_decay",
                                                                {"lr_gamma": 0.5})):
        values = {"lr_peak": torch.tensor(0.3, dtype=D)} | {
            k: torch.tensor(v, dtype=D) for k, v in fields.items()}
        assert hd.schedule(family, 1).values(values).tolist() == [0.3]


# --- arguments that were ignored or failed inside torch --------------------------------------

def test_drops_is_refused_for_a_family_that_does_not_read_it():
    with pytest.raises(hd.HyperdiffError, match=r"schedule: drops must be .*step_decay.*got 5"):
        hd.schedule("warmup_cosine", 10, drops=5)
    assert hd.schedule("step_decay", 10, drops=5).drops == 5


@pytest.mark.parametrize("read, name, got", [
    (lambda s, h: s.value(h, 2.5), "step", "2.5"),
    (lambda s, h: s.value(h, True), "step", "True"),
    (lambda s, h: s.value(h, "3"), "step", "'3'"),
    (lambda s, h: s.window(h, 2.5, 5), "start", "2.5"),
    (lambda s, h: s.window(h, 2, 5.0), "stop", "5.0"),
])
def test_a_step_that_is_not_an_int_is_refused(read, name, got):
    s = hd.schedule("warmup_cosine", 10)
    with pytest.raises(hd.HyperdiffError, match=rf"{name} must be an int \(got {got}\)"):
        read(s, {k: v.detach() for k, v in leaves().items()})


def test_values_of_a_mapping_of_numbers_equal_those_of_tensors():
    s = hd.schedule("warmup_cosine", 10)
    numbers = {"lr_peak": PEAK, "lr_warmup": WARMUP, "lr_final": FINAL}
    got = s.values(numbers)
    assert got.dtype == D
    assert got.tolist() == pytest.approx([PEAK * cosine_over_peak(t, 10) for t in range(10)],
                                         rel=1e-15, abs=1e-18)
    with pytest.raises(hd.HyperdiffError, match=r"'lr_peak' must be a tensor or a number "
                                                r"\(got 'a'\)"):
        s.values({**numbers, "lr_peak": "a"})


def test_resample_refuses_an_integer_tensor():
    with pytest.raises(hd.HyperdiffError, match=r"resample: values must be a non-empty 1-D "
                                                r"tensor of a floating-point dtype"):
        resample(torch.tensor([1, 2, 3]), 5)


# --- resampled keeps the other raw values ----------------------------------------------------

def test_resampled_keeps_the_raw_values_of_the_other_hyperparameters_bit_for_bit():
    hp = hd.HyperParameters(lr=hd.per_step(4, 0.1),
                            act=hd.categorical(["a", "b", "c"], init=[0.2, 0.5, 0.3]),
                            sp=hd.scalar(0.3, "softplus"))
    out = resampled(hp, 7)
    for name in ("act", "sp"):
        assert torch.equal(out.raw[name], hp.raw[name]), name
    assert out.natural()["lr"].shape == (7,)
    assert out.natural()["lr"].tolist() == pytest.approx([0.1] * 7, rel=1e-15)


# --- reversible mode: the int64 range and NaN gradients ---------------------------------------

G = torch.Generator().manual_seed(0)
XR = torch.randn(16, 3, generator=G, dtype=D)
YR = torch.randn(16, 1, generator=G, dtype=D)


def overflowing_problem():
    """A constant gradient 1.5e5 per coordinate: each increment is in the range +-2^18 of
    fraction_bits=44, their sum (the velocity, up to 1.5e6 at momentum 0.9) is not."""
    def train(p, h, b):
        return 1.5e5 * p["w"].sum() + ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    return hd.make_problem(train, val, hd.HyperParameters(lr=hd.scalar(1e-7)),
                           {"w": torch.zeros(3, 1, dtype=D)}, optimizer=hd.sgd("lr", 0.9),
                           train_data=(XR, YR), val_data=(XR, YR), steps=6)


def test_reversible_refuses_a_velocity_past_the_fixed_point_range():
    with pytest.raises(hd.NonFiniteError, match=r"reversible: the velocity must stay within "
                       r"the fixed-point range \+-262144 \(got 285001 at step 1\); lower "
                       r"fraction_bits"):
        reversible()(overflowing_problem())


def test_reversible_with_a_wider_range_matches_reverse_mode():
    """Control (passes before): 8 fewer fraction bits hold the same velocity."""
    problem = overflowing_problem()
    exact = reverse()(problem).vector
    assert torch.allclose(reversible(fraction_bits=36)(problem).vector, exact, rtol=1e-9)


def test_reversible_reports_a_nan_loss_as_the_other_methods_do():
    def train(p, h, b, ctx):
        base = ((b[0] @ p["w"] - b[1]) ** 2).mean()
        return base + (torch.sqrt(p["w"].sum() - 10.0) if ctx.step == 3 else 0.0)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    problem = hd.make_problem(train, val, hd.HyperParameters(lr=hd.scalar(0.1)),
                              {"w": torch.zeros(3, 1, dtype=D)}, optimizer=hd.sgd("lr", 0.9),
                              train_data=(XR, YR), val_data=(XR, YR), steps=6)
    expected = (r"inner training diverged at step 3 \(train loss nan\); lower the learning "
                r"rate or the number of steps")
    with pytest.raises(hd.NonFiniteError, match="reverse: " + expected):
        reverse()(problem)
    with pytest.raises(hd.NonFiniteError, match="reversible: " + expected):
        reversible()(problem)
