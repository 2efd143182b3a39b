"""One method contract over a segment of training: a table of methods x (offline, online).

Every row checks one method's online windows (``OnlineTuner``, which calls
``method.segment``) against the same method offline, or the segment ``[0, T)`` from theta_0
against the offline call (the contract's definition of offline); the capability rows check that
what a method declares is what it does (float64, tiny problems)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from test_online import mlp_params, recipe, train_loss, val_loss

import hyperdiff as hd
from hyperdiff.engine.training import initial_state, train
from hyperdiff.methods.registry import METHODS, capabilities, registered_constructor
from hyperdiff.tree import tree_flatten

from conftest import sine_data

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")


def implicit_problem():
    x, y = sine_data(30, 5, seed=3)
    xv, yv = sine_data(20, 5, seed=4)
    hp = hd.HyperParameters(wd=hd.scalar(0.05))
    return hd.make_problem(train_loss, val_loss, hp, mlp_params(), optimizer=hd.sgd(0.3, 0.5),
                           train_data=(x, y), val_data=(xv, yv), steps=40, probe=False)


def close(got: float, want: float, rel: float) -> bool:
    return abs(got - want) <= rel * max(1.0, abs(want))


# --- online windows x offline method: (name, problem, tuner options, window, offline, rel)
ONLINE_ROWS = [
    ("reverse", recipe, {"method": "reverse"}, 6, lambda p: hd.reverse()(p), 1e-12),
    ("reverse backprop=2", recipe, {"backprop": 2}, 6, lambda p: hd.truncated(2)(p), 1e-12),
    ("forward double_vjp", recipe, {"method": "forward", "engine": "double_vjp"}, 2,
     lambda p: hd.forward()(p), 1e-10),
    ("forward jvp", recipe, {"method": "forward", "engine": "jvp"}, 2,
     lambda p: hd.forward()(p), 1e-10),
    ("implicit", implicit_problem, {"method": "implicit", "solver": hd.solvers.exact()}, 40,
     lambda p: hd.implicit(solver=hd.solvers.exact(), warn=False)(p), 1e-9),
    ("checkpointed", recipe, {"method": "checkpointed"}, 6, lambda p: hd.checkpointed()(p),
     1e-12),
    ("reversible", recipe, {"method": "reversible"}, 6, lambda p: hd.reversible()(p), 1e-12),
    ("finite_difference", recipe, {"method": "finite_difference"}, 6,
     lambda p: hd.finite_difference(warn=False)(p), 1e-12),
]


@pytest.mark.filterwarnings("ignore::hyperdiff.methods.CostWarning")
@pytest.mark.parametrize("name, make, options, window, offline, rel", ONLINE_ROWS,
                         ids=[row[0] for row in ONLINE_ROWS])
def test_online_windows_equal_the_offline_method_at_fixed_hyperparameters(
        name, make, options, window, offline, rel):
    """At outer lr 0 the values never move, so window j's hypergradient is the offline one of
    the first (j+1) K steps for an exact carrying method (forward), and of the whole run for one
    window (the others)."""
    prob = make()
    tuner = hd.online.OnlineTuner(prob, window=window, lr=0.0, **options)
    records = tuner.run().history
    assert len(records) == prob.steps // window
    for j, record in enumerate(records):
        want = offline(prob.with_steps(window * (j + 1)))
        for hname, g in want.grad.items():
            assert close(record.grad[hname], float(g), rel), (name, j, hname)
    assert close(records[-1].val_loss, want.value, 1e-12)
    rounding = 1e-12 if name == "reversible" else 0.0  # its integer training's grid, 2^-44
    assert torch.allclose(tuner.state.params["W1"], train(prob)[0].params["W1"], rtol=0,
                          atol=rounding)


# --- the segment [0, T) from theta_0 is the offline method: (method, rel)
SEGMENT_ROWS = [
    (hd.reverse(), 1e-13),
    (hd.truncated(2), 1e-13),
    (hd.forward(), 1e-10),
    (hd.forward(engine="jvp"), 1e-10),
    (hd.checkpointed(), 0.0),  # the offline call is this segment, bit for bit
    (hd.checkpointed(segments=2), 0.0),
    (hd.reversible(), 0.0),
    (hd.finite_difference(warn=False), 0.0),
    (hd.methods.curvature(horizon=None), 0.0),  # the offline call is this segment
]


@pytest.mark.parametrize("method, rel", SEGMENT_ROWS, ids=[repr(r[0]) for r in SEGMENT_ROWS])
def test_the_segment_from_theta_0_over_the_whole_run_is_the_offline_method(method, rel):
    prob = recipe(6)
    raw = prob.raw_tensors(None)
    with torch.no_grad():
        state = initial_state(prob, differentiable=False)
    segment = method.segment(prob, state, raw, 0, prob.steps, prob.val_data, None)
    offline = method(prob)
    assert close(segment.value, offline.value, 1e-13)
    for name, g in offline.grad.items():
        assert close(float(segment.grad[name]), float(g), rel), name
    for key, p in offline.params.items():
        assert torch.allclose(segment.state.params[key], p, rtol=0, atol=1e-13)
    assert segment.train_losses.shape == (prob.steps,)


# --- capabilities: what a method declares is what it does
def every_method() -> list[hd.methods.Method]:
    """Each registered method, built with its defaults (truncated with k=2)."""
    out = []
    for name, reference in METHODS.items():
        module, _, attr = reference.partition(":")
        constructor = getattr(importlib.import_module(module), attr)
        out.append(constructor(2) if name == "truncated" else constructor())
    return out


@pytest.mark.parametrize("method", every_method(), ids=list(METHODS))
def test_each_method_declares_the_capabilities_of_its_module(method):
    assert method.capabilities == capabilities(method.name)
    assert method.exact == method.capabilities.exact
    assert method.capabilities.online == (method.segment_fn is not None)
    assert method.capabilities.carries_state == (method.carry_fn is not None)


@pytest.mark.parametrize("method", [m for m in every_method() if not m.capabilities.online],
                         ids=lambda m: m.name)
def test_a_method_without_segments_refuses_one_with_a_clear_error(method):
    prob = recipe(2)
    with torch.no_grad():
        state = initial_state(prob, differentiable=False)
    with pytest.raises(hd.HyperdiffError, match=rf"^{method.name}: method must support "
                                                r"segments .* \(got "):
        method.segment(prob, state, prob.raw_tensors(None), 0, 2, prob.val_data, None)
    with pytest.raises(hd.HyperdiffError, match=r"^OnlineTuner: method must be one of "
                                                r"\['reverse', 'forward', 'finite_difference', "
                                                r"'checkpointed', 'implicit', 'reversible', "
                                                r"'curvature'\] \(got "):
        hd.online.OnlineTuner(prob, method=method.name)


@pytest.mark.parametrize("bad, message", [
    ({"horizon": 0}, r"curvature: horizon must be"),
    ({"horizon_unit": "epochs"}, r"curvature: horizon_unit must be one of \['steps', 'lr'\]"),
    ({"curvature_scale": -1.0}, r"curvature: curvature_scale must be"),
])
def test_the_curvature_method_checks_its_options(bad, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        hd.methods.curvature(**bad)


@pytest.mark.parametrize("method", [hd.forward(), hd.methods.curvature()],
                         ids=["forward", "curvature"])
def test_a_carry_is_shaped_like_the_methods_carry_like(method):
    """What a carrying method hands to its next segment has the structure, shapes and dtypes of
    ``carry_like`` (the online checkpoint checks saved carries against it)."""
    prob = recipe(4)
    raw = prob.raw_tensors(None)
    with torch.no_grad():
        state = initial_state(prob, differentiable=False)
    first = method.segment(prob, state, raw, 0, 2, prob.val_data, None)
    second = method.segment(prob, first.state, raw, 2, 4, prob.val_data, first.carry)
    like = method.carry_like(prob, raw, first.state)
    got, want = tree_flatten(tuple(second.carry))[0], tree_flatten(tuple(like))[0]
    assert [(x.shape, x.dtype) for x in got] == [(x.shape, x.dtype) for x in want]


def test_the_capability_table_of_the_architecture_page_is_the_code():
    text = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(\w+)(?:\(k\))?` \| (.+) \|$", text, re.MULTILINE)
    table = {name: [cell.strip().startswith("yes") for cell in cells.split("|")]
             for name, cells in rows if name in METHODS}
    assert set(table) == set(METHODS)
    for name, flags in table.items():
        caps = capabilities(name)
        assert flags == [caps.exact, caps.offline, caps.online, caps.carries_state,
                         caps.data_parallel], name


def register_module_method(tmp_path, monkeypatch, name, *, offline):
    """A module ``{name}_method.py`` declaring reverse mode's calls under ``name`` with
    ``offline`` capabilities, and its line in METHODS (for this test only)."""
    (tmp_path / f"{name}_method.py").write_text(
        "from hyperdiff.methods.base import Capabilities, Method\n"
        "from hyperdiff.methods.reverse import _reverse, reverse_segment\n\n"
        f"CAPABILITIES = Capabilities(exact=True, offline={offline}, online=True)\n\n\n"
        f"def {name}():\n"
        f"    return Method({name!r}, _reverse, capabilities=CAPABILITIES,\n"
        "                  segment_fn=reverse_segment)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, name, f"{name}_method:{name}")


def test_a_new_method_is_its_file_and_its_registry_line(tmp_path, monkeypatch):
    """The two files that docs/architecture.md counts: a module with CAPABILITIES and a
    constructor, and one line in METHODS; the name then works offline and online."""
    register_module_method(tmp_path, monkeypatch, "toy", offline=True)
    prob = recipe(6)
    assert hd.HyperOptimizer(prob, method="toy").method.name == "toy"
    record = hd.online.OnlineTuner(prob, window=6, method="toy", lr=0.0).step()
    offline = hd.reverse()(prob)
    for name, g in offline.grad.items():
        assert close(record.grad[name], float(g), 1e-12), name


def test_an_online_only_method_is_refused_offline_by_name_and_as_a_method(tmp_path,
                                                                          monkeypatch):
    """A method whose capabilities say offline=False (no registered one is, since curvature
    gained its offline call) is refused by the offline loop, the meta plan and the registry,
    with the message naming online tuning."""
    register_module_method(tmp_path, monkeypatch, "online_toy", offline=False)
    prob = recipe(2)
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: method must be one of .*"
                                                r"\('online_toy' exists only in online tuning"):
        hd.HyperOptimizer(prob, method="online_toy")
    method = registered_constructor("online_toy")()
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: method must be a Method "
                                                r"usable offline or one of \[.*\(got online_toy"):
        hd.HyperOptimizer(prob, method=method)
