"""``hyperdiff compare [CONFIG.toml]``: hyperdiff against black-box search on the same task.

The task is tuned by hyperdiff with the config's settings, then by random search (and Optuna's
TPE when it is installed) under the same budget of inner trainings (``--budget``, default: the
number hyperdiff used). All methods minimise the loss that the hypergradient sees: the
validation loss, or with ``task.cv_folds = k`` the k-fold CV loss (a black-box trial then costs
k trainings); the winner of each is retrained with fresh seeds and evaluated on the held-out
test split.
Prints a table and writes ``comparison.png`` (best validation loss so far against trainings
and against wall time) and ``comparison.json`` (each method's curve, its trials and its
winner's natural values, which ``hd.tuned_hparams(task, comparison, method=...)`` reads) into
the run directory, both rewritten as soon as each method's phase finishes: a phase that fails
leaves the earlier ones there (and in the printed table), with the failure named under
``"failed"``; the error is still reported and the exit status is non-zero. The run directory
is ``--out``, else the config's ``output.dir`` (below the working directory, as for ``hyperdiff
run``), else a new ``runs/compare-<task>-<time>``; one that already holds a comparison is
refused before the tuning starts, as ``hyperdiff run --out`` refuses a directory that holds a
run, and it is locked for the whole comparison (its ``run.lock``, as a run's): a second
``compare`` (or ``run``) on it while this one runs is refused. A black-box method whose
every trial diverged has no winner: its row says "no finite trial" (``"no_finite_trial":
true`` and ``"best": null`` in the JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperdiff.app.cli.common import add_config_arguments, config_overrides, set_threads

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTPUTS = ("comparison.json", "comparison.png")
NO_FINITE_TRIAL = ("no finite trial: every trial's training diverged (a non-finite loss), so "
                   "there is no winner to retrain or export; narrow the task's search_space")
HELP = "tune a task with hyperdiff and with random search / TPE under one budget; table + figure"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--budget", type=int, default=None,
                        help="trainings per black-box method, a positive int; with "
                        "task.cv_folds = k a multiple of k (default: as many as hyperdiff used)")
    parser.add_argument("--per-coordinate", action="store_true",
                        help="search every entry of a vector hyperparameter separately "
                        "(default: one shared value per hyperparameter)")
    parser.add_argument("--no-tpe", action="store_true", help="skip Optuna's TPE")
    parser.add_argument("--out", help="output directory, refused when it already holds a "
                        "comparison (default: the config's output.dir, else a new "
                        "runs/compare-<task>-<time>)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run(args: argparse.Namespace) -> int:
    from hyperdiff.app.config import load_config
    from hyperdiff.app.rundir.files import refuse_link
    from hyperdiff.app.rundir.paths import below_working_dir
    from hyperdiff.errors import HyperdiffError
    from hyperdiff.tuner.distributed import init_from_env, on_root

    config = load_config(args.config, config_overrides(args))
    check_budget(args.budget, "--budget")
    set_threads("compare", args.threads)
    from hyperdiff.app.tasks.loader import label

    # --out, else output.dir (kept below the working directory, as `hyperdiff run` keeps it)
    chosen = args.out or (str(below_working_dir(config.output.dir, "config: output.dir"))
                          if config.output.dir else None)
    if chosen:  # refused now, not after the tuning: a link where a file will be written
        out = Path(chosen)
        if (out.is_symlink() and not out.exists()) or (out.exists() and not out.is_dir()):
            what = ("a symbolic link to a missing target" if out.is_symlink()
                    else "an existing file")
            given = "--out" if args.out else "output.dir"
            raise HyperdiffError(f"compare: {given} {out} must be a directory or a new path "
                                 f"(got {what}); choose another one")
        for name in OUTPUTS:
            refuse_link(out / name)
        refuse_existing_comparison(out)  # a computed result is never replaced
    # under torchrun: the trainings are spread over the ranks, rank 0 alone writes and prints
    group = init_from_env(config.distributed.timeout_s)
    root = group is None or group.is_root
    outputs = PhaseOutputs(chosen, f"compare-{label(config.task.name)}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
    claim = OutputClaim(Path(chosen)) if chosen else None
    if claim is not None:  # held until the end: a second compare on it is refused
        on_root(group, "compare: output directory", claim.acquire)
    try:
        return _run_claimed(args, config, group, outputs)
    finally:
        if claim is not None and root:
            claim.release(written=outputs.directory is not None)


def _run_claimed(args: argparse.Namespace, config: Any, group: Any,
                 outputs: PhaseOutputs) -> int:
    """The comparison of :func:`run`, once its output directory is claimed."""
    from hyperdiff.tuner.distributed import on_root

    root = group is None or group.is_root

    def write(report: dict[str, Any]) -> Path:
        where: Path = on_root(group, "compare: outputs", outputs.write, report)
        return where

    try:
        report = compare(config, budget=args.budget, per_coordinate=args.per_coordinate,
                         tpe=not args.no_tpe,
                         progress=False if args.quiet or not root else None,
                         on_phase=write, log=None if root else (lambda _message: None))
    except BaseException:  # the phases done are on disk; show them, then report the error
        if root and outputs.report is not None and outputs.directory is not None:
            print(format_comparison(outputs.report))
            print(f"kept the phases done: {outputs.directory / OUTPUTS[1]}, "
                  f"{outputs.directory / OUTPUTS[0]}")
        raise
    if root:
        out = outputs.directory or outputs.write(report)  # written after the last phase
        print(format_comparison(report))
        print(f"figure and JSON: {out / OUTPUTS[1]}, {out / OUTPUTS[0]}")
    return 0


class OutputClaim:
    """The exclusive OS lock (``run.lock``, :class:`~hyperdiff.app.rundir.lock.RunLock`) on a
    comparison's ``--out``, held for the whole comparison: of two compares on one directory,
    the second is refused naming the first, instead of both passing the check for an existing
    comparison and one silently replacing the other's files."""

    def __init__(self, directory: Path) -> None:
        from hyperdiff.app.rundir.directory import LOCK
        from hyperdiff.app.rundir.lock import RunLock

        self.directory, self.created = directory, False
        self.lock = RunLock(directory / LOCK)

    def acquire(self) -> None:
        """Make the directory if missing, lock it and refuse a comparison that is there now."""
        from hyperdiff.app.rundir.files import os_errors

        if not self.directory.is_dir():
            with os_errors(self.directory, "create the directory"):
                self.directory.mkdir(parents=True, exist_ok=True)
            self.created = True
        try:
            self.lock.acquire()
            refuse_existing_comparison(self.directory)  # one written since run()'s check
        except BaseException:
            self.release(written=False)
            raise

    def release(self, *, written: bool) -> None:
        """Unlock; a directory this claim made and nothing was written into is removed."""
        self.lock.release()
        if self.created and not written:
            with suppress(OSError):
                self.lock.path.unlink(missing_ok=True)
                self.directory.rmdir()


def check_budget(budget: int | None, name: str = "budget") -> None:
    """Raise unless ``budget`` is ``None`` (as many trainings as hyperdiff used) or a positive
    int; ``name`` is how the caller spells it."""
    from hyperdiff.errors import HyperdiffError

    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget < 1):
        raise HyperdiffError(f"compare: {name} must be a positive int (got {budget!r})")


def refuse_existing_comparison(directory: Path) -> None:
    """Raise if ``directory`` already holds a comparison's files, which this one would
    replace."""
    from hyperdiff.errors import HyperdiffError

    found = [n for n in OUTPUTS if (directory / n).exists() or (directory / n).is_symlink()]
    if found:
        raise HyperdiffError(
            f"compare: the output directory {directory} already holds a comparison "
            f"({', '.join(found)}); choose another directory with --out")


class PhaseOutputs:
    """Writes the comparison so far after each phase, into one directory: ``out``, or
    ``runs/<stem>`` made at the first write (``-2``, ``-3``, ... when taken)."""

    def __init__(self, out: str | None, stem: str) -> None:
        self.out, self.stem = out, stem
        self.directory: Path | None = None
        self.report: Mapping[str, Any] | None = None

    def write(self, report: Mapping[str, Any]) -> Path:
        """Write ``report``'s JSON and figure (see :func:`write_outputs`); the directory."""
        where = str(self.directory) if self.directory is not None else self.out
        self.directory = write_outputs(report, where, self.stem)
        self.report = report
        return self.directory


def write_outputs(report: Mapping[str, Any], out: str | None, stem: str) -> Path:
    """Write ``comparison.json`` and ``comparison.png`` into ``out``, or into a new directory
    ``runs/<stem>`` (``-2``, ``-3``, ... when taken); each file is replaced atomically and
    never written through a symbolic link. Returns the directory."""
    from hyperdiff.app.rundir import RunDir, atomic_write_bytes, json_safe
    from hyperdiff.app.rundir.files import os_errors

    if out:
        directory = Path(out)
        with os_errors(directory, "create the directory"):
            directory.mkdir(parents=True, exist_ok=True)
    else:
        directory = RunDir.create_unique("runs", stem).path
    png = io.BytesIO()
    figure = comparison_figure(report["methods"], title=report["task"])
    figure.savefig(png, format="png", dpi=110, bbox_inches="tight")
    text = json.dumps(json_safe(report), indent=1, allow_nan=False)  # JSON has no inf: null
    atomic_write_bytes(directory / OUTPUTS[0], (text + "\n").encode())
    atomic_write_bytes(directory / OUTPUTS[1], png.getvalue())
    return directory


def compare(config: Any, *, budget: int | None = None, per_coordinate: bool = False,
            tpe: bool = True, log: Callable[[str], None] | None = None,
            progress: bool | None = False,
            on_phase: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Tune ``config``'s task with hyperdiff, random search and (optionally) TPE; return a
    JSON-ready report with each method's curve and its winner's held-out metrics.
    ``progress``: tqdm bars (``None``: only on a terminal). ``on_phase(report)``: called with
    the report so far as soon as each method's phase finishes, and once more when a black-box
    phase fails: then ``report["failed"]`` names the method, the error and the methods not run,
    and the error is raised again. ``budget``: trainings per black-box method, a positive int,
    with ``task.cv_folds = k`` a multiple of k (``None``: as many as hyperdiff used, rounded
    down to whole trials of at least one; the report's ``"budget"`` is what each black-box
    method spends). The report records ``task.data_seed`` (``"data_seed"``), which
    ``hd.tuned_hparams`` checks."""
    check_budget(budget)
    from hyperdiff.app.config import OutputConfig
    from hyperdiff.app.experiment import build
    from hyperdiff.app.loggers import Progress
    from hyperdiff.app.plans import offline_bar
    from hyperdiff.app.search import (
        OPTUNA_MISSING,
        check_search_inputs,
        from_history,
        objective_for,
        optuna_available,
        random_search,
        tpe_search,
        trainings_per_trial,
    )
    from hyperdiff.errors import HyperdiffError
    from hyperdiff.logs import get_logger
    from hyperdiff.seeds import report_seeds
    from hyperdiff.tuner.distributed import current_group, on_root
    from hyperdiff.tuner.distributed.spread import spreader_for
    from hyperdiff.tuner.history import natural_values

    log = log or get_logger("compare").info
    phase_done = on_phase or (lambda report: None)
    if config.outer.mode != "offline":
        raise HyperdiffError(f"compare: outer.mode must be 'offline' (got "
                             f"{config.outer.mode!r}): the comparison puts offline hyperdiff "
                             "and black-box search under one budget of trainings; an online or "
                             "meta run is compared by `hyperdiff run` and benchmarks/suite.py")
    if config.inner.warm_start:
        raise HyperdiffError("compare: inner.warm_start must be false: a warm-started training "
                             "continues the last one, so its validation loss is not the one a "
                             "black-box trial's training from theta_0 gives, and the winner "
                             "would be retrained otherwise than it was tuned")
    if config.outer.seed in report_seeds(config.report.seeds):
        raise HyperdiffError(f"compare: outer.seed must not be one of the report's seeds "
                             f"{list(report_seeds(config.report.seeds))} (got "
                             f"{config.outer.seed}): the black-box trials train on it, so the "
                             "winners would be retrained on a seed they were picked on")
    logs = [f"log.{key} = {value!r}" for key, value in vars(config.log).items() if value]
    if logs:
        raise HyperdiffError(f"compare: the [log] settings are written by `hyperdiff run` only "
                             f"(got {', '.join(logs)}); compare writes comparison.json and its "
                             "table")
    default = OutputConfig()
    checkpoints = [f"output.{key} = {getattr(config.output, key)!r}"
                   for key in ("checkpoint_every", "checkpoint_seconds")
                   if getattr(config.output, key) != getattr(default, key)]
    if checkpoints:
        raise HyperdiffError(f"compare: the output.checkpoint_* settings are used by `hyperdiff "
                             f"run` only (got {', '.join(checkpoints)}); compare writes no "
                             "checkpoint (comparison.json is rewritten after each method): "
                             "leave them at their defaults")
    group = current_group()  # under torchrun (initialised by `run`): spread the trainings
    spread = spreader_for(None, group)
    task, driver = build(config)
    objective = objective_for(task)  # with CV, every method minimises the same CV loss
    per_trial = trainings_per_trial(task, objective)
    check_search_inputs("compare", seed=config.outer.seed, objective=objective,
                        seed_name="outer.seed")
    if budget is not None and budget < per_trial:  # refused before any training
        raise HyperdiffError(f"compare: --budget must be at least {per_trial}, the trainings "
                             f"of one trial ({config.task.cv_folds} cross-validation folds) "
                             f"(got {budget})")
    if budget is not None and budget % per_trial:  # else the methods would spend less
        lower = budget - budget % per_trial
        raise HyperdiffError(f"compare: --budget must be a multiple of {per_trial}, the "
                             f"trainings of one trial ({config.task.cv_folds} cross-validation "
                             f"folds), so that every method spends all of it (got {budget}); "
                             f"use {lower} or {lower + per_trial}")
    log(f"compare on {task.name}: hyperdiff ({task.hparams.numel} hyperparameters)")
    seeds = report_seeds(config.report.seeds)
    # one bar per phase: the method's trainings, then its winner's retrainings
    with closing(offline_bar(task, driver, config, progress, len(seeds))) as bar:
        outcome = driver.run(callbacks=[bar])
        winner = task.evaluate(outcome.best_raw, seeds=seeds, progress=bar.report_phase(),
                               spread=spread)
    hyper = from_history(outcome.history, method="hyperdiff")
    trials = max(1, (driver.trainings if budget is None else budget) // per_trial)
    budget = trials * per_trial  # what each black-box method spends: whole trials
    names = list(task.search_space) if per_coordinate else []
    methods = [summarize(hyper, winner, picked_by=outcome.criterion, task=task,
                         best=(outcome.best_step, natural_values(task.hparams, outcome.best_raw)))]
    searches = [("random", random_search)]
    if tpe and optuna_available():
        searches.append(("tpe", tpe_search))
    elif tpe:
        log(OPTUNA_MISSING)
    report = {"task": task.name, **({"task_params": task.info["params"]}
                                    if task.info.get("params") else {}),
              "data_seed": config.task.data_seed,
              "hparams": task.hparams.numel, "budget": budget,
              "objective": objective, "cv_folds": config.task.cv_folds,
              "per_coordinate": per_coordinate, "report_seeds": list(seeds),
              "stop_reason": outcome.stop_reason, "methods": methods,
              "skipped": [] if not tpe or optuna_available() else ["tpe: optuna not installed"]}
    phase_done(report)
    for number, (name, search) in enumerate(searches):
        log(f"compare on {task.name}: {name} search, {trials} trials "
            f"({trials * per_trial} trainings)")
        try:
            search_bar = Progress(total=trials * per_trial, report_trainings=len(seeds),
                                  enabled=progress, desc=name)
            with closing(search_bar):
                result = search(task, trials, seed=config.outer.seed, per_coordinate=names,
                                objective=objective,
                                progress=partial(search_bar.advance, per_trial),
                                spread=spread)
                metrics: dict[str, dict[str, float]] = {}
                if result.found_finite:  # else no winner: every trial diverged
                    # rank 0's winner (TPE runs on every rank: the same search, unless the
                    # machines round differently)
                    best = on_root(group, f"compare: {name} winner", dict, result.best.values)
                    metrics = evaluate_values(task, best, seeds, spread,
                                              progress=search_bar.report_phase())
                else:
                    log(f"compare on {task.name}: {name}: {NO_FINITE_TRIAL}")
                search_bar.best = result.best.objective
            methods.append(summarize(result, metrics, picked_by=objective, task=task))
        except (Exception, KeyboardInterrupt) as err:
            report["failed"] = {"method": name, "error": f"{type(err).__name__}: {err}",
                                "not_run": [n for n, _ in searches[number + 1:]]}
            phase_done(report)
            raise
        phase_done(report)
    return report


def evaluate_values(task: Any, values: Mapping[str, Any], seeds: Sequence[int],
                    spread: Any = None, progress: Callable[[], None] | None = None,
                    ) -> dict[str, dict[str, float]]:
    """Retrain at natural ``values`` (lists for per-coordinate vectors, plain choices or
    their labels for discrete hyperparameters) on ``seeds``, mapped by ``spread``
    (:meth:`~hyperdiff.app.tasks.base.Task.evaluate_values`); ``progress()`` after each."""
    return task.evaluate_values(values, seeds, spread=spread, progress=progress)


def summarize(result: Any, metrics: Mapping[str, Mapping[str, float]], *,
              picked_by: str = "val_loss", task: Any = None,
              best: tuple[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One method's row: budget used, best validation loss, its winner's metrics, and with
    ``task`` its winner (``"best"``: trial index and natural values in the form of
    ``result.json``, which ``hd.tuned_hparams(task, comparison, method=...)`` reads) and every
    trial (``"trials"``). ``best``: ``(trial, values)`` of a winner that the method picked by
    another criterion than the lowest objective (hyperdiff's best step by selection loss)."""
    from hyperdiff.app.search import natural_form, trial_entry

    winner = result.best
    row = {"method": result.method, "trainings": result.trainings, "time_s": result.time_s,
           "best_val_loss": winner.objective, "picked_by": picked_by,
           "winner_metrics": {s: dict(m) for s, m in metrics.items()},
           "curve": result.curve()}
    finite = result.found_finite
    if not finite:  # every trial diverged: no winner (hd.tuned_hparams refuses to export it)
        row["no_finite_trial"] = True
    if task is None:
        return row

    def form(values: Mapping[str, Any]) -> dict[str, Any]:  # hyperdiff's: already natural
        return dict(values) if result.method == "hyperdiff" else natural_form(task.hparams,
                                                                              values)

    trial, values = best if best is not None else (winner.number, form(winner.values))
    row["best"] = ({"trial": trial, "values": dict(values)} if finite or best is not None
                   else None)
    row["trials"] = [trial_entry(t, form(t.values)) for t in result.trials]
    return row


def format_comparison(report: Mapping[str, Any]) -> str:
    """The table ``hyperdiff compare`` prints."""
    head = (f"{'method':<12}{'trainings':>10}{'wall s':>9}{'best val':>11}{'test loss':>11}"
            f"{'test acc':>10}")
    lines = [f"{report['task']}: {report['hparams']} hyperparameters; black-box budget "
             f"{report['budget']} trainings", "", head]
    for row in report["methods"]:
        test = row["winner_metrics"].get("test", {})  # none without a winner
        acc = f"{test['accuracy']:.4f}" if "accuracy" in test else "-"
        loss = f"{test['loss']:.4g}" if "loss" in test else "-"  # a user's metrics may lack it
        val = "no finite" if row.get("no_finite_trial") else f"{row['best_val_loss']:.4g}"
        lines.append(f"{row['method']:<12}{row['trainings']:>10}{row['time_s']:>9.1f}"
                     f"{val:>11}{loss:>11}{acc:>10}")
    picked = report["methods"][0]["picked_by"].replace("_", " ")
    folds = report.get("cv_folds") or 0
    what = (f"the mean validation loss over {folds} cross-validation folds, which every method "
            "minimises" if folds else "the split the hypergradient sees")
    lines += ["", f"best val: lowest validation loss found ({what}); "
              f"test: the winner (hyperdiff's picked by {picked}, the others by "
              f"{'CV' if folds else 'val'} loss) "
              f"retrained on {len(report['report_seeds'])} fresh "
              f"{'seed' if len(report['report_seeds']) == 1 else 'seeds'}"]
    lines += [f"skipped: {s}" for s in report.get("skipped", [])]
    lines += [f"warning: {row['method']}: {NO_FINITE_TRIAL}" for row in report["methods"]
              if row.get("no_finite_trial")]
    failed = report.get("failed")
    if failed:
        not_run = f"; not run: {', '.join(failed['not_run'])}" if failed["not_run"] else ""
        lines.append(f"failed: {failed['method']}: {failed['error']}{not_run}")
    return "\n".join(lines)


def comparison_figure(methods: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """Best validation loss so far against trainings (left) and wall time (right)."""
    from hyperdiff.app.plots import private_matplotlib_config

    with private_matplotlib_config():  # no config or font cache written to the home directory
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(10, 4))
    by_runs, by_time = figure.subplots(1, 2)
    for row in methods:
        curve = row["curve"]
        by_runs.step(curve["trainings"], curve["best"], where="post", label=row["method"])
        by_time.step(curve["time_s"], curve["best"], where="post", label=row["method"])
    by_runs.set_xlabel("trainings")
    by_time.set_xlabel("wall time (s)")
    by_time.set_xscale("log")
    by_time.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    by_time.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    by_time.xaxis.set_minor_formatter(NullFormatter())
    for axes in (by_runs, by_time):
        axes.set_ylabel("best validation loss so far")
        axes.grid(alpha=0.3)
    by_runs.legend()
    figure.suptitle(title)
    return figure


__all__ = ["PhaseOutputs", "add_arguments", "check_budget", "compare", "comparison_figure",
           "evaluate_values", "format_comparison", "refuse_existing_comparison", "run",
           "summarize", "write_outputs"]
