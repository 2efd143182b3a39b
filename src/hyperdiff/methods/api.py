"""The entry point: :func:`hypergradient`."""

from __future__ import annotations

from typing import Any

from hyperdiff.engine.make import make_problem
from hyperdiff.engine.models import FunctionalModel
from hyperdiff.engine.optimizers import Optimizer
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.methods import HyperGradient, Method, reverse
from hyperdiff.typing import LossFn, Params


def hypergradient(
    train_loss: LossFn,
    val_loss: LossFn,
    hparams: HyperParameters,
    params: Params | FunctionalModel | tuple[Params, Params],
    *,
    optimizer: Optimizer,
    train_data: Any,
    val_data: Any,
    steps: int,
    method: Method | None = None,
    buffers: Params | None = None,
    seed: int = 0,
) -> HyperGradient:
    """Validation loss after ``steps`` inner steps and its hypergradient.

    ``theta_{t+1} = optimizer.update(grad_theta L_train(theta_t, lam, batch_t), ...)`` for
    ``t < steps`` from ``theta_0 = params``; returns ``L_val(theta_T, lam)`` and
    ``dL_val/dlam`` (direct and indirect terms) for every hyperparameter in ``hparams``.

    Args:
        train_loss, val_loss: ``loss(params, hparams, batch)`` or ``loss(params, hparams,
            batch, ctx)`` returning a scalar; ``hparams`` maps names to natural values and
            offers ``hparams.at(name, step=, param=)``; ``ctx`` is a :class:`StepContext`
            (buffers, seed, train flag) for models with BatchNorm or dropout.
        hparams: the :class:`HyperParameters` (their current values are used).
        params: initial parameters theta_0 (name -> tensor), a :func:`functional` model (its
            parameters and BatchNorm buffers are used) or a pair ``(params, buffers)``; the
            forms :func:`make_problem` takes too.
        optimizer: inner optimizer (:func:`sgd`, :func:`adam`, :func:`adamw`).
        train_data: a batch, a list of batches, an iterable/DataLoader, a one-shot iterator
            or ``fn(step)``; see :mod:`hyperdiff.engine.data`.
        val_data: a batch or a list/iterable of batches (their losses are averaged).
        steps: number of inner steps T.
        method: :func:`reverse` (default), :func:`forward`, :func:`finite_difference`, ...
        buffers: initial buffers when ``params`` is a dict (BatchNorm running statistics).
        seed: fixes minibatch order and dropout masks.

    Returns:
        A :class:`HyperGradient`: ``.value``, ``.grad`` (raw), ``.grad_natural``, ...

    Raises:
        HyperdiffError: bad input, with the argument and what is valid.
        NonFiniteError: training diverged or the hypergradient is not finite.
    """
    method = reverse() if method is None else method
    if not isinstance(method, Method):
        raise HyperdiffError(
            "hypergradient: method must be made by hd.reverse(), hd.forward(), "
            f"hd.finite_difference(), ... (got {type(method).__name__})"
        )
    problem = make_problem(
        train_loss, val_loss, hparams, params, optimizer=optimizer, train_data=train_data,
        val_data=val_data, steps=steps, buffers=buffers, seed=seed, caller="hypergradient",
    )
    method.check(problem)  # before any training (a refusal, not a silent zero)
    return method(problem)
