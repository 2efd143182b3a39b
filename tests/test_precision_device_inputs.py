"""Precision and device inputs: what ``Problem.to`` copies and casts, what the dtype training
computes in can hold, and finite differences under autocast.

Each test compares with an independent oracle: batches sliced by hand, a hand-written gradient
descent loop, a problem built directly in the target dtype, or the key parts of the expected
message.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.app.tasks import build_task
from hyperdiff.app.tasks.mlp import init_mlp
from hyperdiff.app.tasks.sinusoid_maml import linear_layers
from hyperdiff.errors import HyperdiffError


def ridge_losses():
    def val(p, h, b):
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["lam"] * (p["w"] ** 2).sum()

    return train, val


def data(dtype=torch.float64, rows=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, generator=g, dtype=dtype)
    return x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype)


def tuple_losses():
    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["lam"] * (p["w"] ** 2).sum()

    return train, val


def tuple_problem(params, x, y, optimizer=None, hparams=None, steps=3, train_data=None,
                  val_data=None):
    return hd.make_problem(*tuple_losses(), hparams or hd.HyperParameters(lam=hd.scalar(0.1)),
                           params, optimizer=optimizer or hd.sgd(0.1),
                           train_data=(x, y) if train_data is None else train_data,
                           val_data=(x, y) if val_data is None else val_data, steps=steps)


# 1 and 10: the moved training source re-reads a refilled container or a refreshed batch


def test_moved_source_reads_each_batch_of_a_refilled_container():
    x, y = data()
    slot: dict = {}

    def source(step, seed):  # one dict object, new tensors at every step
        i = (step * 8) % 40
        slot["x"], slot["y"] = x[i:i + 8], y[i:i + 8]
        return slot

    train, val = ridge_losses()
    problem = hd.make_problem(train, val, hd.HyperParameters(lam=hd.scalar(0.1)),
                              {"w": torch.zeros(3, dtype=torch.float64)}, optimizer=hd.sgd(0.1),
                              train_data=source, val_data={"x": x, "y": y}, steps=5)
    moved = problem.to("cpu", torch.float32)
    seen = [moved.train_data.batch(s, 0)["y"] for s in range(3)]
    for s, batch_y in enumerate(seen):
        assert torch.equal(batch_y, y[s * 8:s * 8 + 8].float())
    # the whole run: gradient descent by hand over the five batches, lam = 0.1, lr = 0.1
    w = torch.zeros(3, dtype=torch.float64)
    for s in range(5):
        xb, yb = x[s * 8:s * 8 + 8], y[s * 8:s * 8 + 8]
        w = w - 0.1 * (2 * xb.T @ (xb @ w - yb) / 8 + 2 * 0.1 * w)
    expected = float(((x @ w - y) ** 2).mean())
    assert hd.reverse()(problem.to("cpu")).value == pytest.approx(expected, rel=1e-12)
    assert hd.reverse()(moved).value == pytest.approx(expected, rel=1e-5)


def test_moved_full_batch_is_copied_once_and_again_after_an_in_place_refresh():
    x, y = data(rows=20)
    y = y.clone()  # the training targets, refreshed below; the validation batch stays
    problem = tuple_problem({"w": torch.zeros(3, dtype=torch.float64)}, x, y,
                            val_data=(x.clone(), y.clone()))
    moved = problem.to("cpu", torch.float32)
    first = moved.train_data.batch(0, 0)
    assert moved.train_data.batch(1, 0) is first  # one copy while nothing changes
    y.mul_(-1.0)  # new targets, written in place
    refreshed = moved.train_data.batch(2, 0)
    assert torch.equal(refreshed[1], y.float())
    assert hd.reverse()(moved).value == pytest.approx(hd.reverse()(problem).value, rel=1e-5)


# 2: finite differences under autocast


def autocast_problem(autocast: bool) -> hd.Problem:
    torch.manual_seed(0)
    net = hd.functional(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))

    def val_loss(p, h, batch, ctx):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(p, batch[0], ctx)
        return ((out.float() - batch[1]) ** 2).mean()

    def train_loss(p, h, batch, ctx):
        return val_loss(p, h, batch, ctx) + h["wd"] * sum((v ** 2).sum() for v in p.values())

    return hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-3)),
        net.params, optimizer=hd.sgd("lr", 0.9), steps=5, val_data=(x, y),
        train_data=hd.minibatches(x, y, batch_size=8))


def test_finite_differences_under_autocast_need_an_explicit_step():
    mixed = autocast_problem(True)
    with pytest.raises(HyperdiffError, match=r"finite_difference: eps must be given when the "
                       r"losses compute in bfloat16, coarser than the parameters' float32"):
        hd.finite_difference(warn=False)(mixed)
    reverse = hd.reverse()(mixed)
    explicit = hd.finite_difference(0.05, warn=False)(mixed)
    # docs/devices.md: within 10% of reverse mode (measured 0.7%)
    assert float((explicit.vector - reverse.vector).norm() / reverse.vector.norm()) <= 0.1


def test_finite_differences_without_autocast_keep_their_default_step():
    plain = autocast_problem(False)
    result = hd.finite_difference(warn=False)(plain)
    assert result.diagnostics["eps"] == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3))
    reverse = hd.reverse()(plain)
    assert float((result.vector - reverse.vector).norm() / reverse.vector.norm()) <= 2e-2


# 3: a cast that overflows


def test_cast_that_overflows_the_data_is_refused():
    x, _ = data(rows=20)
    y = 1e5 * x.sum(1)  # fine in float32, inf in float16 (at most 65504)
    problem = tuple_problem({"w": torch.zeros(3, dtype=torch.float64)}, x, y)
    with pytest.raises(HyperdiffError, match=r"Problem.to: val_data\[1\] must fit in float16 "
                       r"\(got values up to [0-9.e+]+ in magnitude, which overflow to inf "
                       r"there: float16 holds at most 65504\)"):
        problem.to("cpu", torch.float16)
    assert problem.to("cpu", torch.float32).val_data[0][1].dtype == torch.float32  # fits


def test_cast_that_overflows_the_parameters_is_refused():
    x, y = data(rows=20)
    problem = tuple_problem({"w": torch.full((3,), 1e5, dtype=torch.float64)}, x, y,
                            optimizer=hd.sgd(1e-12))
    with pytest.raises(HyperdiffError, match=r"Problem.to: params\['w'\] must fit in float16"):
        problem.to("cpu", torch.float16)


# 4: number coefficients in the dtype training uses


@pytest.mark.parametrize("optimizer, label", [(hd.sgd(1e39), "lr"),
                                              (hd.sgd(0.1, weight_decay=1e39), "weight_decay")])
def test_number_coefficient_that_overflows_float32_is_refused(optimizer, label):
    x, y = data(rows=20)
    message = (rf"the sgd {label} must be finite in float32, the dtype training computes it in "
               r"\(got 1e\+39, which overflows to inf there")
    wide = tuple_problem({"w": torch.zeros(3, dtype=torch.float64)}, x, y, optimizer=optimizer)
    with pytest.raises(HyperdiffError, match="Problem.to: " + message):
        wide.to("cpu", torch.float32)
    with pytest.raises(HyperdiffError, match="hypergradient: " + message):
        tuple_problem({"w": torch.zeros(3)}, x.float(), y.float(), optimizer=optimizer)


# 5: built-in tasks under another default dtype


@pytest.fixture
def default_float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_task_parameters_are_float32_whatever_the_default_dtype(default_float64):
    made = {"mlp": init_mlp(64, 8, 10, seed=3), "layers": linear_layers([1, 5, 1], 3)}
    torch.set_default_dtype(torch.float32)
    reference = {"mlp": init_mlp(64, 8, 10, seed=3), "layers": linear_layers([1, 5, 1], 3)}
    torch.set_default_dtype(torch.float64)
    for kind, params in made.items():
        for name, value in params.items():
            assert value.dtype == torch.float32, (kind, name)
            assert torch.equal(value, reference[kind][name]), (kind, name)


def test_mlp_digits_trains_under_a_float64_default(default_float64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = build_task("mlp_digits", steps=2).problems[0]
    assert problem.dtype == torch.float32
    assert torch.isfinite(hd.reverse()(problem).vector).all()


# 6: float8


def test_float8_parameters_and_cast_are_refused():
    x, y = data(rows=20)
    with pytest.raises(HyperdiffError, match=r"make_problem: params\['w'\] must be a tensor of "
                       r"dtype torch.float64, torch.float32, torch.float16 or torch.bfloat16 "
                       r"\(got torch.float8_e4m3fn\)"):
        tuple_problem({"w": torch.zeros(3, dtype=torch.float8_e4m3fn)}, x, y)
    problem = tuple_problem({"w": torch.zeros(3, dtype=torch.float64)}, x, y)
    with pytest.raises(HyperdiffError, match=r"Problem.to: dtype must be a floating-point "
                       r"torch.dtype that hyperdiff trains in: torch.float64, torch.float32, "
                       r"torch.float16 or torch.bfloat16 \(got "):
        problem.to("cpu", torch.float8_e5m2)


# 7: a streamed source on the meta device


def test_streamed_batches_on_meta_are_refused_by_device():
    x, y = data(torch.float32, rows=20)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x.to("meta"), y.to("meta")), batch_size=5)
    with pytest.raises(HyperdiffError, match=r"data: the device of field \[0\] of the batch of "
                       r"step 0 .* must be the CPU, CUDA or MPS \(got 'meta'"):
        tuple_problem({"w": torch.zeros(3)}, x, y, train_data=loader)


# 8: buffers in another dtype than the parameters


def test_buffers_in_another_dtype_are_refused():
    torch.manual_seed(0)
    net = hd.functional(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)))
    x = torch.randn(16, 4, dtype=torch.float64)
    y = x.sum(1, keepdim=True)

    def loss(p, h, b, ctx):
        return ((net(p, b[0], ctx) - b[1]) ** 2).mean() + h["wd"] * (p["2.weight"] ** 2).sum()

    params = {k: v.double() for k, v in net.params.items()}
    with pytest.raises(HyperdiffError, match=r"make_problem: buffers must have the parameters' "
                       r"dtype \(got float32 vs float64\)"):
        hd.make_problem(loss, loss, hd.HyperParameters(wd=hd.scalar(1e-3)), params,
                        buffers=net.buffers, optimizer=hd.sgd(0.1), train_data=(x, y),
                        val_data=(x, y), steps=2)
    buffers = {k: v.double() for k, v in net.buffers.items()}  # together: accepted
    hd.make_problem(loss, loss, hd.HyperParameters(wd=hd.scalar(1e-3)), params,
                    buffers=buffers, optimizer=hd.sgd(0.1), train_data=(x, y),
                    val_data=(x, y), steps=2)


# 9: a hyperparameter value the training dtype cannot hold


def test_subnormal_hyperparameter_value_is_refused_in_float32():
    x, y = data(torch.float32, rows=20)

    def make(lr, dtype):
        return tuple_problem({"w": torch.zeros(3, dtype=dtype)}, x.to(dtype), y.to(dtype),
                             optimizer=hd.sgd("lr", 0.9),
                             hparams=hd.HyperParameters(lam=hd.scalar(0.1), lr=hd.scalar(lr)))

    # float32 holds 1e-45 as 1.4013e-45: 40% off (subnormal, one unit of 2^-149)
    assert abs(float(torch.tensor(1e-45, dtype=torch.float32)) - 1e-45) / 1e-45 > 0.3
    with pytest.raises(HyperdiffError, match=r"make_problem: hyperparameter 'lr' must be "
                       r"representable in float32, the dtype training computes it in, to a "
                       r"relative accuracy of 0.001 \(got 1e-45, which float32 holds as "
                       r"1.401298464e-45: below its smallest normal number"):
        make(1e-45, torch.float32)
    make(1e-45, torch.float64)  # float64 holds it
    make(1e-30, torch.float32)  # a normal float32 number


def test_a_value_near_zero_in_an_interval_around_zero_is_accepted_in_float32():
    """-1 + 2 sigmoid(u) holds 1e-5 to 1.4e-8, an ulp of the interval's scale: ordinary
    rounding, not a value float32 cannot hold (s41 review: it was refused)."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    hp = hd.HyperParameters(shift=hd.scalar(1e-5, (-1.0, 1.0)))

    def loss(p, h, b):
        return ((b @ p["w"] + h["shift"]) ** 2).mean()

    problem = hd.make_problem(loss, loss, hp, {"w": torch.zeros(2)}, optimizer=hd.sgd(0.1),
                              train_data=x, val_data=x, steps=2)
    assert torch.isfinite(hd.reverse()(problem).vector).all()


def test_a_number_coefficient_that_float32_rounds_out_of_its_range_is_refused():
    """adam's eps=1e-50 is 0 in float32, which adam refuses (s41: trained with eps 0)."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    hp = hd.HyperParameters(lr=hd.scalar(0.1))

    def loss(p, h, b):
        return ((b @ p["w"]) ** 2).mean()

    with pytest.raises(HyperdiffError, match=r"the adam eps must be .* in float32, the dtype "
                                             r"training computes it in \(got 1e-50, which "
                                             r"float32 holds as 0.0\)"):
        hd.make_problem(loss, loss, hp, {"w": torch.ones(2)}, optimizer=hd.adam("lr", eps=1e-50),
                        train_data=x, val_data=x, steps=2)


def test_a_fn_source_yielding_meta_tensors_is_refused_by_device():
    def source(step):
        return torch.empty(4, 2, device="meta")

    hp = hd.HyperParameters(lr=hd.scalar(0.1))

    def loss(p, h, b):
        return (b @ p["w"]).pow(2).mean()

    with pytest.raises(HyperdiffError, match=r"must be the CPU, CUDA or MPS \(got 'meta'"):
        hd.make_problem(loss, loss, hp, {"w": torch.ones(2)}, optimizer=hd.sgd("lr"),
                        train_data=source, val_data=torch.randn(4, 2), steps=2)
