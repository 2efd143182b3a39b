"""Hyperparameter inputs that used to be accepted with another meaning, or refused without a
word about what was wrong (the review of s40):

- ``hyperdiff run --from RUN`` started at RUN's raw values read through other constraint
  bounds or another transform (``hparams.json`` recorded only the constraint's name), with
  other task params (which ``hd.tuned_hparams`` refuses) or another ``task.data_seed``
  (per-example weights then land on other examples); ``hd.tuned_hparams`` took a run of
  another ``task.data_seed`` too. A run directory written before the constraint's settings
  were recorded still starts a ``--from`` run, and that run still resumes.
- Float32 training: a value valid in float64 that rounds onto its bound (or to 0) where
  training reads it is refused (:func:`check_representable`, which ``make_problem`` calls);
  ``natural_grad`` raises where the constraint's slope is 0 instead of returning NaN.
- ``hd.HyperParameters``: a collection given as specs keeps its (tuned) values; a name given
  twice, or a hyperparameter named ``raw`` as a keyword, is refused with a message.
- ``per_tensor`` and ``with_natural``: an unknown parameter name is refused; ``with_natural``
  names the hyperparameter, takes a ``per_tensor`` dict, and names a discrete one's choices.
- ``categorical(temperature=(1.0, True))`` is refused; a value too close to a bound to be
  represented is worded in natural values, not as an infinite raw value.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.tasks import build_task
from hyperdiff.app.tasks.loader import forget_specs
from hyperdiff.errors import NonFiniteError
from hyperdiff.hparams import hyperparams

TASK = '''import torch, hyperdiff as hd
def build(*, steps: int = 8, data_seed: int = 0, high: float = HIGH, transform: str = "log"):
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(80, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    def mse(params, h, batch):
        return ((batch[0] @ params["w"] - batch[1]) ** 2).mean()
    def train_loss(params, h, batch):
        return (mse(params, h, batch) + h["lam"] * params["w"].square().sum()
                + h["mu"] * params["w"].abs().sum())
    hp = hd.HyperParameters(lam=hd.scalar(0.5 * high, (0.0, high)),
                            mu=hd.scalar(0.01, transform))
    return hd.task("bounded", model={"w": torch.zeros(3, dtype=torch.float64)},
                   train_loss=train_loss, val_loss=mse, hparams=hp, optimizer=hd.sgd(0.1),
                   data=(x, y), steps=steps)
'''
TINY = ["--set", "inner.steps=5", "--set", "stop.max_steps=2", "--set", "report.seeds=1",
        "--set", "outer.explore=0", "--quiet"]


def task_file(folder, high: float = 1.0):
    path = folder / "bounded_task.py"
    path.write_text(TASK.replace("HIGH", repr(high)))
    return f"{path}:build"


def run(*args: str) -> int:
    return main(["run", *args])


def error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny run of the bounded task (lam in (0, 1), mu positive by log)."""
    folder = tmp_path_factory.mktemp("source")
    name = task_file(folder)
    assert run("--task", name, *TINY, "--out", str(folder / "a")) == 0
    return name, folder / "a"


# --- --from: constraints, task params, data_seed ---------------------------------------------

def test_hparams_json_records_the_bounds_and_the_transform(source):
    _, run_dir = source
    meta = json.loads((run_dir / "hparams.json").read_text())
    assert meta["lam"]["constraint_settings"] == {"low": 0.0, "high": 1.0}
    assert meta["mu"]["constraint_settings"] == {"transform": "log"}


def test_from_refuses_other_task_params(source, tmp_path, capsys):
    """The review's case: high=10 and softplus read lam's raw value 0.377 as 3.77."""
    name, run_dir = source
    out = tmp_path / "b"
    assert run("--task", name, *TINY, "--set", "task.params.high=10.0", "--set",
               "task.params.transform=softplus", "--from", str(run_dir), "--out",
               str(out)) == 2
    assert error(capsys).endswith(
        f"run: --from must name a run of task {name!r} with the task's params {{'high': 10.0, "
        f"'transform': 'softplus'}} (got {run_dir}, a run with the params {{}}); start with "
        "the run's params (--set task.params.NAME=VALUE), or without --from")
    assert not out.exists()


def test_from_takes_a_run_whose_params_left_out_a_default_written_here(source, tmp_path):
    """s41: the params are compared with the factory's defaults filled in on both sides, as
    tuned_hparams compares them (a default written out was refused)."""
    name, run_dir = source
    assert run("--task", name, *TINY, "--set", "task.params.high=1.0", "--from", str(run_dir),
               "--out", str(tmp_path / "b")) == 0


def test_from_refuses_another_data_seed(source, tmp_path, capsys):
    name, run_dir = source
    assert run("--task", name, *TINY, "--set", "task.data_seed=3", "--from", str(run_dir),
               "--out", str(tmp_path / "b")) == 2
    assert error(capsys).endswith(
        f"run: --from must name a run with task.data_seed = 3 (got {run_dir}, a run with "
        "task.data_seed = 0, whose tuned values were fitted to other splits: a per-example "
        "weight would land on another example); start with --set task.data_seed=0, or "
        "without --from")


def test_from_refuses_a_task_whose_constraint_bounds_changed(tmp_path, capsys, monkeypatch):
    """The task file edited between the runs: lam's interval is (0, 10) now."""
    name = task_file(tmp_path)
    assert run("--task", name, *TINY, "--out", str(tmp_path / "a")) == 0
    task_file(tmp_path, high=10.0)
    forget_specs()  # as a new process would, import the edited file
    for key, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == str((tmp_path / "bounded_task.py").resolve()):
            monkeypatch.delitem(sys.modules, key)
    assert run("--task", name, *TINY, "--from", str(tmp_path / "a"), "--out",
               str(tmp_path / "b")) == 2
    assert error(capsys).endswith(
        "run: --from must name a run with the same hyperparameters (names, kinds, "
        f"constraints, sizes) as task 'bounded'; {tmp_path / 'a'} differs in ['lam'] ('lam': "
        "the constraint interval(low=0.0, high=10.0) here, interval(low=0.0, high=1.0) in the "
        "run): its raw values would mean other natural values here; start without --from, or "
        "from a run of the task as it is now")


def test_from_a_run_written_before_constraint_settings_starts_and_resumes(source, tmp_path):
    """Compatibility: an hparams.json without ``constraint_settings`` (before s40) is read
    as not recording them; the new run's manifest keeps that description, and its resume
    (here an extension) compares it the same way."""
    name, run_dir = source
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    meta = json.loads((old / "hparams.json").read_text())
    for entry in meta.values():
        del entry["constraint_settings"]
    data = json.dumps(meta, indent=1).encode()
    (old / "hparams.json").write_bytes(data)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["hparams.json"] = hashlib.sha256(data).hexdigest()  # as it was written
    (old / "manifest.json").write_text(json.dumps(manifest, indent=1))
    new = tmp_path / "new"
    assert run("--task", name, *TINY, "--from", str(old), "--out", str(new)) == 0
    started = json.loads((new / "manifest.json").read_text())["start_from"]
    assert started["hparams"] == meta
    assert run("--resume", str(new), "--set", "stop.max_steps=3", "--quiet") == 0
    assert json.loads((new / "result.json").read_text())["steps"] == 3


def test_tuned_hparams_refuses_a_run_of_another_data_seed(source):
    name, run_dir = source
    task = build_task(name, steps=5, data_seed=3)
    with pytest.raises(hd.HyperdiffError) as err:
        hd.tuned_hparams(task, run_dir)
    assert str(err.value) == (
        f"tuned_hparams: source must be a run with the task's data_seed 3 (got "
        f"{run_dir / 'result.json'}, a run with task.data_seed = 0, whose tuned values were "
        "fitted to other splits: a per-example weight would land on another example); build "
        "the task with data_seed=0 (build_task(..., data_seed=0), --set task.data_seed=0)")
    same = build_task(name, steps=5, data_seed=0)
    tuned = json.loads((run_dir / "result.json").read_text())["tuned"]["hparams"]
    assert float(hd.tuned_hparams(same, run_dir).natural()["lam"]) == pytest.approx(
        tuned["lam"], rel=1e-12)


# --- float32: values that round onto a bound -------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    (hd.scalar(0.99999999, (0.0, 1.0)),
     "hypergradient: hyperparameter 'x' must be strictly between 0.0 and 1.0 for an interval "
     "constraint in float32, the dtype training computes it in (got 0.99999999, which rounds "
     "to 1 there); choose a value farther from the bound, or train in float64"),
    (hd.scalar(1e-47),
     "hypergradient: hyperparameter 'x' must be finite and > 0 for a positive constraint in "
     "float32, the dtype training computes it in (got 1e-47, which rounds to 0 there); choose "
     "a value farther from the bound, or train in float64"),
    (hd.per_feature([0.5, 1e-50], constraint="softplus"),
     "hypergradient: hyperparameter 'x' must be finite and > 0 for a positive constraint in "
     "float32, the dtype training computes it in (got [1e-50], which rounds to [0] there); "
     "choose a value farther from the bound, or train in float64"),
])
def test_a_value_that_rounds_onto_its_bound_in_float32_is_refused(spec, message):
    hp = hd.HyperParameters(x=spec)
    hyperparams.check_representable(hp, torch.float64)  # float64 reads it inside
    with pytest.raises(hd.HyperdiffError) as err:
        hyperparams.check_representable(hp, torch.float32)
    assert str(err.value) == message
    fine = hd.HyperParameters(x=hd.scalar(0.999, (0.0, 1.0)), y=hd.categorical(["a", "b"]))
    hyperparams.check_representable(fine, torch.float32)


def test_natural_grad_raises_where_the_slope_is_0_instead_of_nan():
    hp = hd.HyperParameters(keep=hd.scalar(0.99999999, (0.0, 1.0)), lam=hd.scalar(0.1))
    raw32 = {n: v.float() for n, v in hp.raw.items()}
    grad = {n: torch.ones((), dtype=torch.float32) for n in raw32}
    with pytest.raises(NonFiniteError) as err:
        hp.natural_grad(grad, raw32)
    assert str(err.value) == (
        "hypergradient: the hypergradient of 'keep' in natural units is undefined: its "
        "interval constraint's slope dx/du is 0 in float32 at the raw value 18.420681 "
        "(natural 1, on or next to a bound); choose a value farther from the bound, or train "
        "in float64")
    # float64 keeps the slope: dL/dx = (dL/du) / (s (1 - s)), the chain rule by hand
    g = hp.natural_grad({n: torch.ones((), dtype=torch.float64) for n in raw32})
    s = torch.sigmoid(hp.raw["keep"])
    assert float(g["keep"]) == pytest.approx(float(1 / (s * (1 - s))), rel=1e-12)
    assert math.isfinite(float(g["keep"]))


# --- HyperParameters: collections, names -----------------------------------------------------

def test_a_collection_given_as_specs_keeps_its_values():
    tuned = hd.HyperParameters(lr=hd.scalar(0.1)).with_natural(lr=0.37)
    more = hd.HyperParameters(tuned, wd=hd.scalar(1e-4))
    assert torch.equal(more.raw["lr"], tuned.raw["lr"])  # exactly, not lr's initial 0.1
    assert float(more.natural()["lr"]) == pytest.approx(0.37, rel=1e-12)
    assert float(more.natural()["wd"]) == pytest.approx(1e-4, rel=1e-12)
    fresh = hd.HyperParameters({"lr": tuned["lr"]}, wd=hd.scalar(1e-4))  # a dict: its specs
    assert float(fresh.natural()["lr"]) == pytest.approx(0.1, rel=1e-12)


def test_a_name_given_twice_is_refused():
    with pytest.raises(hd.HyperdiffError) as err:
        hd.HyperParameters({"lr": hd.scalar(0.1)}, lr=hd.scalar(0.2))
    assert str(err.value) == ("HyperParameters: each name must be given once (got 'lr' both "
                              "in the mapping and as a keyword)")


def test_a_hyperparameter_named_raw_is_given_in_the_mapping():
    for make in (lambda: hd.HyperParameters(raw=hd.scalar(0.1)),
                 lambda: hd.HyperParameters(lr=hd.scalar(0.1), raw=hd.scalar(0.2))):
        with pytest.raises(hd.HyperdiffError) as err:
            make()
        assert str(err.value) == (
            "HyperParameters: raw= takes the raw values (a dict name -> tensor), so a "
            "hyperparameter named 'raw' cannot be a keyword (got raw=a HyperParameter); give "
            "it in the mapping: hd.HyperParameters({'raw': hd.scalar(...)}, ...)")
    assert float(hd.HyperParameters({"raw": hd.scalar(0.2)}).natural()["raw"]) == (
        pytest.approx(0.2, rel=1e-12))


# --- per_tensor and with_natural -------------------------------------------------------------

PARAMS = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def test_per_tensor_refuses_an_unknown_parameter_name():
    with pytest.raises(hd.HyperdiffError) as err:
        hd.per_tensor(PARAMS, {"w": 1e-2, "b": 1e-4, "W": 0.5})
    assert str(err.value) == ("per_tensor: value must name only the parameters ['w', 'b'] "
                              "(got unknown ['W'])")


def test_with_natural_names_the_hyperparameter_and_takes_a_per_tensor_dict():
    hp = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.per_tensor(PARAMS, 1e-3))
    with pytest.raises(hd.HyperdiffError) as err:
        hp.with_natural(lr="fast")
    assert str(err.value) == ("HyperParameters.with_natural: lr must be a real number, a list "
                              "of numbers, a real NumPy array or a real tensor (got 'fast')")
    moved = hp.with_natural(wd={"b": 1e-4, "w": 1e-2})  # in the parameters' order
    assert moved.natural()["wd"].tolist() == pytest.approx([1e-2, 1e-4], rel=1e-12)
    assert moved.natural()["wd"].tolist() == pytest.approx(
        hd.per_tensor(PARAMS, {"w": 1e-2, "b": 1e-4}).init.tolist(), rel=1e-12)
    with pytest.raises(hd.HyperdiffError) as err:
        hp.with_natural(wd={"w": 1e-2, "b": 1e-4, "W": 0.5})
    assert str(err.value) == ("HyperParameters.with_natural: wd must name only the parameters "
                              "['w', 'b'] (got unknown ['W'])")


def test_with_natural_of_a_discrete_choice_names_the_choices():
    hp = hd.HyperParameters(act=hd.categorical(["relu", "tanh"]))
    with pytest.raises(hd.HyperdiffError) as err:
        hp.with_natural(act="tanh")
    assert str(err.value) == (
        "HyperParameters.with_natural: act must be probabilities of its 2 choices, shape (2,), "
        "that sum to 1 (got 'tanh'); its choices are ['relu', 'tanh']: to fix one, give its "
        "label to hyperdiff.hparams.choices.fix_choices(hp, {'act': 'tanh'})")


# --- small gaps --------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [(1.0, True), (True, 1.0)])
def test_a_bool_temperature_is_refused(temperature):
    with pytest.raises(hd.HyperdiffError) as err:
        hd.categorical(["a", "b"], temperature=temperature)
    assert str(err.value) == (
        "categorical: temperature must be a finite number > 0 or a (start, end) pair of them "
        f"(got {temperature!r})")


def test_a_value_too_close_to_a_bound_is_worded_in_natural_values():
    with pytest.raises(hd.HyperdiffError) as err:
        hd.scalar(5e-324, (0.0, 3.0))
    assert str(err.value) == (
        "scalar: value must be strictly between 0.0 and 3.0 for an interval constraint and far "
        "enough from its bounds for its raw value to be finite in float64 (got 5e-324, too "
        "close to the bound 0 to be represented); choose a value farther from the bound")
    hp = hd.HyperParameters(a=hd.scalar(1.0, (0.0, 3.0)))
    with pytest.raises(hd.HyperdiffError, match=r"natural value of 'a' must be strictly "
                       r"between 0.0 and 3.0 .* too close to the bound 0 to be represented"):
        hp.with_natural(a=5e-324)


def test_make_problem_refuses_a_value_that_rounds_onto_its_bound_in_float32():
    x = torch.linspace(-1, 1, 6).reshape(3, 2)

    def loss(p, h, b):
        return h["keep"] * ((b[0] @ p["w"] - b[1]) ** 2).mean()

    hparams = hd.HyperParameters(keep=hd.scalar(0.99999999, (0.0, 1.0)))
    with pytest.raises(hd.HyperdiffError, match=r"hyperparameter 'keep' must be strictly "
                       r"between 0.0 and 1.0 for an interval constraint in float32"):
        hd.make_problem(loss, loss, hparams, {"w": torch.zeros(2)}, optimizer=hd.sgd(0.1),
                        train_data=(x, x.sum(1)), val_data=(x, x.sum(1)), steps=3)
    x64 = x.double()
    hd.make_problem(loss, loss, hparams, {"w": torch.zeros(2, dtype=torch.float64)},
                    optimizer=hd.sgd(0.1), train_data=(x64, x64.sum(1)),
                    val_data=(x64, x64.sum(1)), steps=3)
