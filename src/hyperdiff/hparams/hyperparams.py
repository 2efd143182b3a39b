"""Named continuous hyperparameters: shapes, constraints, raw and natural values.

A :class:`HyperParameters` collection maps names to :class:`HyperParameter` specs and holds
the current *raw* (unconstrained) values, on which hypergradients are taken. Users give and read
*natural* values (``lr=0.1``); see :mod:`hyperdiff.hparams.constraints` for the maps between the
two.

Shapes (``kind``):

- ``scalar``: shape ``()``.
- ``per_feature``: shape ``(n,)``; the loss decides what a feature is.
- ``per_tensor``: shape ``(len(params),)``, one value per parameter tensor, looked up by name.
- ``per_element``: shape ``(sum numel,)``, one value per parameter element (flat, in the order
  of ``params``), looked up as a tensor shaped like the parameter.
- ``per_step``: shape ``(steps,)``, one value per inner step (a schedule).
- ``initialization``: the parameters training starts from, stored and looked up as
  ``per_element`` (:mod:`hyperdiff.hparams.initialization`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    describe,
    fail,
    is_number,
    positive_int,
)
from hyperdiff.hparams.constraints import Constraint, Interval, as_constraint, natural_range

KINDS = ("scalar", "per_feature", "per_tensor", "per_element", "per_step")
ELEMENTWISE = ("per_element", "initialization")
"""Kinds stored flat with one value per parameter element, looked up shaped like it."""


@dataclass(frozen=True)
class HyperParameter:
    """One hyperparameter: initial natural value, constraint and kind (see module doc)."""

    init: Tensor
    constraint: Constraint
    kind: str = "scalar"
    param_names: tuple[str, ...] = ()
    param_shapes: tuple[tuple[int, ...], ...] = field(default=())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.init.shape)

    def validate(self, name: str) -> None:
        """Check the spec under ``name`` (discrete kinds check their choices; see
        :mod:`hyperdiff.hparams.discrete`)."""

    def read(self, name: str, raw: Tensor) -> Any:
        """What a loss reads for ``raw``: the natural value (a discrete kind: a ``Choice``)."""
        return self.constraint.to_natural(raw)

    is_discrete: ClassVar[bool] = False

    def best_choice(self, raw: Tensor) -> Any:
        """The most probable choice at ``raw``: only discrete kinds have choices."""
        raise TypeError(f"a {self.kind} hyperparameter has no choices")


VALUE_TEXT = "a real number, a list of numbers, a real NumPy array or a real tensor"


def _tensor(value: float | Tensor | Sequence[float], caller: str = "hyperparameter",
            what: str = "value") -> Tensor:
    """``value`` as a float64 copy; a clear error (naming argument ``what``) for strings,
    bools, complex or ragged input."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:  # by dtype and shape, not numbers
            dtype = str(value.dtype).removeprefix("torch.")
            raise HyperdiffError(f"{caller}: {what} must be {VALUE_TEXT} (got a {dtype} "
                                 f"tensor of shape {tuple(value.shape)})")
        # specs are host state: float64 on the CPU; Problem.raw_tensors moves values to the device
        return value.detach().to(device="cpu", dtype=torch.float64).clone()
    if not isinstance(value, (list, tuple)) and not is_number(value) and not _is_real_array(value):
        raise fail(caller, what, VALUE_TEXT, value)
    try:
        return torch.as_tensor(value, dtype=torch.float64, device="cpu").detach().clone()
    except (TypeError, ValueError, RuntimeError):
        raise fail(caller, what, VALUE_TEXT, value) from None


def _is_real_array(value: Any) -> bool:
    """A NumPy array of integers or reals (``torch.as_tensor`` reads it as numbers)."""
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return type(value).__module__ == "numpy" and kind is not None and kind in "iuf"


def _checked(caller: str, init: Tensor, constraint: Constraint, kind: str,
             names: tuple[str, ...] = (), shapes: tuple[tuple[int, ...], ...] = ()
             ) -> HyperParameter:
    """The spec, after checking that every initial value lies inside its constraint (far
    enough from its bounds that its raw value is finite) and that its raw value holds it
    (:func:`_check_round_trip`)."""
    _check_inside(f"{caller}: value", constraint, init)
    _check_round_trip(f"{caller}: value", constraint, init,
                      _to_raw(f"{caller}: value", constraint, init))
    return HyperParameter(init, constraint, kind, names, shapes)


def _check_params(caller: str, params: Any) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    if not isinstance(params, Mapping) or not params or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in params.items()
    ):
        raise fail(caller, "params", "a non-empty dict name -> tensor", params)
    return tuple(params), tuple(tuple(p.shape) for p in params.values())


def scalar(value: float, constraint: Constraint | str | tuple | None = None) -> HyperParameter:
    """A scalar hyperparameter with natural value ``value`` (default constraint: positive)."""
    v = _tensor(value, "scalar")
    if v.dim() != 0 and v.numel() != 1:
        raise fail("scalar", "value", "a single number (for a vector use hd.per_feature)", value)
    return _checked("scalar", v.reshape(()), as_constraint(constraint, "scalar"), "scalar")


def per_feature(
    value: float | Tensor | list[float],
    size: int | None = None,
    constraint: Constraint | str | tuple | None = None,
) -> HyperParameter:
    """A vector hyperparameter of ``size`` entries (``value`` a scalar or a full vector)."""
    v = _tensor(value, "per_feature")
    if size is not None:
        size = positive_int("per_feature", "size", size)
        v = v.expand(size).clone() if v.dim() == 0 else v
        if v.shape != (size,):
            raise HyperdiffError(
                f"per_feature: value must be a scalar or have shape ({size},) "
                f"(got shape {tuple(v.shape)})"
            )
    if v.dim() != 1:
        raise HyperdiffError(
            f"per_feature: value must be a 1-D vector, or a scalar with size (got {describe(v)})"
        )
    if v.numel() == 0:
        raise fail("per_feature", "value", "a non-empty vector", value)
    return _checked("per_feature", v, as_constraint(constraint, "per_feature"), "per_feature")


def per_tensor(
    params: Mapping[str, Tensor],
    value: float | Mapping[str, float] = 1e-3,
    constraint: Constraint | str | tuple | None = None,
) -> HyperParameter:
    """One value per parameter tensor of ``params`` (a float, or a dict name -> float)."""
    names, _ = _check_params("per_tensor", params)
    if isinstance(value, Mapping):
        v = _per_tensor_values("per_tensor", "value", names, value)
    else:
        v = _tensor(value, "per_tensor")
        if v.dim() != 0:
            raise fail("per_tensor", "value", "a number or a dict name -> number", value)
        v = v.expand(len(names)).clone()
    return _checked("per_tensor", v, as_constraint(constraint, "per_tensor"), "per_tensor", names)


def _per_tensor_values(caller: str, what: str, names: tuple[str, ...],
                       value: Mapping[Any, Any]) -> Tensor:
    """The numbers of a dict parameter name -> number, in the order of ``names``; a name that
    is not one of them (a typo) or a missing name is refused."""
    _check_names(caller, what, names, value)
    return _tensor([value[n] for n in names], caller, what)


def _check_names(caller: str, what: str, names: tuple[str, ...], value: Mapping[Any, Any]
                 ) -> None:
    """Refuse a dict keyed by parameter name that misses one of ``names`` or has another."""
    unknown = [k for k in value if k not in names]
    if unknown:
        raise HyperdiffError(f"{caller}: {what} must name only the parameters {list(names)} "
                             f"(got unknown {unknown})")
    missing = [n for n in names if n not in value]
    if missing:
        raise HyperdiffError(f"{caller}: {what} is missing parameters {missing}")


def per_element(
    params: Mapping[str, Tensor],
    value: float = 1e-3,
    constraint: Constraint | str | tuple | None = None,
) -> HyperParameter:
    """One value per parameter element of ``params``, stored flat."""
    names, shapes = _check_params("per_element", params)
    total = sum(int(p.numel()) for p in params.values())
    v = _tensor(value, "per_element")
    if v.dim() != 0:
        raise fail("per_element", "value", "a number", value)
    v = v.expand(total).clone()
    return _checked("per_element", v, as_constraint(constraint, "per_element"), "per_element",
                    names, shapes)


def per_step(
    steps: int, value: float | Tensor | list[float] = 0.1,
    constraint: Constraint | str | tuple | None = None,
) -> HyperParameter:
    """A schedule: one value per inner step ``t = 0 .. steps-1``."""
    steps = positive_int("per_step", "steps", steps)
    v = _tensor(value, "per_step")
    v = v.expand(steps).clone() if v.dim() == 0 else v
    if v.shape != (steps,):
        raise HyperdiffError(
            f"per_step: value must be a scalar or have shape ({steps},) "
            f"(got shape {tuple(v.shape)})"
        )
    return _checked("per_step", v, as_constraint(constraint, "per_step"), "per_step")


class HParamView(Mapping[str, Tensor]):
    """Natural values by name, plus :meth:`at` to look one up for a step or parameter."""

    def __init__(self, values: Mapping[str, Tensor], specs: Mapping[str, HyperParameter]):
        self._values = dict(values)
        self._specs = specs
        self._parts: dict[str, tuple[Tensor, ...]] = {}  # per-step / per-parameter slices

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(
                f"unknown hyperparameter {name!r}; defined: {sorted(self._values)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def at(self, name: str, *, step: int | None = None, param: str | None = None) -> Tensor:
        """Value of ``name`` for inner step ``step`` and parameter tensor ``param``."""
        value = self[name]
        spec = self._specs[name]
        if spec.kind == "per_step":
            if step is None:
                raise HyperdiffError(f"hyperparameter {name!r} is per_step: a step is required")
            if not 0 <= step < value.shape[0]:
                raise HyperdiffError(
                    f"hyperparameter {name!r}: step must be in [0, {value.shape[0]}) "
                    f"(got {step})" + ("; the schedule is shorter than the training run"
                                       if step >= value.shape[0] else "")
                )
            return self._split(name)[step]
        if spec.kind == "per_tensor" or spec.kind in ELEMENTWISE:
            if param not in spec.param_names:
                raise HyperdiffError(
                    f"hyperparameter {name!r} is {spec.kind}: param must be one of "
                    f"{list(spec.param_names)} (got {param!r})"
                )
            return self._split(name)[spec.param_names.index(param)]
        return value

    def _split(self, name: str) -> tuple[Tensor, ...]:
        """The slices of a per-step, per-tensor or per-element value, cut once per view (one
        kernel and one backward node for all steps or parameters, not one per lookup)."""
        parts = self._parts.get(name)
        if parts is None:
            value, spec = self[name], self._specs[name]
            if spec.kind in ELEMENTWISE:
                sizes = [int(torch.Size(s).numel()) for s in spec.param_shapes]
                parts = tuple(v.view(s) for v, s in
                              zip(value.split(sizes), spec.param_shapes, strict=True))
            else:
                parts = value.unbind(0)
            self._parts[name] = parts
        return parts


class HyperParameters(Mapping[str, HyperParameter]):
    """An immutable, ordered collection of hyperparameters with their current raw values.

    >>> import hyperdiff as hd
    >>> hp = hd.HyperParameters(lr=hd.scalar(0.1), momentum=hd.scalar(0.9, (0.0, 1.0)))
    >>> hp
    HyperParameters(lr=0.1, momentum=0.9)
    >>> round(float(hp.raw["lr"]), 4)  # log(0.1)
    -2.3026
    """

    def __init__(
        self,
        specs: Mapping[str, HyperParameter] | None = None,
        /,
        raw: Mapping[str, Tensor] | None = None,
        **kwargs: HyperParameter,
    ):
        if isinstance(raw, HyperParameter):
            raise HyperdiffError(
                "HyperParameters: raw= takes the raw values (a dict name -> tensor), so a "
                "hyperparameter named 'raw' cannot be a keyword (got raw=a HyperParameter); "
                "give it in the mapping: hd.HyperParameters({'raw': hd.scalar(...)}, ...)")
        merged = _merged(specs, kwargs)
        if not merged:
            raise HyperdiffError("HyperParameters: at least one hyperparameter is required")
        for name, spec in merged.items():
            if not isinstance(spec, HyperParameter):
                raise HyperdiffError(
                    f"HyperParameters: {name!r} must be a HyperParameter made by "
                    "hd.scalar, hd.per_feature, hd.per_tensor, hd.per_element, hd.per_step or "
                    "hd.initialization "
                    f"(got {describe(spec)})"
                )
            spec.validate(name)
            _check_natural(name, spec.constraint, spec.init)
        self._specs = merged
        if raw is None:  # a collection given as specs keeps its values (tuned ones, say)
            kept = specs.raw if isinstance(specs, HyperParameters) else {}
            raw = {n: kept[n] if n in kept else _to_raw(
                f"HyperParameters: natural value of {n!r}", s.constraint, s.init)
                for n, s in merged.items()}
        self._raw = self.check_raw(raw)

    # Mapping over specs -------------------------------------------------------------------
    def __getitem__(self, name: str) -> HyperParameter:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def numel(self) -> int:
        """Total number of scalar hyperparameters."""
        return sum(int(s.init.numel()) for s in self._specs.values())

    # Values -------------------------------------------------------------------------------
    @property
    def raw(self) -> dict[str, Tensor]:
        """Current raw (unconstrained) values, float64 copies."""
        return {n: v.clone() for n, v in self._raw.items()}

    def natural(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Natural values for ``raw`` (default: the current values); differentiable."""
        raw = self._raw if raw is None else raw
        return {n: s.constraint.to_natural(raw[n]) for n, s in self._specs.items()}

    def view(self, raw: Mapping[str, Tensor]) -> HParamView:
        """Natural values of ``raw`` as a mapping with step / parameter lookup."""
        return HParamView({n: s.read(n, raw[n]) for n, s in self._specs.items()}, self._specs)

    def best(self) -> dict[str, Any]:
        """The most probable choice of every discrete hyperparameter
        (:mod:`hyperdiff.hparams.discrete`)."""
        return {n: s.best_choice(self._raw[n]) for n, s in self._specs.items() if s.is_discrete}

    def with_raw(self, raw: Mapping[str, Tensor]) -> HyperParameters:
        """A copy with new raw values (tensors; the constructor checks names and shapes)."""
        bad = {n: v for n, v in raw.items() if not isinstance(v, Tensor)} if isinstance(
            raw, Mapping) else None
        if bad is None or bad:
            raise fail("HyperParameters.with_raw", "raw", "a dict of name -> raw tensor",
                       raw if bad is None else bad)
        return HyperParameters(self._specs, raw={n: v.detach() for n, v in raw.items()})

    def with_natural(self, **values: float | Tensor | Mapping[str, Any]) -> HyperParameters:
        """A copy with some natural values replaced: ``hp.with_natural(lr=0.05)``; a
        ``per_tensor`` value may be a dict parameter name -> number, as ``hd.per_tensor``
        takes it, a ``per_element`` or initialization value a dict parameter name -> tensor
        of the parameter's shape (or a number), as ``initial_values`` returns it; a discrete
        one is the probabilities of its choices. A value that its raw value would hold more
        than :data:`REPRESENTABLE_RTOL` away from it is refused (:func:`_check_round_trip`)."""
        return self._replaced(values, recorded=False)

    def _replaced(self, values: Mapping[str, Any], recorded: bool) -> HyperParameters:
        """:meth:`with_natural`, or :meth:`with_recorded` where ``recorded``."""
        raw = self.raw
        for name, value in values.items():
            if name not in self._specs:
                raise HyperdiffError(
                    f"HyperParameters.with_natural: unknown name {name!r}; "
                    f"valid names are {list(self._specs)}"
                )
            spec = self._specs[name]
            v = _natural_value(name, spec, value)
            _check_natural(name, spec.constraint, v)
            what = f"HyperParameters: natural value of {name!r}"
            raw[name] = _to_raw(what, spec.constraint, v)
            if recorded and spec.is_discrete:
                raw[name] = _exact_logits(spec.constraint, v, raw[name])
            elif recorded:
                raw[name] = _exact_raw(spec.constraint, v, raw[name])
            if not spec.is_discrete:  # (probabilities are rescaled to sum to 1: documented)
                _check_round_trip(what, spec.constraint, v, raw[name])
        return HyperParameters(self._specs, raw=raw)

    def with_recorded(self, values: Mapping[str, Tensor]) -> HyperParameters:
        """``with_natural(**values)`` for natural values a run recorded (float64 tensors of
        each name's shape, ``to_natural`` of its raw values): each raw value is moved, where
        ``to_raw`` rounds, to one whose natural value is the recorded one exactly, so a value
        read back from ``result.json`` is the value that was tuned, to the last bit. A discrete
        one's logits are searched for probabilities equal to the recorded ones
        (:func:`_exact_logits`); where that search fails they are ``log p`` (centred), whose
        probabilities may differ from the recorded ones by an ulp."""
        return self._replaced(values, recorded=True)

    def natural_grad(
        self, grad_raw: Mapping[str, Tensor], raw: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Chain rule to natural units: ``dL/dx = (dL/du) / f'(u)`` elementwise.

        Raises:
            NonFiniteError: where ``f'(u)`` is 0 in the gradient's dtype (a value rounded onto
                its bound), which would make ``dL/dx`` NaN or infinite.
        """
        raw = self._raw if raw is None else raw
        out = {}
        for name, spec in self._specs.items():
            at = raw[name].to(grad_raw[name])
            slope = spec.constraint.derivative(at)
            flat = slope.reshape(-1) == 0
            if bool(flat.any()):
                raise NonFiniteError(_flat_slope_text(name, spec.constraint, at, flat))
            out[name] = grad_raw[name] / slope
        return out

    def check_raw(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Validate names, shapes and finiteness of raw values; return float64 CPU copies."""
        if set(raw) != set(self._specs):
            raise HyperdiffError(
                f"HyperParameters: raw values must have exactly the names {list(self._specs)} "
                f"(got {list(raw)})"
            )
        out = {}
        for name, spec in self._specs.items():
            given = raw[name]
            if isinstance(given, (bool, complex)) or (isinstance(given, Tensor) and (
                    given.is_complex() or given.dtype == torch.bool)):  # a cast drops a part
                got = (f"a {str(given.dtype).removeprefix('torch.')} tensor of shape "
                       f"{tuple(given.shape)}" if isinstance(given, Tensor) else repr(given))
                raise HyperdiffError(f"HyperParameters: the raw value of {name!r} must be a "
                                     f"real tensor (got {got})")
            value = torch.as_tensor(given, dtype=torch.float64, device="cpu").detach()
            if tuple(value.shape) != spec.shape:
                raise HyperdiffError(
                    f"HyperParameters: {name!r} must have shape {spec.shape} "
                    f"(got shape {tuple(value.shape)})"
                )
            if not torch.isfinite(value).all():
                raise HyperdiffError(
                    f"HyperParameters: raw value of {name!r} must be finite (got {describe(value)})"
                )
            out[name] = value.clone()
        return out

    # Flat vectors for coordinate-wise methods ---------------------------------------------------
    def flatten(self, values: Mapping[str, Tensor]) -> Tensor:
        """Concatenate values (shaped like the hyperparameters) into one vector."""
        return torch.cat([values[n].reshape(-1) for n in self._specs])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`flatten`."""
        out, start = {}, 0
        for name, spec in self._specs.items():
            size = int(spec.init.numel())
            out[name] = vector[start : start + size].reshape(spec.shape)
            start += size
        return out

    def coordinate_names(self) -> list[str]:
        """Readable names of the flat coordinates, e.g. ``wd[fc1.weight]``, ``lr[3]``."""
        names: list[str] = []
        for name, spec in self._specs.items():
            if spec.kind == "scalar":
                names.append(name)
            elif spec.kind == "per_tensor":
                names.extend(f"{name}[{p}]" for p in spec.param_names)
            else:
                names.extend(f"{name}[{i}]" for i in range(int(spec.init.numel())))
        return names

    def __repr__(self) -> str:
        parts = []
        for name, value in self.natural().items():
            if value.dim() == 0:
                parts.append(f"{name}={float(value):.6g}")
            elif value.numel() <= 4:
                parts.append(f"{name}=[{', '.join(f'{float(v):.4g}' for v in value)}]")
            else:
                parts.append(
                    f"{name}=<{self._specs[name].kind} {tuple(value.shape)}: "
                    f"mean {float(value.mean()):.4g}, min {float(value.min()):.4g}, "
                    f"max {float(value.max()):.4g}>"
                )
        return f"HyperParameters({', '.join(parts)})"


def _merged(specs: Mapping[str, HyperParameter] | None, kwargs: dict[str, HyperParameter]
            ) -> dict[str, HyperParameter]:
    """The specs of the mapping and the keywords, a name given in both refused."""
    try:
        merged = dict(specs or {})
    except (TypeError, ValueError):
        raise fail("HyperParameters", "specs", "a dict name -> HyperParameter (or a "
                   "hd.HyperParameters, whose values are kept)", specs) from None
    twice = [n for n in kwargs if n in merged]
    if twice:
        raise HyperdiffError(f"HyperParameters: each name must be given once (got {twice[0]!r} "
                             "both in the mapping and as a keyword)")
    merged.update(kwargs)
    return merged


def _natural_value(name: str, spec: HyperParameter, value: Any) -> Tensor:
    """``value`` given to :meth:`HyperParameters.with_natural` for ``name``, as a float64
    tensor of the spec's shape."""
    caller = "HyperParameters.with_natural"
    if spec.kind == "per_tensor" and isinstance(value, Mapping):
        return _per_tensor_values(caller, name, spec.param_names, value)
    if spec.kind in ELEMENTWISE and isinstance(value, Mapping):
        return _elementwise_values(caller, name, spec, value)
    if spec.is_discrete:
        return _probabilities(name, spec, value)
    valid = f"a number or a tensor of shape {spec.shape}" + (
        ", or a dict parameter name -> " + ("number" if spec.kind == "per_tensor" else
                                            "tensor of the parameter's shape")
        if spec.param_names else "")
    if isinstance(value, Mapping):
        raise HyperdiffError(f"{caller}: {name} must be {valid} (got {_shapes(value)})")
    v = _tensor(value, caller, name)
    try:
        return v.expand(spec.shape).clone()
    except RuntimeError:
        raise HyperdiffError(f"{caller}: {name} must be {valid} (got {_shapes(value)})"
                             ) from None


def _elementwise_values(caller: str, name: str, spec: HyperParameter,
                        value: Mapping[Any, Any]) -> Tensor:
    """A dict parameter name -> tensor of the parameter's shape (or a number, for every
    element), as ``initial_values`` returns it, as the flat value of an elementwise spec."""
    _check_names(caller, name, spec.param_names, value)
    parts = []
    for param, shape in zip(spec.param_names, spec.param_shapes, strict=True):
        what = f"{name}[{param!r}]"
        v = _tensor(value[param], caller, what)
        if v.dim() == 0:
            v = v.expand(shape)
        if tuple(v.shape) != shape:
            raise HyperdiffError(f"{caller}: {what} must be a number or a tensor of shape "
                                 f"{shape}, the parameter's (got {_shapes(value[param])})")
        parts.append(v.reshape(-1))
    return torch.cat(parts)


def _shapes(value: Any) -> str:
    """``value`` for a message with its tensors by shape only (never their numbers): ``a dict
    {'w': a tensor of shape (3, 2)}``."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        items = [f"{k!r}: {_shapes(v)}" for k, v in list(value.items())[:6]]
        return "a dict {" + ", ".join(items) + (", ...}" if len(value) > 6 else "}")
    return describe(value)


def _probabilities(name: str, spec: HyperParameter, value: Any) -> Tensor:
    """The probabilities of a discrete spec's choices that ``value`` must be (a choice itself,
    or its label, is refused naming the choices and the function that fixes one)."""
    n = spec.shape[0]
    v = None
    if isinstance(value, (Tensor, list, tuple)) or is_number(value) or _is_real_array(value):
        try:
            v = _tensor(value, "HyperParameters.with_natural", name)
        except HyperdiffError:
            v = None
    if v is not None and tuple(v.shape) == tuple(spec.shape) and abs(
            float(v.sum()) - 1.0) <= 1e-6:  # else softmax(to_raw(v)) would rescale it
        return v
    labels = [getattr(c, "__name__", c) for c in getattr(spec, "choices", ())]
    example = value if isinstance(value, str) and value in labels else labels[0]
    error = fail("HyperParameters.with_natural", name, f"probabilities of its {n} choices, "
                 f"shape ({n},), that sum to 1", value)
    raise HyperdiffError(f"{error}; its choices are {labels}: to fix one, give its label to "
                         f"hyperdiff.hparams.choices.fix_choices(hp, {{{name!r}: {example!r}}})")


def _check_natural(name: str, constraint: Constraint, value: Tensor) -> None:
    _check_inside(f"HyperParameters: natural value of {name!r}", constraint, value)


def _to_raw(what: str, constraint: Constraint, natural: Tensor) -> Tensor:
    """``constraint.to_raw(natural)`` (a value inside it), refused where it is not finite: a
    value so close to a bound (``5e-324`` in ``(0, 3)``) that float64 cannot tell it from the
    bound."""
    raw = constraint.to_raw(natural)
    finite = torch.isfinite(raw)
    if not bool(finite.all()):
        bad = natural[~finite].reshape(-1)[:3]
        low, high = natural_range(constraint)
        first = float(bad[0])
        near = low if low is not None and (high is None or first - low <= high - first) else high
        bound = "a bound" if near is None else f"the bound {near:g}"
        raise HyperdiffError(
            f"{what} must be {constraint.describe_valid()} for {_article(constraint.name)} "
            f"{constraint.name} constraint and far enough from its bounds for its raw value to "
            "be finite in float64 (got "
            f"{bad.tolist() if natural.dim() else first!r}, too close to {bound} to be "
            "represented); choose a value farther from the bound")
    return raw


def _exact_raw(constraint: Constraint, natural: Tensor, raw: Tensor) -> Tensor:
    """``raw`` (``constraint.to_raw(natural)``) moved, where ``to_natural`` of it rounds to
    another float64 than ``natural``, to a raw value whose ``to_natural`` is ``natural``
    itself; entries no float64 raw value maps onto (``exp`` skips most values above 1) keep
    ``raw``. ``to_natural`` is increasing, so the raw values mapping onto ``natural`` form an
    interval near ``raw``: it is bracketed with steps that double, then bisected. A value read
    back from ``result.json`` (``to_natural`` of a tuned raw value) is always reached.

    >>> c = as_constraint("softplus"); v = torch.tensor(0.3, dtype=torch.float64)
    >>> float(c.to_natural(c.to_raw(v))), float(c.to_natural(_exact_raw(c, v, c.to_raw(v))))
    (0.30000000000000004, 0.3)
    """
    flat = raw.reshape(-1).clone()
    todo = (constraint.to_natural(flat) != natural.reshape(-1)).nonzero().reshape(-1)
    if not len(todo):
        return raw
    v, start = natural.reshape(-1)[todo], flat[todo]

    def f(candidates: Tensor) -> Tensor:
        """to_natural of candidates placed in the whole tensor, as natural() computes it (a
        vectorised kernel may round an element otherwise than the same element alone)."""
        trial = flat.clone()
        trial[todo] = candidates
        return constraint.to_natural(trial)[todo]

    up = f(start) < v  # the raw values sought lie above start
    step = torch.where(up, 1.0, -1.0) * start.abs().clamp(min=1.0) * 2.0 ** -53
    low, high = start.clone(), start.clone()
    for doubling in range(64):  # bracket: f(low) <= v <= f(high)
        open_ = (f(high) < v) | (f(low) > v)
        if not bool(open_.any()):
            break
        probe = start + step * 2.0 ** doubling
        below = f(probe) < v
        low = torch.where(open_ & (~up | below), probe, low)
        high = torch.where(open_ & (up | ~below), probe, high)
    for _ in range(128):  # bisect until a hit or two adjacent float64 values
        mid = low + (high - low) / 2
        got = f(mid)
        moving = (mid != low) & (mid != high) & (f(low) != v) & (f(high) != v)
        if not bool(moving.any()):
            break
        low = torch.where(moving & (got <= v), mid, low)
        high = torch.where(moving & (got >= v), mid, high)
    found = torch.where(f(low) == v, low, torch.where(f(high) == v, high, start))
    flat[todo] = found
    return flat.reshape(raw.shape)


def _exact_logits(constraint: Constraint, p: Tensor, raw: Tensor, tries: int = 200) -> Tensor:
    """Logits whose probabilities (``constraint.to_natural``, a softmax) are ``p`` bit for bit,
    for probabilities a run recorded; ``raw`` (``log p``, centred) where they already are, or
    where the search fails (its probabilities then differ by an ulp here and there).

    A softmax ``exp(u_i - max u) / sum`` rounds every entry, so ``log p`` rarely gives ``p``
    back exactly. The search fixes the largest logit at 0 (``p`` came from logits with one
    such, ``u - max u``) and moves the others by ulps: each alone, prefixes of a random order
    together (which moves the sum, hence every probability), and pairs in opposite directions,
    taking the move that leaves the fewest entries wrong (the largest one, which reads only the
    sum, counted first); ties are broken at random from a fixed seed. Measured: every one of
    1,000 random 4- and 10-choice vectors is reached, in a few moves; near-uniform 7-choice
    and random 50-choice vectors miss about 1 in 100, 20 near-equal choices 8 in 100.

    >>> from hyperdiff.hparams.discrete import Softmax
    >>> p = torch.softmax(torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64), dim=-1)
    >>> bool((Softmax().to_natural(_exact_logits(Softmax(), p, torch.log(p))) == p).all())
    True
    """
    if p.dim() != 1 or bool((constraint.to_natural(raw) == p).all()):
        return raw
    n, top = p.numel(), int(p.argmax())
    u = torch.log(p) - torch.log(p[top])  # u[top] == 0 exactly
    device = p.device
    others = torch.tensor([i for i in range(n) if i != top], dtype=torch.long, device=device)
    one = torch.eye(n, dtype=torch.float64, device=device)[others]  # (n - 1, n): one logit each
    steps = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0], dtype=torch.float64,
                         device=device)
    single = (steps[:, None, None] * one[None]).reshape(-1, n)
    generator = torch.Generator(device=device).manual_seed(0)

    def wrong(q: Tensor) -> Tensor:
        return (q[..., top] != p[top]) * (n + 1) + (q != p).sum(-1)

    best = int(wrong(constraint.to_natural(u)))
    for _ in range(tries):
        if best == 0:
            return u
        unit = (torch.nextafter(u, torch.full_like(u, torch.inf)) - u).clamp(min=2.0 ** -53)
        order = others[torch.randperm(len(others), generator=generator, device=device)]
        prefix = torch.zeros(len(others), n, dtype=torch.float64, device=device)
        for m in range(len(others)):
            prefix[m:, order[m]] = 1.0
        i, j = torch.randint(len(others), (2, 4 * n), generator=generator, device=device)
        candidates = u + torch.cat([single, prefix, -prefix, one[i] - one[j]]) * unit
        scores = wrong(constraint.to_natural(candidates))  # row by row, as for one vector
        low = int(scores.min())
        if low > best:
            continue
        ties = (scores == low).nonzero().reshape(-1)
        u = candidates[int(ties[torch.randint(len(ties), (1,), generator=generator,
                                              device=device)])]
        best = int(wrong(constraint.to_natural(u)))
    return u if best == 0 else raw


def _flat_slope_text(name: str, constraint: Constraint, raw: Tensor, flat: Tensor) -> str:
    """Why ``name``'s natural-unit hypergradient cannot be computed: the constraint's slope is
    0 at the raw values ``raw`` (in their dtype) where ``flat``."""
    at = raw.detach().reshape(-1)[flat][:3]
    natural = constraint.to_natural(at)
    dtype, one = str(raw.dtype).removeprefix("torch."), raw.dim() == 0
    return (f"hypergradient: the hypergradient of {name!r} in natural units is undefined: "
            f"its {constraint.name} constraint's slope dx/du is 0 in {dtype} at the raw value"
            f"{'' if one else 's'} {_numbers(at, one)} (natural {_numbers(natural, one)}, on "
            "or next to a bound); choose a value farther from the bound"
            + (", or train in float64" if raw.dtype != torch.float64 else ""))


def _numbers(values: Tensor, one: bool) -> str:
    """``values`` to 10 significant digits: one number if ``one``, else a list."""
    texts = [f"{float(v):.10g}" for v in values.reshape(-1)]
    return texts[0] if one else f"[{', '.join(texts)}]"


def check_representable(hparams: HyperParameters, dtype: torch.dtype,
                        caller: str = "hypergradient") -> None:
    """Refuse a continuous hyperparameter whose natural value, computed from its raw value in
    ``dtype`` (the one training reads it in), is not strictly inside its constraint: a value
    valid in float64 may round onto a bound in float32 (0.99999999 in ``(0, 1)`` becomes 1.0,
    ``1e-47 > 0`` becomes 0), where the loss reads the bound and the hypergradient in natural
    units is undefined."""
    dtype_name, values = str(dtype).removeprefix("torch."), hparams.raw
    for name, spec in hparams.items():
        if spec.is_discrete:
            continue
        raw = values[name]
        rounded = spec.constraint.to_natural(raw.to(dtype))
        ok = spec.constraint.valid(rounded)
        if bool(ok.all()):
            _check_accurate(caller, name, spec.constraint.to_natural(raw), rounded, dtype,
                            _arithmetic_scale(spec.constraint))
            continue
        exact = spec.constraint.to_natural(raw)
        one = raw.dim() == 0
        got, there = _numbers(exact[~ok][:3], one), _numbers(rounded[~ok][:3], one)
        rounds = "" if dtype == torch.float64 else f", which rounds to {there} there"
        raise HyperdiffError(
            f"{caller}: hyperparameter {name!r} must be {spec.constraint.describe_valid()} "
            f"for {_article(spec.constraint.name)} {spec.constraint.name} constraint in "
            f"{dtype_name}, the dtype training computes it in (got {got}{rounds}); choose a "
            "value farther from the bound"
            + (", or train in float64" if dtype != torch.float64 else ""))


REPRESENTABLE_RTOL = 1e-3
"""How far (relatively) the value training reads may lie from a hyperparameter's value."""


def _arithmetic_scale(constraint: Constraint) -> float:
    """The magnitude a constraint's arithmetic rounds at: an interval computes ``low + (high -
    low) sigmoid(u)``, so its values near 0 carry an error of a few ulps of ``max(|low|,
    |high|)`` whatever their own size; 0 for the others (their error is relative)."""
    if isinstance(constraint, Interval):
        return max(abs(constraint.low), abs(constraint.high))
    return 0.0


def _check_accurate(caller: str, name: str, exact: Tensor, rounded: Tensor,
                    dtype: torch.dtype, scale: float = 0.0) -> None:
    """Refuse a value that ``dtype`` holds more than :data:`REPRESENTABLE_RTOL` away from it
    (relatively): a subnormal such as ``lr = 1e-45``, which float32 holds as 1.4e-45, would
    train at another value than the one asked for, reported and exported. An error within 4
    ulps of ``scale`` (:func:`_arithmetic_scale`: 1e-5 in ``(-1, 1)`` is off by 1.4e-8) is
    the constraint's ordinary rounding, not refused."""
    error = (rounded.to(exact.dtype) - exact).abs()
    off = (error > REPRESENTABLE_RTOL * exact.abs()) & (
        error > 4 * torch.finfo(dtype).eps * scale)
    if not bool(off.any()):
        return
    one = exact.dim() == 0
    dtype_name = str(dtype).removeprefix("torch.")
    got, there = _numbers(exact[off][:3], one), _numbers(rounded[off][:3], one)
    tiny = torch.finfo(dtype).tiny
    why = (f"below its smallest normal number {tiny:.4g}" if bool(
        (exact[off].abs() < tiny).any()) else "its constraint's arithmetic loses it")
    raise HyperdiffError(
        f"{caller}: hyperparameter {name!r} must be representable in {dtype_name}, the dtype "
        f"training computes it in, to a relative accuracy of {REPRESENTABLE_RTOL:g} (got {got}, "
        f"which {dtype_name} holds as {there}: {why}); choose another value or constraint, "
        "or train in float64")


def _check_round_trip(what: str, constraint: Constraint, natural: Tensor, raw: Tensor) -> None:
    """Refuse a natural value that its raw value holds (in float64) more than
    :data:`REPRESENTABLE_RTOL` away from it, relatively: an interval computes ``low + (high -
    low) sigmoid(u)``, whose rounding is a few ulps of its bounds, so ``1e-17`` in ``(-1, 1)``
    is held as 0 and ``0.05`` in ``(-1e15, 1e15)`` as 0. A value of 0 is held within 4 ulps
    of ``max(|low|, |high|)`` (:func:`_arithmetic_scale`: 0 in ``(-1, 3)`` is 2.2e-16).

    >>> try:
    ...     scalar(1e-17, (-1.0, 1.0))
    ... except HyperdiffError as error:
    ...     print(str(error).split("(got ")[1].split(";")[0])
    1e-17, which its interval constraint, strictly between -1.0 and 1.0, holds as 0)
    """
    held = constraint.to_natural(raw)
    error = (held - natural).abs()
    off = (error > REPRESENTABLE_RTOL * natural.abs()) & (
        (natural != 0) | (error > 4 * torch.finfo(torch.float64).eps
                          * _arithmetic_scale(constraint)))
    if not bool(off.any()):
        return
    one = natural.dim() == 0
    got, there = _numbers(natural[off][:3], one), _numbers(held[off][:3], one)
    remedy = ("a value farther from 0 or narrower bounds" if isinstance(constraint, Interval)
              else "another value")
    raise HyperdiffError(
        f"{what} must be held by its raw value to a relative accuracy of "
        f"{REPRESENTABLE_RTOL:g} in float64 (got {got}, which its {constraint.name} "
        f"constraint, {constraint.describe_valid()}, holds as {there}); choose {remedy}")


def _check_inside(what: str, constraint: Constraint, value: Tensor) -> None:
    """Raise ``"<what> must be <valid> for a <name> constraint (got <the first bad values>)"``
    unless every entry of ``value`` lies inside ``constraint``."""
    ok = constraint.valid(value)
    if not bool(ok.all()):
        bad = value[~ok].reshape(-1)[:3].tolist()
        raise HyperdiffError(
            f"{what} must be {constraint.describe_valid()} for {_article(constraint.name)} "
            f"{constraint.name} constraint (got {bad if value.dim() else value.item()})"
        )



def _article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[:1].lower() in "aeiou" else "a"

__all__ = ["HParamView", "HyperParameter", "HyperParameters", "check_representable",
           "per_element", "per_feature", "per_step", "per_tensor", "scalar"]
