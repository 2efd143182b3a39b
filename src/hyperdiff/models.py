"""Run any ``torch.nn.Module`` as a pure function of a parameter dict.

:func:`functional` wraps a module so that ``net(params, x, ctx)`` evaluates it with
``torch.func.functional_call`` and never mutates it. Two pieces of module state are handled so
that hypergradients stay exact:

- **BatchNorm running statistics** are carried as *buffers* through training and updated as
  differentiable functions of the parameters (``r <- (1 - m) r + m * batch_stat``), so a
  validation loss evaluated in eval mode sees how they depend on the hyperparameters.
- **Randomness** (dropout) is drawn from a generator seeded by ``(seed, step, call)``, so the
  same training run can be replayed exactly by every hypergradient method.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import HyperdiffError
from .typing import Params

_ACTIVE: contextvars.ContextVar[tuple[FunctionalModel, StepContext] | None] = (
    contextvars.ContextVar("hyperdiff_active_model", default=None)
)


@dataclass
class StepContext:
    """What a four-argument loss ``loss(params, hparams, batch, ctx)`` receives.

    Attributes:
        step: inner step index (``-1`` for the validation loss).
        seed: seed of the training run; with ``step`` it fixes all randomness of the step.
        train: True for training steps (dropout on, batch statistics), False for evaluation.
        buffers: model buffers (BatchNorm running statistics) before this call.
        new_buffers: buffers written by model calls during this loss evaluation.
    """

    step: int
    seed: int
    train: bool
    buffers: dict[str, Tensor] = field(default_factory=dict)
    new_buffers: dict[str, Tensor] = field(default_factory=dict)
    calls: int = 0

    def current_buffers(self) -> dict[str, Tensor]:
        return {**self.buffers, **self.new_buffers}

    def next_seed(self) -> int:
        """A seed for the next random model call of this step, distinct per call."""
        self.calls += 1
        return (self.seed * 1_000_003 + (self.step + 1) * 7_919 + self.calls) % (2**62)


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


class FunctionalModel:
    """A module evaluated as ``net(params, x, ctx=None)``; see :func:`functional`."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise HyperdiffError(
                f"functional: module must be a torch.nn.Module (got {type(module).__name__})"
            )
        self.module = module
        self.params: Params = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.buffers: Params = {}
        self._bn: dict[str, nn.Module] = {}
        for prefix, sub in module.named_modules():
            if _is_batch_norm(sub) and sub.track_running_stats:
                if sub.momentum is None:
                    raise HyperdiffError(
                        f"functional: BatchNorm {prefix!r} must have a float momentum "
                        "(got momentum=None, the cumulative average, which is not supported)"
                    )
                self._bn[prefix] = sub
                sub.register_forward_pre_hook(self._make_hook(prefix))
                sub.register_forward_hook(self._make_eval_hook(prefix))
                base = f"{prefix}." if prefix else ""
                self.buffers[base + "running_mean"] = sub.running_mean.detach().clone()
                self.buffers[base + "running_var"] = sub.running_var.detach().clone()

    def _make_hook(self, prefix: str):
        base = f"{prefix}." if prefix else ""

        def hook(bn: _BatchNorm, inputs: tuple[Any, ...]) -> None:
            active = _ACTIVE.get()
            if active is None or active[0] is not self or not active[1].train:
                return
            ctx = active[1]
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, correction=1)
            current = ctx.current_buffers()
            m = cast(float, bn.momentum)  # None is refused in __init__
            rm, rv = current[base + "running_mean"], current[base + "running_var"]
            ctx.new_buffers[base + "running_mean"] = (1 - m) * rm + m * mean
            ctx.new_buffers[base + "running_var"] = (1 - m) * rv + m * var

        return hook

    def _make_eval_hook(self, prefix: str):
        base = f"{prefix}." if prefix else ""

        def hook(bn: _BatchNorm, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
            # torch's batch_norm is not differentiable in its running statistics; in eval mode
            # recompute the output from the (differentiable) buffers we carry.
            active = _ACTIVE.get()
            if active is None or active[0] is not self or active[1].train:
                return None
            current = active[1].current_buffers()
            x = inputs[0]
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean = current[base + "running_mean"].view(shape)
            var = current[base + "running_var"].view(shape)
            out = (x - mean) / torch.sqrt(var + bn.eps)
            if bn.affine:
                weight, bias = cast(Tensor, bn.weight), cast(Tensor, bn.bias)
                out = out * weight.view(shape) + bias.view(shape)
            return out

        return hook

    def __call__(self, params: Params, x: Any, ctx: StepContext | None = None) -> Any:
        """Evaluate the module; in training mode (``ctx.train``) update ``ctx.new_buffers``."""
        if ctx is None:
            if self.buffers:
                raise HyperdiffError(
                    "functional model: this module has BatchNorm running statistics, so it "
                    "must be called as net(params, x, ctx) from a loss taking a ctx argument "
                    "(got ctx=None)"
                )
            ctx = StepContext(step=-1, seed=0, train=False)
        inputs = dict(params)
        # torch's batch_norm neither differentiates through nor (in training) should update
        # our buffers: it gets detached copies, and the hooks compute the real values.
        # (Passing None instead takes a ~400x slower kernel path in training mode.)
        inputs.update({k: v.detach().clone() for k, v in ctx.current_buffers().items()})
        for prefix in self._bn:
            inputs[f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"] = (
                torch.zeros((), dtype=torch.long)
            )
        was_training = self.module.training
        token = _ACTIVE.set((self, ctx))
        try:
            self.module.train(ctx.train)
            if ctx.train:
                with torch.random.fork_rng(devices=self._rng_devices(x)):
                    torch.default_generator.manual_seed(ctx.next_seed())
                    if x.is_cuda:
                        torch.cuda.manual_seed(ctx.next_seed())
                    return torch.func.functional_call(self.module, inputs, (x,), strict=False)
            return torch.func.functional_call(self.module, inputs, (x,), strict=False)
        finally:
            _ACTIVE.reset(token)
            self.module.train(was_training)


    @staticmethod
    def _rng_devices(x: Any) -> list[Any]:
        return [x.device] if isinstance(x, Tensor) and x.is_cuda else []


def functional(module: nn.Module) -> FunctionalModel:
    """Wrap ``module`` as a pure function ``net(params, x, ctx=None)``.

    ``net.params`` and ``net.buffers`` hold detached copies of the initial parameters and of the
    BatchNorm running statistics.

    >>> import torch, hyperdiff as hd
    >>> net = hd.functional(torch.nn.Linear(3, 2))
    >>> net(net.params, torch.zeros(4, 3)).shape
    torch.Size([4, 2])
    """
    return FunctionalModel(module)
