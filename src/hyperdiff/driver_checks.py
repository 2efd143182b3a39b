"""The argument checks of :class:`~hyperdiff.driver.HyperOptimizer`, one function each.

Each raises :class:`~hyperdiff.errors.HyperdiffError` naming ``HyperOptimizer``, the argument,
what is valid and what was given: the problems (one, or folds that tune the same
hyperparameters), the selection split (evaluated once at theta_0, so that a batch the loss
cannot take fails at once), the sample count, and a checkpoint to resume from (its step and
history, its trainings per step, its outer optimizer state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .datacheck import check_batch, shapes_of
from .errors import HyperdiffError, fail, positive_int
from .logs import get_logger
from .problem import Problem
from .snr import AutoSamples
from .training import validation_loss
from .typing import Batch
from .wording import option

_LOG = get_logger("driver")  # the driver's warnings, under the driver's logger


def check_problems(problem: Problem | Sequence[Problem]) -> tuple[Problem, ...]:
    """``problem`` as a non-empty tuple of problems that tune the same hyperparameters."""
    problems = (problem,) if isinstance(problem, Problem) else tuple(problem)
    if not problems or not all(isinstance(p, Problem) for p in problems):
        raise fail("HyperOptimizer", "problem",
                   "a Problem or a non-empty sequence of Problems (made by hd.make_problem)",
                   problem)
    names = list(problems[0].hparams)
    for p in problems[1:]:
        if list(p.hparams) != names:
            raise fail("HyperOptimizer", "problems", f"all tuning the hyperparameters {names}",
                       list(p.hparams))
    return problems


def as_batches(selection: Batch | list[Batch] | None) -> list[Batch] | None:
    """``selection`` as a non-empty list of batches (``None``: no selection split)."""
    if selection is None:
        return None
    batches = list(selection) if isinstance(selection, list) else [selection]
    if not batches:
        raise fail("HyperOptimizer", "selection", "a batch or a non-empty list of batches "
                   "(None: no selection split)", selection)
    return batches


def auto_samples(samples: int | str, max_samples: int) -> AutoSamples | None:
    """``AutoSamples`` for ``samples="auto"``, ``None`` for a fixed count."""
    if isinstance(samples, str):
        if samples != "auto":
            raise fail("HyperOptimizer", "samples", "a positive int or 'auto'", samples)
        return AutoSamples(maximum=max_samples)  # which checks it
    positive_int("HyperOptimizer", "max_samples", max_samples)
    return None


def check_selection(problem: Problem, selection: list[Batch] | None) -> None:
    """Evaluate ``val_loss`` once on the selection batches at theta_0: a batch it cannot take
    fails here with the shapes, not after the first training; warn when there is none."""
    if selection is None:
        _LOG.warning(
            "HyperOptimizer: no selection split: the best step and early stopping use the "
            "validation loss that the hypergradient descends, which many hyperparameters can "
            "overfit; %s", option("pass selection=batches held out from val_data",
                                  "set task.selection_fraction > 0"))
        return
    for batch in selection:
        check_batch("HyperOptimizer", "selection", batch)
    hview = problem.hparams.view(problem.raw_tensors())
    try:
        with torch.no_grad():
            value = float(validation_loss(replace(problem, val_data=selection), problem.params,
                                          problem.buffers, hview))
    except HyperdiffError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as err:
        raise HyperdiffError(
            "HyperOptimizer: selection must be batches that val_loss accepts, like val_data "
            f"(selection batch: {shapes_of(selection[0])}; validation batch: "
            f"{shapes_of(problem.val_data[0])}; parameter shapes "
            f"{ {n: tuple(p.shape) for n, p in problem.params.items()} }): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not math.isfinite(value):
        raise fail("HyperOptimizer", "selection loss at the initial parameters",
                   "finite", value)


def check_resume(state: dict[str, Any], *, records: int, slots: int) -> None:
    """A checkpoint ``state`` resumes a run with ``records`` history records and ``slots``
    trainings per step only when it was saved at step ``records`` with as many slots."""
    if records != state["step"]:
        raise HyperdiffError(
            f"HyperOptimizer: history must hold {state['step']} records to resume "
            f"(got {records})"
        )
    if len(state["warm"]) != slots:
        raise HyperdiffError(
            "HyperOptimizer: the checkpoint must come from a run with the same folds and "
            f"samples ({slots} trainings per step; got {len(state['warm'])})"
        )


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                          caller: str = "HyperOptimizer") -> None:
    """A saved outer optimizer ``state`` must hold every entry ``optimizer.step`` needs."""
    if missing := missing_optimizer_entries(optimizer, state):
        raise HyperdiffError(f"{caller}: the outer optimizer state lacks the entries "
                             f"{missing} that {type(optimizer).__name__} needs")


def missing_optimizer_entries(optimizer: torch.optim.Optimizer, state: dict[str, Any]
                              ) -> list[str]:
    """Per-parameter entries (``exp_avg``, ``square_avg``, ...) that ``optimizer.step`` needs
    and a non-empty saved parameter state lacks, found by one step of a probe optimizer."""
    params = [p.detach().clone().requires_grad_() for g in optimizer.param_groups
              for p in g["params"]]
    probe = type(optimizer)(params, **optimizer.defaults)
    for p in params:
        p.grad = torch.zeros_like(p)
    probe.step()
    needed = set().union(*(probe.state[p].keys() for p in params))
    saved = [set(entry) for entry in state.get("state", {}).values() if entry]
    return sorted(set().union(*(needed - entry for entry in saved)))
