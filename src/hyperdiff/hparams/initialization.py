"""The initialisation theta_0 as a hyperparameter: MAML's learned starting point.

``hd.initialization(params)`` makes the parameters the inner training starts from a
hyperparameter: training runs ``theta_{t+1} = Phi_t(theta_t, lam)`` from ``theta_0 = u``
(``u`` its raw value, unconstrained: the natural value is the raw one), and every exact method
differentiates the validation loss after training with respect to ``u``:
``dL_val/dtheta_0``, the MAML meta-gradient when the training and validation splits are one
task's support and query sets. Buffers (BatchNorm statistics) still start from the problem's.

Its raw value is stored flat, shape ``(sum numel,)`` in the order of ``params`` (as
``per_element``), float64 on the CPU like every hyperparameter; a loss reads one tensor,
shaped like the parameter, with ``hparams.at(name, param=p)``, and :func:`proximal` writes
iMAML's proximal term ``(strength / 2) ||theta - theta_0||^2`` with it. A problem holds at most
one initialization, over exactly its trained parameters (names, shapes and dtypes), and it is
no optimizer coefficient.

>>> import torch, hyperdiff as hd
>>> theta0 = hd.initialization({"w": torch.zeros(2, 3), "b": torch.ones(3)})
>>> theta0.kind, theta0.shape, theta0.param_names
('initialization', (9,), ('w', 'b'))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, describe, fail
from hyperdiff.hparams.constraints import Free
from hyperdiff.hparams.hyperparams import HyperParameter, HyperParameters
from hyperdiff.typing import Params

KIND = "initialization"


@dataclass(frozen=True)
class Initialization(HyperParameter):
    """theta_0 as a hyperparameter (module doc); ``param_dtypes`` are the parameters' dtypes,
    which the trained model must share."""

    param_dtypes: tuple[torch.dtype, ...] = field(default=())


def initialization(params: Mapping[str, Tensor]) -> Initialization:
    """The initial parameters of the inner training as a hyperparameter, starting at ``params``.

    Args:
        params: a non-empty dict name -> floating-point tensor, the model's trained parameters
            (e.g. ``hd.functional(module).params``); their values are the start of tuning.

    Raises:
        HyperdiffError: ``params`` is not such a dict, or a value is not finite.
    """
    valid = "a non-empty dict name -> floating-point tensor (e.g. hd.functional(model).params)"
    if not isinstance(params, Mapping) or not params:
        raise fail("initialization", "params", valid, params)
    for name, value in params.items():
        if not isinstance(name, str) or not isinstance(value, Tensor) \
                or not value.is_floating_point():
            raise fail("initialization", f"params[{name!r}]", "a floating-point tensor", value)
        if not bool(torch.isfinite(value).all()):
            raise fail("initialization", f"params[{name!r}]", "finite", value)
    values = torch.cat([v.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
                        for v in params.values()])
    return Initialization(values, Free(), KIND, tuple(params),
                          tuple(tuple(v.shape) for v in params.values()),
                          tuple(v.dtype for v in params.values()))


def initialization_name(hparams: Mapping[str, HyperParameter]) -> str | None:
    """The name of the (at most one) initialization in ``hparams``; ``None`` if there is none.

    Raises:
        HyperdiffError: there are several.
    """
    names = [n for n, spec in hparams.items() if spec.kind == KIND]
    if len(names) > 1:
        raise HyperdiffError(
            f"hypergradient: hparams must hold at most one initialization, the one theta_0 of "
            f"the inner training (got {len(names)}: {names})"
        )
    return names[0] if names else None


def check_matches(spec: HyperParameter, name: str, params: Params) -> None:
    """Refuse an initialization whose names, shapes or dtypes differ from the trained
    ``params``."""
    if not isinstance(spec, Initialization):
        raise fail("hypergradient", f"initialization {name!r}", "made by hd.initialization",
                   spec)
    want = {n: (tuple(p.shape), p.dtype) for n, p in params.items()}
    got = dict(zip(spec.param_names, zip(spec.param_shapes, spec.param_dtypes, strict=True),
                   strict=True))
    if set(got) != set(want):
        raise HyperdiffError(
            f"hypergradient: initialization {name!r} must be defined over the trained "
            f"parameters {list(want)} (got {list(got)})"
        )
    bad = {n: got[n] for n in want if got[n] != want[n]}
    if bad:
        raise HyperdiffError(
            f"hypergradient: initialization {name!r} must have the shapes and dtypes of the "
            f"trained parameters { {n: _text(want[n]) for n in bad} } "
            f"(got { {n: _text(v) for n, v in bad.items()} })"
        )


def _text(shape_dtype: tuple[tuple[int, ...], torch.dtype]) -> str:
    shape, dtype = shape_dtype
    return f"{shape} {str(dtype).removeprefix('torch.')}"


def initial_values(hparams: HyperParameters, name: str | None = None) -> Params:
    """The natural value of initialization ``name`` (default: the only one) of ``hparams`` as
    a dict name -> tensor shaped like each parameter, in its dtype (for
    :func:`~hyperdiff.app.export.load_into`)."""
    name = initialization_name(hparams) if name is None else name
    if name is None or name not in hparams or hparams[name].kind != KIND:
        raise HyperdiffError(
            f"initial_values: hparams must hold an initialization (hd.initialization) "
            f"(got {describe(name)} in {list(hparams)})"
        )
    spec = hparams[name]
    if not isinstance(spec, Initialization):
        raise fail("initial_values", name, "made by hd.initialization", spec)
    value = hparams.natural()[name]
    sizes = [int(torch.Size(s).numel()) for s in spec.param_shapes]
    return {n: part.reshape(shape).to(dtype).clone() for n, part, shape, dtype in zip(
        spec.param_names, value.split(sizes), spec.param_shapes, spec.param_dtypes, strict=True)}


def proximal(params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], name: str,
             strength: float | Tensor) -> Tensor:
    """iMAML's proximal term ``(strength / 2) sum_p ||theta_p - theta_0,p||^2``, the centre
    ``theta_0`` read from initialization ``name`` of ``hparams`` (the view a loss receives).

    Added to the training loss it makes ``theta*`` depend on ``theta_0`` at the minimiser, so
    that the implicit hypergradient ``dL_val/dtheta_0 = strength (H + strength I)^-1 g_val``
    is not zero (Rajeswaran et al. 2019).
    """
    at = getattr(hparams, "at", None)
    if at is None:
        raise fail("proximal", "hparams", "the hyperparameter view a loss receives", hparams)
    total = [((p - at(name, param=n).to(p.dtype)) ** 2).sum() for n, p in params.items()]
    return 0.5 * strength * torch.stack(total).sum()


__all__ = ["KIND", "Initialization", "check_matches", "initial_values", "initialization",
           "initialization_name", "proximal"]
