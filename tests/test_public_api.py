"""The public API: at most 45 top-level names, the rest in namespaces, old names deprecated.

The tables below are written out here, independently of ``hyperdiff/__init__.py``, so that a
name dropped or moved by mistake fails a test.
"""

from __future__ import annotations

import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hyperdiff as hd

ROOT = Path(__file__).resolve().parents[1]

NAMESPACES = ("constraints", "data", "diagnose", "discrete", "distributed", "export", "history",
              "hyperparams", "methods", "models", "online", "optimizers", "plans", "schedules", "solvers",
              "tasks", "testing")

# the names that left the top level in 0.1, and where they live now
MOVED = {
    "Advice": "diagnose", "CheckReport": "diagnose", "recommend": "diagnose",
    "BatchSource": "data",
    "Choice": "discrete", "mix": "discrete",
    "Constraint": "constraints", "Free": "constraints", "Interval": "constraints",
    "Positive": "constraints",
    "HParamView": "hyperparams", "HyperParameter": "hyperparams",
    "History": "history", "OptimizeResult": "history", "StepRecord": "history",
    "Method": "methods",
    "OnlineResult": "online", "OnlineTuner": "online",
    "Optimizer": "optimizers",
    "Schedule": "schedules", "resample": "schedules", "resampled": "schedules",
    "SearchRange": "tasks", "TaskData": "tasks", "TaskSpec": "tasks", "build_task": "tasks",
    "SolveResult": "solvers", "Solver": "solvers", "cg": "solvers", "exact": "solvers",
    "neumann": "solvers",
    "StepContext": "models",
    "TunedSchedule": "export",
    "train": "testing",
}
# the 80 names of hyperdiff 0.1's __all__: each is public now, a namespace, or moved
OLD_ALL_SIZE = 80
ADDED = {"initialization"}  # public names that 0.1 did not have


def test_at_most_45_public_names_sorted_and_unique():
    assert len(hd.__all__) <= 45
    assert len(set(hd.__all__)) == len(hd.__all__)
    assert hd.__all__ == sorted(hd.__all__)


def test_every_old_name_is_public_a_namespace_or_moved():
    kept = (set(hd.__all__) - ADDED) | {"distributed"}
    assert not kept & set(MOVED)
    assert len(kept) + len(MOVED) + 1 == OLD_ALL_SIZE  # + linear, now hd.testing


def test_every_public_name_resolves_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in hd.__all__:
            assert getattr(hd, name) is not None, name
        namespace = {}
        exec("from hyperdiff import *", namespace)
    assert set(hd.__all__) <= set(namespace)


def test_dir_lists_the_public_names_and_namespaces_only():
    assert dir(hd) == sorted([*hd.__all__, *NAMESPACES, "__version__"])
    for internal in ("api", "driver", "problem", "training", "linear", "advice"):
        assert internal not in dir(hd)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_each_namespace_is_a_module_exposing_what_it_lists(namespace):
    module = getattr(hd, namespace)
    assert isinstance(module, types.ModuleType)
    assert module.__name__.startswith("hyperdiff.")  # wherever its layer keeps it
    for name in module.__all__:
        assert hasattr(module, name), f"hd.{namespace}.{name}"


@pytest.mark.parametrize(("old", "namespace"), sorted(MOVED.items()))
def test_a_moved_name_resolves_with_a_warning_naming_its_new_spelling(old, namespace):
    new = getattr(getattr(hd, namespace), old)
    assert old in getattr(hd, namespace).__all__
    with pytest.warns(DeprecationWarning,
                      match=rf"^hd\.{old} is deprecated; use hd\.{namespace}\.{old}$") as caught:
        value = getattr(hd, old)
    assert value is new
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]  # the caller's line


def test_from_import_of_a_moved_name_warns_too():
    namespace = {}
    with pytest.warns(DeprecationWarning, match=r"hd\.cg is deprecated; use hd\.solvers\.cg"):
        exec("from hyperdiff import cg", namespace)
    assert namespace["cg"] is hd.solvers.cg


def test_the_linear_module_is_now_hd_testing():
    with pytest.warns(DeprecationWarning, match=r"^hd\.linear is deprecated; use hd\.testing$"):
        linear = hd.linear
    assert linear is sys.modules["hyperdiff.testing.linear"]
    for name in linear.__all__:
        assert getattr(hd.testing, name) is getattr(linear, name)


def test_an_unknown_name_is_an_attribute_error_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
            _ = hd.no_such_name
        assert not hasattr(hd, "no_such_name")


def test_the_test_suite_turns_our_deprecations_into_errors():
    """pyproject.toml's filterwarnings: a test that still spells ``hd.cg`` fails."""
    with pytest.raises(DeprecationWarning, match=r"hd\.cg is deprecated"):
        _ = hd.cg


# make_problem and hypergradient: the same model forms ------------------------------------------
def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 1)).double()


def _setup():
    module = _module()
    net = hd.functional(module)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 1,
                                                                            generator=g,
                                                                            dtype=torch.float64)

    def train_loss(params, h, batch, ctx):
        l2 = sum((p ** 2).sum() for p in params.values())
        return F.mse_loss(net(params, batch[0], ctx), batch[1]) + h["wd"] * l2

    def val_loss(params, h, batch, ctx):
        return F.mse_loss(net(params, batch[0], ctx), batch[1])

    hparams = hd.HyperParameters(lr=hd.scalar(0.05), wd=hd.scalar(1e-2))
    kwargs = dict(optimizer=hd.sgd(lr="lr"), train_data=(x[:8], y[:8]),
                  val_data=(x[8:], y[8:]), steps=4)
    return net, (train_loss, val_loss, hparams), kwargs


def _forms(net):
    """Every model form, as ``(params argument, extra keyword arguments)``."""
    return {
        "functional model": (net, {}),
        "dict and buffers": (dict(net.params), {"buffers": dict(net.buffers)}),
        "pair": ((dict(net.params), dict(net.buffers)), {}),
    }


@pytest.mark.parametrize("form", ["functional model", "dict and buffers", "pair"])
def test_make_problem_and_hypergradient_accept_the_same_model_forms(form):
    net, losses, kwargs = _setup()
    params, extra = _forms(net)[form]
    direct = hd.hypergradient(*losses, params, **kwargs, **extra, method=hd.reverse())
    problem = hd.make_problem(*losses, params, **kwargs, **extra)
    via_problem = hd.reverse()(problem)
    # the reference: central finite differences on the dict form, which both always took
    reference = hd.finite_difference(eps=1e-5, warn=False)(
        hd.make_problem(*losses, dict(net.params), **kwargs, buffers=dict(net.buffers)))
    assert set(problem.buffers) == set(net.buffers) != set()
    for name in ("lr", "wd"):
        torch.testing.assert_close(direct.grad[name], via_problem.grad[name])
        torch.testing.assert_close(direct.grad[name], reference.grad[name], rtol=1e-5,
                                   atol=1e-8)


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("module", {}, r"params must be hd\.functional\(module\), not the module"),
    ("functional", {"buffers": {}}, "buffers must not be given with a functional model"),
    ("path", {}, r"params must be hd\.functional\(module\), a dict of parameter tensors or a "
                 r"pair \(params, buffers\) \(got 'weights\.pt'\)"),
])
def test_make_problem_and_hypergradient_refuse_the_same_forms(model, extra, message):
    net, losses, kwargs = _setup()
    value = {"module": _module(), "functional": net, "path": "weights.pt"}[model]
    for entry in (hd.hypergradient, hd.make_problem):
        with pytest.raises(hd.HyperdiffError, match=rf"^{entry.__name__}: {message}"):
            entry(*losses, value, **kwargs, **extra)


# the README and docs spell only public names and namespaces -------------------------------------
def _hd_references(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])hd\.(\w+(?:\.\w+)?)", text))


@pytest.mark.parametrize("path", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_readme_and_docs_use_only_public_names_and_namespaces(path):
    text = (ROOT / path).read_text()
    wrong = []
    for reference in _hd_references(text):
        first, _, second = reference.partition(".")
        if first in NAMESPACES:
            if second and not hasattr(getattr(hd, first), second):
                wrong.append(reference)
        elif first not in hd.__all__ and first not in ("__all__", "__version__"):
            wrong.append(reference)
    assert not wrong, f"{path} spells names that are not public: {sorted(wrong)}"
