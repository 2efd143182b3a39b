"""higher peer: exact unrolled hypergradient with ``higher.innerloop_ctx``.

A stateful ``nn.Module`` and a stock ``torch.optim.SGD(momentum=0.9)`` / ``torch.optim.Adam``
are wrapped by ``higher.innerloop_ctx(..., copy_initial_weights=True,
override={'lr': [exp(log_lr)]})``; every ``diffopt.step(loss)`` builds the functional update on
the tape, and the validation loss of the final ``fmodel`` is backpropagated to
``(log_lr, log_wd)``. The learning rate reaches the update through ``override`` (a tensor);
the per-tensor weight decay is part of the inner loss (higher's ``weight_decay`` override would
need one param group per tensor; the gradient is identical either way).

Known deviation (reported by compare.py): higher 0.2.1's DifferentiableAdam implements the
*old* torch Adam formula ``step = lr*sqrt(1-b2^t)/(1-b1^t)``, ``denom = sqrt(v) + eps``, i.e.
eps is not divided by ``sqrt(1-b2^t)`` as in the current torch formula
``denom = sqrt(v)/sqrt(1-b2^t) + eps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import BETAS, EPS, MOMENTUM, check_optimizer, l2_penalty, module_with_params

NAME = "higher"
try:
    import higher

    try:
        from importlib.metadata import version as _dist_version

        VERSION = _dist_version("higher")
    except Exception:  # pragma: no cover
        VERSION = "unknown"
    AVAILABLE = True
    REASON = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    higher = None
    VERSION = None
    AVAILABLE = False
    REASON = f"higher cannot be imported with torch {torch.__version__}: {exc!r}"


def hypergradient(
    problem: dict, params: dict, log_lr: Tensor, log_wd: Tensor, optimizer: str, steps: int
) -> tuple[float, Tensor, Tensor]:
    """Validation loss after ``steps`` inner steps and d/d(log_lr, log_wd)."""
    if not AVAILABLE:
        raise RuntimeError(REASON)
    opt = check_optimizer(optimizer)
    log_lr = log_lr.detach().clone().requires_grad_(True)
    log_wd = log_wd.detach().clone().requires_grad_(True)
    lr, wd = log_lr.exp(), log_wd.exp()
    x, y = problem["x_train"], problem["y_train"]

    net = module_with_params(params)
    # the lr given to the stock optimizer is a placeholder; the tensor lr comes via override
    if opt == "sgd":
        inner_opt = torch.optim.SGD(net.parameters(), lr=float(lr.detach()), momentum=MOMENTUM)
    else:
        inner_opt = torch.optim.Adam(net.parameters(), lr=float(lr.detach()), betas=BETAS, eps=EPS)

    with higher.innerloop_ctx(
        net, inner_opt, copy_initial_weights=True, override={"lr": [lr]}, track_higher_grads=True
    ) as (fnet, diffopt):
        for _ in range(steps):
            plist = list(fnet.parameters())  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
            loss = F.cross_entropy(fnet(x), y) + l2_penalty(plist, wd)
            diffopt.step(loss)
        val = F.cross_entropy(fnet(problem["x_val"]), problem["y_val"])
        g_lr, g_wd = torch.autograd.grad(val, (log_lr, log_wd))
    return float(val.detach()), g_lr.detach(), g_wd.detach()
