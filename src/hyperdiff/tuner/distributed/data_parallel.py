"""Data-parallel inner training: every rank trains on its shard of every batch.

With ``W`` ranks, rank ``r`` holds the same parameters ``theta_t`` and takes rows
``[r B/W, (r+1) B/W)`` of the step's batch (``B`` rows; ``B % W == 0``). The train loss sees
the parameters through an identity whose backward averages the incoming gradient over the
ranks with a differentiable all-reduce (``_MeanGradient``, through ``_SumOverRanks``, whose
backward is again an all-reduce)::

    g_t = (1/W) sum_r grad L_train(theta_t, lam, shard_r(batch_t))      (= the full-batch
    theta_{t+1} = update(g_t, state_t, theta_t, lam)                      gradient of a mean loss)

so every rank runs the single-process full-batch training, and anything a method computes
from the gradient (the optimizer's update, the ``curvature`` method's squared-gradient
statistics) sees ``g_t``. Reverse-mode autograd across the ranks then differentiates
``sum_r L_val^(r) = W L_val`` (each rank seeds its own, equal, validation loss), so rank ``r``'s
hypergradient is its share and their mean is ``dL_val/dlam``; forward mode and finite
differences give ``dL_val/dlam`` on every rank already. The wrapper therefore returns the mean
over ranks for every method, which equals the single-process full-batch hypergradient of
:func:`~hyperdiff.methods.reverse`, ``checkpointed``, ``truncated``, ``forward`` and
``finite_difference``. Forward mode runs its ``double_vjp`` engine one tangent per backward
pass (``chunk_size=1``): ``vmap``, which batches the tangents otherwise, has no rule for a c10d
collective.

A segment (``method.segment(problem, state, raw, start, stop, val_batches, carry)``, an
online window) is sharded the same way: every rank holds the same state, carry (forward's
tangents, curvature's tangents and statistics), validation loss and train losses at ``stop``,
and the mean of the ranks' raw hypergradients, which is the single-process full-batch
segment's (``reverse``, ``truncated``, ``forward``, ``curvature``). A window with several
validation samples (``method.segment_samples``) trains once on the shards and evaluates every
sample on every rank, as offline a data-parallel method runs every training on all ranks.
The ``curvature`` method's default scale, the training batch's rows, is the whole batch's
``B``, not a shard's.

The validation batches are not sharded (each rank evaluates all of them). The train loss each
rank reports is the mean over ranks (its value; its gradient is the shard's, averaged as
above), so a diverged step is seen by every rank at once. Dropout masks are drawn from a
per-rank seed ``(seed, rank)``, deterministic for a given world size; minibatch orders use the
shared seed, so every rank slices the same batch. BatchNorm statistics are those of each
rank's shard (not synchronised), so each rank's trained buffers, and the validation loss it
computes with them, are its own: the validation loss every rank returns is the mean over the
ranks (the rank's own, bit for bit, where all ranks computed the same), so every rank records
and ranks the same losses. The implicit and reversible methods, which do not train through
``train_step``, are not supported. The first data-parallel training on a group checks that
every rank has the same problem (:func:`~hyperdiff.tuner.distributed.agree.check_ranks_agree`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data import BatchSource
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.task_batch import TaskBatch
from hyperdiff.engine.training import TrainState
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.methods.base import HyperGradient, Method, Segment
from hyperdiff.methods.curvature import batch_scale
from hyperdiff.methods.registry import make_method, methods_where, registered_constructor
from hyperdiff.seeds import rank_seed
from hyperdiff.tuner.distributed.agree import (
    WORLD_KEY,
    check_ranks_agree,
    torch_world,
    world_mismatch,
)
from hyperdiff.tuner.distributed.group import Group, current_group
from hyperdiff.typing import Batch, Params


class ShardedBatches(BatchSource):
    """Rows ``[rank n/world, (rank+1) n/world)`` of every tensor of ``source``'s batches."""

    def __init__(self, source: BatchSource, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world

    def check(self, steps: int, seed: int) -> None:
        self.source.check(steps, seed)

    def batch(self, step: int, seed: int) -> Batch:
        return self._shard(self.source.batch(step, seed), step)

    def _shard(self, batch: Any, step: int) -> Any:
        if isinstance(batch, Tensor):
            rows = batch.shape[0] if batch.dim() else 0
            if rows == 0 or rows % self.world:
                raise HyperdiffError(
                    f"data_parallel: the batch of inner step {step} must split evenly over "
                    f"{self.world} ranks along its first dimension (got a tensor of shape "
                    f"{tuple(batch.shape)})"
                )
            size = rows // self.world
            return batch[self.rank * size : (self.rank + 1) * size]
        if isinstance(batch, tuple):
            return tuple(self._shard(b, step) for b in batch)
        if isinstance(batch, list):
            return [self._shard(b, step) for b in batch]
        if isinstance(batch, dict):
            return {k: self._shard(v, step) for k, v in batch.items()}
        return batch


class _SumOverRanks(torch.autograd.Function):
    """``y = sum_r x^(r)`` on every rank; its backward is the same sum of the incoming
    gradients (``dL/dx^(r) = sum_s dL^(s)/dy``), again through this function, so it
    differentiates twice (forward mode's ``double_vjp``). Each all-reduce waits with
    :meth:`Group.all_reduce`'s heartbeat checks, so a stopped rank fails it within seconds."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, where: str) -> Tensor:
        ctx.group, ctx.where = group, where
        return group.all_reduce(where, x.detach().clone())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _SumOverRanks.apply(grad, ctx.group, ctx.where), None, None


class _MeanGradient(torch.autograd.Function):
    """The identity on this rank's flat parameters; its backward is the mean over the ranks of
    the incoming gradients (``_SumOverRanks``, differentiable again), so the gradient of a
    train loss taken through it is the mean of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, where: str) -> Tensor:
        ctx.group, ctx.where = group, where
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _SumOverRanks.apply(grad, ctx.group, ctx.where) / ctx.group.world, None, None


def averaging_gradients(params: Params, group: Group, where: str = "data_parallel") -> Params:
    """``params`` (the same values) through :class:`_MeanGradient`: a gradient taken at them is
    ``(1/W) sum_r grad^(r)``, in one all-reduce of the flattened gradient."""
    names = list(params)
    flat = _MeanGradient.apply(torch.cat([params[n].reshape(-1) for n in names]), group, where)
    pieces = torch.split(flat, [params[n].numel() for n in names])
    return {n: p.view_as(params[n]) for n, p in zip(names, pieces, strict=True)}


def shared_train_loss(problem: Problem, group: Group, where: str = "data_parallel") -> Any:
    """The train loss on this rank's shard with the mean over ranks as its value, and a
    gradient in the parameters that is the mean of the ranks' (:func:`averaging_gradients`);
    dropout draws from :func:`rank_seed`."""
    fn, takes_ctx = problem.train_loss, problem.train_takes_ctx

    def loss(params: Params, hparams: Any, batch: Batch, ctx: Any) -> Tensor:
        params = averaging_gradients(params, group, where)
        if takes_ctx:
            seed, ctx.seed = ctx.seed, rank_seed(ctx.seed, group.rank)
            try:
                value = fn(params, hparams, batch, ctx)
            finally:
                ctx.seed = seed
        else:
            value = fn(params, hparams, batch)
        if not isinstance(value, Tensor):
            return value  # call_loss reports it
        mean = group.all_reduce(where, value.detach().clone())
        return value + (mean / group.world - value.detach())

    return loss


def shard_problem(problem: Problem, group: Group, where: str = "data_parallel") -> Problem:
    """``problem`` as this rank trains it: its shard of each batch, averaged gradients
    (``where`` names the training in the error of a lost rank)."""
    return replace(
        problem, train_data=ShardedBatches(problem.train_data, group.rank, group.world),
        train_loss=shared_train_loss(problem, group, where), train_takes_ctx=True,
    )


@dataclass(frozen=True)
class DataParallelMethod(Method):
    """A hypergradient method whose inner training is data-parallel over a process group."""

    inner: Method | None = field(default=None, repr=False)
    group: Any = field(default=None, repr=False)


def _mean_over_ranks(group: Group, where: str, failure: str | None, vector: Tensor | None,
                     train_loss: float, values: Sequence[float] = ()
                     ) -> tuple[Tensor, float, list[float]]:
    """Every rank's failure, or the means over the ranks of ``vector`` (in float64, summed in
    rank order) and ``train_loss``, and ``values`` (validation losses) as every rank holds
    them: the rank's own where all ranks have the same, else their mean (BatchNorm's running
    statistics are each rank's shard's); a failure on any rank is raised on every rank."""
    local = None if vector is None else (vector.detach().double(), train_loss, list(values))
    parts = group.all_gather(where, (failure, local))
    failures = [f for f, _ in parts if f is not None]
    if failures or vector is None:
        raise NonFiniteError(failures[0] if failures else f"{where}: no result")
    total = parts[0][1][0]
    for _, (other, _, _) in parts[1:]:
        total = total + other
    agreed = [float(own) if all(p[1][2][i] == own for p in parts)
              else sum(p[1][2][i] for p in parts) / group.world
              for i, own in enumerate(values)]
    return ((total / group.world).to(vector.dtype), sum(p[1][1] for p in parts) / group.world,
            agreed)


def _run(inner: Method, group_arg: Any, problem: Problem, raw: dict[str, Tensor]
         ) -> HyperGradient:
    group = current_group(group_arg)
    if group is None:
        return inner.run(problem, raw)
    where = f"data_parallel {inner.name} (seed {problem.seed})"
    _check_once(group, problem, raw)
    group.barrier(where)
    failure, hg = None, None
    try:  # a curvature scale left to the batch's rows is the whole batch's, as in a segment
        hg = _full_batch_scale(inner, problem, 0).run(shard_problem(problem, group, where), raw)
    except NonFiniteError as err:
        failure = str(err)
    vector, train_loss, (value,) = _mean_over_ranks(
        group, where, failure, None if hg is None else hg.vector,
        0.0 if hg is None else hg.train_loss, [0.0 if hg is None else hg.value])
    assert hg is not None  # _mean_over_ranks raised otherwise
    grad = problem.hparams.unflatten(vector)
    return replace(
        hg, value=value, grad=grad,
        grad_natural=hg.hparams.natural_grad(grad, dict(raw)),
        train_loss=train_loss, diagnostics={**hg.diagnostics, "world": group.world},
    )


def _check_once(group: Group, problem: Problem, raw: dict[str, Tensor]) -> None:
    """The first data-parallel training on ``group``: refuse ranks whose problems differ
    (:func:`~hyperdiff.tuner.distributed.agree.check_ranks_agree`)."""
    if "data_parallel" not in group.agreed:
        check_ranks_agree(group, "data_parallel", [problem], raw)
        group.agreed.add("data_parallel")


def _batch(inner: Method, group_arg: Any, tasks: TaskBatch, raw: dict[str, Tensor]
           ) -> list[HyperGradient]:
    """``inner``'s batched form with no group (one process: the method unchanged), else each
    task's data-parallel training in turn (a vmapped step cannot hold the all-reduce)."""
    if current_group(group_arg) is None:
        assert inner.batch_fn is not None  # data_parallel gives a batch_fn only then
        return inner.batch_fn(tasks, raw)
    return [_run(inner, group_arg, problem, raw) for problem in tasks.problems]


def _segment(inner: Method, group_arg: Any, problem: Problem, state: TrainState,
             raw: dict[str, Tensor], start: int, stop: int, val_batches: list[Batch],
             carry: Any = None) -> Segment:
    """``inner``'s segment ``[start, stop)`` with each rank training on its shard: the state,
    the validation loss, the train losses and the carry are every rank's (equal), the raw
    hypergradient is the mean of the ranks' (module doc)."""
    return _samples(inner, group_arg, problem, state, raw, start, stop, [val_batches], carry)[0]


def _samples(inner: Method, group_arg: Any, problem: Problem, state: TrainState,
             raw: dict[str, Tensor], start: int, stop: int, val_sets: list[list[Batch]],
             carry: Any = None) -> list[Segment]:
    """:func:`_segment` at each of ``val_sets`` (``inner.segment_samples``): every rank
    evaluates every set, and each set's hypergradient is the mean of the ranks'."""
    group = current_group(group_arg)
    if group is None:
        return inner.segment_samples(problem, state, raw, start, stop, val_sets, carry)
    where = f"data_parallel {inner.name} segment [{start}, {stop}) (seed {problem.seed})"
    _check_once(group, problem, raw)
    group.barrier(where)
    method, failure, parts = _full_batch_scale(inner, problem, start), None, None
    try:
        parts = method.segment_samples(shard_problem(problem, group, where), state, raw, start,
                                       stop, val_sets, carry)
    except NonFiniteError as err:
        failure = str(err)
    vector, _, values = _mean_over_ranks(
        group, where, failure,
        None if parts is None else torch.cat([problem.hparams.flatten(p.grad) for p in parts]),
        0.0, [0.0] * len(val_sets) if parts is None else [p.value for p in parts])
    assert parts is not None  # _mean_over_ranks raised otherwise
    return [part._replace(grad=problem.hparams.unflatten(row), value=value,
                          diagnostics={**(part.diagnostics or {}), "world": group.world})
            for part, row, value in zip(parts, vector.reshape(len(parts), -1), values,
                                        strict=True)]


def _full_batch_scale(inner: Method, problem: Problem, start: int) -> Method:
    """``inner``, with a curvature scale left to the training batch (``curvature_scale``
    ``None`` or ``"rows"``) fixed to the whole batch's at ``start``, not to this rank's shard's
    (:func:`~hyperdiff.methods.curvature.batch_scale`)."""
    if inner.options.get("curvature_scale", 0) not in (None, "rows"):
        return inner
    scale = batch_scale(problem, start, inner.options["curvature_scale"])
    return registered_constructor(inner.name)(**{**inner.options, "curvature_scale": scale})


def data_parallel(method: Method | str = "reverse", group: Any = None) -> DataParallelMethod:
    """``method`` with data-parallel inner training over ``group`` (``None``: the initialised
    default group; with none, or one rank, ``method`` runs unchanged). See the module doc.

    Raises:
        HyperdiffError: for a method that does not train through ``train_step`` (implicit,
            reversible) or forward mode's ``jvp`` engine (torch.func cannot carry the
            all-reduce); forward's other engines run as ``double_vjp`` with ``chunk_size=1``.
    """
    inner = make_method(method) if isinstance(method, str) else method
    if not isinstance(inner, Method) or isinstance(inner, DataParallelMethod):
        raise HyperdiffError(f"data_parallel: method must be a Method or a name, one of "
                             f"{methods_where(data_parallel=True)} (got {inner!r})")
    if not inner.capabilities.data_parallel:
        raise HyperdiffError(f"data_parallel: method must be one of "  # capabilities say so
                             f"{methods_where(data_parallel=True)} (got {inner.name!r})")
    if inner.name == "forward" and inner.options.get("engine") == "jvp":
        raise HyperdiffError("data_parallel: forward engine must be 'double_vjp' or 'auto' "
                             "(got 'jvp': torch.func cannot differentiate the all-reduce)")
    if inner.name == "forward":  # one tangent per backward pass: vmap cannot batch c10d ops
        from hyperdiff.methods.forward import forward

        inner = forward(chunk_size=1, engine="double_vjp")
    return DataParallelMethod(
        inner.name, lambda problem, raw: _run(inner, group, problem, raw),
        {**inner.options, "data_parallel": True}, inner.capabilities,
        segment_fn=None if inner.segment_fn is None else partial(_segment, inner, group),
        samples_fn=None if inner.segment_fn is None else partial(_samples, inner, group),
        carry_fn=inner.carry_fn, saved_carry_fn=inner.saved_carry_fn, check_fn=inner.check_fn,
        batch_fn=None if inner.batch_fn is None else partial(_batch, inner, group),
        inner=inner, group=group,
    )


def loop_group(loop: Any) -> Group | None:
    """The process group the loop's trainings use: a data-parallel method's, else the
    loop's ``process_group`` (``None``: the initialised default group, if any)."""
    method = loop.method
    return current_group(method.group if isinstance(method, DataParallelMethod)
                         else loop.process_group)


def world_checked(caller: str, state: dict[str, Any], method: Any) -> dict[str, Any]:
    """``state`` with the world size of a run with the data-parallel ``method`` checked
    (refused when it was saved on another) and set to this one's (a checkpoint from before it
    was recorded resumes as it did); with another method, without the entry."""
    kept = {key: value for key, value in state.items() if key != WORLD_KEY}
    if not isinstance(method, DataParallelMethod):
        return kept
    world = torch_world(current_group(method.group))
    world_mismatch(caller, state, world)
    return {**kept, WORLD_KEY: world}


__all__ = ["DataParallelMethod", "ShardedBatches", "averaging_gradients", "data_parallel",
           "loop_group", "rank_seed", "shard_problem", "world_checked"]
