"""Metrics of one split: the sample-weighted mean of per-batch values, read batch by batch.

For batches ``b`` of ``n_b`` samples with metric values ``m_b`` (each a mean over its batch),
the split's value is ``sum_b n_b m_b / sum_b n_b``, the mean over the split's samples (a
shorter last batch of a ``DataLoader`` counts for its samples only). When every batch has the
same size this is the plain mean over batches, computed exactly as before. A lazy split
(:class:`~hyperdiff.engine.data.evaluation.EvaluationSplit`) is iterated once; only the running sums
are kept.

What ``metrics`` returns is checked on every batch (:func:`checked_metrics`): a non-empty dict
``{name: number}`` (a one-element tensor counts) with a ``"loss"`` entry, the same names on
every batch; a task's metrics that return anything else stop the report with a message naming
the split, the batch and the entry. A non-finite value is kept (a diverged training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from hyperdiff.engine.data.evaluation import batch_rows
from hyperdiff.engine.datacheck import shapes_of
from hyperdiff.engine.models import StepContext
from hyperdiff.errors import HyperdiffError, describe, is_number, user_failure
from hyperdiff.typing import Batch, Params


def is_metric_value(value: Any) -> bool:
    """A number a metric may be: a real (not bool) Python or NumPy number, or a one-element
    real tensor."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex()
    return is_number(value)


def checked_metrics(values: Any, where: str = "") -> dict[str, float]:
    """``values``, what a metrics function returned, as ``{name: float}``; raise unless it is
    a non-empty dict of string names to numbers with a ``"loss"`` entry (``where``, e.g.
    ``" on batch 0 of the test split"``, ends each message)."""
    if not isinstance(values, Mapping) or not values:
        raise HyperdiffError(f"metrics must return a non-empty dict {{name: number}} (got "
                             f"{describe(values)}{where})")
    if "loss" not in values:
        raise HyperdiffError(f"metrics must return a 'loss' entry, which the report and "
                             "black-box search (hyperdiff compare) read on each split (got the "
                             f"keys {sorted(map(str, values))}{where})")
    for key, value in values.items():
        if not isinstance(key, str) or not is_metric_value(value):
            raise HyperdiffError(f"metrics must return a dict {{name: number}}; entry {key!r} "
                                 f"is {describe(value)}{where}")
    return {key: float(value) for key, value in values.items()}


def split_metrics(metrics: Callable[..., dict[str, float]], with_ctx: bool, params: Params,
                  hview: Any, batches: Iterable[Batch], ctx: StepContext, split: str = "a",
                  caller: str = "") -> dict[str, float]:
    """``{name: sample-weighted mean over batches}`` of ``metrics(params, hview, batch[, ctx])``
    (:func:`checked_metrics` on each batch; ``split`` names the split and ``caller``, e.g.
    ``"task toy"``, starts the error of a metrics function that raises or returns the wrong
    thing)."""
    prefix = f"{caller}: " if caller else ""
    sums: dict[str, float] = {}
    means: dict[str, float] = {}
    sizes: list[int] = []
    for j, batch in enumerate(batches):
        def failed(err: BaseException, j: int = j, batch: Batch = batch) -> str:
            return (f"{prefix}metrics raised {type(err).__name__} on batch {j} of the {split} "
                    f"split ({shapes_of(batch)}): {err}")

        with user_failure(failed):
            returned = (metrics(params, hview, batch, ctx) if with_ctx
                        else metrics(params, hview, batch))
        where = f" on batch {j} of the {split} split"
        try:
            values = checked_metrics(returned, where)
        except HyperdiffError as err:
            raise HyperdiffError(f"{prefix}{err}") from None
        if sizes and values.keys() != means.keys():
            raise HyperdiffError(f"{prefix}metrics must return the same names on every batch "
                                 f"(got {sorted(means)} on batch 0, {sorted(values)}{where})")
        n = batch_rows(batch)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + n * value
            means[key] = means.get(key, 0.0) + value
        sizes.append(n)
    if len(set(sizes)) <= 1:  # equal batches: the mean over batches, as before
        return {key: value / len(sizes) for key, value in means.items()}
    total = sum(sizes)
    return {key: value / total for key, value in sums.items()}
