"""Forward mode: carry the tangents Z_t = d(theta_t, state_t)/dlam through training.

With ``Phi`` one inner step (gradient and optimizer update), ``s_{t+1} = Phi(s_t, lam)`` and

    Z_{t+1} = dPhi/ds * Z_t + dPhi/dlam,    Z_0 = ds_0/dlam,

one Jacobian-vector product of ``Phi`` per hyperparameter coordinate (``Z`` has shape
``(k, *s.shape)``). ``Z_0`` is zero, except for an initialization hyperparameter
(``hd.initialization``, theta_0 = u): one-hot in its coordinates, which makes k at least the
number of parameters. The state ``s`` holds parameters, buffers and the optimizer state
(momentum, Adam moments), so every optimizer is differentiated exactly. Memory is independent
of T; cost grows with k. At the end ``dL_val/dlam = dL_val/dlam|direct + sum_s <dL_val/ds,
Z_T>``. Two engines compute the products, with the same result:

- ``"double_vjp"`` (the default): two reverse passes. ``Phi``'s graph is built with autograd
  as in reverse mode, its vjp ``u = J^T w`` is taken with a graph at a dummy ``w``, and then
  ``J z = d<u, z>/dw`` for all k tangents in one batched backward pass
  (``is_grads_batched``). On the digits MLP it is 1.2-3x faster than ``"jvp"`` for k = 1..100,
  at 10-30% more peak memory; it needs third derivatives of the model's operations.
- ``"jvp"``: ``torch.func.jvp`` of ``Phi`` (its gradient by ``torch.func.grad``), batched over
  the k coordinates with ``torch.func.vmap``; functorch's per-operation overhead dominates
  small models. ``engine="auto"`` falls back to it when an operation has no third derivative.

Its segment (:func:`forward_segment`) carries ``(s, Z)`` across online windows from step 0
(real-time forward mode, RTHO; Franceschi et al. 2017): ``dL/dlam = dL/dlam|direct +
<dL/ds_{t1}, Z_{t1}>``, exact for hyperparameters held fixed since step 0, memory independent of
the run's length.
"""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, call_loss, sum_in_order
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    initial_state,
    train_step,
    validation_loss,
)
from hyperdiff.errors import HyperdiffError, positive_int
from hyperdiff.methods.base import (
    Capabilities,
    HyperGradient,
    Method,
    Segment,
    finish,
    zeros_for_unused,
)
from hyperdiff.methods.segments import at_val_batches, sample_grads
from hyperdiff.tree import tree_flatten, tree_map, tree_unflatten
from hyperdiff.typing import Batch

CAPABILITIES = Capabilities(exact=True, offline=True, online=True, carries_state=True,
                            data_parallel=True, segment_options=("chunk_size", "engine"))


def _step_function(problem: Problem, step: int):
    """``Phi_t(params, buffers, opt_state, raw) -> ((params', buffers', opt_state'), loss)``."""
    batch = problem.train_data.batch(step, problem.seed)

    def phi(params, buffers, opt_state, raw):
        hview = problem.hparams.view(raw)

        def loss_of(p):
            ctx = StepContext(step=step, seed=problem.seed, train=True, buffers=buffers)
            loss = call_loss(problem, "train_loss", p, hview, batch, ctx)
            return loss, (loss, {**buffers, **ctx.new_buffers})

        grads, (loss, new_buffers) = torch.func.grad(loss_of, has_aux=True)(params)
        new_params, new_state = problem.optimizer.update(grads, opt_state, params, hview, step)
        return (new_params, new_buffers, new_state), loss

    return phi


def _coordinate_tangents(problem: Problem, raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """One-hot tangents for the raw values: name -> (k, *shape)."""
    k = problem.hparams.numel
    eye = torch.eye(k, dtype=problem.hparam_dtype, device=problem.device)
    out, start = {}, 0
    for name, value in raw.items():
        size = value.numel()
        out[name] = eye[:, start : start + size].reshape(k, *value.shape)
        start += size
    return out


def _contract(grads: list[Tensor], tangents: list[Tensor]) -> Tensor:
    """``sum_j <grads[j], tangents[j][i]>`` for every coordinate i: shape (k,)."""
    return sum_in_order(
        [z.reshape(z.shape[0], -1) @ g.reshape(-1) for g, z in zip(grads, tangents, strict=True)]
    )


ENGINES = ("auto", "jvp", "double_vjp")


def _unroll_double_vjp(problem: Problem, raw: dict[str, Tensor], raw_tangent: dict[str, Tensor],
                       chunk_size: int | None, state=None, tangent=None, start: int = 0,
                       stop: int | None = None):
    """``(s_T, Z_T, losses)`` with ``J z`` from two reverse passes per step (module doc);
    steps ``start .. stop-1`` from ``(state, tangent)`` (default: theta_0 and Z = 0)."""
    hp, k = problem.hparams, problem.hparams.numel
    state, tangent = _start(problem, raw, state, tangent)
    leaves, spec = tree_flatten(tuple(state))
    tangents = tree_flatten(tuple(tangent))[0]
    names, raw_z = list(raw), list(raw_tangent.values())
    stop = problem.steps if stop is None else stop
    losses = torch.empty(stop - start, dtype=problem.hparam_dtype, device=problem.device)
    for step in range(start, stop):
        xs = [x.detach().requires_grad_(x.is_floating_point()) for x in leaves]
        us = [raw[n].detach().requires_grad_() for n in names]
        params, buffers, opt_state = tree_unflatten(xs, spec)
        hview = hp.view(dict(zip(names, us, strict=True)))
        new = train_step(problem, params, buffers, opt_state, hview, step, differentiable=True)
        losses[step - start] = new[3]
        outs, _ = tree_flatten(tuple(new[:3]))
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        ws = [torch.zeros_like(outs[i], requires_grad=True) for i in live]
        inputs = [x for x in xs if x.requires_grad] + us
        z_inputs = [z for x, z in zip(xs, tangents, strict=True) if x.requires_grad] + raw_z
        vjps = torch.autograd.grad([outs[i] for i in live], inputs, ws, create_graph=True,
                                   allow_unused=True)
        used = [(u, z) for u, z in zip(vjps, z_inputs, strict=True)
                if u is not None and u.requires_grad]
        chunks = []  # J z for chunks of coordinates, one batched backward pass each
        for lo, hi in itertools.pairwise([*range(0, k, chunk_size or k), k] if used else []):
            jz = torch.autograd.grad(
                [u for u, _ in used], ws, [z[lo:hi] if hi - lo > 1 else z[lo] for _, z in used],
                retain_graph=hi < k, allow_unused=True, is_grads_batched=hi - lo > 1,
            )
            chunks.append([torch.zeros((hi - lo, *w.shape), dtype=w.dtype, device=w.device)
                           if g is None else g.reshape(hi - lo, *w.shape)
                           for g, w in zip(jz, ws, strict=True)])
        found = {i: torch.cat([c[slot] for c in chunks]).detach()  # no chunks: all zero
                 for slot, i in enumerate(live if chunks else [])}
        tangents = [found[i] if i in found else x.new_zeros((k, *x.shape))
                    for i, x in enumerate(outs)]
        leaves = [o.detach() for o in outs]
    return tree_unflatten(leaves, spec), tree_unflatten(tangents, spec), losses


def _unroll_jvp(problem: Problem, raw: dict[str, Tensor], raw_tangent: dict[str, Tensor],
                chunk_size: int | None, state=None, tangent=None, start: int = 0,
                stop: int | None = None):
    """``(s_T, Z_T, losses)`` with vmapped ``torch.func.jvp`` of each step (module doc);
    steps ``start .. stop-1`` from ``(state, tangent)`` (default: theta_0 and Z = 0)."""
    k = problem.hparams.numel
    state, tangent = _start(problem, raw, state, tangent)
    state, tangent = tuple(state), tuple(tangent)
    stop = problem.steps if stop is None else stop
    losses = torch.empty(stop - start, dtype=problem.hparam_dtype, device=problem.device)
    for step in range(start, stop):
        phi = _step_function(problem, step)

        def push(z_state, z_raw, phi=phi, state=state):
            out, z_out, loss = torch.func.jvp(
                phi, (*state, raw), (*z_state, z_raw), has_aux=True
            )
            return out, z_out, loss

        batched = torch.func.vmap(
            push, in_dims=(0, 0), out_dims=(None, 0, None),  # type: ignore[arg-type]
            randomness="same",
        )
        try:
            if chunk_size is None or chunk_size >= k:
                state, tangent, loss = batched(tangent, raw_tangent)
            else:  # same result, lower peak memory: the primal step is recomputed per chunk
                pieces = [
                    batched(*tree_map(lambda z, i=i: z[i : i + chunk_size],
                                      (tangent, raw_tangent)))
                    for i in range(0, k, chunk_size)
                ]
                state, loss = pieces[0][0], pieces[0][2]
                tangent = tree_map(lambda *zs: torch.cat(zs), *[p[1] for p in pieces])
        except RuntimeError as err:
            if "ZeroTensors are immutable" in str(err):
                raise HyperdiffError(
                    f"forward(engine='jvp'): torch's jvp failed at step {step} ({err}); some "
                    "operations' forward-mode formulas (F.mse_loss's, among others) write into "
                    "a zero tangent that torch.func keeps read-only. Use engine='double_vjp' or "
                    "'auto' (the same hypergradient)"
                ) from err
            if not any(words in str(err) for words in (
                    "expected scalar type", "expected dtype", "but got dtype")):
                raise
            raise HyperdiffError(
                f"forward(engine='jvp'): torch's jvp mixed dtypes at step {step} ({err}); it "
                "promotes the tangent of a Python float times a 0-dim hyperparameter (e.g. "
                "0.5 * h['wd'] in a loss) to float64. Use engine='double_vjp' (the same "
                "hypergradient), or write the constant as a tensor of the model's dtype"
            ) from err
        # torch's jvp can promote a tangent to float64 (a Python float times a 0-dim float32
        # hyperparameter): each stays in its state entry's dtype, as the next step expects
        tangent = tree_map(lambda z, x: z if z.dtype == x.dtype else z.to(x.dtype), tangent,
                           state)
        losses[step - start] = loss.detach()
    return state, tangent, losses


def _start(problem: Problem, raw: dict[str, Tensor], state, tangent):
    """``(state, tangent)``, defaulting to theta_0's training state at ``raw`` and the
    tangents of the start of a run: zero, except ``Z_0 = dtheta_0/du`` (one-hot) for an
    initialization hyperparameter."""
    if state is None:
        with torch.no_grad():
            state = initial_state(problem, problem.hparams.view(raw), differentiable=False)
    if tangent is None:
        k = problem.hparams.numel
        tangent = tree_map(lambda x: x.new_zeros((k, *x.shape)), tuple(state))
        if problem.initialization is not None:
            tangent = (_initial_tangents(problem, raw, problem.initialization), *tangent[1:])
    return state, tangent


def _initial_tangents(problem: Problem, raw: dict[str, Tensor], name: str
                      ) -> dict[str, Tensor]:
    """``Z_0 = dtheta_0/du`` for theta_0 the value of initialization ``name`` (natural = raw):
    for each parameter, the one-hot rows of its coordinates, shape ``(k, *param.shape)``."""
    eye = _coordinate_tangents(problem, raw)[name]  # (k, sum numel), in the spec's order
    order = problem.hparams[name].param_names
    parts = dict(zip(order, eye.split([problem.params[n].numel() for n in order], dim=1),
                     strict=True))
    return {n: parts[n].reshape(-1, *p.shape).to(p.dtype) for n, p in problem.params.items()}


def propagate(problem: Problem, raw: dict[str, Tensor], state, tangent, start: int, stop: int,
              *, engine: str = "double_vjp", chunk_size: int | None = None):
    """Carry ``(s_t, Z_t)`` through steps ``start .. stop-1`` at fixed raw values ``raw``:
    ``Z_{t+1} = dPhi_t/ds Z_t + dPhi_t/du`` (the online forward mode, RTHO, calls this once per
    window). ``state`` is a :class:`~hyperdiff.engine.training.TrainState` (or its tuple),
    ``tangent`` the same structure with a leading axis of size k. Returns ``(state, tangent,
    losses)``."""
    raw = {n: v.detach() for n, v in raw.items()}
    push = _unroll_jvp if engine == "jvp" else _unroll_double_vjp
    return push(problem, raw, _coordinate_tangents(problem, raw), chunk_size, state, tangent,
                start, stop)


def _forward(problem: Problem, raw: dict[str, Tensor], chunk_size: int | None, engine: str
             ) -> HyperGradient:
    started = time.perf_counter()
    hp = problem.hparams
    k = hp.numel
    raw = {n: v.detach() for n, v in raw.items()}
    raw_tangent = _coordinate_tangents(problem, raw)
    used = "jvp" if engine == "jvp" else "double_vjp"
    try:
        if used == "double_vjp":
            state, tangent, losses_t = _unroll_double_vjp(problem, raw, raw_tangent, chunk_size)
        else:
            state, tangent, losses_t = _unroll_jvp(problem, raw, raw_tangent, chunk_size)
    except RuntimeError as err:  # e.g. "the derivative for 'aten::x' is not implemented"
        if engine != "auto" or "not implemented" not in str(err):
            raise
        used = "jvp"
        state, tangent, losses_t = _unroll_jvp(problem, raw, raw_tangent, chunk_size)
    check_finite_losses(losses_t, "forward")

    params, buffers, _ = state
    leaves = [
        {k_: v.detach().requires_grad_() for k_, v in params.items()},
        {k_: v.detach().requires_grad_() for k_, v in buffers.items()},
        {n: v.detach().requires_grad_() for n, v in raw.items()},
    ]
    value = validation_loss(problem, leaves[0], leaves[1], hp.view(leaves[2]))
    flat_inputs = [v for d in leaves for v in d.values()]
    grads = zeros_for_unused(
        torch.autograd.grad(value, flat_inputs, allow_unused=True), flat_inputs
    )
    n_state = len(leaves[0]) + len(leaves[1])
    z_params, z_buffers, _ = tangent
    indirect = _contract(grads[:n_state], [*z_params.values(), *z_buffers.values()])
    direct = hp.flatten(dict(zip(raw, grads[n_state:], strict=True)))
    grad = hp.unflatten(direct + indirect)
    return finish(
        problem, raw, method="forward", value=value, grad=grad, params=params, buffers=buffers,
        train_losses=losses_t, started=started, tangents=k, engine=used,
    )


def forward_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                    stop: int, val_batches: list[Batch], carry: Any = None, *,
                    engine: str = "double_vjp", chunk_size: int | None = None) -> Segment:
    """Carry ``(s, Z)`` through steps ``start .. stop-1`` at ``raw`` and contract the validation
    gradient at the end with ``Z`` (module doc); the carry is ``Z`` (``None`` at the start of
    the run); ``chunk_size`` as :func:`forward`'s."""
    return forward_samples(problem, state, raw, start, stop, [val_batches], carry,
                           engine=engine, chunk_size=chunk_size)[0]


def forward_samples(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                    stop: int, val_sets: list[list[Batch]], carry: Any = None, *,
                    engine: str = "double_vjp", chunk_size: int | None = None
                    ) -> list[Segment]:
    """:func:`forward_segment` at each of ``val_sets``: the tangents are carried once, and each
    set costs one validation gradient contracted with them."""
    end, tangent, losses = propagate(problem, raw, state, carry, start, stop, engine=engine,
                                     chunk_size=chunk_size)
    check_finite_losses(losses, "online forward", start)
    params, buffers, opt_state = end
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    bufs = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in buffers.items()}
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    values = [validation_loss(at_val_batches(problem, val), theta, bufs,
                              problem.hparams.view(leaves)) for val in val_sets]
    tracked = [*theta.values(), *[b for b in bufs.values() if b.requires_grad]]
    z_state = [*tangent[0].values(), *[tangent[1][k] for k, b in bufs.items() if b.requires_grad]]
    hp, kept = problem.hparams, TrainState(params, buffers, opt_state)
    segments = []
    for value, grads in zip(values, sample_grads(values, [*tracked, *leaves.values()]),
                            strict=True):
        indirect = sum(z.reshape(z.shape[0], -1) @ g.reshape(-1)
                       for g, z in zip(grads[: len(tracked)], z_state, strict=True))
        direct = hp.flatten(dict(zip(leaves, grads[len(tracked):], strict=True)))
        segments.append(Segment(kept, hp.unflatten(direct + indirect), float(value.detach()),
                                losses, tangent))
    return segments


def forward_carry_like(problem: Problem, raw: dict[str, Tensor], state: TrainState) -> TrainState:
    """Uninitialised tangents shaped like :func:`forward_segment`'s carry: every state leaf
    with a leading axis of the ``P`` raw values."""
    size = problem.hparams.flatten(raw).numel()
    return TrainState(*tree_map(lambda x: x.new_empty((size, *x.shape)), tuple(state)))


def forward(chunk_size: int | None = None, engine: str = "auto") -> Method:
    """Exact hypergradient by forward-mode tangents (memory independent of T, cost O(k)).

    Args:
        chunk_size: process at most this many hyperparameter coordinates at once per step
            (lower peak memory, more time); ``None`` does all k together.
        engine: ``"double_vjp"`` (two reverse passes per step), ``"jvp"`` (vmapped
            ``torch.func.jvp``) or ``"auto"``: ``"double_vjp"``, and ``"jvp"`` if an operation
            lacks the third derivative it needs (see the module doc).
    """
    if isinstance(chunk_size, str) and chunk_size in ENGINES:
        raise HyperdiffError(f"forward: chunk_size must be a positive int or None (got "
                             f"{chunk_size!r}, an engine: pass it as "
                             f"hd.forward(engine={chunk_size!r}))")
    if chunk_size is not None:
        positive_int("forward", "chunk_size", chunk_size)
    if engine not in ENGINES:
        raise HyperdiffError(f"forward: engine must be one of {list(ENGINES)} (got {engine!r})")
    return Method(
        "forward", lambda problem, raw: _forward(problem, raw, chunk_size, engine),
        {"chunk_size": chunk_size, "engine": engine},
        capabilities=CAPABILITIES,
        segment_fn=partial(forward_segment, engine=engine, chunk_size=chunk_size),
        samples_fn=partial(forward_samples, engine=engine, chunk_size=chunk_size),
        carry_fn=forward_carry_like,
    )
