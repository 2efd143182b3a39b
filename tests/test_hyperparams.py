import math

import pytest
import torch

import hyperdiff as hd


@pytest.mark.parametrize(
    "constraint, values",
    [
        ("free", [-3.0, 0.0, 2.5]),
        ("positive", [1e-6, 0.3, 40.0]),
        ("softplus", [1e-3, 0.3, 40.0]),
        ((0.0, 1.0), [1e-3, 0.5, 0.999]),
        ((-2.0, 5.0), [-1.9, 0.0, 4.9]),
    ],
)
def test_constraint_round_trip_and_natural_gradient(constraint, values):
    c = hd.constraints.as_constraint(constraint)
    x = torch.tensor(values, dtype=torch.float64)
    u = c.to_raw(x)
    assert torch.allclose(c.to_natural(u), x, rtol=1e-12, atol=0)
    # derivative against autograd of the map itself
    u_leaf = u.clone().requires_grad_()
    (auto,) = torch.autograd.grad(c.to_natural(u_leaf).sum(), u_leaf)
    assert torch.allclose(c.derivative(u), auto, rtol=1e-12)


def test_shapes_and_lookup():
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    hp = hd.HyperParameters(
        lr=hd.per_step(4, 0.1),
        wd=hd.per_tensor(params, {"w": 1e-2, "b": 1e-4}),
        el=hd.per_element(params, 0.5),
        feat=hd.per_feature(1.0, size=5, constraint="free"),
        mom=hd.scalar(0.9, (0.0, 1.0)),
    )
    assert hp.numel == 4 + 2 + 8 + 5 + 1
    view = hp.view(hp.raw)
    assert float(view.at("lr", step=3)) == pytest.approx(0.1)
    assert float(view.at("wd", param="b")) == pytest.approx(1e-4)
    assert view.at("el", param="w").shape == (3, 2)
    assert float(view.at("mom")) == pytest.approx(0.9)
    assert hp.unflatten(hp.flatten(hp.raw))["wd"].shape == (2,)
    assert len(hp.coordinate_names()) == hp.numel
    with pytest.raises(hd.HyperdiffError, match="step must be in"):
        view.at("lr", step=4)
    with pytest.raises(hd.HyperdiffError, match="param must be one of"):
        view.at("wd", param="nope")


def test_natural_grad_matches_chain_rule():
    hp = hd.HyperParameters(a=hd.scalar(0.2), b=hd.scalar(0.7, (0.0, 1.0)))
    raw = {n: v.clone().requires_grad_() for n, v in hp.raw.items()}
    nat = hp.natural(raw)
    loss = nat["a"] ** 3 + torch.sin(nat["b"])
    g_raw = dict(zip(raw, torch.autograd.grad(loss, list(raw.values())), strict=True))
    g_nat = hp.natural_grad(g_raw)
    assert float(g_nat["a"]) == pytest.approx(3 * 0.2**2, rel=1e-12)
    assert float(g_nat["b"]) == pytest.approx(math.cos(0.7), rel=1e-12)


def test_repr_shows_natural_values():
    hp = hd.HyperParameters(lr=hd.scalar(0.1), mom=hd.scalar(0.9, (0.0, 1.0)))
    assert repr(hp) == "HyperParameters(lr=0.1, mom=0.9)"
    assert "lr=0.05" in repr(hp.with_natural(lr=0.05))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: hd.HyperParameters(lr=hd.scalar(-0.1)), "scalar: value must be finite and > 0"),
        (lambda: hd.HyperParameters(lr=hd.scalar(float("nan"))), "value must be finite"),
        (lambda: hd.HyperParameters(m=hd.scalar(1.5, (0.0, 1.0))), "strictly between 0.0 and 1.0"),
        (lambda: hd.HyperParameters(lr=0.1), "must be a HyperParameter"),
        (lambda: hd.per_step(0), "steps must be a positive int"),
        (lambda: hd.per_feature([1.0, 2.0], size=3), r"shape \(3,\)"),
        (lambda: hd.HyperParameters(lr=hd.scalar(0.1)).with_natural(lr=0.0), "> 0"),
        (lambda: hd.HyperParameters(lr=hd.scalar(0.1)).with_natural(lx=0.2), "unknown name 'lx'"),
        (
            lambda: hd.HyperParameters(lr=hd.scalar(0.1)).with_raw({"lr": torch.tensor(float("inf"))}),
            "raw value of 'lr' must be finite",
        ),
        (
            lambda: hd.HyperParameters(lr=hd.scalar(0.1)).with_raw({"lr": torch.zeros(2)}),
            r"'lr' must have shape \(\)",
        ),
    ],
)
def test_bad_values_are_named(make, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        make()


def test_bad_constraint_spec():
    with pytest.raises(ValueError, match="constraint must be"):
        hd.scalar(0.1, "postive")


def test_numpy_arrays_are_values_as_before():
    # the value check added with the validation refused NumPy arrays, which torch.as_tensor
    # (and hyperdiff before it) read as numbers; oracle: the same values given as a list
    np = pytest.importorskip("numpy")
    for make in (lambda v: hd.per_feature(v), lambda v: hd.per_step(3, v)):
        torch.testing.assert_close(make(np.array([0.1, 0.2, 0.3])).init, make([0.1, 0.2, 0.3]).init)
    assert float(hd.scalar(np.array(0.25)).init) == 0.25
    with pytest.raises(hd.HyperdiffError, match="per_feature: value must be a real number"):
        hd.per_feature(np.array(["a", "b"]))
