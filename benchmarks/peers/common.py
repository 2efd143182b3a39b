"""Shared definition of the head-to-head benchmark problem.

Every peer implementation (TorchOpt, higher, Betty) and the plain-PyTorch reference use
exactly these data, this model, these initial parameters and these loss definitions.

Problem
-------
* Data: ``sklearn.datasets.load_digits``; ``X / 16.0``; rows ``[0, 1000)`` train and rows
  ``[1000, 1400)`` validation, no shuffling.
* Model: MLP 64-128-10 with tanh, params ``fc1.weight (128, 64)``, ``fc1.bias (128,)``,
  ``fc2.weight (10, 128)``, ``fc2.bias (10,)``; initialised with ``torch.manual_seed(0)`` then
  the default ``nn.Linear`` init of ``Sequential(Linear(64, 128), Tanh(), Linear(128, 10))``.
* Hyperparameters: ``log_lr`` (scalar) and ``log_wd`` (4,), one per parameter tensor in
  :data:`PARAM_NAMES` order.
* Inner loss (full batch): ``CE(model(x_train), y_train) + 0.5 * sum_k wd_k * ||p_k||^2``.
* Outer objective: ``CE(model_T(x_val), y_val)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARAM_NAMES: tuple[str, ...] = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
N_TRAIN = 1000
N_VAL = 400
INIT_LR = {"sgd": 0.1, "adam": 0.01}
INIT_WD = 1e-3
MOMENTUM = 0.9
BETAS = (0.9, 0.999)
EPS = 1e-8
OPTIMIZERS = ("sgd", "adam")


def digits_problem(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Deterministic digits split: first 1000 rows train, next 400 validation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64).div(16.0).to(dtype)
    y = torch.as_tensor(data.target, dtype=torch.long)
    return {
        "x_train": x[:N_TRAIN].contiguous(),
        "y_train": y[:N_TRAIN].contiguous(),
        "x_val": x[N_TRAIN : N_TRAIN + N_VAL].contiguous(),
        "y_val": y[N_TRAIN : N_TRAIN + N_VAL].contiguous(),
    }


def make_module() -> nn.Sequential:
    """The benchmark architecture; weights are whatever the current RNG state gives."""
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))


def init_params(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Initial parameters: ``torch.manual_seed(0)`` then default ``nn.Linear`` init.

    The module is built in float32 (the default dtype) and then cast, so every dtype starts from
    the same numbers (float64 parameters are the exact float32 values widened).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = make_module()
    names = {
        "0.weight": "fc1.weight",
        "0.bias": "fc1.bias",
        "2.weight": "fc2.weight",
        "2.bias": "fc2.bias",
    }
    return {names[k]: v.detach().to(dtype).clone() for k, v in module.state_dict().items()}


def initial_hyperparameters(
    optimizer: str, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``(log_lr, log_wd)`` at the benchmark's initial values."""
    log_lr = torch.tensor(math.log(INIT_LR[optimizer]), dtype=dtype)
    log_wd = torch.full((len(PARAM_NAMES),), math.log(INIT_WD), dtype=dtype)
    return log_lr, log_wd


def module_with_params(params: dict[str, Tensor]) -> nn.Sequential:
    """A fresh ``nn.Sequential`` holding copies of ``params`` (for stateful-module peers)."""
    module = make_module().to(next(iter(params.values())).dtype)
    with torch.no_grad():
        module[0].weight.copy_(params["fc1.weight"])
        module[0].bias.copy_(params["fc1.bias"])
        module[2].weight.copy_(params["fc2.weight"])
        module[2].bias.copy_(params["fc2.bias"])
    return module


def forward(params: dict[str, Tensor] | list[Tensor] | tuple[Tensor, ...], x: Tensor) -> Tensor:
    """Functional MLP forward; ``params`` is a dict or a sequence in PARAM_NAMES order."""
    if isinstance(params, dict):
        w1, b1, w2, b2 = (params[n] for n in PARAM_NAMES)
    else:
        w1, b1, w2, b2 = params
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


def l2_penalty(params: list[Tensor] | tuple[Tensor, ...], wd: Tensor) -> Tensor:
    """``0.5 * sum_k wd_k * ||p_k||^2`` with params in PARAM_NAMES order."""
    return 0.5 * sum(wd[k] * p.pow(2).sum() for k, p in enumerate(params))


def check_optimizer(optimizer: str) -> str:
    opt = optimizer.lower()
    if opt not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    return opt
