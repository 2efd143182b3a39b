"""hyperdiff on ``torch.distributed``: trainings over ranks, data-parallel inner training.

- :mod:`~hyperdiff.tuner.distributed.group`: the process group (:func:`current_group`,
  :func:`init_from_env` for ``torchrun``), store-based monitored barriers and heartbeats that
  turn a dead or hung rank into a :class:`LostRankError` naming it.
- :mod:`~hyperdiff.tuner.distributed.spread`: the ``folds x samples`` trainings of an outer step
  spread over the ranks and gathered, so every rank holds the single-process step
  (:class:`~hyperdiff.tuner.driver.HyperOptimizer` does this whenever a group is initialised).
- :mod:`~hyperdiff.tuner.distributed.data_parallel`: :func:`data_parallel` wraps a method so each
  rank trains on its shard of every batch with an all-reduced, differentiable gradient.
- :mod:`~hyperdiff.tuner.distributed.root`: rank 0 alone touches the run directory.

See ``docs/distributed.md`` for launching with ``torchrun``.
"""

from hyperdiff.tuner.distributed.data_parallel import (
    DataParallelMethod,
    data_parallel,
    shard_problem,
)
from hyperdiff.tuner.distributed.group import Group, LostRankError, current_group, init_from_env
from hyperdiff.tuner.distributed.root import is_root, on_root, root_only
from hyperdiff.tuner.distributed.spread import LocalSpreader, RankSpreader, Spreader, spreader_for

__all__ = [
    "DataParallelMethod", "Group", "LocalSpreader", "LostRankError", "RankSpreader", "Spreader",
    "current_group", "data_parallel", "init_from_env", "is_root", "on_root", "root_only",
    "shard_problem", "spreader_for",
]
