"""Spreading the trainings of an outer step over the ranks of a process group.

An outer step of :class:`~hyperdiff.tuner.driver.HyperOptimizer` runs ``n = folds x samples``
independent trainings (a run's final report its ``rows x seeds`` retrainings, ``hyperdiff
compare`` its random-search and grid trials). With ``W`` ranks, rank ``r`` runs the trainings
``i`` with ``i % W == r``; one :meth:`~hyperdiff.tuner.distributed.group.Group.all_gather`
then gives every rank all ``n`` results in the order of the single-process loop, so the mean
hypergradient, the losses and their spreads that the driver computes from them (the report's
seed averages) are the single-process ones bit for bit (each training is the same arithmetic
in whichever process runs it), and every rank takes the same outer update.

A training that fails (a :class:`~hyperdiff.errors.NonFiniteError` of a diverged inner run,
or any other error) is gathered too and raised on every rank, so the divergence guard stays
in step across ranks instead of one rank leaving the others waiting.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.tuner.distributed.group import Group, current_group

A = TypeVar("A")
B = TypeVar("B")


class Spreader:
    """Maps a function over the trainings of an outer step: ``map(fn, items, where)``."""

    def map(self, fn: Callable[[A], B], items: Sequence[A], where: str,
            progress: Callable[[], None] | None = None) -> list[B]:
        """``[fn(item) for item in items]``; ``progress()`` after each item."""
        out = []
        for item in items:
            out.append(fn(item))
            if progress is not None:
                progress()
        return out

    def map_batch(self, fn: Callable[[list[A]], list[B]], items: Sequence[A], where: str
                  ) -> list[B]:
        """``fn(items)``: one call for all items (``fn`` maps a list to a list of results)."""
        return fn(list(items))


class LocalSpreader(Spreader):
    """Every training in this process (one rank, or data-parallel trainings that use every
    rank for each training)."""


class RankSpreader(Spreader):
    """Training ``i`` runs on rank ``i % world``; all results are gathered on every rank."""

    def __init__(self, group: Group):
        self.group = group

    def owned(self, count: int) -> list[int]:
        """Indices of the trainings this rank runs."""
        return list(range(self.group.rank, count, self.group.world))

    def map(self, fn: Callable[[A], B], items: Sequence[A], where: str,
            progress: Callable[[], None] | None = None) -> list[B]:
        """This rank's items, then every rank's results gathered in item order; ``progress()``
        after each of this rank's items and, once gathered, once for each of the others'."""
        mine: dict[int, tuple[str, Any]] = {}
        for index in self.owned(len(items)):
            mine[index] = _attempt(fn, items[index])
            if mine[index][0] != "ok":
                break  # the step fails anyway; tell the others now
            if progress is not None:
                progress()
        results = self._gathered(where, mine)
        if progress is not None:  # the items the other ranks ran
            for _ in range(len(items) - len(mine)):
                progress()
        return [results[i][1] for i in range(len(items))]

    def map_batch(self, fn: Callable[[list[A]], list[B]], items: Sequence[A], where: str
                  ) -> list[B]:
        """This rank's items in one call ``fn(list)``, then every rank's results gathered in
        item order (a failure is reported as the rank's first item's)."""
        owned = self.owned(len(items))
        status, value = _attempt(fn, [items[i] for i in owned]) if owned else ("ok", [])
        mine = (dict(zip(owned, (("ok", v) for v in value), strict=True)) if status == "ok"
                else {owned[0]: (status, value)})
        results = self._gathered(where, mine)
        return [results[i][1] for i in range(len(items))]

    def _gathered(self, where: str, mine: dict[int, tuple[str, Any]]
                  ) -> dict[int, tuple[str, Any]]:
        """Every rank's ``{item: (status, result)}`` merged; the first failed item's error
        raised on every rank."""
        results: dict[int, tuple[str, Any]] = {}
        for part in self.group.all_gather(where, mine):
            results.update(part)
        failures = sorted(i for i, (status, _) in results.items() if status != "ok")
        if failures:
            first = failures[0]
            status, message = results[first]
            rank = first % self.group.world
            if status == "nonfinite":
                raise NonFiniteError(message)
            if status == "hyperdiff":
                raise HyperdiffError(message)
            raise HyperdiffError(f"{where}: training {first} failed on rank {rank}: {message}")
        return results


def _attempt(fn: Callable[[Any], Any], arg: Any) -> tuple[str, Any]:
    """``("ok", fn(arg))``, or the failure's kind and message to gather: ``"nonfinite"`` (a
    diverged training), ``"hyperdiff"`` (bad input: the message one process gives) or
    ``"error"`` with a short traceback."""
    try:
        return "ok", fn(arg)
    except NonFiniteError as err:
        return "nonfinite", str(err)
    except HyperdiffError as err:
        return "hyperdiff", str(err)
    except Exception as err:
        return "error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"


def spreader_for(method: Any, group: Any = None) -> Spreader:
    """The spreader for an outer loop with ``method`` on ``group`` (``None``: the initialised
    default group, if any): trainings over ranks, or all of them here for one process or a
    data-parallel method (see :mod:`hyperdiff.tuner.distributed.data_parallel`)."""
    from hyperdiff.tuner.distributed.data_parallel import (
        DataParallelMethod,  # local: data_parallel imports methods
    )

    found = current_group(group)
    if found is None or isinstance(method, DataParallelMethod):
        return LocalSpreader()
    return RankSpreader(found)


__all__ = ["LocalSpreader", "RankSpreader", "Spreader", "spreader_for"]
