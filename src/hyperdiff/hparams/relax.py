"""What a loss reads for a discrete hyperparameter (:class:`Choice`), and how it mixes options.

A relaxed choice among options ``f_1 .. f_n`` with logits ``u`` and temperature ``tau`` is the
mixture ``sum_i w_i f_i(x)``, ``w = softmax(u / tau)`` (DARTS): a smooth function of ``u``, so
every hypergradient method differentiates it exactly. A *fixed* choice (REINFORCE's sample, a
discretised configuration, a black-box trial) has one-hot constant weights and evaluates only
the chosen option. As ``tau -> 0`` with distinct logits the mixture weights become exactly
one-hot and the relaxed model's losses equal the fixed model's.

Reading a choice as a number (arithmetic, ``float``, a torch function) raises a
:class:`~hyperdiff.errors.HyperdiffError` naming the hyperparameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, Text, fail, is_number


def relaxed_weights(logits: Tensor, temperature: float) -> Tensor:
    """``softmax(logits / temperature)``, shape ``(n,)``."""
    return torch.softmax(logits / temperature, dim=-1)


class Choice:
    """A discrete hyperparameter as a loss sees it.

    Attributes:
        name: the hyperparameter's name; choices: its choices.
        weights: mixture weights, shape ``(n,)`` (one-hot constants for a fixed choice;
            differentiable in the logits otherwise).
        probs: ``softmax(logits)``, the distribution the logits define.
        index: the chosen position for a fixed choice, else ``None``.
    """

    __slots__ = ("choices", "index", "name", "probs", "weights")

    def __init__(self, name: str, choices: tuple[Any, ...], weights: Tensor, probs: Tensor,
                 index: int | None = None):
        self.name, self.choices, self.weights, self.probs, self.index = (
            name, choices, weights, probs, index)

    @classmethod
    def fixed(cls, name: str, choices: tuple[Any, ...], index: int, probs: Tensor) -> Choice:
        weights = torch.zeros(len(choices), dtype=probs.dtype, device=probs.device)
        weights[index] = 1.0
        return cls(name, choices, weights, probs.detach(), index)

    @property
    def is_fixed(self) -> bool:
        return self.index is not None

    @property
    def value(self) -> Any:
        """The chosen choice (a fixed choice only)."""
        if self.index is None:
            raise HyperdiffError(
                f"hyperparameter {self.name!r}: value is only defined for a fixed choice "
                "(mode 'reinforce', or discretised); a relaxed choice mixes its options: use "
                f"hd.choose(h[{self.name!r}], options, ...)"
            )
        return self.choices[self.index]

    def misuse(self, what: str) -> HyperdiffError:
        return HyperdiffError(
            f"hyperparameter {self.name!r} is discrete (choices {list(self.choices)}) and "
            f"cannot be used as a number or value ({what}); evaluate it with "
            f"hd.choose(h[{self.name!r}], options, *args) or read h[{self.name!r}].weights"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        found = [a for a in _flat((*args, *(kwargs or {}).values())) if isinstance(a, Choice)]
        name = getattr(func, "__name__", str(func))
        raise found[0].misuse(f"passed to torch.{name}")

    def __repr__(self) -> str:
        if self.index is not None:
            return f"Choice({self.name!r}: {self.choices[self.index]!r})"
        return f"Choice({self.name!r}: weights {[round(float(w), 4) for w in self.weights]})"


def _flat(values: Any) -> list[Any]:
    """The leaves of nested lists and tuples (``torch.stack([c, c])`` passes a list)."""
    out: list[Any] = []
    for value in values:
        out.extend(_flat(value) if isinstance(value, (list, tuple)) else [value])
    return out


def _refuse(op: str) -> Callable[..., Any]:
    def method(self: Choice, *args: Any) -> Any:
        raise self.misuse(op)
    return method


for _op in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow",
            "rpow", "matmul", "rmatmul", "neg", "float", "int", "index", "bool", "lt", "le",
            "gt", "ge", "abs", "array", "mod", "rmod", "floordiv", "rfloordiv", "divmod",
            "round", "trunc", "floor", "ceil", "pos", "invert", "complex",
            # a choice compared with a value (h["act"] == "tanh") would be False even where
            # "tanh" is chosen, so comparing is refused too (identity, hashing stay)
            "eq", "ne"):
    setattr(Choice, f"__{_op}__", _refuse({"eq": "compared with == (a fixed choice's "
                                                 "value is .value)", "ne": "compared with !="
                                           }.get(_op, f"__{_op}__")))
Choice.item = _refuse("item()")  # type: ignore[attr-defined]
Choice.tolist = _refuse("tolist()")  # type: ignore[attr-defined]


def _options(choice: Choice, options: Any) -> list[Any]:
    if options is None:
        return list(choice.choices)
    if isinstance(options, Mapping):
        missing = [c for c in choice.choices if c not in options]
        if missing:
            raise fail("choose", f"options for {choice.name!r}",
                       f"a mapping with a key for every choice {list(choice.choices)}",
                       Text(f"a mapping without the keys {sorted(map(repr, missing))}"))
        return [options[c] for c in choice.choices]
    if not isinstance(options, Sequence) or len(options) != len(choice.choices):
        raise fail("choose", f"options for {choice.name!r}",
                   f"a sequence of {len(choice.choices)} options (one per choice) or a mapping",
                   options)
    return list(options)


def _evaluate(choice: Choice, option: Any, args: tuple, kwargs: dict) -> Tensor:
    if callable(option):
        return option(*args, **kwargs)
    if args or kwargs:
        raise fail("choose", f"options for {choice.name!r}", "callables when arguments are given",
                   option)
    if isinstance(option, Tensor):
        return option
    if not is_number(option):  # e.g. the default options of string choices: their labels
        raise fail("choose", f"options for {choice.name!r}", "callables or numbers (the "
                   "default options are the choices themselves; pass options= for choices "
                   "that are not numbers)", option)
    return torch.as_tensor(option, dtype=choice.weights.dtype, device=choice.weights.device)


def choose(choice: Choice, options: Any = None, *args: Any, **kwargs: Any) -> Tensor:
    """Evaluate a choice: ``sum_i w_i * option_i(*args)`` (a fixed choice: only its option).

    ``options``: one per choice, as a sequence in the order of the choices or a mapping
    ``choice -> option`` (default: the choices themselves). An option is a callable (called
    with ``args``) or a value (a number or tensor, mixed as is).

    >>> import torch, hyperdiff as hd
    >>> hp = hd.HyperParameters(act=hd.categorical(["relu", "tanh"]))
    >>> h = hp.view(hp.raw)
    >>> x = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    >>> hd.choose(h["act"], {"relu": torch.relu, "tanh": torch.tanh}, x).tolist()
    [-0.380797..., 1.482013...]
    """
    if not isinstance(choice, Choice):
        raise fail("choose", "choice", "a discrete hyperparameter as read by a loss, h[name]",
                   choice)
    opts = _options(choice, options)
    if choice.index is not None:
        return _evaluate(choice, opts[choice.index], args, kwargs)
    return mix(choice, [_evaluate(choice, o, args, kwargs) for o in opts])


def mix(choice: Choice, values: Sequence[Tensor]) -> Tensor:
    """``sum_i w_i values_i`` (a fixed choice: ``values[index]``), in the values' dtype."""
    if len(values) != len(choice.choices):
        raise fail("mix", f"values for {choice.name!r}", f"{len(choice.choices)} tensors",
                   len(values))
    shapes = {tuple(v.shape) for v in values if isinstance(v, Tensor)}
    if len(shapes) > 1:  # broadcast, the mixture would compute what no single choice does
        raise fail("mix", f"the values of {choice.name!r}'s choices",
                   "tensors of one shape (each choice's output must be what the others "
                   "produce)", [tuple(v.shape) if isinstance(v, Tensor) else v for v in values])
    if choice.index is not None:
        return values[choice.index]
    values = [_as_value(choice, v) for v in values]
    weights = choice.weights.to(values[0].dtype)
    total = weights[0] * _unless_unweighted(values[0], weights[0])
    for i in range(1, len(values)):
        total = total + weights[i] * _unless_unweighted(values[i], weights[i])
    return total


def _as_value(choice: Choice, value: Any) -> Tensor:
    """A choice's value as a tensor (a number in the weights' dtype and device)."""
    if isinstance(value, Tensor):
        return value
    if not is_number(value):
        raise fail("mix", f"the values of {choice.name!r}'s choices", "tensors or numbers",
                   value)
    return torch.as_tensor(value, dtype=choice.weights.dtype, device=choice.weights.device)


def _unless_unweighted(value: Tensor, weight: Tensor) -> Tensor:
    """``value`` with its non-finite entries set to 0 where ``weight`` is 0 (a Gumbel sample's
    other options: their inf would make ``0 * inf`` a NaN in the sampled training); finite
    values and weighted options as they are (no host synchronisation)."""
    return torch.where(torch.isfinite(value) | (weight != 0), value, torch.zeros_like(value))


__all__ = ["Choice", "choose", "mix", "relaxed_weights"]
