"""Plain-PyTorch reference hypergradient (torch.autograd only, ``create_graph=True``).

Unrolls T full-batch steps of SGD-with-momentum or Adam, written out so that they match
``torch.optim.SGD(momentum=0.9)`` / ``torch.optim.Adam(betas=(0.9, 0.999), eps=1e-8)`` update
formulas exactly, keeps every step's graph, and backpropagates the validation loss to
``(log_lr, log_wd)``. Used as the float64 ground truth for the peer comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    BETAS,
    EPS,
    MOMENTUM,
    PARAM_NAMES,
    check_optimizer,
    digits_problem,
    forward,
    init_params,
    initial_hyperparameters,
    l2_penalty,
)

__all__ = [
    "AVAILABLE",
    "NAME",
    "REASON",
    "digits_problem",
    "hypergradient",
    "init_params",
    "initial_hyperparameters",
    "unrolled_params",
]

NAME = "reference"
AVAILABLE = True
REASON = ""
VERSION = torch.__version__


def unrolled_params(
    problem: dict,
    params: dict,
    log_lr: Tensor,
    log_wd: Tensor,
    optimizer: str,
    steps: int,
    create_graph: bool = True,
    adam_formula: str = "torch",
    adam_step_offset: int = 0,
) -> list[Tensor]:
    """Run the inner loop; returns the final parameters (graph-connected if create_graph).

    ``adam_formula="torch"`` (default) is the current torch.optim.Adam update. The diagnostic
    ``"legacy_eps"`` is the older torch formula still used by higher 0.2.1
    (``step = lr*sqrt(1-b2^t)/(1-b1^t)``, ``denom = sqrt(v) + eps``); it is only used to
    explain peer deviations, never as the reference. ``adam_step_offset=k`` (diagnostic
    only) uses ``t + k`` in the bias corrections, as an optimizer whose state was already
    stepped ``k`` times with zero gradients would.
    """
    opt = check_optimizer(optimizer)
    if adam_formula not in ("torch", "legacy_eps"):
        raise ValueError(f"unknown adam_formula {adam_formula!r}")
    lr = log_lr.exp()
    wd = log_wd.exp()
    x, y = problem["x_train"], problem["y_train"]
    ps = [params[n].detach().clone().requires_grad_(True) for n in PARAM_NAMES]
    beta1, beta2 = BETAS
    bufs: list[Tensor] | None = None
    m: list[Tensor] = [torch.zeros_like(p) for p in ps]
    v: list[Tensor] = [torch.zeros_like(p) for p in ps]
    for t in range(1, steps + 1):
        loss = F.cross_entropy(forward(ps, x), y) + l2_penalty(ps, wd)
        grads = torch.autograd.grad(loss, ps, create_graph=create_graph)
        if opt == "sgd":
            # torch.optim.SGD: buf = g on the first step, then buf = momentum * buf + g
            bufs = (
                list(grads)
                if bufs is None
                else [MOMENTUM * b + g for b, g in zip(bufs, grads, strict=True)]
            )
            ps = [p - lr * b for p, b in zip(ps, bufs, strict=True)]
        else:
            # torch.optim.Adam (non-capturable path):
            # step_size = lr / (1 - b1^t); denom = sqrt(v) / sqrt(1 - b2^t) + eps
            m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads, strict=True)]
            v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads, strict=True)]
            tb = t + adam_step_offset
            bc1 = 1 - beta1**tb
            bc2_sqrt = (1 - beta2**tb) ** 0.5
            if adam_formula == "torch":
                ps = [
                    p - (lr / bc1) * mi / (vi.sqrt() / bc2_sqrt + EPS)
                    for p, mi, vi in zip(ps, m, v, strict=True)
                ]
            else:
                ps = [
                    p - (lr * bc2_sqrt / bc1) * mi / (vi.sqrt() + EPS)
                    for p, mi, vi in zip(ps, m, v, strict=True)
                ]
    return ps


def hypergradient(
    problem: dict,
    params: dict,
    log_lr: Tensor,
    log_wd: Tensor,
    optimizer: str,
    steps: int,
    adam_formula: str = "torch",
    adam_step_offset: int = 0,
) -> tuple[float, Tensor, Tensor]:
    """Validation loss after ``steps`` inner steps and its gradient w.r.t. (log_lr, log_wd)."""
    log_lr = log_lr.detach().clone().requires_grad_(True)
    log_wd = log_wd.detach().clone().requires_grad_(True)
    ps = unrolled_params(
        problem,
        params,
        log_lr,
        log_wd,
        optimizer,
        steps,
        create_graph=True,
        adam_formula=adam_formula,
        adam_step_offset=adam_step_offset,
    )
    val = F.cross_entropy(forward(ps, problem["x_val"]), problem["y_val"])
    g_lr, g_wd = torch.autograd.grad(val, (log_lr, log_wd))
    return float(val.detach()), g_lr.detach(), g_wd.detach()
