"""The CLI builds one configured method for both modes (``app/plans.py``'s
``configured_method``): ``method.name`` and its options through the registered constructor,
``outer.backprop = k`` online as ``truncated(k)``, ``distributed.data_parallel`` as the
``data_parallel`` wrapper; what an online run accepts is read from the method's capabilities
(``segment_options``, ``long_horizon``), not from lists of names."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build_online, configured_method
from hyperdiff.tuner.distributed.data_parallel import DataParallelMethod
from hyperdiff.tuner.driver import HyperOptimizer

ONLINE = ["task.name=ridge_diabetes", "outer.mode=online", "task.cv_folds=0", "inner.steps=6",
          "outer.window=3"]


def ridge() -> hd.Problem:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)

    def train(p, h, batch):
        return ((batch[0] @ p["w"] - batch[1]) ** 2).mean() + h["lam"] * (p["w"] ** 2).sum()

    def val(p, h, batch):
        return ((batch[0] @ p["w"] - batch[1]) ** 2).mean()

    return hd.make_problem(train, val, hd.HyperParameters(lam=hd.scalar(0.1)),
                           {"w": torch.zeros(3, 1, dtype=torch.float64)},
                           optimizer=hd.sgd(lr=0.1), train_data=(x, y), val_data=(x, y),
                           steps=6, probe=False)


def test_an_online_method_is_the_same_configured_method_as_offline():
    """``method.solver = "cg"`` is ``hd.implicit("cg")`` in both modes (the deprecated
    OnlineTuner's ``solver="cg"`` alone keeps its old ``cg(maxiter=50)``)."""
    keys = ["method.name=implicit", "method.solver='cg'"]
    online = configured_method(load_config(overrides=[*ONLINE, *keys]))
    offline = configured_method(load_config(overrides=[*ONLINE[:1], *keys]))
    assert online.name == offline.name == "implicit"
    assert repr(online.options["solver"]) == repr(offline.options["solver"]) == repr(
        hd.implicit("cg").options["solver"]) == "cg(tol=None, maxiter=1000, damping=0.0)"
    chunked = configured_method(load_config(overrides=[*ONLINE, "method.name=forward",
                                                       "method.chunk_size=2"]))
    assert chunked.options == hd.forward(chunk_size=2).options  # its segment reads chunk_size


def test_outer_backprop_is_truncated_and_truncated_is_configured_online():
    # (the online default method is curvature: outer.backprop needs method.name = "reverse")
    by_key = configured_method(load_config(overrides=[*ONLINE, "method.name=reverse",
                                                      "outer.backprop=2"]))
    named = configured_method(load_config(overrides=[*ONLINE, "method.name=truncated",
                                                     "method.k=2"]))
    assert (by_key.name, by_key.options) == (named.name, named.options) == ("truncated",
                                                                          {"k": 2})
    _, loop = build_online(load_config(overrides=[*ONLINE, "method.name=reverse",
                                                  "outer.backprop=2"]))
    assert loop.plan.label == "reverse"  # as checkpoints and result.json have recorded it


def test_data_parallel_wraps_the_configured_method_in_both_modes():
    for mode, default in ((ONLINE, "curvature"), (ONLINE[:1], "reverse")):  # each mode's own
        method = configured_method(load_config(overrides=[*mode,
                                                          "distributed.data_parallel=true"]))
        assert isinstance(method, DataParallelMethod) and method.inner.name == default


def test_an_online_only_methods_options_are_checked_when_the_config_is_read():
    with pytest.raises(hd.HyperdiffError, match=r"^config: unknown key method.horizn; method "
                       r"'curvature' accepts the options horizon, horizon_unit, "
                       r"curvature_scale, loss_terms \(did you mean method.horizon\?\)"):
        load_config(overrides=[*ONLINE, "method.name=curvature", "method.horizn=20"])


def test_the_hot_start_default_reads_the_long_horizon_capability():
    def plan_of(method: hd.methods.Method) -> hd.plans.OnlinePlan:
        plan = hd.plans.OnlinePlan(window=2)
        HyperOptimizer(ridge(), plan=plan, method=method)
        return plan

    assert plan_of(hd.methods.curvature()).hot_start == "restart"
    assert plan_of(hd.forward()).hot_start == "ignore"
    forgetting = replace(hd.forward(), capabilities=replace(hd.forward().capabilities,
                                                            long_horizon=True))
    assert plan_of(forgetting).hot_start == "restart"  # not by its name


def test_the_online_loop_names_itself_in_messages():
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: process_group must be None "
                       r"\(an online run is one training; to train its windows on the ranks' "
                       r"shards of every batch pass method=hd.distributed.data_parallel"):
        HyperOptimizer(ridge(), plan=hd.plans.OnlinePlan(window=2), process_group=object())
    with pytest.warns(DeprecationWarning), pytest.raises(
            hd.HyperdiffError, match=r"^OnlineTuner: window must be a positive int"):
        hd.online.OnlineTuner(ridge(), window=0)  # the deprecated shim keeps its name
    # the curvature method's own refusals name the method, whichever loop called it
    nesterov = replace(ridge(), optimizer=hd.sgd(lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(hd.HyperdiffError, match=r"^curvature: the method carries the tangents "
                       r"of heavy-ball SGD"):
        HyperOptimizer(nesterov, plan=hd.plans.OnlinePlan(window=2),
                       method=hd.methods.curvature())
