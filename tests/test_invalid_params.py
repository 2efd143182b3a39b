"""Generated invalid-parameter tests, in the spirit of scikit-learn's.

Every public constructor is listed once with valid arguments and, per argument, the *kind* of
value it takes; every config key comes from the config dataclasses' fields and metadata. Each
kind expands into wrong types, non-finite values (NaN, inf) and out-of-range values, and every
one must raise ``hd.HyperdiffError`` (a ``ValueError``) whose message names the argument.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import fields
from typing import Any, get_type_hints

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import SECTIONS, resolve

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

D = torch.float64
NAN, INF = float("nan"), float("inf")
TEXT, OBJECT = "text", object()

BAD: dict[str, list[Any]] = {
    # kind -> values that must be refused
    "number>0": [TEXT, OBJECT, None, True, NAN, INF, -INF, 0.0, -1.0],
    "number>=0": [TEXT, OBJECT, True, NAN, INF, -1.0],
    "coefficient>=0": [OBJECT, None, True, "", NAN, INF, -1.0],  # a str names a hyperparameter
    "coefficient>0": [OBJECT, None, True, "", NAN, INF, 0.0, -1.0],
    "unit[0,1)": [TEXT, NAN, INF, -0.1, 1.0, 1.5],
    "unit[0,1]": [TEXT, NAN, INF, -0.1, 1.5],
    "int>=1": [TEXT, None, 2.5, True, NAN, INF, 0, -1],
    "int>=0": [TEXT, 2.5, True, NAN, -1],
    "int>=2": [TEXT, 2.5, NAN, 1, 0],
    "hparam value": [TEXT, [TEXT], OBJECT, None, True, NAN, INF, -1.0, 0.0],
    "constraint": ["bogus", 3, (1.0, 0.0), (0.0, TEXT), (NAN, 1.0), (0.0, INF)],
    "params": [None, {}, TEXT, {"w": 1.0}, [torch.zeros(2)]],
    "optional number>0": [TEXT, OBJECT, NAN, INF, 0.0, -1.0],
    "optional int>=1": [TEXT, 2.5, True, NAN, 0, -1],
    "betas": [TEXT, 0.9, (0.9,), (1.5, 0.999), (0.9, NAN), (-0.1, 0.9), (0.9, 1.0)],
    "choice": ["no-such-name", 3, None],
    "optional choice": ["no-such-name", 3],  # None: the default (the plan's outer optimizer)
    "path": [3, None, "", OBJECT],
}


def _problem():
    x = torch.linspace(-1, 1, 24, dtype=D).reshape(8, 3)
    y = x.sum(1)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["lam"] * p["w"].square().sum()

    return hd.make_problem(train, val, hd.HyperParameters(lam=hd.scalar(0.1)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.1),
                           train_data=(x, y), val_data=(x, y), steps=2, probe=False)


PROBLEM = _problem()
PARAMS = {"w": torch.zeros(3, dtype=D)}
X, Y = torch.zeros(8, 3, dtype=D), torch.zeros(8, dtype=D)


def _problem_kwargs() -> dict[str, Any]:
    return dict(train_loss=PROBLEM.train_loss, val_loss=PROBLEM.val_loss,
                hparams=PROBLEM.hparams, params=dict(PARAMS), optimizer=hd.sgd(0.1),
                train_data=(X, Y), val_data=(X, Y), steps=2)


# name -> (constructor, valid keyword arguments, {argument: kind})
CONSTRUCTORS: dict[str, tuple[Any, dict[str, Any], dict[str, str]]] = {
    "scalar": (hd.scalar, {"value": 0.1}, {"value": "hparam value", "constraint": "constraint"}),
    "per_step": (hd.per_step, {"steps": 4, "value": 0.1},
                 {"steps": "int>=1", "value": "hparam value", "constraint": "constraint"}),
    "per_tensor": (hd.per_tensor, {"params": PARAMS, "value": 0.1},
                   {"params": "params", "value": "hparam value", "constraint": "constraint"}),
    "per_feature": (hd.per_feature, {"value": 0.1, "size": 3},
                    {"value": "hparam value", "size": "int>=1", "constraint": "constraint"}),
    "per_element": (hd.per_element, {"params": PARAMS, "value": 0.1},
                    {"params": "params", "value": "hparam value", "constraint": "constraint"}),
    "sgd": (hd.sgd, {"lr": 0.1, "momentum": 0.9},
            {"lr": "coefficient>=0", "momentum": "coefficient>=0", "dampening": "unit[0,1]",
             "weight_decay": "coefficient>=0"}),
    "adam": (hd.adam, {}, {"lr": "coefficient>=0", "betas": "betas", "eps": "coefficient>0",
                           "weight_decay": "coefficient>=0"}),
    "adamw": (hd.adamw, {}, {"lr": "coefficient>=0", "betas": "betas", "eps": "coefficient>0",
                             "weight_decay": "coefficient>=0"}),
    "checkpointed": (hd.checkpointed, {}, {"segments": "optional int>=1"}),
    "truncated": (hd.truncated, {"k": 2}, {"k": "int>=1"}),
    "forward": (hd.forward, {}, {"chunk_size": "optional int>=1", "engine": "choice"}),
    "implicit": (hd.implicit, {}, {"solver": "choice", "stationarity_tol": "number>0",
                                   "val_change_tol": "number>0",
                                   "train_batches": "optional int>=1"}),
    "finite_difference": (hd.finite_difference, {}, {"eps": "optional number>0"}),
    "reversible": (hd.reversible, {}, {"fraction_bits": "int>=1"}),
    "cg": (hd.solvers.cg, {}, {"tol": "optional number>0", "maxiter": "int>=1",
                       "damping": "number>=0"}),
    "neumann": (hd.solvers.neumann, {}, {"step": "optional number>0", "iterations": "int>=1",
                                 "tol": "optional number>0", "damping": "number>=0"}),
    "exact": (hd.solvers.exact, {}, {"max_size": "int>=1", "chunk_size": "int>=1",
                             "tol": "optional number>0", "damping": "number>=0"}),
    "Stopping": (hd.Stopping, {}, {"max_steps": "int>=1", "max_time_s": "optional number>0",
                                   "patience": "optional int>=1", "min_delta": "number>=0",
                                   "grad_tol": "number>=0", "step_tol": "number>=0"}),
    "HyperOptimizer": (hd.HyperOptimizer, {"problem": PROBLEM},
                       {"method": "choice", "optimizer": "optional choice", "lr": "number>0",
                        "clip": "optional number>0", "schedule": "choice",
                        "samples": "int>=1", "max_samples": "int>=1", "tie_steps": "int>=0",
                        "seed": "int>=0", "shrink": "unit[0,1)", "max_failures": "int>=1"}),
    "OnlineTuner": (hd.online.OnlineTuner, {"problem": PROBLEM},
                    {"window": "int>=1", "method": "choice", "optimizer": "optional choice",
                     "lr": "number>=0", "schedule": "choice", "clip": "optional number>0",
                     "val_batch_size": "optional int>=1", "eval_every": "int>=0",
                     "seed": "int>=0", "engine": "choice", "solver": "choice",
                     "backprop": "optional int>=1", "shrink": "unit[0,1)",
                     "max_failures": "int>=1", "max_loss_ratio": "number>0",
                     "horizon": "optional number>0", "horizon_unit": "choice",
                     "curvature_scale": "optional number>0", "hot_start": "choice"}),
    "categorical": (hd.categorical, {"choices": ["a", "b"]},
                    {"mode": "choice", "temperature": "number>0"}),
    # baseline and decay are REINFORCE's options (refused with another mode since s40)
    "categorical_reinforce": (hd.categorical, {"choices": ["a", "b"], "mode": "reinforce"},
                              {"baseline": "choice", "decay": "unit[0,1)"}),
    "schedule": (hd.schedule, {"family": "warmup_cosine", "steps": 10},
                 {"family": "choice", "steps": "int>=1", "drops": "int>=1"}),
    "check": (hd.check, {"problem": PROBLEM, "memory": False},
              {"coordinates": "int>=1", "seed": "int>=0", "memory_bytes": "optional number>0"}),
    "torch_optimizer": (hd.torch_optimizer, {"optimizer": hd.sgd(0.1),
                                             "hparams": hd.HyperParameters(a=hd.scalar(1.0)),
                                             "module_or_params": torch.nn.Linear(3, 1)},
                        {"steps": "optional int>=1"}),
    "CSVLogger": (hd.CSVLogger, {"path": "steps.csv"}, {"path": "path"}),
    "minibatches": (lambda **kw: hd.minibatches(X, Y, **kw), {"batch_size": 4},
                    {"batch_size": "int>=1"}),
    "make_problem": (hd.make_problem, _problem_kwargs(), {"steps": "int>=1", "seed": "int>=0"}),
    "hypergradient": (hd.hypergradient, _problem_kwargs(),
                      {"steps": "int>=1", "seed": "int>=0"}),
}
if importlib.util.find_spec("tensorboard") is not None:  # its valid call needs the package
    CONSTRUCTORS["TensorBoardLogger"] = (hd.TensorBoardLogger, {"log_dir": "tb"},
                                         {"log_dir": "path"})
# values that are valid for one argument although its kind would refuse them
VALID_HERE = {("HyperOptimizer", "samples"): ["auto"], ("HyperOptimizer", "shrink"): [],
              ("HyperOptimizer", "method"): [], ("implicit", "solver"): [None],
              ("reversible", "fraction_bits"): [],
              ("OnlineTuner", "max_loss_ratio"): [INF],  # inf turns the loss-ratio rules off
              ("OnlineTuner", "hot_start"): [None],  # None: the method's default
              ("categorical", "temperature"): [None],  # None: the default, 1
              ("categorical_reinforce", "baseline"): [None],  # None: "moving_average"
              ("categorical_reinforce", "decay"): [None]}  # None: 0.9


def _constructor_cases():
    for name, (make, valid, kinds) in CONSTRUCTORS.items():
        for argument, kind in kinds.items():
            allowed = VALID_HERE.get((name, argument), [])
            for value in BAD[kind]:
                if any(value is a or value == a for a in allowed):
                    continue
                yield pytest.param(make, {**valid, argument: value}, argument,
                                   id=f"{name}-{argument}={value!r}"[:80])


@pytest.mark.parametrize("make, kwargs, argument", list(_constructor_cases()))
def test_constructor_refuses(make, kwargs, argument):
    with pytest.raises(hd.HyperdiffError) as info:
        make(**kwargs)
    assert argument in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_hypergradient_shaped_inputs():
    """Inputs that are not single values: hyperparameters, params, data, losses."""
    bad = {"hparams": {"lam": 0.1}, "params": {"w": torch.zeros(3, dtype=torch.long)},
           "train_data": None, "val_data": [], "optimizer": torch.optim.SGD,
           "train_loss": "loss", "val_loss": lambda p, h: 0.0}
    for argument, value in bad.items():
        with pytest.raises(hd.HyperdiffError) as info:
            hd.make_problem(**{**_problem_kwargs(), argument: value})
        assert argument in str(info.value), str(info.value)


def _config_bad_values(hint: Any, meta: Any) -> list[Any]:
    """Wrong types, non-finite and out-of-range values of one config key."""
    if hint is bool:
        return ["yes", 1, 0.5]
    if hint is str:
        return [3, 1.5, True] + (["no-such-choice"] if meta.get("choices") else [])
    if hint is int:
        values: list[Any] = [TEXT, 1.5, True, NAN, [1]]
    else:
        values = [TEXT, True, NAN, INF, -INF, [1.0]]
    low, high = meta.get("low"), meta.get("high")
    if low is not None:
        values.append(low - 1 if not meta["open_low"] else low)
    if high is not None:
        values.append(high + 1 if not meta["open_high"] else high)
    return values


def _config_cases():
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name == "options":
                continue
            for value in _config_bad_values(hints[f.name], f.metadata):
                yield pytest.param(section, f.name, value, id=f"{section}.{f.name}={value!r}")


CONFIG_CASES = list(_config_cases())


def test_every_config_key_is_covered():
    keys = {(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls) if f.name != "options"}
    covered = {(c.values[0], c.values[1]) for c in CONFIG_CASES}
    assert keys == covered and len(keys) >= 25


@pytest.mark.parametrize("section, key, value", CONFIG_CASES)
def test_config_key_refuses(section, key, value):
    with pytest.raises(hd.HyperdiffError) as info:
        resolve({section: {key: value}})
    assert f"{section}.{key}" in str(info.value), str(info.value)


def test_generated_values_are_really_bad_not_typos():
    """The valid arguments of every constructor are accepted (so refusals above are caused by
    the one bad argument)."""
    for name, (make, valid, _) in CONSTRUCTORS.items():
        if name in ("make_problem", "hypergradient"):
            assert math.isfinite(float(hd.hypergradient(**valid).value))
            continue
        make(**valid)


# --- issue 18: files written where they must not be ---
OUTSIDE_OR_RUN_FILE = ["../steps.csv", "a/../../steps.csv", "/tmp/steps.csv", ".", "history.jsonl",
                       "CHECKPOINT.PT", "figures/x", "manifest.json/x", "run.lock"]


@pytest.mark.parametrize("key", ["csv", "tensorboard"])
@pytest.mark.parametrize("value", OUTSIDE_OR_RUN_FILE)
def test_log_paths_must_stay_inside_the_run_directory_and_off_its_files(key, value):
    with pytest.raises(hd.HyperdiffError) as info:
        resolve({"log": {key: value}})
    assert str(info.value).startswith(f"config: log.{key} must be a path inside the run "
                                      "directory"), str(info.value)
    assert f"(got {value!r}: " in str(info.value)


@pytest.mark.parametrize("key", ["csv", "tensorboard"])
def test_log_paths_inside_the_run_directory_are_accepted(key):
    assert getattr(resolve({"log": {key: "logs/steps"}}).log, key) == "logs/steps"


# --- issue 18: exports that lose values, frozen parameters are trained ---


def test_a_frozen_parameter_given_as_a_parameter_to_train_is_refused():
    layer = torch.nn.Linear(3, 2).double().requires_grad_(False)
    x, y = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)

    def loss(p, h, b):
        return ((b[0] @ p["weight"].T + p["bias"] - b[1]) ** 2).mean()

    with pytest.raises(hd.HyperdiffError, match=r"make_problem: params\['weight'\] must be a "
                       r"parameter to train \(got a frozen nn.Parameter, requires_grad=False\)"):
        hd.make_problem(loss, loss, hd.HyperParameters(a=hd.scalar(1.0)),
                        dict(layer.named_parameters()), optimizer=hd.sgd(0.1),
                        train_data=(x, y), val_data=(x, y), steps=2)


# --- issue 18: messages that blame the wrong thing or nothing ---
BAD_CHOICES: list[Any] = [[], ["relu"], ["a", "a"], [NAN, NAN], [1.0, INF], [1.0, -INF],
                          [[1], [2]], [1, True]]  # 1 == True: duplicates


@pytest.mark.parametrize("choices", BAD_CHOICES, ids=repr)
def test_categorical_refuses_degenerate_choices(choices):
    with pytest.raises(hd.HyperdiffError, match=r"^categorical: choices must be .* \(got "):
        hd.categorical(choices)


@pytest.mark.parametrize(("low", "high"), [(2, 2), (3, 1), (0, -1)])
def test_integer_refuses_a_range_of_fewer_than_two(low, high):
    with pytest.raises(hd.HyperdiffError, match=rf"^integer: high must be an int > low={low} "
                       rf".*\(got {high}\)"):
        hd.integer(low, high)


@pytest.mark.parametrize(("split", "value"), [
    (split, value) for split in ("train", "val", "test", "selection")
    for value in (None, TEXT, b"bytes") if (split, value) != ("selection", None)  # optional
])
def test_given_splits_refuses_a_missing_or_text_split(split, value):
    x = torch.zeros(4, 2)
    kwargs = {"train": x, "val": x, "test": x, split: value}
    with pytest.raises(hd.HyperdiffError, match=rf"^given_splits: {split} must be data"):
        hd.given_splits(**kwargs)


class _Broken(torch.utils.data.Dataset):
    """A data set whose sample 1 is broken as ``fault`` says."""

    def __init__(self, fault):
        self.fault = fault

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.ones(3, dtype=D)
        if i == 1:
            if self.fault == "nan":
                x[0] = NAN
            elif self.fault == "inf":
                x[2] = -INF
            elif self.fault == "ragged":
                x = torch.ones(2, dtype=D)
            else:
                raise self.fault
        return x, x.sum()


@pytest.mark.parametrize("fault", ["nan", "inf", "ragged", KeyError(1), IndexError(1),
                                   OSError("unreadable"), RuntimeError("decode"),
                                   ZeroDivisionError("scale")], ids=repr)
def test_a_broken_dataset_sample_is_named(fault):
    loader = torch.utils.data.DataLoader(_Broken(fault), batch_size=2)  # sample 1: step 0
    kwargs = {**_problem_kwargs(), "train_data": loader}
    with pytest.raises(hd.HyperdiffError, match=r"data: the batch of step 0 \(seed 0, samples "
                       r"\[0, 1\]\) of train_data DataLoader") as info:
        hd.make_problem(**kwargs)
    assert "sample 1" in str(info.value)


@pytest.mark.parametrize(("body", "said"), [("sys.exit(3)", "called sys.exit(3)"),
                                            ("sys.exit()", "called sys.exit(None)"),
                                            ("raise ValueError('no data')",
                                             "raised ValueError: no data"),
                                            ("return 3", "must return hd.task(...) (got int)")])
def test_a_task_file_whose_factory_fails_is_named(tmp_path, body, said):
    from hyperdiff.app.tasks import build_task

    path = tmp_path / "bad_task.py"
    path.write_text(f"import sys\n\n\ndef build():\n    {body}\n")
    with pytest.raises(hd.HyperdiffError, match=r"^task: the factory ") as info:
        build_task(f"{path}:build")
    assert said in str(info.value) and str(path) in str(info.value)


# --- h21 init: hd.initialization (theta_0 as a hyperparameter) ---
@pytest.mark.parametrize("value", BAD["params"] + [{"w": torch.zeros(2, dtype=torch.long)},
                                                   {"w": torch.tensor([NAN])}], ids=repr)
def test_initialization_refuses_bad_params(value):
    with pytest.raises(hd.HyperdiffError, match=r"^initialization: params") as info:
        hd.initialization(value)
    assert isinstance(info.value, ValueError)


# --- issue 19 item 3: the plans of the one outer loop ---
PLAN_ARGUMENTS = {
    "OfflinePlan": (hd.plans.OfflinePlan, {"samples": "int>=1", "max_samples": "int>=1"}),
    "OnlinePlan": (hd.plans.OnlinePlan, {"window": "int>=1", "val_batch_size": "optional int>=1",
                                         "eval_every": "int>=0", "hot_start": "choice"}),
}
PLAN_VALID_HERE = {("OfflinePlan", "samples"): ["auto"], ("OnlinePlan", "hot_start"): [None]}


def _plan_cases():
    for name, (make, kinds) in PLAN_ARGUMENTS.items():
        for argument, kind in kinds.items():
            allowed = PLAN_VALID_HERE.get((name, argument), [])
            for value in BAD[kind]:
                if not any(value is a or value == a for a in allowed):
                    yield pytest.param(make, argument, value,
                                       id=f"{name}-{argument}={value!r}"[:80])


@pytest.mark.parametrize("make, argument, value", list(_plan_cases()))
def test_a_plan_refuses(make, argument, value):
    with pytest.raises(hd.HyperdiffError) as info:
        make(**{argument: value})
    assert argument in str(info.value) and "(got " in str(info.value), str(info.value)


# --- issue 22: logging that shows the model ---


@pytest.mark.parametrize("value", OUTSIDE_OR_RUN_FILE)
def test_the_mlflow_store_must_stay_inside_the_run_directory_and_off_its_files(value):
    with pytest.raises(hd.HyperdiffError) as info:
        resolve({"log": {"mlflow": value}})
    assert str(info.value).startswith("config: log.mlflow must be a path inside the run "
                                      "directory"), str(info.value)
    assert f"(got {value!r}: " in str(info.value)


# --- issue 21 meta: the meta plan, its task distribution, Reptile ---
def _a_task(index, seed):
    return (torch.zeros(2, 1), torch.zeros(2, 1)), (torch.zeros(2, 1), torch.zeros(2, 1))


@pytest.mark.parametrize("value", BAD["int>=1"], ids=repr)
def test_meta_plan_refuses_a_bad_batch(value):
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: batch must be a positive int "
                                                r"\(got "):
        hd.plans.MetaPlan(_a_task, batch=value)


@pytest.mark.parametrize("value", [TEXT, None, 3, OBJECT], ids=repr)
def test_task_distribution_refuses_what_is_not_a_function(value):
    with pytest.raises(hd.HyperdiffError, match=r"^task_distribution: sample must be a "
                                                r"function sample\(index, seed\) "):
        hd.tasks.distribution(value)


@pytest.mark.parametrize("value", BAD["number>0"], ids=repr)
def test_reptile_refuses_a_bad_scale(value):
    with pytest.raises(hd.HyperdiffError, match=r"^reptile: scale must be a positive finite "
                                                r"number \(got "):
        hd.methods.reptile(scale=value)


# --- samples/SNR online (issue 19 item 3) ---
@pytest.mark.parametrize("value", BAD["int>=1"], ids=repr)
def test_the_online_plan_refuses_bad_samples(value):
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: samples must be a positive "
                                                r"int \(got "):
        hd.plans.OnlinePlan(val_batch_size=4, samples=value)


# --- onrescue and the online training seed (issue 20 items 3/5) ---
@pytest.mark.parametrize("name", ["rescue", "train_seed"])
@pytest.mark.parametrize("value", BAD["int>=0"], ids=repr)
def test_the_online_plan_refuses_a_bad_rescue_or_train_seed(name, value):
    with pytest.raises(hd.HyperdiffError, match=rf"^HyperOptimizer: {name} must be a "
                                                r"non-negative int \(got "):
        hd.plans.OnlinePlan(**{name: value})


@pytest.mark.parametrize("mode", ["offline", "meta"])
def test_the_config_refuses_a_train_seed_outside_online_runs(mode):
    with pytest.raises(hd.HyperdiffError, match=r"^config: outer\.train_seed must be -1 with "
                                                rf"outer\.mode = '{mode}' \(.*; got 0\)$"):
        resolve({"outer": {"mode": mode, "train_seed": 0}})


# --- onstarts: the retries of a weak or hot online start (issue 20, starts) ---
@pytest.mark.parametrize("value", BAD["int>=0"], ids=repr)
def test_the_online_plan_refuses_a_bad_retry(value):
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: retry must be a "
                                                r"non-negative int \(got "):
        hd.plans.OnlinePlan(retry=value)
