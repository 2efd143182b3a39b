"""Black-box search baselines over a task: random search, Optuna's TPE, a given grid.

Every trial trains at the trial's natural values and scores them by ``objective``: the default
``val_loss`` (one training through ``task.train_and_evaluate(values, seed)``, scored on the
validation split the hypergradient sees), or ``outer_loss`` (``task.outer_loss``: the loss the
hypergradient descends, averaged over the task's inner problems, so one training per
cross-validation fold). :func:`objective_for` picks the one that matches a task; any other
objective is refused before the first training. Each dimension of
``task.search_space`` is searched uniformly, in log space when its range says ``log``. A
vector hyperparameter gets one shared value, unless it is named in ``per_coordinate``: then
each of its entries is a dimension of its own (64 dimensions for 64 per-feature penalties).

A search returns a :class:`SearchResult`: its trials in order, each with the cumulative
number of trainings and wall time, so curves of the best objective so far against budget
compare across methods (:func:`from_history` turns a hyperdiff run into the same shape).
Optuna is an optional extra (``pip install 'hyperdiff[search]'``); :func:`optuna_available`
says whether :func:`tpe_search` can run.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hyperdiff.app.config import MAX_SEED
from hyperdiff.app.tasks.base import SearchChoices, SearchRange, Task
from hyperdiff.errors import HyperdiffError, fail, positive_int
from hyperdiff.hparams.choices import fixed_hparams
from hyperdiff.hparams.discrete import discrete_names
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.tuner.distributed.spread import LocalSpreader, Spreader
from hyperdiff.tuner.history import StepRecord, finite_or_none, natural_values

OBJECTIVES = ("val_loss", "outer_loss")
"""The objectives a search minimises (module doc)."""
SEEDS = "an int in [0, 2**63 - 1]"
"""The seeds a search takes: those of ``outer.seed`` (``hyperdiff.app.config.MAX_SEED``)."""
SAMPLER_SEEDS = 2**32
"""Optuna's samplers take seeds below 2**32: :func:`tpe_search` seeds TPE with ``seed`` modulo
this."""

Values = dict[str, Any]
"""Natural values of one trial: a float per hyperparameter, or a list for a per-coordinate
vector."""


@dataclass(frozen=True)
class Trial:
    """One training run of a search (or one outer step of hyperdiff).

    Attributes:
        number: 0-based index in the search.
        values: natural hyperparameter values evaluated (floats, or lists per coordinate).
        objective: the minimised loss (``inf`` when the training diverged).
        metrics: everything ``train_and_evaluate`` returned.
        trainings: inner trainings done so far (cumulative, this trial included).
        time_s: wall time since the search started, at the end of this trial.
    """

    number: int
    values: Values
    objective: float
    metrics: dict[str, float]
    trainings: int
    time_s: float


@dataclass(frozen=True)
class SearchResult:
    """The trials of one search, in the order they ran.

    ``spent``: ``(trainings, time_s)`` of the whole search when it went on after its last
    trial (a hyperdiff run whose last outer steps failed: their trainings and time count);
    ``None``: the last trial's."""

    method: str
    trials: tuple[Trial, ...]
    spent: tuple[int, float] | None = None

    @property
    def best(self) -> Trial:
        """The trial with the lowest objective (the first one on ties); its objective is
        ``inf`` when every trial diverged (see :attr:`found_finite`)."""
        if not self.trials:
            raise HyperdiffError(f"{self.method}: no trials, so no best trial")
        return min(self.trials, key=lambda t: (t.objective, t.number))

    @property
    def found_finite(self) -> bool:
        """Whether some trial has a finite objective (else :attr:`best` is a diverged one)."""
        return any(math.isfinite(t.objective) for t in self.trials)

    @property
    def trainings(self) -> int:
        if self.spent is not None:
            return self.spent[0]
        return self.trials[-1].trainings if self.trials else 0

    @property
    def time_s(self) -> float:
        if self.spent is not None:
            return self.spent[1]
        return self.trials[-1].time_s if self.trials else 0.0

    def curve(self) -> dict[str, list[float]]:
        """Best objective so far after each trial, against trainings and wall time (one more
        point at :attr:`trainings` when the search went on after its last trial)."""
        best = math.inf
        out: dict[str, list[float]] = {"trainings": [], "time_s": [], "best": []}
        for trial in self.trials:
            best = min(best, trial.objective)
            out["trainings"].append(trial.trainings)
            out["time_s"].append(trial.time_s)
            out["best"].append(best)
        last = (self.trials[-1].trainings, self.trials[-1].time_s) if self.trials else (0, 0.0)
        if self.spent is not None and tuple(self.spent) != last:
            out["trainings"].append(self.spent[0])
            out["time_s"].append(self.spent[1])
            out["best"].append(best)
        return out

    def first_reaching(self, target: float) -> Trial | None:
        """The first trial whose objective is at most ``target`` (``None`` if none is)."""
        return next((t for t in self.trials if t.objective <= target), None)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"method": self.method, "trainings": self.trainings, "time_s": self.time_s,
                "best": {"number": best.number, "objective": best.objective,
                         "values": best.values, "metrics": best.metrics},
                "curve": self.curve()}


@dataclass(frozen=True)
class Dimension:
    """One searched coordinate: ``name`` (and entry ``index`` of a vector, else ``None``)."""

    name: str
    index: int | None
    range: SearchRange

    @property
    def label(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


def dimensions(task: Task, per_coordinate: Iterable[str] = ()) -> list[Dimension]:
    """The searched coordinates of ``task``: one per name of ``task.search_space``, or one per
    entry for the vector hyperparameters named in ``per_coordinate``."""
    per_coordinate = set(per_coordinate)
    unknown = per_coordinate - set(task.search_space)
    if unknown:
        raise HyperdiffError(
            f"search: per_coordinate must name hyperparameters of the search space "
            f"{sorted(task.search_space)} (got {sorted(unknown)})"
        )
    sizes = {name: spec.numel() for name, spec in task.hparams.raw.items()}
    dims = []
    for name, rng in task.search_space.items():
        vector = task.hparams[name].shape != ()  # a scalar or a choice: one dimension
        if name in per_coordinate and vector and not isinstance(rng, SearchChoices):
            dims += [Dimension(name, i, rng) for i in range(sizes[name])]
        else:
            dims.append(Dimension(name, None, rng))
    return dims


def assemble_values(dims: Sequence[Dimension], point: Sequence[Any]) -> Values:
    """Natural values from one number per dimension (vectors become lists)."""
    values: Values = {}
    for dim, x in zip(dims, point, strict=True):
        if isinstance(dim.range, SearchChoices):  # a discrete choice keeps its label
            values[dim.name] = x
        elif dim.index is None:
            values[dim.name] = float(x)
        else:
            values.setdefault(dim.name, []).append(float(x))
    return values


def check_search_inputs(caller: str, *, seed: Any, objective: Any,
                        seed_name: str = "seed") -> None:
    """Refuse a ``seed`` outside :data:`SEEDS` and an ``objective`` not in :data:`OBJECTIVES`,
    before any training (``seed_name``: how the caller spells the seed).

    >>> check_search_inputs("random_search", seed=0, objective="test_loss")
    Traceback (most recent call last):
        ...
    hyperdiff.errors.HyperdiffError: random_search: objective must be one of [...] (got ...)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise fail(caller, seed_name, SEEDS, seed)
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise fail(caller, "objective", f"one of {list(OBJECTIVES)}", objective)


def objective_for(task: Task) -> str:
    """``"outer_loss"`` for a cross-validated task (its validation split is part of the final
    model's training data, so a hold-out score would be meaningless), else ``"val_loss"``."""
    return "outer_loss" if task.info.get("cv_folds") else "val_loss"


def trainings_per_trial(task: Task, objective: str) -> int:
    """Inner trainings one trial costs: one per inner problem for ``outer_loss``, else one."""
    return len(task.problems) if objective == "outer_loss" else 1


def as_tensors(values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's values as the task takes them: per-coordinate lists become float64 tensors."""
    return {n: torch.tensor(v, dtype=torch.float64, device="cpu") if isinstance(v, list) else v
            for n, v in values.items()}


def natural_form(hparams: HyperParameters, values: Mapping[str, Any]) -> Values:
    """A trial's ``values`` as ``result.json`` writes natural values (``tuned`` ->
    ``hparams``): a float per scalar and a list per vector, for every hyperparameter.

    A continuous value is written as the trial trained it (a shared number repeated over the
    vector), so that ``hd.tuned_hparams`` gives back the same raw values bit for bit; a
    discrete hyperparameter's label becomes its natural values at that plain choice; names the
    search left out keep their initial values.

    >>> import hyperdiff as hd
    >>> theta = {"a": torch.zeros(2), "b": torch.zeros(3)}
    >>> hp = hd.HyperParameters(lr=hd.scalar(0.2), wd=hd.per_tensor(theta, 1.0))
    >>> natural_form(hp, {"lr": 0.1, "wd": 0.5})
    {'lr': 0.1, 'wd': [0.5, 0.5]}
    """
    fixed = fixed_hparams(hparams, as_tensors(values))
    form = natural_values(fixed, fixed.raw)
    discrete = set(discrete_names(hparams))
    for name, value in values.items():
        if name in discrete:
            continue
        shape = hparams[name].shape
        if isinstance(value, list):
            form[name] = [float(v) for v in value]
        elif shape == ():
            form[name] = float(value)
        else:
            form[name] = [float(value)] * math.prod(shape)
    return form


def trial_entry(trial: Trial, values: Values) -> dict[str, Any]:
    """One trial of a comparison's history (JSON-ready; a non-finite loss is ``None``). A
    trial scored by the CV loss (``outer_loss``: the mean validation loss over the folds, as
    a hyperdiff step's ``val_loss`` is) gives it as its ``val_loss``; it computes no
    ``selection_loss`` (``None``)."""
    val = trial.metrics.get("val_loss", trial.metrics.get("outer_loss"))
    return {"trial": trial.number, "values": values,
            "objective": finite_or_none(trial.objective),
            "val_loss": finite_or_none(val),
            "selection_loss": finite_or_none(trial.metrics.get("selection_loss")),
            "trainings": trial.trainings, "time_s": trial.time_s}


def evaluate_trial(task: Task, values: Mapping[str, Any], *, seed: int, objective: str
                   ) -> tuple[float, dict[str, float]]:
    """Train at ``values`` and return (objective, metrics); a diverged training gives ``inf``."""
    check_search_inputs("evaluate_trial", seed=seed, objective=objective)
    natural = as_tensors(values)
    try:
        if objective == "outer_loss":
            metrics = {"outer_loss": task.outer_loss(natural, seed=seed)}
        else:
            needed = {"val", "selection", objective.rpartition("_")[0]}  # no test pass
            metrics = task.train_and_evaluate(natural, seed=seed, splits=needed)
    except FloatingPointError:
        return math.inf, {}
    if objective not in metrics:
        raise HyperdiffError(
            f"search: objective must be one of {sorted(metrics)} (got {objective!r})"
        )
    value = metrics[objective]
    return (value if math.isfinite(value) else math.inf), metrics


def run_points(
    task: Task, points: Iterable[Values], *, method: str, seed: int = 0,
    objective: str = "val_loss", clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[], None] | None = None, spread: Spreader | None = None,
) -> SearchResult:
    """Evaluate the given natural values in order (a grid, or any list of candidates);
    ``progress()`` after each trial. The trials are independent: ``spread`` maps them (over
    the ranks of a process group: trial ``i`` on rank ``i % W``, every rank gets every
    trial), and a trial's ``time_s`` is when it ended on its rank, counted from that rank's
    start of the search (at least the previous trial's). ``seed``: see :data:`SEEDS`;
    ``objective``: one of :data:`OBJECTIVES`, both refused before the first training."""
    check_search_inputs("run_points", seed=seed, objective=objective)
    values = [dict(v) for v in points]
    per = trainings_per_trial(task, objective)
    start = clock()

    def trial(number: int) -> tuple[float, dict[str, float], float]:
        loss, metrics = evaluate_trial(task, values[number], seed=seed, objective=objective)
        return loss, metrics, clock() - start

    done = (spread or LocalSpreader()).map(trial, range(len(values)), f"{method} search",
                                           progress)
    trials, ended = [], 0.0
    for number, (loss, metrics, at) in enumerate(done):
        ended = max(ended, at)
        trials.append(Trial(number, values[number], loss, metrics, (number + 1) * per, ended))
    return SearchResult(method, tuple(trials))


def sample_point(dims: Sequence[Dimension], rng: np.random.Generator) -> list[Any]:
    """One uniform draw per dimension (uniform in log space for log ranges; a uniform choice
    for a discrete dimension)."""
    point = []
    for dim in dims:
        low, high = dim.range.low, dim.range.high
        if isinstance(dim.range, SearchChoices):
            point.append(dim.range.choices[int(rng.integers(len(dim.range.choices)))])
        elif dim.range.log:
            point.append(math.exp(rng.uniform(math.log(low), math.log(high))))
        else:
            point.append(rng.uniform(low, high))
    return point


def random_search(
    task: Task, budget: int, *, seed: int = 0, per_coordinate: Iterable[str] = (),
    objective: str = "val_loss", clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[], None] | None = None, spread: Spreader | None = None,
) -> SearchResult:
    """``budget`` trials at points drawn independently from the search space (one training
    each; one per fold with ``objective="outer_loss"``), mapped by ``spread``
    (:func:`run_points`).

    The draws depend only on ``seed`` (``numpy.random.default_rng(seed)``); every training
    uses the minibatch seed ``seed`` as well, so two calls with the same seed agree (also on
    any number of ranks). ``seed``: an int in [0, 2**63 - 1], as ``outer.seed``; ``objective``:
    one of :data:`OBJECTIVES` (both refused before the first training).
    """
    positive_int("random_search", "budget", budget)
    check_search_inputs("random_search", seed=seed, objective=objective)
    dims = dimensions(task, per_coordinate)
    rng = np.random.default_rng(seed)
    points = (assemble_values(dims, sample_point(dims, rng)) for _ in range(budget))
    return run_points(task, points, method="random", seed=seed, objective=objective,
                      clock=clock, progress=progress, spread=spread)


def optuna_available() -> bool:
    """Whether Optuna is installed (``pip install 'hyperdiff[search]'``)."""
    return importlib.util.find_spec("optuna") is not None


OPTUNA_MISSING = ("Optuna is not installed, so the TPE search is skipped; install it with "
                  "`pip install 'hyperdiff[search]'` (or `pip install optuna`)")


def tpe_search(
    task: Task, budget: int, *, seed: int = 0, per_coordinate: Iterable[str] = (),
    objective: str = "val_loss", clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[], None] | None = None, spread: Spreader | None = None,
) -> SearchResult:
    """``budget`` trials proposed by Optuna's TPE sampler (seeded; its logging silenced), each
    one training (one per fold with ``objective="outer_loss"``).

    The sampler's own time counts in the wall time, as it would for a user. Its trials are
    sequential (each is proposed from the results before it), so ``spread`` is not used:
    under a process group every rank runs the same search.

    ``seed``: an int in [0, 2**63 - 1], as ``outer.seed``; every training uses it as its
    minibatch seed, and the sampler, which takes seeds below 2**32, is seeded with
    ``seed % 2**32`` (the seed itself below 2**32). ``objective``: one of :data:`OBJECTIVES`.

    Raises:
        HyperdiffError: when Optuna is not installed; a ``seed`` or an ``objective`` outside
            those (before the first training).
    """
    positive_int("tpe_search", "budget", budget)
    check_search_inputs("tpe_search", seed=seed, objective=objective)
    if not optuna_available():
        raise HyperdiffError(f"tpe_search: {OPTUNA_MISSING}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dims = dimensions(task, per_coordinate)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed % SAMPLER_SEEDS))
    start, trials = clock(), []
    per = trainings_per_trial(task, objective)
    for number in range(budget):
        trial = study.ask()
        point = [trial.suggest_categorical(d.label, list(d.range.choices))
                 if isinstance(d.range, SearchChoices) else
                 trial.suggest_float(d.label, d.range.low, d.range.high, log=d.range.log)
                 for d in dims]
        values = assemble_values(dims, point)
        loss, metrics = evaluate_trial(task, values, seed=seed, objective=objective)
        study.tell(trial, loss if math.isfinite(loss) else 1e300)
        trials.append(Trial(number, values, loss, metrics, (number + 1) * per,
                            clock() - start))
        if progress is not None:
            progress()
    return SearchResult("tpe", tuple(trials))


def from_history(history: Sequence[StepRecord], *, method: str = "hyperdiff",
                 objective: str = "val_loss") -> SearchResult:
    """A hyperdiff run as a :class:`SearchResult`: one trial per successful outer step, with
    the driver's cumulative trainings and wall time (a failed step counts its trainings, also
    a failed last one: the result's totals are the last record's)."""
    trials = []
    for record in history:
        value = getattr(record, objective)
        if record.status != "ok" or value is None:
            continue
        metrics = {k: getattr(record, k) for k in ("val_loss", "selection_loss", "train_loss")
                   if getattr(record, k) is not None}
        trials.append(Trial(record.step, dict(record.hparams), float(value), metrics,
                            record.trainings, record.time_s))
    spent = (history[-1].trainings, history[-1].time_s) if history else None
    return SearchResult(method, tuple(trials), spent)


__all__ = ["OBJECTIVES", "OPTUNA_MISSING", "SAMPLER_SEEDS", "SEEDS", "Dimension", "SearchResult",
           "Trial", "as_tensors", "check_search_inputs", "dimensions", "evaluate_trial",
           "from_history", "natural_form", "objective_for", "optuna_available", "random_search",
           "run_points", "tpe_search", "trainings_per_trial", "trial_entry"]
