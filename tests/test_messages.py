"""Issue 18, class 8: messages that blamed the wrong thing or nothing. Each test is built from
the case the issue reports and failed before the fix."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.methods.base import Method
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.snr import below
from hyperdiff.wording import config_syntax, option

D = torch.float64


def ridge_problem(train_data=None, steps=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=D)
    y = x @ torch.tensor([1.0, -1.0, 0.5], dtype=D)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["lam"] * p["w"].square().sum()

    return hd.make_problem(train, val, hd.HyperParameters(lam=hd.scalar(0.3)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.1),
                           train_data=(x, y) if train_data is None else train_data,
                           val_data=(x, y), steps=steps, probe=False)


# ---------------------------------------------------------------- discrete kinds
@pytest.mark.parametrize(("make", "message"), [
    (lambda: hd.categorical(["relu"]), r"^categorical: choices must be at least two distinct "
                                       r"choices \(got \['relu'\]\)"),
    (lambda: hd.categorical([]), r"^categorical: choices must be at least two"),
    (lambda: hd.categorical([math.nan, math.nan]),
     r"^categorical: choices must be finite numbers .* \(got \[nan, nan\]\)"),
    (lambda: hd.categorical([float("nan"), float("nan")]), r"^categorical: choices must be finite"),
    (lambda: hd.categorical([1.0, math.inf]), r"^categorical: choices must be finite .*\[inf\]"),
    (lambda: hd.categorical(["a", "b", "a"]), r"^categorical: choices must be distinct "
                                              r"\(got duplicates \['a'\]\)"),
    (lambda: hd.categorical([[1], [2]]), r"^categorical: choices must be hashable"),
    (lambda: hd.integer(2, 2), r"^integer: high must be an int > low=2 .*\(got 2\)"),
])
def test_discrete_kinds_refuse_degenerate_choices(make, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        make()


def test_a_discrete_spec_built_directly_is_checked_by_name():
    spec = hd.categorical(["a", "b"])
    with pytest.raises(hd.HyperdiffError, match=r"categorical 'act': choices must be at least"):
        hd.HyperParameters(act=replace(spec, choices=("a",), init=spec.init[:1] * 2))


def test_two_choices_and_a_two_value_range_are_accepted():
    hp = hd.HyperParameters(a=hd.categorical(["x", math.pi]), b=hd.integer(2, 3), c=hd.boolean())
    assert hp.best() == {"a": "x", "b": 2, "c": False}


# ---------------------------------------------------------------- given_splits
@pytest.mark.parametrize("missing", ["train", "val", "test"])
def test_given_splits_refuses_a_missing_split_by_its_own_name(missing):
    x = torch.zeros(4, 2)
    splits = {"train": (x,), "val": (x,), "test": (x,), missing: None}
    with pytest.raises(hd.HyperdiffError, match=rf"^given_splits: {missing} must be data: .*"
                                                r"\(got None\)"):
        hd.given_splits(**splits)


def test_given_splits_refuses_text_as_a_selection_split():
    x = torch.zeros(4, 2)
    with pytest.raises(hd.HyperdiffError, match=r"^given_splits: selection must be data"):
        hd.given_splits(train=x, val=x, test=x, selection="val.csv")


# ---------------------------------------------------------------- task factories
@pytest.mark.parametrize(("body", "said"), [
    ("    sys.exit(3)", "called sys.exit(3)"),
    ("    raise SystemExit('no data')", "called sys.exit('no data')"),
    ("    raise KeyError('x')", "raised KeyError: 'x'"),
])
def test_a_task_factory_that_exits_is_named_with_its_file(tmp_path, capsys, body, said):
    path = tmp_path / "exiting_task.py"
    path.write_text(f"import sys\n\n\ndef build():\n{body}\n")
    assert main(["run", "--task", f"{path}:build", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"the factory '{path}:build' (defined in {path}, line 4)" in err, err
    assert said in err, err
    assert not (tmp_path / "run").exists()


def test_a_task_file_that_exits_on_import_is_named(tmp_path, capsys):
    path = tmp_path / "exit_on_import.py"
    path.write_text("import sys\nsys.exit(4)\n\n\ndef build():\n    pass\n")
    assert main(["run", "--task", f"{path}:build", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"importing '{path}:build' must succeed" in err and "sys.exit(4)" in err, err


# ---------------------------------------------------------------- the SNR warning
def test_below_keeps_the_printed_value_below_the_bound():
    for value in (0.996, 0.9999, 0.99999999, 0.43, 0.0051, 0.95):
        text = below(value, 1.0)
        assert float(text) < 1.0 and abs(float(text) - value) <= 0.006 * value, text
    assert below(0.43, 1.0) == "0.43"


def _fixed_grads(values):
    """A method whose hypergradient of lam is ``values[seed]``: a known SNR."""
    exact = hd.reverse()

    def run(problem, raw):
        hg = exact.run(problem, raw)
        return replace(hg, grad={"lam": torch.full_like(hg.grad["lam"], values[problem.seed])})

    return Method("fixed", run)


def test_the_snr_warning_never_prints_one_below_one(caplog):
    values: dict[int, float] = {}
    opt = HyperOptimizer(ridge_problem(), method=_fixed_grads(values), samples=2,
                         selection=None)
    # two samples a, b: SNR = |a + b| / |a - b| = 0.996 / 1 (oracle by hand, not the module)
    values.update({opt.plan.seed_for(0, 0): 0.998, opt.plan.seed_for(0, 1): -0.002})
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        record = opt.step()
    assert record.grad_snr == pytest.approx(0.996, rel=1e-9)
    assert "signal-to-noise ratio is 0.996 < 1 " in caplog.text, caplog.text
    assert "samples='auto'" in caplog.text


# ---------------------------------------------------------------- option syntax
def test_option_names_the_config_key_only_inside_the_cli():
    assert option("samples='auto'", "outer.auto_samples = true") == "samples='auto'"
    with config_syntax():
        assert option("samples='auto'", "outer.auto_samples = true") == \
            "outer.auto_samples = true"
    assert option("a", "b") == "a"


def test_the_cli_warnings_name_the_config_keys(tmp_path, capsys):
    assert main(["run", "--task", "ridge_diabetes", "--set", "task.selection_fraction=0",
                 "--set", "stop.max_steps=1", "--set", "inner.steps=2", "--set",
                 "report.seeds=1", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "no selection split" in err and "set task.selection_fraction > 0" in err, err
    assert "selection=batches" not in err, err


def test_the_snr_warning_in_config_syntax_names_the_config_key(caplog):
    values: dict[int, float] = {}
    opt = HyperOptimizer(ridge_problem(), method=_fixed_grads(values), samples=2,
                         selection=None)
    values.update({opt.plan.seed_for(0, 0): 0.6, opt.plan.seed_for(0, 1): -0.4})
    with caplog.at_level(logging.WARNING, logger="hyperdiff"), config_syntax():
        opt.step()
    assert "ratio is 0.2 < 1 " in caplog.text, caplog.text
    assert "(outer.auto_samples = true)" in caplog.text and "samples='auto'" not in caplog.text


def test_the_finite_difference_cost_warning_follows_the_syntax():
    problem = ridge_problem(steps=2)
    with pytest.warns(UserWarning, match=r"use reverse\(\) or forward\(\) for real work"):
        hd.finite_difference()(problem)
    with config_syntax(), pytest.warns(UserWarning, match=r'use method.name = "reverse" or '
                                                          r'"forward" for real work'):
        hd.finite_difference()(problem)


# ---------------------------------------------------------------- the user's data code
class Samples(Dataset):
    """32 samples ``(x_i, sum x_i)``; sample 20 is broken in the way ``fault`` says."""

    def __init__(self, fault: str | None):
        self.fault = fault

    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.full((3,), i / 32, dtype=D)
        if i == 20:
            if self.fault == "ragged":
                x = torch.ones(4, dtype=D)
            elif self.fault == "nan":
                x[1] = math.nan
            elif self.fault == "index":
                raise IndexError("list index out of range")
            elif self.fault == "os":
                raise OSError(5, "Input/output error", "/data/20.png")
            elif self.fault == "own":
                raise LookupError("no label for row 20")
        return x, x.sum()


def loader(fault, **options):
    # no shuffle: sample 20 is in the batch of step 20 // 4 = 5, with samples 20..23
    return DataLoader(Samples(fault), batch_size=4, shuffle=False, **options)


def train_with(train_data, steps=8):
    problem = ridge_problem(train_data=train_data, steps=steps)
    return hd.reverse()(problem)


@pytest.mark.parametrize(("fault", "cause", "said"), [
    ("index", IndexError, "sample 20 of Samples raised IndexError: list index out of range"),
    ("os", OSError, "sample 20 of Samples raised OSError: [Errno 5] Input/output error: "
                    "'/data/20.png'"),
    ("own", LookupError, "sample 20 of Samples raised LookupError: no label for row 20"),
])
def test_a_datasets_own_exception_names_the_split_step_and_sample(fault, cause, said):
    with pytest.raises(hd.HyperdiffError) as info:
        train_with(loader(fault))
    text = str(info.value)
    assert text.startswith("data: the batch of step 5 (seed 0, samples [20, 21, 22, 23]) of "
                           "train_data DataLoader(dataset=Samples"), text
    assert said in text, text
    original = info.value.__cause__.__cause__  # HyperdiffError <- SampleError <- the original
    assert isinstance(original, cause)


def test_a_ragged_sample_is_named_not_a_collate_traceback():
    with pytest.raises(hd.HyperdiffError) as info:
        train_with(loader("ragged"))
    text = str(info.value)
    assert "the batch of step 5 (seed 0, samples [20, 21, 22, 23]) of train_data" in text, text
    assert "sample 21's [0] has shape (3,), sample 20's (4,)" in text, text
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's collate error, kept


def test_a_ragged_sample_read_by_a_worker_is_named():
    with pytest.raises(hd.HyperdiffError) as info:
        train_with(loader("ragged", num_workers=1))
    text = str(info.value)
    assert "step 5 (seed 0, samples [20, 21, 22, 23])" in text
    assert "sample 21's [0] has shape (3,), sample 20's (4,)" in text, text


def test_a_nan_in_a_later_streamed_sample_is_a_data_error_not_a_divergence():
    with pytest.raises(hd.HyperdiffError) as info:
        train_with(loader("nan"))
    text = str(info.value)
    assert not isinstance(info.value, hd.NonFiniteError)
    assert "the batch of step 5 (seed 0, samples [20, 21, 22, 23])" in text, text
    assert "must be finite (got 1 NaN or infinite entries in field [0], first at row 0 " \
           "(sample 20))" in text, text
    assert "learning rate" not in text


def test_a_nan_from_fn_step_and_from_a_generator_is_named():
    def fn(step):
        x = torch.ones(4, 3, dtype=D)
        if step == 3:
            x[2, 0] = math.inf
        return x, x.sum(1)

    with pytest.raises(hd.HyperdiffError, match=r"the batch of step 3 \(seed 0\), function .*"
                       r"fn\(3\), must be finite .*field \[0\], first at row 2\)"):
        train_with(fn)

    def epoch():
        for step in range(6):
            yield fn(step)

    with pytest.raises(hd.HyperdiffError, match=r"the batch of step 3 \(seed 0\) of train_data "
                       r"function .*epoch must be finite"):
        train_with(epoch)


def test_an_exception_in_a_generator_names_the_step():
    def epoch():
        for step in range(6):
            if step == 4:
                raise KeyError("column 'y'")
            yield torch.ones(2, 3, dtype=D), torch.ones(2, dtype=D)

    with pytest.raises(hd.HyperdiffError) as info:
        train_with(epoch)
    assert "data: the batch of step 4 (seed 0) of train_data function" in str(info.value)
    assert "KeyError: \"column 'y'\"" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)

    def fn(step, seed):
        raise ValueError("bad row")

    with pytest.raises(hd.HyperdiffError, match=r"the batch of step 0 \(seed 0\), function "
                       r".*fn\(0, 0\), must be readable .*ValueError: bad row"):
        train_with(fn)


def test_val_data_from_an_iterable_that_fails_is_named():
    class Batches:
        def __iter__(self):
            yield torch.ones(2, 3, dtype=D), torch.ones(2, dtype=D)
            raise OSError("disk gone")

    with pytest.raises(hd.HyperdiffError, match=r"data: batch 1 of val_data must be readable "
                       r".*OSError: disk gone"):
        hd.make_problem(lambda p, h, b: p["w"].sum(), lambda p, h, b: p["w"].sum(),
                        hd.HyperParameters(lam=hd.scalar(0.1)), {"w": torch.zeros(3)},
                        optimizer=hd.sgd(0.1), train_data=torch.ones(2, 3), val_data=Batches(),
                        steps=2)


def _task_with_test(test):
    x = torch.randn(32, 3, dtype=D)
    data = (x, x.sum(1))

    def mse(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    return hd.task("toy", model={"w": torch.zeros(3, dtype=D)},
                   train_loss=lambda p, h, b: mse(p, h, b) + h["lam"] * p["w"].square().sum(),
                   val_loss=mse, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), steps=3, batch_size=4,
                   data=hd.given_splits(train=data, val=data, test=test, allow_shared_rows=True))


def test_a_lazy_test_split_names_its_batch_and_sample():
    task = _task_with_test(Samples("nan")).build(selection_fraction=0)
    # a bare Dataset is read in batches of the task's batch_size: sample 20 is in batch 5
    with pytest.raises(hd.HyperdiffError, match=r"data: batch 5 \(samples \[20, 21, 22, 23\]\) "
                       r"of the test split must be finite .*\(sample 20\)"):
        list(task.splits["test"])
    task = _task_with_test(Samples("index")).build(selection_fraction=0)
    with pytest.raises(hd.HyperdiffError, match=r"data: batch 5 \(samples \[20, 21, 22, 23\]\) "
                       r"of the test split must be readable .*sample 20 of Samples raised "
                       r"IndexError"):
        list(task.splits["test"])


def test_an_in_memory_test_split_with_nan_is_refused_at_build():
    x = torch.randn(8, 3, dtype=D)
    x[5, 2] = math.nan
    with pytest.raises(hd.HyperdiffError, match=r"^toy: the test split must be finite"):
        _task_with_test((x, x.sum(1))).build(selection_fraction=0)


# ---------------------------------------------------------------- run files
@pytest.mark.parametrize("content", ['{}', '{"task": "ridge_diabetes", "status": "finished"}',
                                     '{"task": "t", "status": "finished", "stop_reason": "s", '
                                     '"steps": 1, "best_step": 0, "criterion": "c", "time_s": 1, '
                                     '"sizes": {}, "initial": [], "tuned": {}}'])
def test_a_finished_result_that_lost_entries_is_called_damaged(tmp_path, capsys, content):
    run = tmp_path / "run"
    assert main(["run", "--task", "ridge_diabetes", "--set", "stop.max_steps=1", "--set",
                 "inner.steps=2", "--set", "report.seeds=1", "--quiet", "--out", str(run)]) == 0
    (run / "result.json").write_text(content)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"run directory: {run / 'result.json'} is damaged (" in err, err
    assert "delete the file and resume the run" in err


@pytest.mark.parametrize("entry", ["1", '{"coordinates": 5}', '{"coordinates": ["a", "b"]}'])
def test_a_damaged_hparams_entry_is_named_by_plot(tmp_path, capsys, entry):
    run = tmp_path / "run"
    assert main(["run", "--task", "ridge_diabetes", "--set", "stop.max_steps=1", "--set",
                 "inner.steps=2", "--set", "report.seeds=1", "--quiet", "--out", str(run)]) == 0
    meta = json.loads((run / "hparams.json").read_text())
    name = next(iter(meta))
    meta[name] = json.loads(entry)
    (run / "hparams.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"run directory: {run / 'hparams.json'} is damaged (its entry {name!r} must be" in err


def test_the_leave_one_out_samples_error_names_the_key_as_the_user_sets_it():
    from hyperdiff.tuner.discrete_outer import outer_hook

    hp = hd.HyperParameters(act=hd.categorical(["a", "b"], mode="reinforce",
                                               baseline="leave_one_out"))
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: samples must be >= 2 .* "
                       r"\(got 1\)"):
        outer_hook(hp, seed=0, samples=1, max_steps=3, folds=1)
    with config_syntax(), pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: "
                                        r"outer.samples must be >= 2 .*\(got 1\)"):
        outer_hook(hp, seed=0, samples=1, max_steps=3, folds=1)


def test_a_tasks_own_prepare_or_hparams_function_that_fails_is_named():
    x = torch.randn(40, 3, dtype=D)

    def mse(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def prepare(data, splits):
        raise KeyError("mean")

    def hparams(info):
        raise SystemExit(5)

    common = dict(model={"w": torch.zeros(3, dtype=D)}, val_loss=mse,
                  train_loss=lambda p, h, b: mse(p, h, b) + h["lam"] * p["w"].square().sum(),
                  optimizer=hd.sgd(0.1), data=(x, x.sum(1)), steps=3)
    spec = hd.task("toy", hparams=hd.HyperParameters(lam=hd.scalar(0.1)), prepare=prepare,
                   **common)
    with pytest.raises(hd.HyperdiffError, match=r"^toy: prepare\(data, splits\) \(.*prepare\) "
                       r"must succeed; it raised KeyError: 'mean'") as info:
        spec.build()
    assert isinstance(info.value.__cause__, KeyError)
    spec = hd.task("toy", hparams=hparams, **common)
    with pytest.raises(hd.HyperdiffError, match=r"^toy: hparams\(task_data\) \(.*hparams\) must "
                       r"succeed; it called sys.exit\(5\)"):
        spec.build()


def test_method_and_solver_advice_follows_the_syntax():
    b = torch.ones(3, dtype=D)
    with pytest.raises(hd.HyperdiffError, match=r"use cg\(\) or raise max_size"):
        hd.solvers.exact(max_size=2)(lambda v: v, b)
    with config_syntax(), pytest.raises(hd.HyperdiffError, match=r'use method.solver = "cg" or '
                                                                 r"raise max_size"):
        hd.solvers.exact(max_size=2)(lambda v: v, b)
    with config_syntax(), pytest.warns(UserWarning, match=r'or use method.solver = "exact" for '
                                                          r"an indefinite system"):
        hd.solvers.cg()(lambda v: -v, b)  # A = -I: p'Ap < 0 at once
    problem = replace(ridge_problem(), optimizer=hd.adam(0.1))
    with pytest.raises(hd.HyperdiffError, match=r"use checkpointed\(\) for a memory-saving"):
        hd.reversible()(problem)
    with config_syntax(), pytest.raises(hd.HyperdiffError, match=r'use method.name = '
                                                                 r'"checkpointed" for a memory'):
        hd.reversible()(problem)


def test_a_nan_in_a_list_of_batches_names_the_batch_and_the_row():
    x = torch.randn(4, 3, dtype=D)
    bad = x.clone()
    bad[2, 1] = math.nan
    batches = [(x, x.sum(1)), (bad, x.sum(1))]
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: train_data\[1\] must be finite "
                       r"\(got 1 NaN or infinite entries of 12 in train_data\[1\]\[0\], first at "
                       r"row 2\)"):
        ridge_problem(train_data=batches)
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: val_data\[1\] must be finite "
                       r"\(got 1 NaN .* in val_data\[1\]\[0\], first at row 2\)"):
        hd.make_problem(lambda p, h, b: p["w"].sum(), lambda p, h, b: p["w"].sum(),
                        hd.HyperParameters(lam=hd.scalar(0.1)), {"w": torch.zeros(3)},
                        optimizer=hd.sgd(0.1), train_data=x, val_data=batches, steps=2)


def test_a_ragged_sample_in_a_lazy_test_split_is_named():
    task = _task_with_test(Samples("ragged")).build(selection_fraction=0)
    with pytest.raises(hd.HyperdiffError, match=r"data: batch 5 \(samples \[20, 21, 22, 23\]\) "
                       r"of the test split must be readable .*RuntimeError: .*; sample 21's \[0\] "
                       r"has shape \(3,\), sample 20's \(4,\)\)") as info:
        list(task.splits["test"])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_tasks_summarize_that_fails_is_named():
    x = torch.randn(40, 3, dtype=D)

    def mse(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def summarize(values, info):
        return {"lr": values["missing"]}

    spec = hd.task("toy", model={"w": torch.zeros(3, dtype=D)}, val_loss=mse,
                   train_loss=lambda p, h, b: mse(p, h, b) + h["lam"] * p["w"].square().sum(),
                   hparams=hd.HyperParameters(lam=hd.scalar(0.1)), optimizer=hd.sgd(0.1),
                   data=(x, x.sum(1)), steps=3, summarize=summarize)
    task = spec.build()
    with pytest.raises(hd.HyperdiffError, match=r"^toy: summarize\(values, task_data\) "
                       r"\(.*summarize\) must succeed; it raised KeyError: 'missing'"):
        task.summarize(task.hparams.natural())
