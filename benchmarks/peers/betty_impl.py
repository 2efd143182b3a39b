"""Betty peer: exact unrolled hypergradient through Betty's Problem/Engine API.

How the problem is expressed in Betty 0.2.1
-------------------------------------------
* Lower level: an ``IterativeProblem`` ("inner") whose ``nn.Module`` is the MLP and whose
  optimizer is a stock ``torch.optim.SGD(momentum=0.9)`` / ``torch.optim.Adam``. Betty turns the
  module into a functorch functional model and the optimizer into its own
  ``DifferentiableSGD`` / ``DifferentiableAdam`` (out-of-place updates), so the T updates stay
  on the autograd tape. ``Config(unroll_steps=T, retain_graph=True)``.
* Upper level: an ``ImplicitProblem`` ("outer") whose module holds ``log_lr`` and ``log_wd`` as
  ``nn.Parameter``s and whose loss is the validation cross-entropy of the inner functional model.
  ``Config(first_order=False)`` makes Betty differentiate the inner steps with
  ``create_graph=True`` and take the *direct* gradient of the outer loss through the unrolled
  inner parameters, i.e. exact reverse mode (no DARTS/CG/Neumann approximation is used).
* The learning rate is differentiable by putting ``exp(log_lr)`` (a tensor) into the patched
  optimizer's ``param_groups`` in the ``on_inner_loop_start`` hook; the per-tensor weight decay
  is in the inner loss (``training_step``).
* The hypergradient is read in the outer problem's ``grad_callback`` hook (after Betty's
  backward, before its optimizer step; the outer optimizer is SGD with lr=0).
* ``Engine(train_iters=T)`` runs T inner steps, then one outer step.

Workarounds needed (Betty 0.2.1 bugs, independent of the torch version)
-----------------------------------------------------------------------
1. ``IterativeProblem.initialize`` raises ``KeyError: 'params'``: ``Problem.initialize`` already
   replaces the torch optimizer by Betty's differentiable one, then ``initialize_optimizer_state``
   iterates ``param_group["params"]`` of the replaced optimizer. The subclass below runs
   ``initialize_optimizer_state`` first, then ``Problem.initialize``, then ``patch_modules``.
2. ``IterativeProblem.optimizer_step`` reads ``self._fp16``, which ``Problem`` no longer defines
   (``AttributeError``). The subclass sets ``_fp16 = False``.
3. Betty 0.2.1 declares ``Requires-Python <3.11``; it is installed with
   ``--ignore-requires-python`` (pure Python, imports fine on 3.11).

Known deviation (kept, reported by compare.py): Betty initialises optimizer state by one real
``optimizer.step()`` with zero gradients (``initialize_optimizer_state``). For SGD this is
harmless (momentum buffer 0, then ``0.9*0 + g``), but for Adam it sets ``state['step'] = 1``,
so the first differentiable step uses ``t = 2`` in the bias corrections (all T steps are shifted
by one). ``reset_adam_step=True`` (diagnostic only) resets the step counter to 0. torch 2.13
keeps ``state['step']`` as a float32 tensor, so the bias corrections are also computed in float32.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import BETAS, EPS, MOMENTUM, check_optimizer, l2_penalty, module_with_params

NAME = "betty"
try:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.logging.logger_base import get_logger
    from betty.problems import ImplicitProblem, IterativeProblem, Problem

    try:
        from importlib.metadata import version as _dist_version

        VERSION = _dist_version("betty-ml")
    except Exception:  # pragma: no cover
        VERSION = "unknown"
    get_logger().setLevel(logging.WARNING)  # Betty logs INFO lines to stdout by default
    AVAILABLE = True
    REASON = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    VERSION = None
    AVAILABLE = False
    REASON = f"betty cannot be imported with torch {torch.__version__}: {exc!r}"


if AVAILABLE:

    class _Hyper(nn.Module):
        def __init__(self, log_lr: Tensor, log_wd: Tensor):
            super().__init__()
            self.log_lr = nn.Parameter(log_lr.detach().clone())
            self.log_wd = nn.Parameter(log_wd.detach().clone())

    class _Inner(IterativeProblem):
        _fp16 = False  # workaround 2: attribute read by IterativeProblem.optimizer_step
        reset_adam_step = False

        def initialize(self):
            # workaround 1: initialise torch optimizer state *before* Betty patches it
            self.initialize_optimizer_state()
            Problem.initialize(self)  # patches the optimizer (IterativeProblem.patch_optimizer)
            self.patch_modules()  # functorch functional module + params
            if self.reset_adam_step:
                for st in self.optimizer.state:
                    if st and "step" in st:
                        st["step"] = torch.zeros_like(st["step"])

        def training_step(self, batch):
            x, y = batch
            out = self.fmodule(self.params, self.buffers, x)
            wd = self.outer.module.log_wd.exp()
            return F.cross_entropy(out, y) + l2_penalty(self.params, wd)

        def on_inner_loop_start(self):
            lr = self.outer.module.log_lr.exp()
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    class _Outer(ImplicitProblem):
        captured = None

        def training_step(self, batch):
            x, y = batch
            out = self.inner.fmodule(self.inner.params, self.inner.buffers, x)
            loss = F.cross_entropy(out, y)
            self.val_loss = float(loss.detach())
            return loss

        def grad_callback(self):
            self.captured = [p.grad.detach().clone() for p in self.trainable_parameters()]


def hypergradient(
    problem: dict,
    params: dict,
    log_lr: Tensor,
    log_wd: Tensor,
    optimizer: str,
    steps: int,
    reset_adam_step: bool = False,
) -> tuple[float, Tensor, Tensor]:
    """Validation loss after ``steps`` inner steps and d/d(log_lr, log_wd)."""
    if not AVAILABLE:
        raise RuntimeError(REASON)
    opt = check_optimizer(optimizer)
    if steps < 1:
        raise ValueError("Betty needs steps >= 1 (the outer step fires after unroll_steps)")
    net = module_with_params(params)
    hyper = _Hyper(log_lr, log_wd)
    lr0 = float(log_lr.detach().exp())  # placeholder; replaced by the tensor lr in the hook
    if opt == "sgd":
        inner_opt = torch.optim.SGD(net.parameters(), lr=lr0, momentum=MOMENTUM)
    else:
        inner_opt = torch.optim.Adam(net.parameters(), lr=lr0, betas=BETAS, eps=EPS)
    train_loader = [(problem["x_train"], problem["y_train"])]  # one full batch per step
    val_loader = [(problem["x_val"], problem["y_val"])]

    inner = _Inner(
        "inner",
        Config(type="darts", unroll_steps=steps, retain_graph=True),
        module=net,
        optimizer=inner_opt,
        train_data_loader=train_loader,
    )
    inner.reset_adam_step = reset_adam_step
    outer = _Outer(
        "outer",
        Config(type="darts", first_order=False, retain_graph=False),
        module=hyper,
        optimizer=torch.optim.SGD(hyper.parameters(), lr=0.0),
        train_data_loader=val_loader,
    )
    engine = Engine(
        problems=[outer, inner],
        config=EngineConfig(train_iters=steps, strategy="cpu"),
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
    )
    engine.run()
    if outer.captured is None:
        raise RuntimeError("Betty did not run the outer step (no hypergradient captured)")
    g_lr, g_wd = outer.captured
    return outer.val_loss, g_lr, g_wd
