"""The run configuration: typed dataclasses, loaded from TOML and validated key by key.

A config is resolved in four layers: the dataclass defaults below, then the values that the
chosen task recommends (its ``DEFAULTS``), then the TOML file, then ``--set key=value``
overrides. Every error names the key path and what is valid, e.g.
``config: outer.lr must be a number > 0 (got -1)`` or
``config: unknown key outer.lrr; [outer] accepts clip, lr, ... (did you mean outer.lr?)``.
The config is data only: it is parsed with :mod:`tomllib`, never executed.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path, PurePath
from types import UnionType
from typing import Any, Union, cast, get_args, get_origin, get_type_hints

from hyperdiff.app.rundir.paths import inside_run_dir
from hyperdiff.app.tasks import (
    DEFAULT_TASK,
    check_task_name,
    check_task_params,
    factory_reference,
    task_defaults,
)
from hyperdiff.app.tasks.loader import (
    check_types,
    factory_parameters,
    matches,
    resolve_factory,
    type_hints,
    type_text,
)
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.methods.registry import (
    METHODS,
    SCHEDULES,
    method_constructor,
    registered_constructor,
)
from hyperdiff.tuner.online_plan import LOWERING, SCHEDULE_OVER
from hyperdiff.tuner.online_rescue import TRIES as RESCUE_TRIES
from hyperdiff.tuner.online_retry import TRIES as RETRY_TRIES
from hyperdiff.tuner.outer_steps import DEFAULT_OFFLINE, offline_optimizers
from hyperdiff.tuner.stopping import CHAOS_RATIO
from hyperdiff.tuner.windows import window_starts

ONLINE_GROWTH = 0.2
"""Online: ``outer.window_growth`` when not set (windows longer by 0.2 x the steps trained before
them; docs/online.md, ``benchmarks/online_cost.py``)."""

ONLINE_BETAS = (0.5, 0.99)
"""Online: ``outer.beta1`` and ``outer.beta2`` when not set (moving averages over about 2 and 100
windows instead of torch's 10 and 1000; (0.5, 0.9) and torch's measured beside them in
``benchmarks/results/online_betas_s26.json``; docs/online.md, "When the run ends worse than its
start")."""

ONLINE_SETTLE = 0.75
"""Online: ``outer.settle`` when not set: the windows after 75% of the run train plainly at the
values reached (on the suite's tasks the last window, whose outer step moves values that no
step trains with; ``benchmarks/results/online_settle.json``, docs/online.md "Settled values")."""

ONLINE_SCHEDULE_OVER = "steps"
"""Online: ``outer.schedule_over`` when not set: the outer learning rate's cosine runs over the
run's inner steps, not its growing windows (whose index runs ahead of the training): own
model's test loss x0.974 (geometric mean of 16 task x start rows, 3-seed means) with as many rows
at or below the best lr-free optimizer (``benchmarks/results/online_cosine_steps_s27.json``,
docs/online.md "A cosine over the inner steps")."""

ONLINE_LOWERING = 0.2
"""Online: ``outer.lowering`` when not set: an outer move that lowers the learning rate of the
rest of the run keeps a fifth of its length (window hypergradients favour smaller rates, the
short-horizon bias): own model's test loss x0.932 (geometric mean of 16 task x start rows, 3-seed
means), at or below the best lr-free optimizer on 12 rows instead of 11, 5 of 6 from the tasks'
own starts instead of 4 (``benchmarks/results/online_lowering_s28.json``, docs/online.md "Why
tabular_mlp's online run ends worse than not tuning")."""

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def option(default: Any, help: str, *, choices: Any = None, low: float | None = None,
           high: float | None = None, open_low: bool = False, open_high: bool = False,
           check: Callable[[str, str], Any] | None = None) -> Any:
    """A config field with its documentation and valid range (``choices`` may be a callable;
    ``check(value, "config: section.key")`` raises for a non-empty string that is invalid)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high,
            "open_low": open_low, "open_high": open_high, "check": check}
    return field(default=default, metadata=meta)


MAX_SEED = 2**63 - 1
"""The largest outer seed: torch takes seeds as signed 64-bit ints (its Sobol engine, ...)."""
MAX_DATA_SEED = 2**32 - 1
"""The largest data seed: scikit-learn's and NumPy's ``random_state`` take 32-bit ones."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = option(DEFAULT_TASK, "built-in task (see `hyperdiff tasks`), or your own "
                       "task factory as 'package.module:build' or 'path/to/file.py:build' "
                       "(naming a module runs its code)")
    selection_fraction: float = option(
        0.5, "share of the validation split held out from hypergradients; used only to pick "
        "the best step and to stop early (0: off)", low=0.0, high=1.0, open_high=True)
    cv_folds: int = option(0, "k-fold cross-validation over train+validation as the outer "
                           "loss (0: hold-out validation)", low=0)
    data_seed: int = option(0, "seed of the data split (and label noise)", low=0,
                            high=MAX_DATA_SEED)
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the task's own parameters, passed to its factory as keyword arguments and "
        "checked against its signature: a table [task.params] or --set task.params.NAME=VALUE "
        "(e.g. mlp_digits takes hidden)"})


@dataclass(frozen=True)
class InnerConfig:
    steps: int = option(100, "inner training steps T per outer step", low=1)
    warm_start: bool = option(False, "offline: start each outer step from the last theta_T "
                              "instead of theta_0")


@dataclass(frozen=True)
class MethodConfig:
    name: str = option("reverse", "hypergradient method; other keys of [method] are its "
                       "options (outer.mode = online: curvature when not set)",
                       choices=lambda: list(METHODS))
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "method options"})


@dataclass(frozen=True)
class OuterConfig:
    optimizer: str = option("auto", "optimizer of the raw hyperparameters: torch.optim's, or "
                            "signstep / trust (offline only; docs/driver.md); auto: "
                            f"{DEFAULT_OFFLINE} offline, adam online",
                            choices=lambda: ["auto", *offline_optimizers()])
    lr: float = option(0.05, "outer learning rate (raw units: 0.05 changes a positive "
                       "hyperparameter by about 5%); online, when not set: min(0.7, 10 / "
                       "windows), the run's windows (ceil(inner.steps / outer.window) without "
                       "outer.window_growth)", low=0.0, open_low=True)
    schedule: str = option("auto", "outer learning-rate schedule: constant, cosine decay to 0 "
                           "over stop.max_steps, or auto: constant with signstep (it anneals "
                           "itself), cosine otherwise", choices=["auto", *SCHEDULES])
    clip: float = option(0.0, "clip the hypergradient to this L2 norm (0: off)", low=0.0)
    samples: int = option(1, "trainings with different minibatch seeds averaged per step; "
                          "online: validation samples per window (outer.val_batch rows each; "
                          "a task's value is for offline runs)", low=1)
    auto_samples: bool = option(False, "choose the samples per step: 2, then more until the "
                                "hypergradient's signal-to-noise ratio is >= 1 (replaces "
                                "outer.samples)")
    max_samples: int = option(16, "the most samples per step with outer.auto_samples", low=2)
    explore: int = option(8, "offline: quasi-random points (Sobol) tried at outer steps "
                          "1..explore around the start before the gradient phase, which goes on "
                          "from the best (0: none; when: outer.explore_when; docs/driver.md)",
                          low=0)
    explore_decades: float = option(2.0, "offline: half-width in decades of outer.explore's "
                                    "box around the start (log-odds for interval values)",
                                    low=0.0, open_low=True, high=10.0)
    explore_when: str = option("weak", "offline: when outer.explore's points are tried: "
                               "always; broken: only when step 0 fails, trains to a loss no "
                               "better than the untrained model's or has a chaotic "
                               "hypergradient; weak: also when its training removes less than "
                               "20% of the untrained model's loss or its hypergradient is "
                               "steep (docs/driver.md)",
                               choices=["always", "weak", "broken"])
    confirm: int = option(0, "offline: more trainings (other minibatch seeds) of a step whose "
                          "selection loss beats the best so far; it is ranked by their mean "
                          "(0: none; refused without a selection split; docs/driver.md)", low=0)
    confirm_chaotic: int = option(2, "offline: as many more trainings of a would-be best "
                                  "step whose hypergradient is chaotic (norm above 30 x "
                                  "max(|validation loss|, 1)); skipped with warm starts, "
                                  "discrete choices, data-parallel methods, a fixed "
                                  "training batch and no selection split (0: none; "
                                  "docs/driver.md)", low=0)
    revert: int = option(0, "offline: when the selection loss rose at this many steps in a "
                         "row after the best one, go back to the best step's values with the "
                         "outer learning rate halved (0: never; docs/driver.md)", low=0)
    common_seed: bool = option(False, "offline: every outer step trains on the same minibatch "
                               "seeds (common random numbers; false: each step its own; "
                               "docs/driver.md)")
    seed: int = option(0, "base seed of the minibatch orders of the outer steps' trainings "
                       "(offline, meta); online: of the validation draws (the one training "
                       "follows outer.train_seed)", low=0, high=MAX_SEED)
    train_seed: int = option(-1, "online: seed of the one training's minibatch order and "
                             "dropout (a plain training at this seed reads the same batches; "
                             "-1: the task's problem's own seed); offline and meta: -1 (their "
                             "trainings' seeds come from outer.seed)", low=-1, high=MAX_SEED)
    tie_steps: int = option(0, "first outer steps in which each vector hyperparameter moves as "
                            "one (mean hypergradient of its entries; 0: off)", low=0)
    mode: str = option("offline", "offline: retrain T steps per outer step; online: tune "
                       "during one run of inner.steps (docs/online.md); meta: every outer "
                       "step adapts on a batch of new tasks of the task's distribution "
                       "(docs/meta.md)", choices=["offline", "online", "meta"])
    meta_batch: int = option(4, "meta: tasks per outer step, their hypergradients averaged",
                             low=1)
    meta_test_tasks: int = option(20, "meta: held-out tasks on which the report adapts the "
                                  "initial and tuned values", low=1)
    meta_val_tasks: int = option(0, "meta: fixed validation tasks on which every outer step's "
                                 "values are scored after adaptation, choosing the best step "
                                 "(0: none, the result is the final values)", low=0)
    window: int = option(5, "online: inner steps per hyper-step (1: hypergradient descent)",
                         low=1)
    window_growth: float = option(0.0, "online: a window that starts at inner step t trains "
                                  "outer.window + floor(window_growth * t) steps (dense "
                                  "hypergradients early, sparse later; 0: outer.window each); "
                                  f"outer.mode = online, when not set: {ONLINE_GROWTH:g}",
                                  low=0.0)
    backprop: int = option(0, "online reverse: backpropagate through the last this many steps "
                           "of each window (0: all)", low=0)
    val_batch: int = option(0, "online: validation rows drawn per hyper-step (0: all)", low=0)
    normalize: bool = option(False, "online: divide each hypergradient by its L2 norm before "
                             "the outer step (with sgd: every step moves the raw values by lr)")
    beta1: float = option(0.9, "online: the outer Adam's (or AdamW's) beta1, the memory of its "
                          "hypergradient average (about 1 / (1 - beta1) windows); outer.mode = "
                          f"online, when not set: {ONLINE_BETAS[0]:g}", low=0.0, high=1.0,
                          open_high=True)
    beta2: float = option(0.999, "online: the outer Adam's (or AdamW's) beta2, the memory of its "
                          "squared-hypergradient average; outer.mode = online, when not set: "
                          f"{ONLINE_BETAS[1]:g}", low=0.0, high=1.0, open_high=True)
    settle: float = option(1.0, "online: stop tuning once the run has trained this fraction of "
                           "its steps; the rest trains plainly at the values reached (no "
                           "tangents, validation or outer steps; 1: tune to the end; "
                           f"docs/online.md); outer.mode = online, when not set: "
                           f"{ONLINE_SETTLE:g}", low=0.0, open_low=True, high=1.0)
    settle_tol: float = option(0.0, "online: stop tuning once no value changed by more than "
                               "this (relative) over the last 2 windows (0: off; as "
                               "outer.settle otherwise)", low=0.0)
    hot_start: str = option("auto", "online: at 10% of the run, if it trained more than 2x "
                            "the optimization time that its values by then give those steps: "
                            "restart from theta_0 with the learning rate divided by that ratio, "
                            "warn, or ignore; auto: restart with method curvature, else ignore "
                            "(docs/online.md)", choices=["auto", "restart", "warn", "ignore"])
    rescue: int = option(RESCUE_TRIES, "online: a broken start (its first window fails, trains "
                         "to far worse than the untrained model, or has a chaotic "
                         "hypergradient) starts over from theta_0 with the learning rate cut "
                         "10x, at most this many times (0: the guard refuses it; "
                         "docs/online.md)", low=0)
    retry: int = option(RETRY_TRIES, "online: a weak start (at its first window's pace the run "
                        "would remove under 10% of the untrained model's loss, and the window's "
                        "hypergradient asks for a larger learning rate) or a hot one (its first "
                        "window ends 5% above that loss, asking for a smaller one) starts over "
                        "from theta_0 with the learning rate 10x larger or smaller, one way, at "
                        "most this many times (0: never; docs/online.md)", low=0)
    schedule_over: str = option("windows", "online: what outer.schedule's cosine runs over: the "
                                "run's windows (window h of W: (1 + cos(pi h / W)) / 2) or its "
                                "inner steps (the window's first step t of N: (1 + cos(pi t / "
                                "N)) / 2; docs/online.md); outer.mode = online, when not set: "
                                f"{ONLINE_SCHEDULE_OVER}", choices=list(SCHEDULE_OVER))
    lowering: float = option(1.0, "online: the fraction of its move that an outer step keeps "
                             "where it lowers the learning rate of the rest of the run (window "
                             "hypergradients favour smaller rates: the short-horizon bias; 1: "
                             "every move as the outer optimizer makes it; docs/online.md); "
                             f"outer.mode = online, when not set: {ONLINE_LOWERING:g}",
                             low=LOWERING.low, open_low=True, high=LOWERING.high)


@dataclass(frozen=True)
class StopConfig:
    max_steps: int = option(30, "budget of outer steps", low=1)
    max_time_s: float = option(0.0, "wall-time budget in seconds (0: none)", low=0.0)
    patience: int = option(10, "stop after this many steps without a better selection "
                           "loss (0: off)", low=0)
    min_delta: float = option(0.0, "smallest improvement that counts", low=0.0)
    grad_tol: float = option(0.0, "converged below this hypergradient norm (0: off)", low=0.0)
    step_tol: float = option(0.0, "converged when no raw value moves more than this "
                             "(0: off)", low=0.0)
    travel: int = option(3, "offline: stop.patience does not count a step in which a scalar "
                         "log or interval value still travels: moved the same way at each of "
                         "the last this many steps, by at least the outer lr a step on average "
                         "(0: off; docs/driver.md)", low=0)
    extend: int = option(0, "offline: at most this many outer steps past stop.max_steps while a "
                         "value still travels (the stop.travel test; constant outer schedule "
                         "and stop.travel >= 1 only, refused otherwise; 0: off; docs/driver.md)",
                         low=0)
    chaos_ratio: float = option(0.0, "offline: a step whose hypergradient norm is above this "
                                "many times max(|validation loss|, 1) is chaotic (trained near "
                                f"the edge of stability) and ranked below every calm step (0: "
                                f"off; measured at {CHAOS_RATIO:g}, helps at the suite's lengths "
                                "and hurts at 3x: docs/driver.md)", low=0.0)


@dataclass(frozen=True)
class GuardConfig:
    shrink: float = option(0.5, "outer learning-rate factor after a failed step", low=0.0,
                           high=1.0, open_low=True, open_high=True)
    max_failures: int = option(5, "failed steps in a row before the run stops", low=1)
    max_loss_ratio: float = option(1e6, "a step fails when a loss exceeds this many times "
                                   "max(|initial loss|, 1)", low=1.0,
                                   open_low=True)


@dataclass(frozen=True)
class ReportConfig:
    seeds: int = option(3, "seeds averaged in the final report (initial vs tuned)", low=1)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = option("", "run directory of a new run, relative to the working directory "
                      "without '..' (empty: runs/<task>-<date>-<time>; any other place: "
                      "--out)")
    checkpoint_every: int = option(1, "write a checkpoint every this many outer steps", low=1)
    checkpoint_seconds: float = option(5.0, "and at least this many seconds after the last one "
                                       "(the last step's is always written; a killed run "
                                       "redoes at most this much work, identically; 0: every "
                                       "checkpoint_every steps; under torchrun always 0)",
                                       low=0.0)


@dataclass(frozen=True)
class RunConfig:
    device: str = option("cpu", 'where tuning runs: "cpu", "cuda", "cuda:N", "mps" or "auto" '
                         "(CUDA when available)")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: str = option("", "TensorBoard log directory inside the run directory "
                              "(relative, no '..', not a run file; empty: off; needs pip "
                              "install 'hyperdiff[tensorboard]')", check=inside_run_dir)
    csv: str = option("", "CSV file with one row per outer step inside the run directory "
                      "(relative, no '..', not a run file; empty: off)", check=inside_run_dir)
    mlflow: str = option("", "MLflow store directory inside the run directory (relative, no "
                         "'..', not a run file; empty: off; needs pip install "
                         "'hyperdiff[mlflow]')", check=inside_run_dir)


@dataclass(frozen=True)
class DistributedConfig:
    data_parallel: bool = option(False, "under torchrun: each rank trains on its shard of every "
                                 "batch (false: the trainings of a step are spread over ranks; "
                                 "outer.mode = online under torchrun needs true)")
    timeout_s: float = option(300.0, "seconds to wait for a rank that is alive but does not "
                              "arrive, before the run ends naming it", low=0.0, open_low=True)


@dataclass(frozen=True)
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict; method options are flattened into ``[method]``."""
        data = asdict(self)
        options = data["method"].pop("options")
        data["method"].update(options)
        return data

    def to_toml(self, comments: bool = False) -> str:
        """TOML text that :func:`load_config` reads back to an equal config."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            helps = _helps(SECTIONS[section])
            for key, value in values.items():
                text = f"{key} = {_toml_value(value)}"
                if comments and key in helps:
                    text = f"{text:<32} # {helps[key]}"
                lines.append(text)
            lines.append("")
        return "\n".join(lines)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


ONLINE_DEFAULTS: dict[str, Any] = {"method.name": "curvature",
                                   "outer.window_growth": ONLINE_GROWTH,
                                   "outer.beta1": ONLINE_BETAS[0],
                                   "outer.beta2": ONLINE_BETAS[1],
                                   "outer.settle": ONLINE_SETTLE,
                                   "outer.schedule_over": ONLINE_SCHEDULE_OVER,
                                   "outer.lowering": ONLINE_LOWERING}
"""What ``outer.mode = "online"`` changes in the defaults (a task's defaults, the TOML file and
``--set`` still win); chosen by ``benchmarks/online_defaults.py`` (docs/online.md)."""

OFFLINE_ONLY_DEFAULTS = ("outer.samples",)
"""A task's defaults that are for offline runs: its ``outer.samples`` counts trainings per
step; online it would count validation samples per window (1 unless the TOML file or
``--set`` sets it)."""

ONLINE_LR_CAP = 0.7
"""Online: the largest outer lr :func:`online_lr` gives (0.5 before the growing windows; 0.5,
0.7 and 1 measured in docs/online.md)."""

ONLINE_TRAVEL = 10.0
"""Online: ``outer.lr * windows`` when ``outer.lr`` is not set (:func:`online_lr`)."""


def online_lr(steps: int, window: int, growth: float = 0.0) -> float:
    """The online outer learning rate when none is set: ``min(0.7, 10 / W)`` for the run's
    ``W`` windows (``ceil(steps / window)`` without growth, :mod:`hyperdiff.tuner.windows`).

    Adam moves a raw value by at most about ``lr`` per window, and a cosine decay over W
    windows sums to ``lr W / 2``: 5 in log units, a factor of about 150, whatever the run's
    length, so a start 100x off can be reached in one run; 0.7 caps one window's move at a
    factor of e^0.7 (short runs, whose growing windows are few: 9 for 100 steps of K=5, which
    travel 0.7 x 9 / 2 = 3.2, a factor of 23). With the cosine over the inner steps
    (``outer.schedule_over = "steps"``, the online default) growing windows sum to more, as
    their first steps lag their index: the factors sum to 6.4 instead of (W + 1) / 2 = 5 for
    those 9 windows, 16.9 instead of 11 for the 21 of 1000 steps (travel 4.5 instead of 3.5,
    8.0 instead of 5.2).

    >>> online_lr(100, 5), online_lr(100, 5, 0.2), online_lr(2000, 10)
    (0.5, 0.7, 0.05)
    """
    return min(ONLINE_LR_CAP, ONLINE_TRAVEL / len(window_starts(steps, window, growth)))


def reads_curvature_scale(name: Any, options: dict[str, Any], mode: Any) -> bool:
    """Whether method ``name`` with ``options`` runs the curvature model in ``outer.mode``
    ``mode`` (``curvature``, and offline ``truncated`` with ``head = "curvature"``: a head is
    refused online), whose ``curvature_scale`` the config writes."""
    return name == "curvature" or (name == "truncated" and options.get("head") == "curvature"
                                   and mode != "online")


def legacy_values(source: dict[str, Any]) -> dict[str, Any]:
    """A run directory's stored config with the values that reproduce what the code did when
    it was written, for keys added since (a stored config lists every key of its time).

    A config without ``outer.window_growth`` was written before growing windows and before
    online runs drew ``outer.samples`` validation samples: its online windows are all K steps
    (growth 0) and its ``outer.samples`` (a task default stored with it, e.g. mlp_digits' 2)
    was ignored online, so it reads as 1 there. A config without ``outer.explore_when`` was
    written when ``outer.explore``'s points ran after every start (``always``), and one without
    ``outer.explore`` before the global phase (0 points). One without ``outer.beta1`` was
    written when the outer Adam had torch's betas (0.9, 0.999) online too. One without
    ``outer.rescue`` was written before the online rescue of a broken start (0 cuts), one
    without ``outer.settle`` when online runs tuned to their end (1), one without
    ``outer.schedule_over`` when the outer learning rate's cosine ran over the windows, one
    without ``outer.lowering`` when every outer move was kept whole (1), one without
    ``outer.retry`` before the retries of a weak or hot start (0), one without
    ``outer.confirm`` before a new best was confirmed (0), one without ``outer.confirm_chaotic``
    before a chaotic one was (0), one without ``outer.revert`` before
    the return to the best values (0), one without ``outer.common_seed`` when each step drew its
    own minibatch seeds (false);
    ``outer.train_seed`` trained online on its problem's own seed: the default (-1), so it
    needs no entry here. A ``[stop]`` without ``stop.travel`` was written when early stopping
    counted every step (0), one without ``stop.extend`` when the budget did not wait for a
    travelling value (0), one without ``stop.chaos_ratio`` when chaotic steps were ranked by their
loss (0). A ``[method]`` of the curvature model without
    ``curvature_scale`` was written when its scale was the batch's rows on a fixed batch too
    (``"rows"``; session 34 made it 1 there: ``"auto"``)."""
    method, outer = source.get("method"), source.get("outer")
    mode = outer.get("mode") if isinstance(outer, dict) else None
    if (isinstance(method, dict) and "curvature_scale" not in method
            and reads_curvature_scale(method.get("name"), method, mode)):
        source = _merge(source, {"method": {"curvature_scale": "rows"}})
    stop = source.get("stop")
    if isinstance(stop, dict) and "travel" not in stop:
        source = _merge(source, {"stop": {"travel": 0}})
    if isinstance(stop, dict) and "extend" not in stop:
        source = _merge(source, {"stop": {"extend": 0}})
    if isinstance(stop, dict) and "chaos_ratio" not in stop:
        source = _merge(source, {"stop": {"chaos_ratio": 0.0}})
    outer = source.get("outer", {})
    if not isinstance(outer, dict):
        return source
    legacy: dict[str, Any] = {}
    if "window_growth" not in outer:
        legacy["window_growth"] = 0.0
        if outer.get("mode") == "online":
            legacy["samples"] = 1
    if "beta1" not in outer:
        legacy["beta1"], legacy["beta2"] = 0.9, 0.999
    if "rescue" not in outer:
        legacy["rescue"] = 0
    if "settle" not in outer:
        legacy["settle"] = 1.0
    if "schedule_over" not in outer:
        legacy["schedule_over"] = "windows"
    if "lowering" not in outer:
        legacy["lowering"] = 1.0
    if "retry" not in outer:
        legacy["retry"] = 0
    if "confirm" not in outer:
        legacy["confirm"] = 0
    if "confirm_chaotic" not in outer:
        legacy["confirm_chaotic"] = 0
    if "revert" not in outer:
        legacy["revert"] = 0
    if "common_seed" not in outer:
        legacy["common_seed"] = False
    if "explore_when" not in outer:
        legacy["explore_when"] = "always"
        if "explore" not in outer:
            legacy["explore"] = 0
    return _merge(source, {"outer": legacy}) if legacy else source


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                *, data: dict[str, Any] | None = None, stored: bool = False) -> Config:
    """Resolve a config: defaults, task defaults, the TOML file (or ``data``), overrides.

    ``overrides`` are ``"section.key=value"`` strings; the value is read as TOML (a bare word
    is a string). ``stored``: the file is a run directory's ``config.toml`` (every key the code
    had when the run started), read with :func:`legacy_values` for keys added since.
    """
    source: dict[str, Any] = {}
    if path is not None:
        try:
            source = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HyperdiffError(f"config: file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise HyperdiffError(
                f"config: {str(path)!r} must be a TOML file (got a directory)") from None
        except UnicodeDecodeError as err:
            raise HyperdiffError(
                f"config: {str(path)!r} must be UTF-8 text, as TOML requires (got a byte "
                f"{err.object[err.start]:#04x} at offset {err.start} that is not UTF-8)"
            ) from None
        except OSError as err:
            raise HyperdiffError(
                f"config: {str(path)!r} must be a readable file (got {err.strerror})") from None
        except tomllib.TOMLDecodeError as err:
            raise HyperdiffError(f"config: {path} is not valid TOML: {err}") from None
    if stored:
        source = legacy_values(source)
    if data is not None:
        source = _merge(source, data)
    for item in overrides:
        source = _merge(source, _parse_override(item))
    config = resolve(source)
    if not stored:  # a stored config lists every key; it ran with what it holds
        _check_unread_stop(source, config)
        _check_unread_mode_keys(source, config)
    return config


REFUSED_WHEN_BUILT = {("outer", key) for key in (
    "confirm", "confirm_chaotic", "revert", "common_seed", "explore", "explore_when",
    "train_seed")}
"""Mode-only keys that the plans refuse with their own words when the run is built
(``hyperdiff.app.plans``), and :func:`_check_unread_stop` the ``[stop]`` keys it covers."""

MODE_PREFIX = re.compile(r"(offline|online|meta)\b[^:]{0,20}:")
"""A key's help that starts with the mode reading it (``"online: ..."``, ``"online reverse:
..."``) declares it unread by the other modes."""


def mode_only_keys() -> dict[tuple[str, str], str]:
    """``(section, key) -> mode`` for every config key only one ``outer.mode`` reads (its help
    starts with that mode, :data:`MODE_PREFIX`); ``outer.mode`` itself is not one."""
    found = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            match = MODE_PREFIX.match(f.metadata.get("help", ""))
            if match and (section, f.name) != ("outer", "mode"):
                found[(section, f.name)] = match.group(1)
    return found


def _check_unread_mode_keys(source: dict[str, Any], config: Config) -> None:
    """Refuse a key that only another ``outer.mode`` reads, set by ``source`` (the TOML file
    and ``--set``) to a value other than its default for this mode or off (0, false), so that
    no setting is ignored silently (``[stop]`` keys online: :func:`_check_unread_stop`)."""
    mode = config.outer.mode
    readers = {k: f"{reader} runs only" for k, reader in mode_only_keys().items()}
    readers.update({k: "offline and online runs" for k in NOT_READ_BY_META if mode == "meta"})
    for (section, key), reader in readers.items():
        given = source.get(section)
        if reader.startswith(mode) or not isinstance(given, dict) or key not in given or (
                section, key) in REFUSED_WHEN_BUILT or (section == "stop" and (
                    mode == "online" or key in ("travel", "extend"))):
            continue
        value = getattr(getattr(config, section), key)
        rest = {k: v for k, v in given.items() if k != key}
        default = getattr(getattr(resolve({**source, section: rest}), section), key)
        if value != default and value:
            raise HyperdiffError(
                f"config: {section}.{key} must be left at its default {default!r} with "
                f"outer.mode = {mode!r} (it is read by {reader}; got {value!r})")


NOT_READ_BY_META = (("outer", "samples"), ("outer", "auto_samples"), ("outer", "max_samples"))
"""Keys that offline and online runs read and meta runs do not (a meta step's trainings are
its ``outer.meta_batch`` tasks; no selection split ranks them: ``outer.meta_val_tasks``
does)."""


UNREAD_STOP = {"online": ("an online run is one training of inner.steps steps: it has no "
                          "outer-step budget, time budget, early stopping or convergence test"),
               "meta": "stop.travel and stop.extend are the offline plan's rules; meta runs do not "
                       "read them"}
"""Why an ``outer.mode`` does not read ``[stop]`` keys: all of them online, ``stop.travel``
and ``stop.extend`` in meta runs."""

UNRANKED_META = ("without outer.meta_val_tasks a meta run has no early stopping: each step's "
                 "loss is of other tasks, so a run of steps without a lower one is the draw's "
                 "luck; 0 turns it off")
"""Why a meta run without validation tasks does not read ``stop.patience``."""


def _check_unread_stop(source: dict[str, Any], config: Config) -> None:
    """Refuse a ``[stop]`` key that ``source`` (the TOML file and ``--set``) moves off its
    default in a mode that does not read it, so that no setting is ignored silently (a meta
    run's ``stop.patience`` may also be 0, off, where it has no validation tasks)."""
    mode, stop = config.outer.mode, source.get("stop")
    if mode not in UNREAD_STOP or not isinstance(stop, dict):
        return
    unranked = mode == "meta" and not config.outer.meta_val_tasks
    unread = [key for key in stop if mode == "online" or key in ("travel", "extend")
              or (unranked and key == "patience")]
    if not unread:
        return
    defaults = resolve({**source, "stop": {k: v for k, v in stop.items() if k not in unread}})
    for key in unread:
        value, default = getattr(config.stop, key), getattr(defaults.stop, key)
        if value != default and (mode == "online" or key != "patience" or value):
            why = UNRANKED_META if mode == "meta" and key == "patience" else UNREAD_STOP[mode]
            raise HyperdiffError(
                f"config: stop.{key} must be left at its default {default!r} with outer.mode "
                f"= {mode!r} ({why}; got {value!r})")


def resolve(source: dict[str, Any]) -> Config:
    """Validate ``source`` (nested dict as read from TOML) over the defaults."""
    for section, values in source.items():
        if section not in SECTIONS:
            raise HyperdiffError(f"config: unknown section [{section}]; valid sections are "
                                 f"{', '.join(f'[{s}]' for s in SECTIONS)}"
                                 f"{_suggest(section, list(SECTIONS), '[', ']')}")
        if not isinstance(values, dict):
            raise HyperdiffError(f"config: {section} must be a table [{section}] "
                                 f"(got {describe(values)})")
    task_name = source.get("task", {}).get("name", DEFAULT_TASK)
    _check_value("task", "name", task_name, _meta(TaskConfig, "name"), str)
    check_task_name(task_name, "config: task.name")
    params = _task_params(task_name, source.get("task", {}).get("params", {}))
    merged: dict[str, Any] = {}
    defaults = task_defaults(task_name, params)
    online = source.get("outer", {}).get("mode", defaults.get("outer.mode")) == "online"
    if online:  # the online mode's own defaults, under the task's offline-free ones
        defaults = {**ONLINE_DEFAULTS, **{k: v for k, v in defaults.items()
                                          if k not in OFFLINE_ONLY_DEFAULTS}}
    chosen = source.get("method", {}).get("name", defaults.get("method.name"))
    if chosen != defaults.get("method.name"):  # the task's method options belong to its method
        defaults = {k: v for k, v in defaults.items()
                    if not k.startswith("method.") or k == "method.name"}
    for dotted, value in defaults.items():
        merged = _merge(merged, _nest(dotted, value))
    merged = _merge(merged, source)
    merged["task"] = {**merged.get("task", {}), "params": params}  # the checked ones, only
    built = {}
    for section, cls in SECTIONS.items():
        built[section] = _build_section(section, cls, merged.get(section, {}))
    if online and "lr" not in merged.get("outer", {}):
        built["outer"] = replace(built["outer"], lr=online_lr(
            built["inner"].steps, built["outer"].window, built["outer"].window_growth))
    _check_train_seed(built["outer"])
    if reads_curvature_scale(built["method"].name, built["method"].options,
                             built["outer"].mode):
        # the scale's rule, written out: a stored config without it is older (legacy_values)
        options = {**built["method"].options}
        options.setdefault("curvature_scale", "auto")
        built["method"] = replace(built["method"], options=options)
    if built["task"].cv_folds == 1:
        raise HyperdiffError("config: task.cv_folds must be 0 (hold-out validation) or an int "
                             ">= 2 (got 1)")
    _check_log_paths(built["log"])
    return Config(**built)


def _check_log_paths(log: LogConfig) -> None:
    """Raise if the CSV file would take the place of the TensorBoard or MLflow directory (or
    of one of the folders above it) or lie inside one (the logger owns every file there, e.g.
    MLflow's database), or if those two directories nest."""
    csv = PurePath(log.csv).parts
    for key in ("tensorboard", "mlflow"):
        folder = PurePath(getattr(log, key)).parts
        if log.csv and folder and folder[: len(csv)] == csv:
            raise HyperdiffError(
                f"config: log.csv must not be log.{key}'s directory or a folder above it "
                f"(got {log.csv!r} with log.{key} = {getattr(log, key)!r})")
        if log.csv and folder and csv[: len(folder)] == folder:
            raise HyperdiffError(
                f"config: log.csv must be a file outside log.{key}'s directory, whose files "
                f"the {key} logger owns (got {log.csv!r} with log.{key} = "
                f"{getattr(log, key)!r})")
    board, store = PurePath(log.tensorboard).parts, PurePath(log.mlflow).parts
    shorter = min(len(board), len(store))
    if log.tensorboard and log.mlflow and board[:shorter] == store[:shorter]:
        raise HyperdiffError(
            f"config: log.mlflow must be a directory apart from log.tensorboard's, neither "
            f"inside the other (got {log.mlflow!r} with log.tensorboard = {log.tensorboard!r})")


def _check_train_seed(outer: OuterConfig) -> None:
    """Refuse ``outer.train_seed`` outside online runs (offline and meta trainings take their
    seeds from ``outer.seed``)."""
    if outer.mode != "online" and outer.train_seed != -1:
        raise HyperdiffError(f"config: outer.train_seed must be -1 with outer.mode = "
                             f"{outer.mode!r} (it seeds an online run's one training; "
                             "offline and meta trainings take their minibatch seeds from "
                             f"outer.seed; got {outer.train_seed})")


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name not in TABLES}
    kwargs: dict[str, Any] = {}
    extra = {k: v for k, v in values.items() if k not in known}
    if section == "task":  # params: checked by _task_params before the task's defaults
        kwargs["params"] = dict(extra.pop("params", {}))
    if section == "method":
        name = values.get("name", known["name"].default)
        _check_value(section, "name", name, known["name"].metadata, str)
        kwargs["options"] = _method_options(name, extra)
    elif extra:
        key = next(iter(extra))
        names = [f.name for f in fields(cls) if f.name != "options"]
        hint = _suggest(key, names, section + ".")
        if section == "task" and key in factory_parameters(resolve_factory(factory_reference(
                values.get("name", DEFAULT_TASK))))[0]:
            hint = f" (did you mean task.params.{key}?)"
        raise HyperdiffError(
            f"config: unknown key {section}.{key}; [{section}] accepts {', '.join(names)}{hint}")
    for name, f in known.items():
        if name in values:
            kwargs[name] = _check_value(section, name, values[name], f.metadata, hints[name])
    return cls(**kwargs)


TABLES = ("options", "params")  # fields that hold a table of keyword arguments


def _task_params(task: str, params: Any) -> dict[str, Any]:
    """``[task.params]`` checked against the signature of task ``task``'s factory (names, types
    where it annotates them: :func:`check_task_params`) and as TOML values that config.toml
    can hold."""
    check_task_params(task, params, caller="config", prefix="task.params.")
    for key, value in params.items():
        _check_toml_value(f"task.params.{key}", value)
    hints = type_hints(resolve_factory(factory_reference(task)))
    return {key: _as_hinted(value, hints.get(key)) for key, value in params.items()}


def _as_hinted(value: Any, hint: Any) -> Any:
    """A TOML array given for a parameter typed as a tuple, as that tuple."""
    tuples = [hint, *get_args(hint)] if get_origin(hint) in (Union, UnionType) else [hint]
    if isinstance(value, list) and any(get_origin(h) is tuple and matches(value, h)
                                       for h in tuples):
        return tuple(value)
    return value


def _check_toml_value(where: str, value: Any) -> None:
    """Refuse what TOML cannot write back (dates and times) at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_toml_value(f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):  # a tuple: an array read for a tuple-typed param
        for item in value:
            _check_toml_value(where, item)
    elif not isinstance(value, (str, int, float)):
        raise HyperdiffError(f"config: {where} must be a string, number, boolean, array or "
                             f"table (got {describe(value)})")


def _method_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    # every registered method's options are its constructor's (online-only ones too); the
    # mode's own rules (which options a segment reads) are app/plans.py's
    constructor = registered_constructor(name) if name in METHODS else method_constructor(name)
    params = inspect.signature(constructor).parameters
    hints = type_hints(constructor)
    valid = [p for p in params if params[p].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                     inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for key in valid:
        if params[key].default is inspect.Parameter.empty and key not in options:
            raise HyperdiffError(
                f"config: method.{key} must be given for method {name!r} "
                f"({type_text(hints[key]) if key in hints else 'required'})"
            )
    for key in options:
        if key not in valid:
            listed = ", ".join(valid) if valid else "none"
            raise HyperdiffError(
                f"config: unknown key method.{key}; method {name!r} accepts the options "
                f"{listed}{_suggest(key, valid, 'method.')}"
            )
    check_types("config", "method.", options, hints)
    return dict(options)


def _check_value(section: str, key: str, value: Any, meta: Any, kind: Any) -> Any:
    where = f"{section}.{key}"
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if kind is bool:
        if not isinstance(value, bool):
            raise HyperdiffError(f"config: {where} must be true or false (got {describe(value)})")
        return value
    if kind is str:
        if not isinstance(value, str):
            quoted = (f"; to mean the text, quote it: --set '{where}=\"{value}\"' or "
                      f"{key} = \"{value}\" in TOML" if isinstance(value, (int, float)) else "")
            raise HyperdiffError(f"config: {where} must be a string (got "
                                 f"{describe(value)}{quoted})")
        if choices and value not in choices:
            raise HyperdiffError(
                f"config: {where} must be one of {', '.join(map(repr, choices))} "
                f"(got {value!r}){_suggest(value, list(choices), '')}"
            )
        if value and meta.get("check"):
            meta["check"](value, f"config: {where}")
        return value
    is_int = kind is int
    numeric = isinstance(value, int) if is_int else isinstance(value, (int, float))
    if isinstance(value, bool) or not numeric or (not is_int and not math.isfinite(value)):
        noun = "an int" if is_int else "a number"
        raise HyperdiffError(
            f"config: {where} must be {noun}{_range_text(meta)} (got {describe(value)})"
        )
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta["open_low"] else value < low)
    too_high = high is not None and (value >= high if meta["open_high"] else value > high)
    if too_low or too_high:
        noun = "an int" if is_int else "a number"
        raise HyperdiffError(
            f"config: {where} must be {noun}{_range_text(meta)} (got {describe(value)})"
        )
    return int(value) if is_int else float(value)


def _bound(value: float) -> str:
    """A range's end as text: an int exactly (``2**63 - 1``), a float by ``:g``."""
    return str(value) if isinstance(value, int) and abs(value) >= 1e6 else f"{value:g}"


def _range_text(meta: Any) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        left = "(" if meta["open_low"] else "["
        right = ")" if meta["open_high"] else "]"
        return f" in {left}{_bound(low)}, {_bound(high)}{right}"
    if low is not None:
        return f" {'>' if meta['open_low'] else '>='} {low:g}"
    if high is not None:
        return f" {'<' if meta['open_high'] else '<='} {high:g}"
    return ""


def _suggest(word: str, candidates: list[str], prefix: str, suffix: str = "") -> str:
    close = difflib.get_close_matches(str(word), candidates, n=1)
    return f" (did you mean {prefix}{close[0]}{suffix}?)" if close else ""


def _meta(cls: type, name: str) -> Any:
    return next(f.metadata for f in fields(cls) if f.name == name)


def _helps(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise HyperdiffError(
            f"config: an override must look like section.key=value (got {item!r})"
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return _nest(key, value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: {"width" = 64}
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise HyperdiffError(f"config: cannot write {describe(value)} as TOML")


def _key_fields() -> list[tuple[str, Any]]:
    """``(section.key, field)`` of every config key, in declaration order."""
    return [(f"{section}.{f.name}", f) for section, cls in SECTIONS.items()
            for f in fields(cls) if f.name != "options"]


def _default(f: Any) -> Any:
    factory = cast(Callable[[], Any], f.default_factory)
    return f.default if f.default is not MISSING else factory()


def config_rows() -> list[tuple[str, str, str]]:
    """``(key, default, help)`` of every config key, for documentation."""
    return [(key, _toml_value(_default(f)), f.metadata.get("help", ""))
            for key, f in _key_fields()]


def _valid_text(f: Any) -> str:
    """What a key accepts, from its declaration: ``true, false``, the choices, or the range."""
    meta = f.metadata
    if isinstance(_default(f), bool):
        return "true, false"
    if isinstance(_default(f), dict):
        return "a table of the task factory's keyword arguments"
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices:
        return ", ".join(f"`{c}`" for c in choices)
    if isinstance(_default(f), (int, float)):
        noun = "int" if isinstance(_default(f), int) else "number"
        return f"{noun}{_range_text(meta)}"
    return "string" + (" (a path inside the run directory)" if meta.get("check") else "")


def config_table() -> str:
    """The markdown table of every config key (key, default, valid values, meaning), generated
    from the declarations above; ``docs/driver.md`` holds it between marker comments
    (``hyperdiff run --print-config --markdown`` prints it)."""
    lines = ["| key | default | valid | meaning |", "|---|---|---|---|"]
    for key, f in _key_fields():
        cells = [f"`{key}`", f"`{_toml_value(_default(f))}`", _valid_text(f),
                 f.metadata.get("help", "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
