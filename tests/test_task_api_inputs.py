"""The public task API refuses what it used to ignore or crash on: a selection fraction that
rounds to no row, a factory param outside its ``Literal`` or of the wrong element type, a
``Path`` param given as a string (accepted), ``stratify=True`` over given splits without
labels, bad ``seeds`` / ``segments`` / split names of ``Task.evaluate``, bad ``defaults`` and
``description`` of ``hd.task``, a factory whose ``steps`` has no default; and a selection cut
that leaves a class with one validation row stays stratified by the other classes."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

import hyperdiff as hd
from hyperdiff.app.tasks import build_task
from hyperdiff.app.tasks.loader import check_types, forget_specs, type_hints
from hyperdiff.app.tasks.splits import split_rows

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_specs():
    forget_specs()
    yield
    forget_specs()


def ce(p, h, b):
    return torch.nn.functional.cross_entropy(b[0] @ p["w"], b[1])


def spec(x, y, *, classes: int = 2, data=None, **options) -> hd.tasks.TaskSpec:
    """A tiny float64 linear classifier with an L2 penalty ``lam``."""
    return hd.task("t", model={"w": torch.zeros(x.shape[1], classes, dtype=F64)},
                   train_loss=lambda p, h, b: ce(p, h, b) + h["lam"] * p["w"].square().sum(),
                   val_loss=ce, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), data=(x, y) if data is None else data, steps=2,
                   **options)


def data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    return x, (x[:, 0] > 0).long()


def factory_file(tmp_path: Path, source: str) -> str:
    path = tmp_path / "factory.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


# ------------------------------------------------------- 1. selection rounding to no row
def test_a_selection_fraction_that_rounds_to_no_row_is_refused_not_switched_off():
    x, y = data(40)  # val_fraction 0.05: 2 validation rows; 0.2 of them rounds to 0
    with pytest.raises(hd.HyperdiffError) as err:
        spec(x, y, val_fraction=0.05).build(selection_fraction=0.2)
    text = str(err.value)
    assert "selection_fraction must take at least one of the 2 validation rows" in text, text
    assert "(got 0.2, which rounds to 0 rows)" in text and "0.5 or more takes one row" in text
    assert "larger val_fraction" in text and "task.selection_fraction = 0" in text, text
    built = spec(x, y, val_fraction=0.05).build(selection_fraction=0.0)  # off when asked
    assert built.info["sizes"] == {"train": 28, "val": 2, "selection": 0, "test": 10}


def test_given_splits_refuse_a_selection_fraction_that_rounds_to_no_row():
    x, y = data(34)
    given = hd.given_splits(train=(x[:20], y[:20]), val=(x[20:24], y[20:24]),
                            test=(x[24:], y[24:]))
    with pytest.raises(hd.HyperdiffError, match=r"at least one of the 4 validation rows .*"
                       r"\(got 0\.1, which rounds to 0 rows\).*larger val split"):
        spec(x, y, data=given).build(selection_fraction=0.1)
    assert spec(x, y, data=given).build(selection_fraction=0.5).info["sizes"] == {
        "val": 2, "selection": 2, "test": 10}


# ------------------------------------------------------- 2./3. factory param annotations
def build_with(*, steps: int = 2, act: Literal["relu", "tanh"] = "relu",
               flags: list[int] = [1], weights: dict[str, float] | None = None,  # noqa: B006
               sizes: tuple[int, ...] = (1,)): ...


@pytest.mark.parametrize("params, valid", [
    ({"act": "gelu"}, "params.act must be one of ['relu', 'tanh'] (got 'gelu')"),
    ({"flags": [1, "a"]}, "params.flags must be of type list[int] (got [1, 'a'])"),
    ({"weights": {"a": "x"}}, "params.weights must be of type dict[str, float] (got {'a': 'x'})"),
    ({"sizes": [1, "a"]}, "params.sizes must be of type tuple[int, ...] (got [1, 'a'])"),
])
def test_literal_and_container_annotations_are_checked(params, valid):
    with pytest.raises(hd.HyperdiffError) as err:
        check_types("task t", "params.", params, type_hints(build_with))
    assert str(err.value) == f"task t: {valid}"
    check_types("task t", "params.", {"act": "tanh", "flags": [2, 3], "weights": {"a": 1},
                                      "sizes": [2, 3, 4]}, type_hints(build_with))


def test_a_factory_refuses_a_value_outside_its_literal(tmp_path):
    path = factory_file(tmp_path, '''
        from typing import Literal
        import torch, hyperdiff as hd
        def build(*, steps: int = 2, data_seed: int = 0, act: Literal["relu", "tanh"] = "relu"):
            x = torch.randn(20, 2, dtype=torch.float64)
            return hd.task("f", model={"w": torch.zeros(2, dtype=torch.float64)},
                train_loss=lambda p, h, b: (b[0] @ p["w"]).square().mean() + h["l"] * p["w"].sum(),
                val_loss=lambda p, h, b: (b[0] @ p["w"]).square().mean(),
                hparams=hd.HyperParameters(l=hd.scalar(0.1)), optimizer=hd.sgd(0.1),
                data=(x, x[:, 0]), steps=steps, description=act)
    ''')
    with pytest.raises(hd.HyperdiffError, match=r"params\.act must be one of \['relu', 'tanh'\] "
                       r"\(got 'gelu'\)"):
        build_task(f"{path}:build", params={"act": "gelu"})
    assert build_task(f"{path}:build", params={"act": "tanh"}).description == "tanh"


def test_a_path_param_takes_a_string_and_gets_it_as_is(tmp_path):
    path = factory_file(tmp_path, '''
        from pathlib import Path
        import torch, hyperdiff as hd
        def build(*, steps: int = 2, data_seed: int = 0, data_dir: Path = Path("data")):
            x = torch.randn(20, 2, dtype=torch.float64)
            return hd.task("f", model={"w": torch.zeros(2, dtype=torch.float64)},
                train_loss=lambda p, h, b: (b[0] @ p["w"]).square().mean() + h["l"] * p["w"].sum(),
                val_loss=lambda p, h, b: (b[0] @ p["w"]).square().mean(),
                hparams=hd.HyperParameters(l=hd.scalar(0.1)), optimizer=hd.sgd(0.1),
                data=(x, x[:, 0]), steps=steps, description=repr(data_dir))
    ''')
    assert build_task(f"{path}:build", params={"data_dir": "/tmp/x"}).description == "'/tmp/x'"
    with pytest.raises(hd.HyperdiffError, match=r"params\.data_dir must be of type Path \(or a "
                       r"string\) \(got 3\)"):
        build_task(f"{path}:build", params={"data_dir": 3})


# ------------------------------------------------------- 4. stratify=True over given splits
@pytest.mark.parametrize("as_dataset", [False, True])
def test_stratify_true_refuses_given_validation_batches_without_labels(as_dataset):
    x = torch.randn(60, 3, dtype=F64)
    y = (x[:, :1] > 0).to(F64)  # (N, 1) targets: no 1-d labels to stratify by
    val = TensorDataset(x[20:40], y[20:40]) if as_dataset else (x[20:40], y[20:40])
    given = hd.given_splits(train=(x[:20], y[:20]), val=val, test=(x[40:], y[40:]))

    def bce(p, h, b):
        return torch.nn.functional.binary_cross_entropy_with_logits(b[0] @ p["w"], b[1])

    def make(stratify):
        return hd.task("s", model={"w": torch.zeros(3, 1, dtype=F64)},
                       train_loss=lambda p, h, b: bce(p, h, b) + h["lam"] * p["w"].square().sum(),
                       val_loss=bce, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                       optimizer=hd.sgd(0.1), stratify=stratify, data=given, steps=2)

    with pytest.raises(hd.HyperdiffError, match=r"s: stratify=True needs labels, a 1-d tensor as "
                       r"the second element of every batch of given_splits' val"):
        make(True).build(selection_fraction=0.5)
    assert make(None).build(selection_fraction=0.5).info["sizes"]["selection"] == 10


# ------------------------------------------------------- 5. Task.evaluate's arguments
@pytest.fixture(scope="module")
def built():
    x, y = data(40, seed=1)
    return spec(x, y).build()


@pytest.mark.parametrize("seeds", [0, (), (0.5,), (True,), "0"])
def test_evaluate_refuses_seeds_that_are_not_a_nonempty_sequence_of_ints(built, seeds):
    with pytest.raises(hd.HyperdiffError, match=r"task t: seeds must be a non-empty tuple of int "
                       r"seeds, e\.g\. \(0, 1, 2\) \(got "):
        built.evaluate(seeds=seeds)


@pytest.mark.parametrize("segments", [0, True, 1.0])
def test_evaluate_refuses_segments_that_are_not_a_positive_int(built, segments):
    with pytest.raises(hd.HyperdiffError, match=r"task t: segments must be a positive int"):
        built.evaluate(segments=segments)


def test_unknown_split_names_are_refused_with_did_you_mean(built):
    with pytest.raises(hd.HyperdiffError, match=r"task t: splits must be names of the task's "
                       r"splits, among \['train', 'val', 'selection', 'test'\] \(got 'tset'\) "
                       r"\(did you mean 'test'\?\)"):
        built.train_and_evaluate({"lam": 1.0}, splits=["tset"])
    problem = built.final_problem
    hview = built.hparams.view(problem.raw_tensors())
    with pytest.raises(hd.HyperdiffError, match=r"\(got 'vall'\) \(did you mean 'val'\?\)"):
        built.metrics_at(problem.params, {}, hview, splits=["vall"])
    with pytest.raises(hd.HyperdiffError, match=r"splits must be a list of split names"):
        built.metrics_at(problem.params, {}, hview, splits="val")


def test_train_and_evaluate_keeps_its_defaults_without_a_selection_split():
    x, y = data(40, seed=1)
    task = spec(x, y).build(selection_fraction=0.0)
    out = task.train_and_evaluate({"lam": 0.5})
    ref = task.evaluate_values({"lam": 0.5}, seeds=[0])
    assert out == {"val_loss": ref["val"]["loss"], "test_loss": ref["test"]["loss"]}


# ------------------------------------------------------- 6. hd.task's defaults, description
@pytest.mark.parametrize("defaults", [[("stop.max_steps", 2)], "stop.max_steps=2", {1: 2}])
def test_task_refuses_defaults_that_are_not_a_dict_of_config_keys(defaults):
    x, y = data()
    with pytest.raises(hd.HyperdiffError, match=r"task t: defaults must be a dict \{dotted config "
                       r"key: value\} \(got "):
        spec(x, y, defaults=defaults)


def test_task_refuses_a_description_that_is_not_a_string():
    x, y = data()
    with pytest.raises(hd.HyperdiffError, match=r"task t: description must be a string .*"
                       r"\(got 5\)"):
        spec(x, y, description=5)


# ------------------------------------------------------- 7. factory without a steps default
@pytest.mark.parametrize("signature, missing", [("steps: int, data_seed: int = 0", "steps")])
def test_a_factory_whose_steps_has_no_default_is_refused_first(tmp_path, signature, missing):
    path = factory_file(tmp_path, f'''
        CALLS = []
        def build({signature}):
            CALLS.append(1)
            raise AssertionError("not called")
    ''')
    with pytest.raises(hd.HyperdiffError) as err:
        build_task(f"{path}:build")
    text = str(err.value)
    assert f"build' (defined in {Path(path).resolve()}, line 3) must give {missing} a default " \
           f"(got a required {missing})" in text, text
    assert "steps is an optional argument" in text and "raised" not in text, text


# ------------------------------------------------------- 8. selection cut with a rare class
def test_the_selection_cut_leaves_a_class_with_one_validation_row_in_the_validation_part():
    x = torch.arange(90 * 3, dtype=F64).reshape(90, 3)  # row i: x[i, 0] = 3 i
    y = torch.tensor([0] * 40 + [1] * 44 + [2] * 6)
    rows = split_rows(90, test=0.25, val=0.2, selection_fraction=0.5, seed=3, labels=y)
    labels = y.numpy()  # the reference, cut by hand with scikit-learn
    rest, test = train_test_split(np.arange(90), test_size=22, random_state=3, stratify=labels)
    train, val_all = train_test_split(rest, test_size=18, random_state=4, stratify=labels[rest])
    counts = {c: int((labels[val_all] == c).sum()) for c in range(3)}
    assert counts[2] == 1  # one row of class 2: a stratified cut of all 18 rows is impossible
    single = labels[val_all] == 2
    val, selection = train_test_split(val_all[~single], test_size=9, random_state=5,
                                      stratify=labels[val_all[~single]])
    for got, want in ((rows.train, train), (rows.test, test), (rows.selection, selection),
                      (rows.val, np.concatenate([val, val_all[single]]))):
        assert got.tolist() == sorted(want.tolist())
    task = spec(x, y, classes=3).build(selection_fraction=0.5, data_seed=3)
    assert task.info["sizes"] == {"train": 50, "val": 9, "selection": 9, "test": 22}
    assert (task.splits["selection"][0][0][:, 0] / 3).long().tolist() == rows.selection.tolist()


def test_a_split_that_succeeds_stays_the_same_rows():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rows = split_rows(100, test=0.25, val=0.2, selection_fraction=0.5, seed=7, labels=labels)
    y = labels.numpy()
    rest, test = train_test_split(np.arange(100), test_size=25, random_state=7, stratify=y)
    train, val_all = train_test_split(rest, test_size=20, random_state=8, stratify=y[rest])
    val, selection = train_test_split(val_all, test_size=10, random_state=9, stratify=y[val_all])
    for got, want in ((rows.train, train), (rows.val, val), (rows.selection, selection),
                      (rows.test, test)):
        assert got.tolist() == sorted(want.tolist())


# ------------------------------------------------------- 9. docstrings
def test_public_methods_have_docstrings():
    for method in (hd.CSVLogger.start, hd.CSVLogger.row, hd.CSVLogger.close,
                   hd.Problem.with_steps):
        assert method.__doc__ and method.__doc__.strip().endswith("."), method
