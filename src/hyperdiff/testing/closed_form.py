"""Closed-form ridge regression: the exact minimiser and hypergradients (test oracles).

``L_train = 1/2 sum_i c_i (x_i'w - y_i)^2 + 1/2 sum_j lam_j w_j^2`` up to the ``1/n`` that
:func:`hyperdiff.testing.linear.ridge` puts in front of both terms (it cancels in ``w*``), and
``L_val = mean_i 1/2 (x_i'w - y_i)^2`` over the validation set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, describe


class RidgeAnswer(NamedTuple):
    """Exact ridge quantities at one ``lam``: ``w*``, ``L_val(w*)``, and the natural-unit
    hypergradients with respect to the penalty (shaped like ``l2``) and the example weights."""

    solution: Tensor
    value: Tensor
    grad_l2: Tensor
    grad_sample_weight: Tensor


def ridge_solution(
    x: Tensor, y: Tensor, l2: Tensor | float, sample_weight: Tensor | None = None
) -> Tensor:
    """``w* = (X' C X + Lam)^-1 X' C y`` with ``Lam = diag(l2)`` (a number or one-element
    tensor shared by all features, or ``(d,)``) and ``C = diag(sample_weight)`` (``(n,)``,
    default identity); ``x`` is ``(n, d)`` and ``y`` ``(n,)``.

    Raises:
        HyperdiffError: shapes other than these.
    """
    lam, c = _checked("ridge_solution", x, y, None, None, l2, sample_weight)
    a = _normal_matrix(x, c, lam)
    return torch.linalg.solve(a, x.T @ (c * y))


def ridge_hypergradient(
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    l2: Tensor | float,
    sample_weight: Tensor | None = None,
) -> RidgeAnswer:
    """Exact ``dL_val/dlam`` and ``dL_val/dc`` for ``L_val = mean 1/2 (x'w* - y)^2``.

    With ``A = X'CX + Lam``, ``w* = A^-1 X'Cy`` and ``q = A^-1 dL_val/dw``:
    ``dL_val/dlam_j = -q_j w*_j`` (summed over j for a shared ``lam``: a number or a
    one-element tensor, the result shaped like it) and ``dL_val/dc_i = q'x_i (y_i - x_i'w*)``.
    Shapes: ``x`` ``(n, d)``, ``y`` ``(n,)``, ``x_val`` ``(m, d)``, ``y_val`` ``(m,)``, ``l2``
    a number, one element or ``(d,)``, ``sample_weight`` ``(n,)``.

    Raises:
        HyperdiffError: shapes other than these.
    """
    lam, c = _checked("ridge_hypergradient", x, y, x_val, y_val, l2, sample_weight)
    a = _normal_matrix(x, c, lam)
    w = torch.linalg.solve(a, x.T @ (c * y))
    residual_val = x_val @ w - y_val
    value = 0.5 * (residual_val**2).mean()
    q = torch.linalg.solve(a, x_val.T @ residual_val / x_val.shape[0])
    grad_lam = -q * w
    grad_l2 = grad_lam.sum().reshape(lam.shape) if lam.numel() == 1 else grad_lam
    grad_c = (x @ q) * (y - x @ w)
    return RidgeAnswer(w, value, grad_l2, grad_c)


def _checked(caller: str, x: Tensor, y: Tensor, x_val: Tensor | None, y_val: Tensor | None,
             l2: Tensor | float, sample_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(lam, c)`` in ``x``'s dtype after checking every shape, else the standard error."""
    given = {"x": x, "y": y, "x_val": x_val, "y_val": y_val}
    for name, t in given.items():
        if t is not None and not isinstance(t, Tensor):
            raise HyperdiffError(f"{caller}: {name} must be a torch.Tensor (got {describe(t)})")
    if x.dim() != 2:
        raise HyperdiffError(f"{caller}: x must be 2-D (n, d) (got shape {tuple(x.shape)})")
    n, d = x.shape
    if y.shape != (n,):
        raise HyperdiffError(f"{caller}: y must have shape ({n},), one target per row of x "
                             f"(got shape {tuple(y.shape)})")
    if x_val is not None and (x_val.dim() != 2 or x_val.shape[1] != d):
        raise HyperdiffError(f"{caller}: x_val must be 2-D with x's {d} columns (got shape "
                             f"{tuple(x_val.shape)})")
    if x_val is not None and y_val is not None and y_val.shape != (x_val.shape[0],):
        raise HyperdiffError(f"{caller}: y_val must have shape ({x_val.shape[0]},), one target "
                             f"per row of x_val (got shape {tuple(y_val.shape)})")
    lam = torch.as_tensor(l2, dtype=x.dtype, device=x.device)
    if lam.numel() != 1 and lam.shape != (d,):
        raise HyperdiffError(f"{caller}: l2 must be a number, a one-element tensor or shape "
                             f"({d},), one per feature (got {describe(l2)})")
    if sample_weight is None:
        return lam, torch.ones_like(y)
    if not isinstance(sample_weight, Tensor) or sample_weight.shape != (n,):
        raise HyperdiffError(f"{caller}: sample_weight must be None or a tensor of shape ({n},), "
                             f"one weight per row of x (got {describe(sample_weight)})")
    return lam, sample_weight.to(y)


def _normal_matrix(x: Tensor, c: Tensor, lam: Tensor) -> Tensor:
    """``X' diag(c) X + diag(lam)`` with ``lam`` one element or ``(d,)``."""
    return x.T @ (c[:, None] * x) + torch.diag(lam.reshape(-1).expand(x.shape[1]))
