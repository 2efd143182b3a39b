"""Checks that the ranks of a process group run the same thing, and values they agree on.

Every rank of a run builds its own problem, so a model initialised without a seed, data read
in another order or another hyperparameter start would make the ranks train different things:
spread trainings then mix the ranks' problems in one step, and a data-parallel training
averages gradients of different models. :func:`check_ranks_agree` gathers a cheap fingerprint
of each rank's problems (the sums of ``theta_0``, the buffers, the first train and validation
batches; the raw values, ``steps`` and ``seed``) and raises a
:class:`~hyperdiff.errors.HyperdiffError` on every rank naming the rank and what differs.

:func:`agreed_mean` makes a loss that can differ per rank (a data-parallel training's
BatchNorm running statistics are its shard's) one value: the mean over the ranks, or the
rank's own where every rank has the same (a run without such buffers is unchanged bit for
bit). :func:`agreed_elapsed` judges ``stop.max_time_s`` on rank 0's clock on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.distributed.group import Group

WORLD_KEY = "data_parallel_world"
"""The checkpoint entry of a data-parallel run: the world size it trained on."""


def _sums(value: Any) -> Any:
    """Shape, dtype and float64 sums (plain and absolute) of every tensor in ``value``."""
    if isinstance(value, Tensor):
        data = value.detach()
        as64 = (data.abs() if data.is_complex() else data).double()
        return (tuple(data.shape), str(data.dtype), float(as64.sum()), float(as64.abs().sum()))
    if isinstance(value, Mapping):
        return {str(k): _sums(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_sums(v) for v in value]
    return type(value).__name__


def _first_batch(problem: Problem) -> Any:
    try:
        return _sums(problem.train_data.batch(0, problem.seed))
    except Exception as err:  # the training reports it; here only its kind is compared
        return f"unreadable ({type(err).__name__})"


def fingerprint(problems: Sequence[Problem], raw: Mapping[str, Tensor]) -> dict[str, Any]:
    """What :func:`check_ranks_agree` compares, by the words its message uses."""
    out: dict[str, Any] = {"the number of problems (folds)": len(problems),
                           "the hyperparameters' raw values": _sums(dict(raw))}
    for k, problem in enumerate(problems):
        fold = f" of problem {k}" if len(problems) > 1 else ""
        out[f"theta_0{fold}"] = _sums(problem.params)
        out[f"the buffers{fold}"] = _sums(problem.buffers)
        out[f"inner steps{fold}"] = problem.steps
        out[f"the seed{fold}"] = problem.seed
        out[f"the first train batch{fold}"] = _first_batch(problem)
        out[f"the first validation batch{fold}"] = _sums(problem.val_data[:1])
    return out


def _names(mine: Any, theirs: Any) -> str:
    """The tensors' names where two fingerprints of a dict of tensors differ."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        names = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return f" ({', '.join(map(repr, names[:4]))})" if names else ""
    return ""


def check_ranks_agree(group: Group, caller: str, problems: Sequence[Problem],
                      raw: Mapping[str, Tensor]) -> None:
    """Raise on every rank when a rank's problems or raw values differ from rank 0's.

    Raises:
        HyperdiffError: naming the first rank that differs and what differs.
    """
    every = group.all_gather(f"{caller}: the ranks' problems", fingerprint(problems, raw))
    root = every[0]
    for rank, theirs in enumerate(every[1:], start=1):
        differs = [f"{key}{_names(root.get(key), theirs.get(key))}"
                   for key in dict.fromkeys([*root, *theirs])
                   if root.get(key) != theirs.get(key)]
        if differs:
            raise HyperdiffError(
                f"{caller}: every rank of the process group must train the same problem "
                f"(got rank {rank} differing from rank 0 in {'; '.join(differs[:6])}); build "
                "it the same way on every rank: seed the model's initialisation "
                "(torch.manual_seed before making it), read the same data in the same order, "
                "start from the same values")


def agreed_mean(group: Group, where: str, values: Sequence[float]) -> list[float]:
    """``values`` as every rank holds them: this rank's own where every rank has the same,
    else the mean over the ranks (summed in rank order), entry by entry."""
    every = group.all_gather(where, [float(v) for v in values])
    return [float(own) if all(p[i] == own for p in every)
            else sum(p[i] for p in every) / group.world
            for i, own in enumerate(values)]


def agreed_elapsed(group: Group, where: str, elapsed: float) -> float:
    """Rank 0's ``elapsed`` on every rank: the time budget is judged once for all ranks."""
    return float(group.broadcast(where, float(elapsed)))


def world_mismatch(caller: str, state: Mapping[str, Any], world: int) -> None:
    """Refuse a data-parallel checkpoint ``state`` saved on another world size than ``world``
    (one without the entry, written before it was recorded, resumes as it did).

    Raises:
        HyperdiffError: naming both sizes.
    """
    saved = state.get(WORLD_KEY)
    if saved is None or int(saved) == world:
        return
    raise HyperdiffError(
        f"{caller}: a data-parallel run must resume on the world size it trained on (got a "
        f"checkpoint of {int(saved)} rank(s), resumed on {world}): each rank's shard of "
        f"every batch, and so the numbers, depend on the world size; resume with "
        f"`torchrun --nproc_per_node {int(saved)}`, or start a new run")


def torch_world(group: Group | None) -> int:
    """The number of ranks of ``group`` (1 without one)."""
    return 1 if group is None else group.world


__all__ = ["WORLD_KEY", "agreed_elapsed", "agreed_mean", "check_ranks_agree", "fingerprint",
           "torch_world", "world_mismatch"]
