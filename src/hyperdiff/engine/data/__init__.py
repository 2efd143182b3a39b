"""Batch sources for inner training: ``source.batch(step, seed) -> batch``, the same batch every
time it is asked for (replays are verified), read lazily from streams.

See ``docs/data.md`` and :func:`as_source` for what is accepted. A batch's digest is
:func:`hyperdiff.engine.data.replay.fingerprint`; the submodule
:mod:`hyperdiff.engine.data.fingerprint` fingerprints whole splits.
"""

from hyperdiff.engine.data.convert import as_source, describe_source, stream, validation_batches
from hyperdiff.engine.data.evaluation import EvaluationSplit, evaluation_split
from hyperdiff.engine.data.loader import LoaderStream
from hyperdiff.engine.data.replay import ReplayLog, check_batch
from hyperdiff.engine.data.sources import (
    BatchSource,
    Fed,
    FromCallable,
    FullBatch,
    Minibatches,
    Recorded,
    Sequence,
    minibatches,
)
from hyperdiff.engine.data.streaming import IterableStream, Streamed

__all__ = [
    "BatchSource", "EvaluationSplit", "Fed", "FromCallable", "FullBatch", "IterableStream",
    "LoaderStream", "Minibatches", "Recorded", "ReplayLog", "Sequence", "Streamed", "as_source",
    "check_batch", "describe_source", "evaluation_split", "minibatches",
    "stream", "validation_batches",
]
