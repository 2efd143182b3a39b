"""The public task API: :func:`task` describes a tuning task, :meth:`TaskSpec.build` builds it.

A task is written once, in the user's own module or file, as a *factory*: a function that
returns ``hd.task(...)``. hyperdiff calls it (``hyperdiff run --task my_pkg.cnn:build``) and
then builds the :class:`~hyperdiff.app.tasks.base.Task` itself, with the config's
``selection_fraction``, ``cv_folds`` and ``data_seed``, so every task gets the same defences
(a selection split the hypergradient never sees, a held-out test split, stratified splits and
folds for classification). The built-in tasks are factories of the same kind.

``data`` is either the whole data set, one batch whose tensors share their first (row)
dimension (a tensor, a tuple or a dict of tensors); hyperdiff splits its rows; or
:func:`given_splits` (train / val / test, and optionally selection, each anything
:func:`~hyperdiff.make_problem` accepts: tensors, a list of batches, a ``DataLoader``, ...).

>>> import torch, hyperdiff as hd
>>> x = torch.randn(40, 3, dtype=torch.float64); y = x @ torch.ones(3, dtype=torch.float64)
>>> mse = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
>>> spec = hd.task("toy", model={"w": torch.zeros(3, dtype=torch.float64)},
...     train_loss=lambda p, h, b: mse(p, h, b) + h["lam"] * p["w"].square().sum(),
...     val_loss=mse, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
...     optimizer=hd.sgd(0.1), data=(x, y), steps=20)
>>> built = spec.build(selection_fraction=0.5)
>>> sorted(built.splits), built.info["sizes"]["test"]
(['selection', 'test', 'train', 'val'], 10)
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hyperdiff.app.tasks.base import Metrics, SearchChoices, SearchRange, Task
from hyperdiff.app.tasks.dataset_splits import (
    selection_batches,
    split_size,
    test_split,
    train_source,
    validation_and_selection,
)
from hyperdiff.app.tasks.metrics import checked_metrics, is_metric_value
from hyperdiff.app.tasks.splits import (
    SPLITS,
    Splits,
    check_data_seed,
    fold_rows,
    in_memory_batches,
    labels_needed,
    shared_counts,
    shared_rows_text,
    split_given_rows,
    split_rows,
    stratify_labels,
)
from hyperdiff.engine.data import minibatches, validation_batches
from hyperdiff.engine.data.evaluation import EvaluationSplit, is_dataset_split
from hyperdiff.engine.datacheck import check_batch, shapes_of, tensors_in
from hyperdiff.engine.make import make_problem
from hyperdiff.engine.models import model_state
from hyperdiff.engine.optimizers import Optimizer
from hyperdiff.engine.problem import Problem, takes_context
from hyperdiff.engine.task_distribution import TaskDistribution, TaskSampler, task_distribution
from hyperdiff.errors import (
    UNIT_OPEN_HIGH,
    HyperdiffError,
    Range,
    Text,
    describe,
    fail,
    is_number,
    nonnegative_int,
    number,
    positive_int,
    user_failure,
)
from hyperdiff.hparams.constraints import Free, Interval
from hyperdiff.hparams.discrete import DiscreteParameter
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.typing import Batch, LossFn, Params


@dataclass(frozen=True)
class GivenSplits:
    """Data already split by the user (see :func:`given_splits`)."""

    train: Any
    val: Any
    test: Any
    selection: Any = None
    allow_shared_rows: bool = False


def given_splits(*, train: Any, val: Any, test: Any, selection: Any = None,
                 allow_shared_rows: bool = False) -> GivenSplits:
    """Use these splits as they are. ``train``: anything ``make_problem`` takes as train_data,
    or a map-style ``Dataset`` (trained in shuffled batches of the task's ``batch_size``);
    ``val``, ``test``, ``selection``: a batch, a list of batches, or a ``Dataset`` /
    ``DataLoader`` / generator function (read in batches; the test split lazily at every report,
    see :mod:`hyperdiff.app.tasks.dataset_splits`). Without ``selection``, ``selection_fraction`` of
    ``val`` is taken out of it (``val`` must then be one batch or a map-style data set).
    Cross-validation needs the whole data set, so it is refused here.

    In-memory splits must not share rows (inputs with equal bytes, see
    :mod:`hyperdiff.app.tasks.splits`): the build refuses them, naming the splits and
    the count, unless ``allow_shared_rows=True`` says they are duplicate examples of the
    data, not the same rows."""
    given = {"train": train, "val": val, "test": test, "selection": selection}
    for name, split in given.items():
        if (split is None and name != "selection") or isinstance(split, (str, bytes, bytearray)):
            raise fail("given_splits", name, "data: a batch of tensors, a list of batches, a "
                       "Dataset, a DataLoader or a generator function", split)
    if not isinstance(allow_shared_rows, bool):
        raise fail("given_splits", "allow_shared_rows", "True or False", allow_shared_rows)
    return GivenSplits(train=train, val=val, test=test, selection=selection,
                       allow_shared_rows=allow_shared_rows)


def how_it_failed(err: BaseException) -> str:
    """``"called sys.exit(3), ..."`` or ``"raised KeyError: 'x'"``: how user code stopped."""
    if isinstance(err, SystemExit):
        return f"called sys.exit({err.code!r}), which would end the run without a message"
    return f"raised {type(err).__name__}: {err}"


@contextmanager
def task_code(task: str, call: str, fn: Any) -> Iterator[None]:
    """Run a task's own function ``fn`` (named ``call``); an exception or ``sys.exit`` in it is
    re-raised as ``"<task>: <call> must ... ; it raised ..."`` from the original."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    with user_failure(lambda err: f"{task}: {call} ({name}) must succeed; it "
                                  f"{how_it_failed(err)}"):
        yield


@dataclass(frozen=True)
class TaskData:
    """What data-dependent parts of a task see: the data after ``prepare`` and its splits
    (``rows`` is ``None`` for :func:`given_splits`)."""

    data: Any
    rows: Splits | None
    data_seed: int


@dataclass(frozen=True)
class TaskSpec:
    """A tuning task as :func:`task` describes it; :meth:`build` makes the runnable task."""

    name: str
    model: Any
    train_loss: LossFn
    val_loss: LossFn
    hparams: HyperParameters | Callable[[TaskData], HyperParameters]
    optimizer: Optimizer
    data: Any
    steps: int
    batch_size: int | None = None
    metrics: Metrics | None = None
    search_space: Mapping[str, SearchRange] | None = None
    stratify: bool | None = None
    test_fraction: float = 0.25
    val_fraction: float = 0.2
    prepare: Callable[[Any, Splits], Any] | None = None
    summarize: Callable[[Mapping[str, Tensor], TaskData], dict[str, float]] | None = None
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    cross_validation: bool | str = True
    probe: bool = True
    task_type: type[Task] = Task
    tasks: TaskDistribution | None = None

    def build(self, *, steps: int | None = None, selection_fraction: float = 0.5,
              cv_folds: int = 0, data_seed: int = 0) -> Task:
        """The runnable :class:`Task`: splits drawn from ``data_seed`` (the selection split
        takes ``selection_fraction`` of the validation rows), one inner problem per
        cross-validation fold when ``cv_folds >= 2``, T = ``steps`` (default: ``self.steps``).
        """
        steps = positive_int(f"task {self.name}", "steps", self.steps if steps is None else steps)
        data_seed = check_data_seed(f"task {self.name}", data_seed)
        cv_folds = nonnegative_int(f"task {self.name}", "cv_folds", cv_folds)
        number(f"task {self.name}", "selection_fraction", selection_fraction, UNIT_OPEN_HIGH)
        if cv_folds and self.cross_validation is not True:
            reason = self.cross_validation or "this task does not support it"
            raise HyperdiffError(f"{self.name}: task.cv_folds must be 0 (got {cv_folds}): "
                                 f"{reason}")
        if isinstance(self.data, GivenSplits):
            built = self._build_given(steps, selection_fraction, cv_folds, data_seed)
        else:
            built = self._build_rows(steps, selection_fraction, cv_folds, data_seed)
        if self.task_type is Task:
            return built
        return self.task_type(**{f.name: getattr(built, f.name) for f in fields(Task)})

    # ------------------------------------------------------------------ internals
    def _build_rows(self, steps: int, selection_fraction: float, cv_folds: int,
                    data_seed: int) -> Task:
        n = num_rows(self.data, self.name)
        labels = None if self.stratify is False else stratify_labels(
            self.data, any_dtype=bool(self.stratify))
        if self.stratify and labels is None:
            raise labels_needed(self.name)
        rows = split_rows(n, test=self.test_fraction, val=self.val_fraction,
                          selection_fraction=selection_fraction, seed=data_seed, labels=labels)
        data = self.data if self.prepare is None else self._prepared(rows, n)
        info = TaskData(data, rows, data_seed)
        hparams = self._hparams(info)
        model_params, buffers = model_state(self.name, self.model)
        train, val = take(data, rows.train), take(data, rows.val)  # shared by problems and splits

        def problem_for(train_batch: Batch, val_batch: Batch, probe: bool, origin: str
                        ) -> Problem:
            return self._problem(hparams, model_params, buffers, train_batch, val_batch, steps,
                                 probe, origin=origin)

        held_out = (f"of the {n} rows of data: test_fraction {self.test_fraction} holds out "
                    f"{rows.test.numel()} and val_fraction {self.val_fraction} "
                    f"{rows.val.numel() + rows.selection.numel()}")
        if cv_folds:
            pool = torch.cat([rows.train, rows.val]).sort().values
            folds = fold_rows(pool, cv_folds, data_seed, labels, stratify=self.stratify)
            problems = tuple(problem_for(take(data, tr), take(data, va), self.probe and j == 0,
                                         f"cross-validation fold {j}'s train split (of the "
                                         f"{pool.numel()} train and validation rows in "
                                         f"cv_folds={cv_folds} folds; {held_out})")
                             for j, (tr, va) in enumerate(folds))
            final = problem_for(take(data, pool), val, False,
                                f"train and validation rows ({held_out})")
        else:
            problems = (problem_for(train, val, self.probe, f"train split ({held_out})"),)
            final = problems[0]
        splits: dict[str, list[Batch] | EvaluationSplit] = {"train": [train], "val": [val]}
        if rows.selection.numel():
            splits["selection"] = [take(data, rows.selection)]
        splits["test"] = [take(data, rows.test)]
        return self._task(problems, final, splits, hparams, info,
                          {"sizes": rows.sizes(), "cv_folds": cv_folds})

    def _prepared(self, rows: Splits, n: int) -> Any:
        """``prepare(data, rows)``, refused unless it keeps the ``n`` rows the splits index."""
        assert self.prepare is not None
        with task_code(self.name, "prepare(data, splits)", self.prepare):
            data = self.prepare(self.data, rows)
        try:
            kept = num_rows(data, self.name)
        except HyperdiffError:
            kept = None
        if kept != n:
            raise HyperdiffError(
                f"{self.name}: prepare(data, splits) must return the data as a tensor, a tuple "
                f"or a dict of tensors with all its {n} rows, which the splits index (got "
                f"{describe(data) if kept is None else f'{kept} rows'}); transform the rows, "
                "keep their number and order")
        return data

    def _build_given(self, steps: int, selection_fraction: float, cv_folds: int,
                     data_seed: int) -> Task:
        given = self.data
        assert isinstance(given, GivenSplits)
        for split in ("train", "val", "test", "selection"):
            check_worker_imports(self.name, split, getattr(given, split))
        if cv_folds:
            raise HyperdiffError(f"{self.name}: task.cv_folds must be 0 with given_splits (got "
                                 f"{cv_folds}): folds need the whole data set as data=")
        if not given.allow_shared_rows:
            self._refuse_shared_rows(given)
        streamed = is_dataset_split(given.val)
        if streamed:
            val, selection = validation_and_selection(
                given.val, given.selection, name=self.name, selection_fraction=selection_fraction,
                seed=data_seed, stratify=self.stratify, batch_size=self.batch_size)
        else:
            val = validation_batches(given.val)
            selection = selection_batches(given.selection, self.batch_size)
        if selection is None and selection_fraction > 0 and not streamed:
            if len(val) != 1:
                raise HyperdiffError(
                    f"{self.name}: given_splits(selection=...) must be given when val is not "
                    f"one batch (got {len(val)} batches), or set task.selection_fraction = 0")
            labels = None if self.stratify is False else stratify_labels(
                val[0], any_dtype=bool(self.stratify))
            if self.stratify and labels is None:
                raise labels_needed(self.name, given=True)
            val_rows, sel_rows = split_given_rows(
                num_rows(val[0], self.name), selection_fraction=selection_fraction,
                seed=data_seed, labels=labels)
            selection = take(val[0], sel_rows) if sel_rows.numel() else None
            val = [take(val[0], val_rows)]
        info = TaskData(given, None, data_seed)
        hparams = self._hparams(info)
        model_params, buffers = model_state(self.name, self.model)
        problem = self._problem(hparams, model_params, buffers,
                                train_source(given.train, self.batch_size, self.name), val,
                                steps, self.probe, origin="given_splits' train split")
        splits: dict[str, list[Batch] | EvaluationSplit] = {"val": val}
        if selection is not None:
            splits["selection"] = validation_batches(selection)
        splits["test"] = (test_split(given.test, self.batch_size) if is_dataset_split(given.test)
                          else validation_batches(given.test))
        sizes = {k: split_size(v, lambda b: tensor_rows(b, self.name)) for k, v in splits.items()}
        return self._task((problem,), problem, splits, hparams, info,
                          {"sizes": sizes, "cv_folds": 0})

    def _refuse_shared_rows(self, given: GivenSplits) -> None:
        """Refuse in-memory given splits that share rows (see :mod:`.splits`)."""
        counts, sizes = shared_counts({split: in_memory_batches(getattr(given, split))
                                       for split in SPLITS})
        if counts:
            raise HyperdiffError(
                f"{self.name}: given_splits' train, val, selection and test must not share rows "
                f"(got {shared_rows_text(counts, sizes)}): a split that holds rows of another "
                "is not held out from it; pass disjoint splits, or hd.given_splits(..., "
                "allow_shared_rows=True) if these are duplicate examples of the data (equal "
                "inputs), not the same rows")

    def _hparams(self, info: TaskData) -> HyperParameters:
        hparams = self.hparams
        if callable(hparams):
            with task_code(self.name, "hparams(task_data)", hparams):
                hparams = hparams(info)
        if not isinstance(hparams, HyperParameters):
            raise HyperdiffError(f"{self.name}: hparams must be a hd.HyperParameters or a "
                                 f"function returning one (got {type(hparams).__name__})")
        return hparams

    def _problem(self, hparams: HyperParameters, params: Params, buffers: Params,
                 train: Any, val: Any, steps: int, probe: bool, *, origin: str) -> Problem:
        """The inner problem on ``train`` (``origin``: where its rows come from, in words)."""
        if self.batch_size is not None and not isinstance(train, DataLoader):
            tensors = (train,) if isinstance(train, Tensor) else train
            if not isinstance(tensors, tuple) or not all(isinstance(t, Tensor) for t in tensors):
                raise HyperdiffError(f"{self.name}: batch_size needs the training data as a "
                                     f"tensor or a tuple of tensors (got {describe(train)}); "
                                     "for dict batches pass batch_size=None (full batch) or "
                                     "hd.given_splits(train=a DataLoader of dicts, ...)")
            rows = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else None
            if rows is not None and self.batch_size > rows:
                raise HyperdiffError(
                    f"task {self.name}: batch_size must be at most the {rows} rows of the "
                    f"{origin} (got {self.batch_size}); lower batch_size, or pass "
                    "batch_size=None to train on the full batch")
            train = minibatches(*tensors, batch_size=self.batch_size)
        return make_problem(self.train_loss, self.val_loss, hparams, params,
                            buffers=buffers or None, optimizer=self.optimizer,
                            train_data=train, val_data=val, steps=steps, probe=probe,
                            caller=f"task {self.name}")

    def _task(self, problems: tuple[Problem, ...], final: Problem,
              splits: dict[str, list[Batch] | EvaluationSplit], hparams: HyperParameters,
              info: TaskData,
              meta: dict[str, Any]) -> Task:
        for split, batches in splits.items():  # a lazy split checks itself as it is read
            if not isinstance(batches, EvaluationSplit):
                for batch in batches:
                    check_batch(self.name, f"the {split} split", batch)
        summarize = None
        if self.summarize is not None:
            user = self.summarize

            def summarize(values: Mapping[str, Tensor]) -> dict[str, float]:
                with task_code(self.name, "summarize(values, task_data)", user):
                    summary = user(values, info)
                return checked_summary(self.name, summary)

        metrics = self.metrics or loss_metrics(self)
        if self.probe:  # every split the report evaluates, not only the one tuning reads
            for split, batches in splits.items():  # a lazy split: its first batch, read now
                first = next(iter(batches)) if isinstance(batches, EvaluationSplit) else batches[0]
                probe_metrics(self.name, metrics, final, hparams, first, split)
        return Task(
            name=self.name, description=self.description, problems=problems,
            final_problem=final, splits=splits, metrics=metrics,
            search_space=checked_search_space(
                self.name, hparams, self.search_space or default_search_space(hparams)),
            info=meta, summarize=summarize, tasks=self.tasks,
        )


USER_TASK_MODULE = "hyperdiff_user_task_"
"""The prefix of the module name a task file (``path/file.py:build``) is imported under."""


def check_worker_imports(name: str, split: str, data: Any) -> None:
    """Refuse a ``DataLoader`` whose worker processes start fresh (``spawn``, ``forkserver``)
    and would have to import a class defined in a task file: they cannot import it by the
    name hyperdiff gave the file (a worker would fail with ModuleNotFoundError)."""
    if not isinstance(data, DataLoader) or data.num_workers == 0:
        return
    context = data.multiprocessing_context
    method = (context if isinstance(context, str) else context.get_start_method()
              if context is not None else multiprocessing.get_start_method())
    defined = [("Dataset", type(data.dataset)), ("collate_fn", data.collate_fn),
               ("worker_init_fn", data.worker_init_fn)]
    local = [f"{what} {getattr(obj, '__name__', what)}" for what, obj in defined
             if str(getattr(obj, "__module__", "")).startswith(USER_TASK_MODULE)]
    if method != "fork" and local:
        raise HyperdiffError(
            f"{name}: the {split} DataLoader's {', '.join(local)} must be importable by its "
            f"'{method}' worker processes (got one defined in the task file, which a fresh "
            "process cannot import); move it into a module on the Python path, or use "
            "num_workers=0 or multiprocessing_context='fork'")


def probe_metrics(name: str, metrics: Metrics, problem: Problem, hparams: HyperParameters,
                  batch: Batch, split: str = "val") -> None:
    """Call ``metrics`` once on ``batch`` (of the split ``split``) at theta_0 in eval mode, so
    that a metrics function that fails (e.g. a BatchNorm model called without ``ctx``, or a
    test split of other shapes), returns something other than ``{name: number}`` with a
    ``"loss"`` (:func:`~hyperdiff.app.tasks.metrics.checked_metrics`) or a non-finite loss is
    refused when the task is built, not after the whole run."""
    from hyperdiff.engine.models import StepContext  # local: as tasks.base does

    with_ctx = takes_context(metrics, "metrics")
    hview = hparams.view(problem.raw_tensors())
    ctx = StepContext(step=-1, seed=0, train=False, buffers=dict(problem.buffers))
    try:
        with torch.no_grad():
            values = (metrics(problem.params, hview, batch, ctx) if with_ctx
                      else metrics(problem.params, hview, batch))
    except HyperdiffError as err:
        raise HyperdiffError(f"task {name}: metrics failed on the {_split_name(split)} at "
                             f"the initial parameters: {err}") from None
    except Exception as err:  # the user's code: name it instead of a deep traceback
        raise HyperdiffError(f"task {name}: metrics failed on the {_split_name(split)} at "
                             f"the initial parameters ({type(err).__name__}: {err}; its batch: "
                             f"{shapes_of(batch)})") from err
    try:
        loss = checked_metrics(values)["loss"]
    except HyperdiffError as err:
        raise HyperdiffError(f"task {name}: {err}") from None
    if not math.isfinite(loss):
        raise HyperdiffError(f"task {name}: metrics must return a finite 'loss' at the initial "
                             f"parameters (got {loss} on the {_split_name(split)}; its batch: "
                             f"{shapes_of(batch)}): the report would compare non-finite "
                             "losses; check the metrics function and the data")


def checked_summary(name: str, summary: Any) -> dict[str, float]:
    """What a task's ``summarize`` returned, as ``{label: float}`` (a one-element tensor or a
    NumPy number converted); anything else is refused, naming the entry."""
    if not isinstance(summary, Mapping):
        raise fail(f"task {name}", "summarize(values, task_data)'s result", "a dict "
                   "{label: number}", summary)
    for key, value in summary.items():
        if not isinstance(key, str) or not is_metric_value(value):
            raise HyperdiffError(f"task {name}: summarize(values, task_data) must return a dict "
                                 f"{{label: number}}; entry {key!r} is {describe(value)}")
    return {key: float(value) for key, value in summary.items()}


def _split_name(split: str) -> str:
    return "validation split" if split == "val" else f"{split} split"


def task(
    name: str, *, model: Any, train_loss: LossFn, val_loss: LossFn,
    hparams: HyperParameters | Callable[[TaskData], HyperParameters], optimizer: Optimizer,
    data: Any, steps: int, batch_size: int | None = None, metrics: Metrics | None = None,
    search_space: Mapping[str, SearchRange] | None = None, stratify: bool | None = None,
    test_fraction: float = 0.25, val_fraction: float = 0.2,
    prepare: Callable[[Any, Splits], Any] | None = None,
    summarize: Callable[[Mapping[str, Tensor], TaskData], dict[str, float]] | None = None,
    description: str = "", defaults: Mapping[str, Any] | None = None,
    cross_validation: bool | str = True, probe: bool = True, task_type: type[Task] = Task,
    tasks: TaskDistribution | TaskSampler | None = None,
) -> TaskSpec:
    """Describe a tuning task; return a :class:`TaskSpec` (build it with ``.build()``).

    Args:
        name: the task's name (run directories and reports).
        model: ``hd.functional(module)`` (its params and BatchNorm buffers), a dict of
            parameter tensors, or ``(params, buffers)``: theta_0 of every training.
        train_loss, val_loss: ``loss(params, hparams, batch[, ctx])`` returning a scalar.
        hparams: the :class:`~hyperdiff.HyperParameters` at their initial values, or a
            function of :class:`TaskData` returning them (per-example weights need the
            number of training rows).
        optimizer: the inner optimizer (``hd.sgd``, ``hd.adam``, ``hd.adamw``).
        data: the whole data set as one batch (hyperdiff splits its rows), or
            :func:`given_splits` (tensors, lists of batches, ``Dataset`` s, ``DataLoader`` s).
        steps: default inner steps T (``inner.steps`` overrides it).
        batch_size: train on seeded minibatches of this size (``None``: full batch); with
            :func:`given_splits`, the batch size of a bare ``Dataset`` split (evaluation
            splits default to 256).
        metrics: ``metrics(params, hparams, batch[, ctx]) -> {name: float}`` for reports;
            ``ctx.buffers`` are the trained buffers, ``ctx.train`` is False (eval mode).
            Default: ``{"loss": val_loss}``.
        search_space: natural ranges for black-box search (``hyperdiff compare``); default:
            two decades either side of a positive value, the inner 98% of an interval, a
            discrete hyperparameter's plain choices (:class:`SearchChoices`, the only kind of
            range it takes).
        stratify: ``True``, ``False`` or ``None``: stratify splits and folds by the labels
            (``data[1]`` or ``data["y"]``); ``None``: whenever the labels are integers.
        test_fraction, val_fraction: shares of the rows for the test and validation splits,
            each in (0, 1) and together below 1 (the selection split is taken out of
            validation).
        prepare: ``prepare(data, rows) -> data``, e.g. standardization fitted on
            ``rows.train`` only; called once after splitting; it must keep every row.
        summarize: ``summarize(natural_values, task_data) -> {label: float}`` for the report.
        description: one line for listings.
        defaults: config values this task recommends, as dotted keys
            (``{"outer.lr": 0.1}``); ``inner.steps`` defaults to ``steps``.
        cross_validation: ``True``, or a string saying why ``task.cv_folds`` is refused.
        probe: run two differentiable steps once at build time to check the losses.
        task_type: the :class:`Task` subclass that ``build`` returns. Discrete
            hyperparameters need none: every task reports and searches their plain choices.
        tasks: for meta-learning (``outer.mode = "meta"``, docs/meta.md): the task
            distribution, ``hd.tasks.distribution(sample)`` or ``sample(index, seed) ->
            (support, query)`` itself; the task's own data is then one task, the template
            that checks the losses and that the report trains on.
    """
    if not isinstance(name, str) or not name:
        raise HyperdiffError(f"task: name must be a non-empty string (got {describe(name)})")
    for arg, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
        takes_context(fn, arg)
    if metrics is not None:
        if not callable(metrics):
            raise HyperdiffError(f"task {name}: metrics must be a function (params, hparams, "
                                 f"batch[, ctx]) -> dict (got {describe(metrics)})")
        takes_context(metrics, "metrics")
    if not isinstance(optimizer, Optimizer):
        raise HyperdiffError(f"task {name}: optimizer must be made by hd.sgd, hd.adam or "
                             f"hd.adamw (got {type(optimizer).__name__})")
    if batch_size is not None:
        positive_int(f"task {name}", "batch_size", batch_size)
    _check_options(f"task {name}", stratify=stratify, test_fraction=test_fraction,
                   val_fraction=val_fraction, search_space=search_space,
                   cross_validation=cross_validation, probe=probe, task_type=task_type)
    for arg, given in (("prepare", prepare), ("summarize", summarize)):
        if given is not None and not callable(given):
            raise fail(f"task {name}", arg, "a function or None", given)
    if not isinstance(description, str):
        raise fail(f"task {name}", "description", "a string (one line for listings)",
                   description)
    if defaults is not None and not (isinstance(defaults, Mapping)
                                     and all(isinstance(k, str) for k in defaults)):
        raise fail(f"task {name}", "defaults", "a dict {dotted config key: value}", defaults)
    fixed = sorted(k for k in (defaults or {}) if k == "task.name" or k.startswith("task.params"))
    if fixed:  # the task's name and its factory's arguments are fixed before the defaults
        raise fail(f"task {name}", "defaults", "config keys other than task.name and "
                   "task.params.* (a factory's own keyword defaults are its params' defaults)",
                   fixed)
    return TaskSpec(
        name=name, model=model, train_loss=train_loss, val_loss=val_loss, hparams=hparams,
        optimizer=optimizer, data=data, steps=positive_int(f"task {name}", "steps", steps),
        batch_size=batch_size, metrics=metrics, search_space=search_space, stratify=stratify,
        test_fraction=test_fraction, val_fraction=val_fraction, prepare=prepare,
        summarize=summarize, description=description, defaults=dict(defaults or {}),
        cross_validation=cross_validation, probe=probe, task_type=task_type,
        tasks=tasks if tasks is None or isinstance(tasks, TaskDistribution)
        else task_distribution(tasks, name=f"task {name}: tasks"),
    )


def _check_options(caller: str, *, stratify: Any, test_fraction: Any, val_fraction: Any,
                   search_space: Any, cross_validation: Any, probe: Any, task_type: Any
                   ) -> None:
    """Refuse :func:`task` options of the wrong kind (``stratify="no"`` would stratify,
    ``cross_validation=1`` be read as a reason), fractions that leave no training rows."""
    if stratify is not None and not isinstance(stratify, bool):
        raise fail(caller, "stratify", "True, False or None (stratify whenever the labels are "
                   "integers)", stratify)
    between = Range(0.0, 1.0, open_low=True, open_high=True)
    number(caller, "test_fraction", test_fraction, between)
    number(caller, "val_fraction", val_fraction, between)
    if test_fraction + val_fraction >= 1:
        raise fail(caller, "test_fraction + val_fraction", "below 1, leaving rows to train on",
                   Text(f"{test_fraction} + {val_fraction} = {test_fraction + val_fraction:g}"))
    if search_space is not None and not isinstance(search_space, Mapping):
        raise fail(caller, "search_space", "a dict {hyperparameter name: "
                   "hd.tasks.SearchRange(low, high) or SearchChoices} or None", search_space)
    if cross_validation is not True and cross_validation is not False and not (
            isinstance(cross_validation, str) and cross_validation):
        raise fail(caller, "cross_validation", "True, False, or a string saying why "
                   "task.cv_folds is refused", cross_validation)
    if not isinstance(probe, bool):
        raise fail(caller, "probe", "True or False", probe)
    if not (isinstance(task_type, type) and issubclass(task_type, Task)):
        raise fail(caller, "task_type", "hd.tasks.Task or a subclass of it", task_type)


def num_rows(data: Any, name: str) -> int:
    """The shared first dimension of the tensors of a batch."""
    tensors = (list(data.values()) if isinstance(data, dict)
               else list(data) if isinstance(data, (tuple, list)) else [data])
    if not tensors or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
        raise HyperdiffError(f"{name}: data must be a tensor, a tuple or a dict of tensors with "
                             f"one row per example, or hd.given_splits(...) (got "
                             f"{describe(data)}; a Dataset or DataLoader goes in "
                             "hd.given_splits(train=, val=, test=))")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise HyperdiffError(f"{name}: data's tensors must share their first dimension (got "
                             f"{[tuple(t.shape) for t in tensors]})")
    return sizes.pop()


def tensor_rows(batch: Batch, name: str) -> int:
    """The shared first dimension of the tensors of a given split's batch; other entries (the
    lists of ids or strings that ``default_collate`` makes) are not counted."""
    return num_rows(tuple(t for _, t in tensors_in(batch)), name)


def take(data: Any, rows: Tensor) -> Batch:
    """The rows ``rows`` of every tensor of ``data``."""
    if isinstance(data, dict):
        return {k: v[rows.to(v.device)] for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return tuple(t[rows.to(t.device)] for t in data)
    return data[rows.to(data.device)]


def loss_metrics(spec: TaskSpec) -> Metrics:
    """Default report metrics: ``{"loss": val_loss}``."""
    with_ctx = takes_context(spec.val_loss, "val_loss")

    def metrics(params: Params, hparams: Any, batch: Batch, ctx: Any) -> dict[str, float]:
        loss = spec.val_loss(params, hparams, batch, ctx) if with_ctx else spec.val_loss(
            params, hparams, batch)
        return {"loss": float(loss)}

    return metrics


def checked_search_space(task: str, hparams: HyperParameters,
                         space: Mapping[str, SearchRange]) -> dict[str, SearchRange]:
    """``space`` as a dict, refusing a discrete hyperparameter searched as anything but
    :class:`SearchChoices` among its own choices' labels (a trial would otherwise fail only
    after the tuning, e.g. at a depth of 1.7)."""
    where = f"task {task}"
    for name, rng in space.items():
        spec = hparams.get(name)
        if spec is None:
            raise fail(where, "search_space's names", f"hyperparameters of the task, among "
                       f"{list(hparams)}", name)
        if not isinstance(rng, SearchRange):
            raise fail(where, f"search_space[{name!r}]", "a hd.tasks.SearchRange(low, high, "
                       "log=...) or SearchChoices", rng)
        if not isinstance(spec, DiscreteParameter):
            _check_range(where, name, spec, rng)
            continue
        labels = SearchChoices.of(spec.choices).choices
        if not (isinstance(rng, SearchChoices) and rng.choices
                and all(c in labels for c in rng.choices)):
            raise fail(f"task {task}", f"search_space[{name!r}]",
                       f"hd.tasks.SearchChoices.of(some of {list(labels)}) for a discrete "
                       "hyperparameter", rng)
    return dict(space)


def _check_range(where: str, name: str, spec: Any, rng: SearchRange) -> None:
    """A continuous dimension: finite ``low < high``, ``low > 0`` on a log scale, both ends
    values the hyperparameter's constraint takes (refused at build, not after the tuning)."""
    if isinstance(rng, SearchChoices):
        raise fail(where, f"search_space[{name!r}]", "a SearchRange for a continuous "
                   "hyperparameter", rng)
    if not (is_number(rng.low) and is_number(rng.high) and rng.low < rng.high):
        raise fail(where, f"search_space[{name!r}]", "a range of finite numbers low < high",
                   rng)
    if rng.log and rng.low <= 0:
        raise fail(where, f"search_space[{name!r}]", "a range with low > 0 on a log scale "
                   "(log=False for one that reaches 0 or below)", rng)
    inside = 1e-9 * (float(rng.high) - float(rng.low))  # an open end of the constraint may
    low, high = float(rng.low) + inside, float(rng.high) - inside  # bound the range; host
    ends = torch.tensor([low, high], dtype=torch.float64, device="cpu")  # numbers, as specs'
    if not bool(spec.constraint.valid(ends).all()):
        raise fail(where, f"search_space[{name!r}]", f"a range of values {name} takes "
                   f"({spec.constraint.describe_valid()})", rng)


def default_search_space(hparams: HyperParameters) -> dict[str, SearchRange]:
    """Two decades either side of a positive value's mean, the inner 98% of an interval,
    +-1 around a free value; a discrete hyperparameter's plain choices (their labels)."""
    space: dict[str, SearchRange] = {}
    for name, spec in hparams.items():
        mean = float(spec.init.double().mean())
        if isinstance(spec, DiscreteParameter):
            space[name] = SearchChoices.of(spec.choices)
        elif isinstance(spec.constraint, Interval):
            low, high = spec.constraint.low, spec.constraint.high
            pad = 0.01 * (high - low)
            space[name] = SearchRange(low + pad, high - pad, log=False)
        elif isinstance(spec.constraint, Free):
            space[name] = SearchRange(mean - 1.0, mean + 1.0, log=False)
        else:
            mean = mean if mean > 0 and math.isfinite(mean) else 1.0
            space[name] = SearchRange(mean / 100, mean * 100)
    return space
