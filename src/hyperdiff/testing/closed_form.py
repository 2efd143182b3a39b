"""Closed-form ridge regression: the exact minimiser and hypergradients (test oracles).

``L_train = 1/2 sum_i c_i (x_i'w - y_i)^2 + 1/2 sum_j lam_j w_j^2`` up to the ``1/n`` that
:func:`hyperdiff.testing.linear.ridge` puts in front of both terms (it cancels in ``w*``), and
``L_val = mean_i 1/2 (x_i'w - y_i)^2`` over the validation set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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
    """``w* = (X' C X + Lam)^-1 X' C y`` with ``Lam = diag(l2)`` (scalar or ``(d,)``) and
    ``C = diag(sample_weight)`` (default identity)."""
    c = torch.ones_like(y) if sample_weight is None else sample_weight.to(y)
    a = _normal_matrix(x, c, torch.as_tensor(l2, dtype=x.dtype, device=x.device))
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
    ``dL_val/dlam_j = -q_j w*_j`` (summed over j for a scalar ``lam``) and
    ``dL_val/dc_i = q'x_i (y_i - x_i'w*)``.
    """
    c = torch.ones_like(y) if sample_weight is None else sample_weight.to(y)
    lam = torch.as_tensor(l2, dtype=x.dtype, device=x.device)
    a = _normal_matrix(x, c, lam)
    w = torch.linalg.solve(a, x.T @ (c * y))
    residual_val = x_val @ w - y_val
    value = 0.5 * (residual_val**2).mean()
    q = torch.linalg.solve(a, x_val.T @ residual_val / x_val.shape[0])
    grad_lam = -q * w
    grad_l2 = grad_lam.sum() if lam.dim() == 0 else grad_lam
    grad_c = (x @ q) * (y - x @ w)
    return RidgeAnswer(w, value, grad_l2, grad_c)


def _normal_matrix(x: Tensor, c: Tensor, lam: Tensor) -> Tensor:
    """``X' diag(c) X + diag(lam)`` with ``lam`` a scalar or ``(d,)``."""
    return x.T @ (c[:, None] * x) + torch.diag(lam.expand(x.shape[1]))
