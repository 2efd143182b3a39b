"""Implicit differentiation at the end point of training (no stored or replayed steps).

**Stationary form.** If training ends at ``theta*`` with ``g(theta*, lam) = grad_theta
L_train(theta*, lam) = 0``, the implicit function theorem gives ``dtheta*/dlam = -H^-1
d2L_train/dtheta dlam`` with ``H = dg/dtheta`` the Hessian, hence

    dL_val/dlam = dL_val/dlam|direct - (d2L_train/dlam dtheta)^T v,   H v = dL_val/dtheta,

one linear solve with Hessian-vector products and one mixed vjp ``d/dlam <g, v>``.

**Fixed-point form.** If training ends at a fixed point ``theta* = Phi(theta*, lam)`` of an
update map, ``dtheta*/dlam = (I - dPhi/dtheta)^-1 dPhi/dlam``, hence

    dL_val/dlam = dL_val/dlam|direct + (dPhi/dlam)^T v,   (I - dPhi/dtheta)^T v = dL_val/dtheta.

``Phi`` is one step of the problem's own optimizer, ``Phi(theta, lam) = update(g(theta, lam),
state_T, theta, lam, step=T-1)``, with the optimizer state (momentum, Adam moments) frozen at
its final value. This captures hyperparameters that act through the optimizer (coupled weight
decay, and learning rates, whose hypergradient vanishes at a fixed point). AdamW's decoupled
weight decay is refused: at its fixed point the moments follow theta (``m = g``, ``v = g^2``,
``wd theta + g / (|g| + eps) = 0``), which frozen moments do not describe. For plain SGD the
system is ``lr (H + wd I)``, symmetric; with Adam or per-parameter learning rates it is not
symmetric, and :func:`~hyperdiff.engine.solvers.exact` or :func:`~hyperdiff.engine.solvers.neumann`
should be used instead of CG.

**Which training loss.** ``L_train`` at ``theta*`` is the mean train loss over the batches of
one epoch of the source, batch ``i`` evaluated as at inner step ``i`` (same seed and context):
the one batch of a full-batch source; all batches of a list; the ``n // batch_size`` batches of
epoch 0 of :func:`hyperdiff.minibatches`; the first epoch of a DataLoader. Sources without an
epoch (``fn(step)``, iterators) use the step-0 batch. ``train_batches=m`` overrides this with
the batches of steps ``0 .. m-1``.

The answer is exact only at a stationary (fixed) point: diagnostics report the gradient norm
(fixed-point residual) at ``theta*`` relative to its value at the start, and a
:class:`~hyperdiff.engine.solvers.ConvergenceWarning` is emitted when it is above
``stationarity_tol`` or the linear solve did not converge.

**Initialization.** At a stationary point of a training loss that does not read theta_0
(``hd.initialization``) the end point does not depend on it, and its implicit hypergradient
is zero: such a problem is refused. With iMAML's proximal term
(:func:`~hyperdiff.hparams.initialization.proximal`, ``(s/2)||theta - theta_0||^2`` in the
training loss) the stationary form gives ``dL_val/dtheta_0 = s (H + s I)^-1 dL_val/dtheta``,
iMAML's meta-gradient (``H`` the Hessian of the task's loss without the term), in memory
independent of T.

**Segment** (:func:`implicit_segment`, an online window): train the window plainly, then the
stationary form at the current ``theta`` (Lorraine et al. 2020) with ``H`` the Hessian of
``L_train`` on the window's last training batch. Hyperparameters that act only through the
optimizer (learning rates, momentum) get 0: use it for those of the loss.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.data import FullBatch, Minibatches, Recorded, Sequence, Streamed
from hyperdiff.engine.device import unwrap
from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, call_loss, sum_in_order
from hyperdiff.engine.solvers import ConvergenceWarning, Solver, SolveResult, cg, exact, neumann
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    flat,
    grads_of,
    initial_state,
    unroll,
    validation_loss,
)
from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    describe,
    positive_float,
    positive_int,
)
from hyperdiff.methods.base import (
    Capabilities,
    HyperGradient,
    Method,
    Segment,
    finish,
    zeros_for_unused,
)
from hyperdiff.methods.segments import at_val_batches, detached_state
from hyperdiff.typing import Batch, Params
from hyperdiff.wording import option


def epoch_batches(problem: Problem) -> int:
    """Number of batches averaged into ``L_train`` by default (see the module doc)."""
    source = unwrap(problem.train_data)  # the source under Problem.to's device wrapper
    if isinstance(source, FullBatch):
        return 1
    if isinstance(source, Sequence):
        return len(source.batches)
    if isinstance(source, Minibatches):
        return source.per_epoch
    if isinstance(source, Streamed):
        return source.epoch_length(problem.seed)
    if isinstance(source, Recorded):
        return 1
    return 1


def _check_train_batches(problem: Problem, batches: int) -> None:
    """Refuse ``train_batches`` beyond the batches of a one-shot iterator (training itself
    needed only ``steps`` of them, so the source's own message would name steps)."""
    source = unwrap(problem.train_data)
    if not isinstance(source, Recorded):
        return
    try:
        source.check(batches, problem.seed)
    except HyperdiffError:
        raise HyperdiffError(
            f"implicit: train_batches must be at most {len(source.batches)}, the batches the "
            f"one-shot train_data iterator held (got {batches}); leave it out, or pass a "
            "re-iterable (a list or DataLoader) or a callable fn(step)"
        ) from None


def train_objective(problem: Problem, batches: int):
    """``L(params, hview)``: mean train loss over the batches of steps ``0 .. batches-1``."""
    data = [(s, problem.train_data.batch(s, problem.seed)) for s in range(batches)]

    def objective(params: Params, hview: Any) -> Tensor:
        losses = [
            call_loss(problem, "train_loss", params, hview, batch,
                      StepContext(step=step, seed=problem.seed, train=True, buffers={}))
            for step, batch in data
        ]
        return sum_in_order(losses) / len(losses)

    return objective


def _vjp(output: Tensor, inputs: list[Tensor], v: Tensor, *, retain: bool) -> Tensor:
    """``(d output / d inputs)^T v`` as one flat vector (zeros where independent)."""
    if not output.requires_grad:
        return torch.zeros(sum(x.numel() for x in inputs), dtype=v.dtype, device=v.device)
    grads = torch.autograd.grad(output, inputs, v, retain_graph=retain, allow_unused=True)
    return flat(zeros_for_unused(grads, inputs))


class _System(NamedTuple):
    """The linear system ``A v = dL_val/dtheta`` and the map from ``v`` to the indirect term."""

    matvec: Callable[[Tensor], Tensor]
    indirect: Callable[[Tensor], Tensor]
    measure: float  # distance from stationarity now ...
    reference: float  # ... and at the start of training
    drift: Tensor  # e with A^T-solve delta = e: theta* - theta_T ~ A^-1 e (first order)


def _stationary_system(g: Tensor, theta: list[Tensor], raw: list[Tensor], start: float):
    """``H v = b`` with ``H v = d<g, v>/dtheta``; indirect term ``-d<g, v>/du``."""
    return _System(
        matvec=lambda v: _vjp(g, theta, v, retain=True),
        indirect=lambda v: -_vjp(g, raw, v, retain=False),
        measure=float(g.detach().norm()),
        reference=start,
        drift=-g.detach(),  # Newton step: theta* - theta_T ~ -H^-1 g
    )


def _fixed_point_system(phi: Tensor, theta: list[Tensor], raw: list[Tensor], first: float):
    """``(I - dPhi/dtheta)^T v = b``; indirect term ``(dPhi/du)^T v``."""
    step = phi.detach() - flat(theta).detach()
    return _System(
        matvec=lambda v: v - _vjp(phi, theta, v, retain=True),
        indirect=lambda v: _vjp(phi, raw, v, retain=False),
        measure=float(step.norm()),
        reference=first,
        drift=step,  # theta* - theta_T ~ (I - dPhi/dtheta)^-1 (Phi(theta_T) - theta_T)
    )


def _end_of_training(problem: Problem, raw: dict[str, Tensor]):
    """Plain training; returns theta_T's state, the length of the first step, the losses."""
    hview = problem.hparams.view(raw)
    with torch.no_grad():
        state0 = initial_state(problem, hview, differentiable=False)
    state1, first_loss = unroll(problem, hview, state0, stop=1, differentiable=False)
    state, losses = unroll(problem, hview, state1, start=1, differentiable=False)
    losses = torch.cat([first_loss, losses])
    check_finite_losses(losses, "implicit")
    first_step = float((flat(state1.params.values()) - flat(state0.params.values())).norm())
    return state, first_step, losses


def _decoupled_decay(problem: Problem) -> Any:
    """AdamW's weight decay coefficient when it is not the number 0, else ``None``."""
    if problem.optimizer.name != "adamw":
        return None
    decay = problem.optimizer.coefficients.get("weight_decay", 0.0)
    zero = isinstance(decay, (int, float)) and not isinstance(decay, bool) and decay == 0
    return None if zero else decay


def _adamw_advice() -> str:
    """What to use instead of either implicit form for AdamW's decoupled weight decay."""
    exact = option("reverse(), forward() or checkpointed()",
                   'method.name = "reverse", "forward" or "checkpointed"')
    return (f"use {exact} (exact through the steps), or adam() without weight decay and the "
            "decay written into train_loss as (wd/2) ||theta||^2 (a different training, whose "
            "end point is a stationary point of train_loss)")


def _refuse_decoupled_decay(problem: Problem) -> None:
    """Refuse the fixed-point form for AdamW with weight decay: at AdamW's fixed point the
    moments follow theta (``m = g``, ``v = g^2``), so ``wd theta + g / (|g| + eps) = 0``; ``Phi``
    with the moments frozen at their final values scales the curvature by ``(1 - b1) / (sqrt v
    + eps)`` but not the decoupled ``wd I`` term, and its hypergradient is wrong (about 2x on a
    converged run)."""
    decay = _decoupled_decay(problem)
    if decay is None:
        return
    raise HyperdiffError(
        f"implicit: {option('fixed_point=True', 'method.fixed_point = true')} must not be used "
        "with adamw's decoupled weight decay "
        f"(got weight_decay={describe(decay)}); at AdamW's fixed point Adam's moments move with "
        "theta, which the fixed-point form freezes at their final values, so its hypergradient "
        f"would be wrong (about 2x on a converged run); {_adamw_advice()}"
    )


def _stationarity(system: _System, tol: float, dtype: torch.dtype, fixed_point: bool, warn: bool,
                  decoupled: bool = False):
    """``(relative measure, stationary)``; warns when not stationary."""
    measure, reference = system.measure, system.reference
    relative = measure / reference if reference > 0 else (0.0 if measure == 0 else math.inf)
    stationary = relative <= tol or measure <= math.sqrt(torch.finfo(dtype).eps)
    if warn and not stationary:
        what = "fixed-point residual ||Phi(theta) - theta||" if fixed_point else "||grad L_train||"
        hint = ""
        if decoupled and not fixed_point:
            hint = ("; adamw's decoupled weight decay keeps the end point off the stationary "
                    f"points of train_loss, and neither implicit form models it: {_adamw_advice()}")
        elif not fixed_point:
            hint = ("; if the optimizer adds to the gradient (weight decay), use "
                    + option("fixed_point=True", "method.fixed_point = true"))
        warnings.warn(
            f"implicit: training did not reach a stationary point: {what} = {measure:.3g} is "
            f"{relative:.3g} of its value at the start "
            f"({option('stationarity_tol', 'method.stationarity_tol')}={tol:g}); the implicit "
            f"hypergradient is biased; train longer{hint}",
            ConvergenceWarning,
            stacklevel=5,
        )
    return relative, stationary


def _implicit(
    problem: Problem,
    raw: dict[str, Tensor],
    solver: Solver,
    fixed_point: bool,
    stationarity_tol: float,
    val_change_tol: float,
    warn: bool,
    train_batches: int | None,
) -> HyperGradient:
    started = time.perf_counter()
    if problem.buffers:
        exact = option("reverse() or forward()", 'method.name = "reverse" or "forward"')
        raise HyperdiffError(
            f"implicit: the model must have no buffers (got BatchNorm running statistics "
            f"{list(problem.buffers)[:3]}); the end point of training is not a stationary point "
            f"of a loss of the parameters alone; use {exact}"
        )
    if fixed_point:
        _refuse_decoupled_decay(problem)
    hp = problem.hparams
    raw = {n: v.detach() for n, v in raw.items()}
    state, first_step, losses = _end_of_training(problem, raw)
    trained = time.perf_counter()

    if train_batches is not None:
        _check_train_batches(problem, train_batches)
    batches = epoch_batches(problem) if train_batches is None else train_batches
    objective = train_objective(problem, batches)
    theta = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    leaves = {n: v.clone().requires_grad_() for n, v in raw.items()}
    hview = hp.view(leaves)
    theta_list, raw_list = list(theta.values()), list(leaves.values())

    # right-hand side dL_val/dtheta and the direct term dL_val/du (through a view of its own:
    # this backward pass frees the graph of the natural values it reads, which g's vjps need)
    value = validation_loss(problem, theta, {}, hp.view(leaves))
    inputs = theta_list + raw_list
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    rhs, direct = flat(grads[: len(theta_list)]), flat(grads[len(theta_list) :])

    # g(theta*, u) = grad L_train, kept with its graph for the vjps
    grad = grads_of(objective(theta, hview), theta, create_graph=True)
    g = flat(grad.values())
    if problem.initialization is not None:
        _check_reads_initialization(problem, g, leaves[problem.initialization])
    start_norm = _start_gradient_norm(problem, objective, hp.view(raw))
    if fixed_point:  # Phi = one optimizer step, state frozen at the end of training
        new_params, _ = problem.optimizer.update(
            grad, state.opt_state, theta, hview, problem.steps - 1
        )
        system = _fixed_point_system(flat(new_params.values()), theta_list, raw_list, first_step)
    else:
        system = _stationary_system(g, theta_list, raw_list, start_norm)

    _refuse_nonfinite_rhs(rhs, "implicit")
    solve_started = time.perf_counter()
    result = solver(system.matvec, rhs.detach(), warn=False)
    _refuse_nonfinite_matrix(result, solver, "implicit", fixed_point)
    if warn and not result.converged:
        warnings.warn(f"{solver.name}: {result.info}", ConvergenceWarning, stacklevel=2)
    indirect = system.indirect(result.x)
    solved = time.perf_counter()

    relative, stationary = _stationarity(system, stationarity_tol, problem.dtype, fixed_point, warn,
                                         _decoupled_decay(problem) is not None)
    # first-order change of L_val on the way from theta_T to theta*: <b, A^-1 e> = <v, e>
    val_change = float(result.x @ system.drift)
    scale = max(abs(float(value.detach())), torch.finfo(problem.dtype).tiny)
    relative_change = abs(val_change) / scale
    if relative_change > val_change_tol:
        if warn and stationary:
            warnings.warn(
                f"implicit: training did not reach a stationary point: to first order the "
                f"validation loss would still change by {val_change:.3g} "
                f"({relative_change:.3g} of itself; "
                f"{option('val_change_tol', 'method.val_change_tol')}={val_change_tol:g}) on "
                "the way to it, although the gradient test passed; the implicit hypergradient is "
                "biased; train longer",
                ConvergenceWarning,
                stacklevel=4,
            )
        stationary = False
    grad_norm = float(g.detach().norm())
    diagnostics: dict[str, Any] = {
        "form": "fixed_point" if fixed_point else "stationary",
        "solver": repr(solver),
        "iterations": result.iterations,
        "matvecs": result.matvecs,
        "residual": result.residual,
        "converged": result.converged,
        "solver_info": result.info,
        "grad_norm": grad_norm,
        "start_grad_norm": start_norm,
        "relative_grad_norm": grad_norm / start_norm if start_norm > 0 else math.inf,
        "relative_stationarity": relative,
        "val_change": val_change,
        "relative_val_change": relative_change,
        "stationary": stationary,
        "train_batches": batches,
        "time_train_s": trained - started,
        "time_solve_s": solved - solve_started,
    }
    if fixed_point:
        diagnostics["fixed_point_residual"] = system.measure
    return finish(
        problem,
        leaves,
        method="implicit",
        value=value,
        grad=hp.unflatten(direct + indirect),
        params=theta,
        buffers={},
        train_losses=losses,
        started=started,
        **diagnostics,
    )


def _refuse_nonfinite_rhs(rhs: Tensor, caller: str) -> None:
    """Raise :class:`NonFiniteError` when ``dL_val/dtheta``, the solve's right-hand side, has NaN
    or inf entries (a solver would stop at once and the hypergradient read 0)."""
    bad = int((~torch.isfinite(rhs.detach())).sum())
    if bad:
        raise NonFiniteError(
            f"{caller}: the gradient of val_loss with respect to the parameters at the end point "
            f"of training must be finite (got {bad} NaN or inf entries of {rhs.numel()}); "
            "val_loss is not differentiable there (e.g. a norm, sqrt or |x| ** 0.75 at 0): "
            "smooth it, e.g. sqrt(x ** 2 + eps) for |x|"
        )


def _refuse_nonfinite_matrix(result: SolveResult, solver: Solver, caller: str,
                             fixed_point: bool) -> None:
    """Raise :class:`NonFiniteError` when the solve met NaN or inf products: the system's
    matrix is not finite at the end point, and the solver's estimate would be a wrong number."""
    if result.matrix_finite:
        return
    matrix = ("I - dPhi/dtheta (Phi one optimizer step)" if fixed_point
              else "the Hessian of train_loss")
    raise NonFiniteError(
        f"{caller}: {matrix} at the end point of training must be finite for the linear solve "
        f"(got NaN or inf in its products with vectors in the {solver.name} solve); train_loss "
        "is not twice differentiable there (e.g. |x| ** 1.5, sqrt or norm at 0): smooth it, "
        "e.g. sqrt(x ** 2 + eps) for |x|"
    )


def _check_reads_initialization(problem: Problem, g: Tensor, leaf: Tensor) -> None:
    """Refuse an initialization that the training loss does not read: at a stationary point
    of a loss independent of theta_0 the implicit hypergradient of theta_0 is zero, which is
    not MAML's (only iMAML's proximal term ties the end point to theta_0)."""
    if torch.autograd.grad(g, leaf, torch.ones_like(g), retain_graph=True,
                           allow_unused=True)[0] is None:
        exact = option("reverse(), forward() or checkpointed()",
                       'method.name = "reverse", "forward" or "checkpointed"')
        name = problem.initialization
        raise HyperdiffError(
            f"implicit: the initialization {name!r} must be read by train_loss (got a "
            "train_loss that does not read it, at whose stationary point the implicit "
            "hypergradient of theta_0 is zero, not MAML's); add iMAML's proximal term "
            f"proximal(params, hparams, {name!r}, strength) from "
            f"hyperdiff.hparams.initialization, or use {exact} for MAML's hypergradient "
            "through the inner steps"
        )


def _start_gradient_norm(problem: Problem, objective, hview) -> float:
    """``||grad_theta L_train(theta_0)||``: the scale for the stationarity test."""
    start = initial_state(problem, hview, differentiable=False).params
    params = {k: v.detach().clone().requires_grad_() for k, v in start.items()}
    with torch.enable_grad():
        grads = grads_of(objective(params, hview), params, create_graph=False)
    return float(flat(grads.values()).norm())


def implicit_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                     stop: int, val_batches: list[Batch], carry: Any = None, *,
                     solver: Solver) -> Segment:
    """Train steps ``start .. stop-1`` plainly, then one implicit-function solve at the current
    parameters with the Hessian of the last training batch's loss (module doc)."""
    return implicit_samples(problem, state, raw, start, stop, [val_batches], carry,
                            solver=solver)[0]


def implicit_samples(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                     stop: int, val_sets: list[list[Batch]], carry: Any = None, *,
                     solver: Solver) -> list[Segment]:
    """:func:`implicit_segment` at each of ``val_sets``: the window and the train gradient's
    graph once; per set one validation gradient, one solve and one mixed product."""
    hp = problem.hparams
    with torch.no_grad():
        end, losses = unroll(problem, hp.view(problem.raw_tensors(raw)), state, start=start,
                             stop=stop, differentiable=False)
    check_finite_losses(losses, "online implicit", start)
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = hp.view(leaves)
    theta = {k: v.detach().requires_grad_() for k, v in end.params.items()}
    theta_list, kept, segments = list(theta.values()), detached_state(end), []
    with torch.enable_grad():
        batch = problem.train_data.batch(stop - 1, problem.seed)
        ctx = StepContext(step=stop - 1, seed=problem.seed, train=True, buffers=end.buffers)
        train = call_loss(problem, "train_loss", theta, hview, batch, ctx)
        g = flat(grads_of(train, theta, create_graph=True).values())

        def hvp(v: Tensor) -> Tensor:
            out = torch.autograd.grad(g, theta_list, v, retain_graph=True, allow_unused=True)
            return flat(zeros_for_unused(out, theta_list))

        for val in val_sets:
            value = validation_loss(at_val_batches(problem, val), theta, end.buffers,
                                    hp.view(leaves))  # its own graph of the natural values
            inputs = [*theta_list, *leaves.values()]
            found = torch.autograd.grad(value, inputs, allow_unused=True)
            grads = zeros_for_unused(found, inputs)
            direct = hp.flatten(dict(zip(leaves, grads[len(theta_list):], strict=True)))
            rhs = flat(grads[: len(theta_list)]).detach()
            _refuse_nonfinite_rhs(rhs, "implicit (an online window)")
            result = solver(hvp, rhs, warn=False)
            _refuse_nonfinite_matrix(result, solver, "implicit (an online window)", False)
            mixed = torch.autograd.grad(g, list(leaves.values()), result.x, allow_unused=True,
                                        retain_graph=True)
            _refuse_unseen(found[len(theta_list):], mixed, list(leaves))
            indirect = -hp.flatten(dict(zip(leaves, zeros_for_unused(
                mixed, list(leaves.values())), strict=True)))
            diagnostics = {"iterations": result.iterations, "residual": result.residual,
                           "converged": result.converged}
            segments.append(Segment(kept, hp.unflatten(direct + indirect),
                                    float(value.detach()), losses, None, diagnostics))
    return segments


def _refuse_unseen(direct: tuple[Tensor | None, ...], mixed: tuple[Tensor | None, ...],
                   names: list[str]) -> None:
    """Raise when no hyperparameter reaches the window's losses: the stationary form's
    hypergradient would be identically 0 (they act through the optimizer alone)."""
    if all(d is None and m is None for d, m in zip(direct, mixed, strict=True)):
        raise HyperdiffError(
            f"implicit (an online window): at least one hyperparameter must be read by "
            f"train_loss or val_loss (got {names}, which act through the optimizer alone: "
            "learning rates, momentum, its weight decay), since the window's stationary form "
            "sees the losses only and would give them a hypergradient of 0; use method "
            "'curvature' (the online default) or 'reverse'")


def _flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``, else raise (``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise HyperdiffError(f"implicit: {name} must be True or False (got {describe(value)})")
    return value


CAPABILITIES = Capabilities(exact=False, offline=True, online=True, segment_options=("solver",))

SOLVERS: dict[str, Callable[[], Solver]] = {"cg": cg, "neumann": neumann, "exact": exact}
"""Solver names accepted by :func:`implicit` (default options), e.g. from a TOML config."""


def implicit(
    solver: Solver | str | None = None,
    *,
    fixed_point: bool = False,
    stationarity_tol: float = 1e-3,
    val_change_tol: float = 1e-5,
    warn: bool = True,
    train_batches: int | None = None,
) -> Method:
    """Hypergradient by the implicit function theorem at the end point of training.

    Trains for ``problem.steps`` plain steps, then solves one linear system with
    Hessian-vector products (stationary form) or vjps of one optimizer step (fixed-point form);
    see the module doc for the equations. Memory O(params), independent of T.

    Args:
        solver: linear solver (default ``cg()``: tol 1e-7 in float64, maxiter 1000), or the
            name ``"cg"``, ``"neumann"`` or ``"exact"`` for its default options.
        fixed_point: use ``theta* = Phi(theta*)`` with ``Phi`` one optimizer step (needed when
            the optimizer itself carries hyperparameters such as weight decay; refused for
            ``adamw`` with weight decay, see the module doc).
        val_change_tol: also warn when, to first order, ``L_val`` would still change by more
            than this fraction of itself between ``theta_T`` and the stationary (fixed) point:
            ``|<v, H^-1 grad L_train>|`` (``v`` the solve's solution; free). On the built-in
            tasks the hypergradient's relative error was 4-580 times this quantity
            (``docs/implicit.md``).
        stationarity_tol: warn when the gradient norm (fixed-point residual) at ``theta*`` is
            above this fraction of its value at the start of training.
        warn: emit :class:`~hyperdiff.engine.solvers.ConvergenceWarning` for a solve that did not
            converge or a non-stationary end point.
        train_batches: average ``L_train`` over the batches of steps ``0 .. m-1`` (default:
            one epoch of the source; see the module doc).

    Returns a :class:`Method`; ``result.diagnostics`` holds ``form``, ``solver``,
    ``iterations``, ``residual``, ``converged``, ``solver_info``, ``grad_norm``,
    ``relative_grad_norm``, ``stationary`` and timings.

    Raises:
        HyperdiffError: an invalid option (``fixed_point`` and ``warn`` must be bools); (when
            called) ``fixed_point=True`` with ``adamw``'s weight decay, whose fixed point the
            frozen moments of ``Phi`` do not describe.
        NonFiniteError: (when called) the Hessian at the end point has NaN or inf entries
            (``SolveResult.matrix_finite`` is ``False``): no solver's estimate would be right;
            or ``dL_val/dtheta`` there has.
    """
    solver = cg() if solver is None else solver
    if isinstance(solver, str) and solver in SOLVERS:
        solver = SOLVERS[solver]()
    if not isinstance(solver, Solver):
        raise HyperdiffError(
            "implicit: solver must be made by hyperdiff.engine.solvers.cg(), neumann() or exact(), "
            f"or be one of {sorted(SOLVERS)} (got {describe(solver)})"
        )
    fixed_point, warn = _flag("fixed_point", fixed_point), _flag("warn", warn)
    stationarity_tol = positive_float("implicit", "stationarity_tol", stationarity_tol)
    val_change_tol = positive_float("implicit", "val_change_tol", val_change_tol)
    if train_batches is not None:
        train_batches = positive_int("implicit", "train_batches", train_batches)
    options = {"solver": solver, "fixed_point": fixed_point, "stationarity_tol": stationarity_tol,
               "val_change_tol": val_change_tol}
    if train_batches is not None:
        options["train_batches"] = train_batches
    return Method(
        "implicit",
        lambda problem, raw: _implicit(
            problem, raw, solver, fixed_point, stationarity_tol, val_change_tol, warn,
            train_batches,
        ),
        options,
        capabilities=CAPABILITIES,
        segment_fn=partial(implicit_segment, solver=solver),
        samples_fn=partial(implicit_samples, solver=solver),
    )
