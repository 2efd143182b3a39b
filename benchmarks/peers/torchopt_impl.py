"""TorchOpt peer: exact unrolled hypergradient with TorchOpt's differentiable optimizers.

Default style ("functional"): ``torchopt.sgd`` / ``torchopt.adam`` GradientTransformations,
``update(..., inplace=False)`` + ``torchopt.apply_updates(..., inplace=False)`` on a tuple of
parameter tensors, with a *tensor* learning rate ``exp(log_lr)`` so the update is
differentiable in it. Weight decay is part of the inner loss (TorchOpt's ``weight_decay``
argument only takes a Python float, so it cannot carry a gradient or differ per tensor).

Alternative style ("meta"): ``torchopt.MetaSGD`` / ``torchopt.MetaAdam`` driving an
``nn.Module`` in place (``meta_opt.step(loss)``).

Both styles backpropagate the validation loss through all T unrolled steps with
``torch.autograd`` (exact reverse mode).
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
    forward,
    l2_penalty,
    module_with_params,
)

NAME = "torchopt"
try:
    import torchopt

    VERSION = torchopt.__version__
    AVAILABLE = True
    REASON = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    torchopt = None
    VERSION = None
    AVAILABLE = False
    REASON = f"torchopt cannot be imported with torch {torch.__version__}: {exc!r}"


def _make_transform(opt: str, lr: Tensor):
    if opt == "sgd":
        # moment_requires_grad=True: the momentum buffer is part of the differentiable state.
        return torchopt.sgd(lr=lr, momentum=MOMENTUM, moment_requires_grad=True)
    return torchopt.adam(
        lr=lr,
        betas=BETAS,
        eps=EPS,
        eps_root=0.0,
        moment_requires_grad=True,
        use_accelerated_op=False,
    )


def _make_meta(opt: str, module, lr: Tensor):
    if opt == "sgd":
        return torchopt.MetaSGD(module, lr=lr, momentum=MOMENTUM, moment_requires_grad=True)
    return torchopt.MetaAdam(
        module,
        lr=lr,
        betas=BETAS,
        eps=EPS,
        eps_root=0.0,
        moment_requires_grad=True,
        use_accelerated_op=False,
    )


def hypergradient(
    problem: dict,
    params: dict,
    log_lr: Tensor,
    log_wd: Tensor,
    optimizer: str,
    steps: int,
    style: str = "functional",
) -> tuple[float, Tensor, Tensor]:
    """Validation loss after ``steps`` inner steps and d/d(log_lr, log_wd)."""
    if not AVAILABLE:
        raise RuntimeError(REASON)
    opt = check_optimizer(optimizer)
    log_lr = log_lr.detach().clone().requires_grad_(True)
    log_wd = log_wd.detach().clone().requires_grad_(True)
    lr, wd = log_lr.exp(), log_wd.exp()
    x, y = problem["x_train"], problem["y_train"]

    if style == "functional":
        ps = tuple(params[n].detach().clone().requires_grad_(True) for n in PARAM_NAMES)
        transform = _make_transform(opt, lr)
        state = transform.init(ps)
        for _ in range(steps):
            loss = F.cross_entropy(forward(ps, x), y) + l2_penalty(ps, wd)
            grads = torch.autograd.grad(loss, ps, create_graph=True)
            updates, state = transform.update(grads, state, params=ps, inplace=False)
            ps = torchopt.apply_updates(ps, updates, inplace=False)
        logits = forward(ps, problem["x_val"])
    elif style == "meta":
        net = module_with_params(params)
        meta_opt = _make_meta(opt, net, lr)
        for _ in range(steps):
            plist = [net[0].weight, net[0].bias, net[2].weight, net[2].bias]
            loss = F.cross_entropy(net(x), y) + l2_penalty(plist, wd)
            meta_opt.step(loss)
        logits = net(problem["x_val"])
    else:
        raise ValueError(f"unknown style {style!r}")

    val = F.cross_entropy(logits, problem["y_val"])
    g_lr, g_wd = torch.autograd.grad(val, (log_lr, log_wd))
    return float(val.detach()), g_lr.detach(), g_wd.detach()
