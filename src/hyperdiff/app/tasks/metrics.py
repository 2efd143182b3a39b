"""Metrics of one split: the sample-weighted mean of per-batch values, read batch by batch.

For batches ``b`` of ``n_b`` samples with metric values ``m_b`` (each a mean over its batch),
the split's value is ``sum_b n_b m_b / sum_b n_b``, the mean over the split's samples (a
shorter last batch of a ``DataLoader`` counts for its samples only). When every batch has the
same size this is the plain mean over batches, computed exactly as before. A lazy split
(:class:`~hyperdiff.engine.data.evaluation.EvaluationSplit`) is iterated once; only the running sums
are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hyperdiff.engine.data.evaluation import batch_rows
from hyperdiff.engine.datacheck import shapes_of
from hyperdiff.engine.models import StepContext
from hyperdiff.errors import user_failure
from hyperdiff.typing import Batch, Params


def split_metrics(metrics: Callable[..., dict[str, float]], with_ctx: bool, params: Params,
                  hview: Any, batches: Iterable[Batch], ctx: StepContext, split: str = "a"
                  ) -> dict[str, float]:
    """``{name: sample-weighted mean over batches}`` of ``metrics(params, hview, batch[, ctx])``
    (``split`` names the split in the error of a metrics function that raises)."""
    sums: dict[str, float] = {}
    means: dict[str, float] = {}
    sizes: list[int] = []
    for j, batch in enumerate(batches):
        def failed(err: BaseException, j: int = j, batch: Batch = batch) -> str:
            return (f"metrics raised {type(err).__name__} on batch {j} of the {split} split "
                    f"({shapes_of(batch)}): {err}")

        with user_failure(failed):
            values = (metrics(params, hview, batch, ctx) if with_ctx
                      else metrics(params, hview, batch))
        n = batch_rows(batch)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + n * float(value)
            means[key] = means.get(key, 0.0) + float(value)
        sizes.append(n)
    if len(set(sizes)) <= 1:  # equal batches: the mean over batches, as before
        return {key: value / len(sizes) for key, value in means.items()}
    total = sum(sizes)
    return {key: value / total for key, value in sums.items()}
