"""Run any ``torch.nn.Module`` as a pure function of a parameter dict.

:func:`functional` wraps a module so that ``net(params, x, ctx)`` evaluates it with
``torch.func.functional_call`` and never mutates it. Two pieces of module state are handled so
that hypergradients stay exact:

- **BatchNorm running statistics** are carried as *buffers* through training and updated as
  differentiable functions of the parameters (``r <- (1 - m) r + m * batch_stat``), so a
  validation loss evaluated in eval mode sees how they depend on the hyperparameters.
- **Randomness** (dropout) is drawn from a generator seeded by ``(seed, step, call)``, so the
  same training run can be replayed exactly by every hypergradient method.

Several inputs, keyword (dict) inputs, devices and ``torch.compile`` are described in
:func:`functional` and docs/devices.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parameter import is_lazy
from torch.nn.utils.weight_norm import WeightNorm

from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.seeds import call_seed
from hyperdiff.tree import BatchNormBase, tree_flatten
from hyperdiff.typing import Params

_ACTIVE: contextvars.ContextVar[tuple[FunctionalModel, StepContext] | None] = (
    contextvars.ContextVar("hyperdiff_active_model", default=None)
)
TRAINING_LOSS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hyperdiff_training_loss", default=False)
"""True while a train loss is evaluated for a training step (set by
:func:`~hyperdiff.engine.problem.call_loss`): a model called there without ``ctx`` would run
in eval mode, dropout off."""


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
        return self.call_seed(self.calls)

    def call_seed(self, call: int) -> int:
        """The seed of model call ``call`` (1, 2, ...) of this step; ``call = 0`` seeds the
        loss function itself (randomness it draws outside the model, e.g. ``F.dropout``)."""
        return call_seed(self.seed, self.step, call)


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, BatchNormBase)


def _is_compiled(module: Any) -> bool:
    """True for the wrapper ``torch.compile(module)`` returns (an ``OptimizedModule``); checked
    by name so that importing hyperdiff does not import torch._dynamo."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), nn.Module
    )


def _add_devices(tree: Any, found: set[torch.device]) -> None:
    """Add the devices of the tensors in ``tree`` to ``found``: plain dicts, lists and tuples
    walked here (the common case, per training call), anything else (namedtuples, registered
    pytree nodes) through :func:`~hyperdiff.tree.tree_flatten`, whose leaves are the same."""
    kind = type(tree)
    if kind is dict:
        children = tree.values()
    elif kind is list or kind is tuple:
        children = tree
    elif isinstance(tree, Tensor):
        found.add(tree.device)
        return
    elif tree is None or kind in (int, float, bool, str):
        return
    else:
        found.update(x.device for x in tree_flatten(tree)[0] if isinstance(x, Tensor))
        return
    for child in children:
        if isinstance(child, Tensor):  # a leaf: no call
            found.add(child.device)
        else:
            _add_devices(child, found)


def _tensor_devices(*trees: Any) -> list[torch.device]:
    """The distinct accelerator devices (not CPU, not meta) of the tensors in ``trees``, in a
    fixed order: those whose random generators a training call seeds."""
    found: set[torch.device] = set()
    _add_devices(trees, found)
    return sorted((d for d in found if d.type not in ("cpu", "meta")), key=str)


@contextlib.contextmanager
def _seeded_rng(next_seed: Callable[[], int], devices: list[torch.device]) -> Iterator[None]:
    """Fork the CPU generator and those of ``devices``, seeding each from ``next_seed()`` (CPU
    first, then the devices in order), and restore them afterwards."""
    if not devices:  # CPU only: what torch.random.fork_rng(devices=[]) does, without its setup
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(next_seed())
        try:
            yield
        finally:
            torch.set_rng_state(state)
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.default_generator.manual_seed(next_seed())
        for kind in sorted({d.type for d in devices}):
            indices = [d.index or 0 for d in devices if d.type == kind]
            stack.enter_context(torch.random.fork_rng(devices=indices, device_type=kind))
            backend = getattr(torch, kind)
            for index in indices:
                generators = getattr(backend, "default_generators", None)
                if generators:  # cuda, xpu: one generator per device
                    generators[index].manual_seed(next_seed())
                else:  # mps: a single device
                    backend.manual_seed(next_seed())
        yield


def _set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)``, skipped where it would change nothing: every submodule already
    in ``mode`` and none overriding ``train`` or ``__setattr__`` (``train`` walks every
    submodule through ``nn.Module.__setattr__``, a cost paid twice per model call)."""
    if any(sub.training is not mode or type(sub).train is not nn.Module.train
           or type(sub).__setattr__ is not nn.Module.__setattr__ for sub in module.modules()):
        module.train(mode)


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def dropout_modules(module: nn.Module) -> str:
    """The submodules of ``module`` that draw dropout in training mode, as text (``""``: none):
    dropout layers with ``p > 0``, and attention or recurrent layers with ``dropout > 0``, that
    are in training mode after ``module.train()`` (a module whose own ``train`` keeps its
    dropout in eval draws none); every submodule's mode is put back after."""
    modes = [(sub, sub.training) for sub in module.modules()]
    try:
        module.train(True)
        found = [f"{name or 'the module'!r} ({type(sub).__name__})"
                 for name, sub in module.named_modules()
                 if sub.training and ((isinstance(sub, _DROPOUT) and sub.p > 0) or (
                     isinstance(sub, (nn.MultiheadAttention, nn.RNNBase)) and sub.dropout > 0))]
    finally:
        for sub, mode in modes:
            sub.training = mode
    return ", ".join(found[:3]) + (f", ... ({len(found)} in all)" if len(found) > 3 else "")


def _check_supported(module: nn.Module) -> None:
    """Refuse submodules whose forward pass hyperdiff cannot run or differentiate exactly: lazy
    (uninitialized) tensors, ``nn.Embedding(max_norm=...)`` (renormalizes its weight in place,
    out of autograd's sight) and torch's weight norm (its double backward is wrong on CPU)."""
    for name, sub in module.named_modules():
        where = f"submodule {name!r} ({type(sub).__name__})" if name else (
            f"the module ({type(sub).__name__})")
        lazy = [n for n, t in itertools.chain(sub.named_parameters(recurse=False),
                                              sub.named_buffers(recurse=False)) if is_lazy(t)]
        if lazy:
            raise HyperdiffError(
                f"functional: {where} has uninitialized lazy tensors {lazy} (a Lazy* module "
                "before its first forward pass); run one forward pass on an example batch, "
                "module(x), before hd.functional(module)")
        if isinstance(sub, nn.Embedding) and sub.max_norm is not None:
            raise HyperdiffError(
                f"functional: {where} must not set max_norm (got max_norm={sub.max_norm}): "
                "F.embedding renormalizes the weight in place without autograd, so "
                "hypergradients would miss it and the parameters passed in would change. "
                "Renormalize in forward instead, e.g. w = self.emb.weight; "
                "w = w * (max_norm / w.norm(dim=1, keepdim=True)).clamp(max=1); "
                "F.embedding(x, w)")
        if _has_weight_norm(sub):
            raise HyperdiffError(
                f"functional: {where} uses torch's weight norm (nn.utils.parametrizations."
                "weight_norm or nn.utils.weight_norm), whose double backward "
                "(torch._weight_norm) is wrong on CPU, so hypergradients would be wrong. Write "
                "it as a parametrization by hand, e.g. class WeightNorm(nn.Module): def "
                "forward(self, g, v): return g * v / v.norm(dim=1, keepdim=True); def "
                "right_inverse(self, w): return w.norm(dim=1, keepdim=True), w; and "
                "nn.utils.parametrize.register_parametrization(layer, 'weight', WeightNorm())")


def _has_weight_norm(module: nn.Module) -> bool:
    """Whether ``module`` itself has torch's weight norm: the ``_WeightNorm`` parametrization
    or the old ``WeightNorm`` forward pre-hook."""
    lists = getattr(module, "parametrizations", None)  # _WeightNorm is private: by name
    if isinstance(lists, nn.ModuleDict) and any(
            type(p).__name__ == "_WeightNorm"
            and type(p).__module__ == "torch.nn.utils.parametrizations"
            for plist in lists.values() for p in plist.children()):
        return True
    return any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values())


def trainable_parameters(module: nn.Module) -> tuple[Params, tuple[str, ...]]:
    """Detached copies of the parameters that require grad (the ones training moves), and the
    names of the frozen ones (``requires_grad=False``), which stay constants of the forward
    pass: ``torch.optim`` would get ``[p for p in module.parameters() if p.requires_grad]``."""
    named = dict(module.named_parameters())
    params = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    return params, tuple(n for n, p in named.items() if not p.requires_grad)


def replayed_rng(ctx: StepContext, *trees: Any) -> contextlib.AbstractContextManager[None]:
    """The global generators (CPU, and the devices of the tensors in ``trees``) seeded by
    ``ctx.call_seed(0)`` for one loss evaluation and restored afterwards, so that randomness a
    loss draws outside the model (``F.dropout``, ``torch.rand``) is the same every time the same
    ``(seed, step)`` is evaluated: every training of a method or of finite differences replays it.
    """
    seed = ctx.call_seed(0)
    return _seeded_rng(lambda: seed, _tensor_devices(*trees))


UNTRACKED_WATCH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hyperdiff_untracked_watch", default=False)
"""True while :func:`~hyperdiff.engine.problem.call_loss` checks that a loss draws nothing
from Python's or NumPy's global generator (set while a problem is probed)."""


class FunctionalModel:
    """A module evaluated as ``net(params, *inputs, ctx=None, **kw_inputs)``; see
    :func:`functional`."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise HyperdiffError(
                f"functional: module must be a torch.nn.Module (got {type(module).__name__})"
            )
        self.compiled: nn.Module | None = None
        if _is_compiled(module):  # differentiate the eager module (see docs/devices.md)
            self.compiled, module = module, cast(nn.Module, module._orig_mod)
        for name, sub in module.named_modules():
            if name and _is_compiled(sub):
                raise HyperdiffError(
                    f"functional: submodule {name!r} must not be a torch.compile'd module (got "
                    "an OptimizedModule): hypergradients differentiate through training "
                    "(double backward), which torch.compile's AOTAutograd does not support. "
                    "Pass the eager submodule, or compile the whole model: "
                    "hd.functional(torch.compile(model)) differentiates its eager module"
                )
        _check_supported(module)
        self.module = module
        self.params, self.frozen = trainable_parameters(module)
        self.buffers: Params = {}
        self.dropout = dropout_modules(module)
        self._bn: dict[str, nn.Module] = {}
        self._fill_in_cache: dict[Any, dict[str, Tensor]] = {}
        self._buffers_checked = False  # whether a training call left the other buffers alone
        self._mode_checked = False  # whether a call without ctx in training was checked
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

        def hook(bn: BatchNormBase, inputs: tuple[Any, ...]) -> None:
            active = _ACTIVE.get()  # a BatchNorm the model keeps in eval mode (a frozen
            if active is None or active[0] is not self or not (active[1].train and bn.training):
                return  # backbone's, by its own train()) keeps its statistics, as in torch
            ctx = active[1]
            current = ctx.current_buffers()
            rm, rv = current[base + "running_mean"], current[base + "running_var"]
            # as torch's kernel: statistics and update in float32 at least (a bf16 input under
            # autocast, a bf16 / fp16 model), rounded to the buffers' dtype once
            work = torch.promote_types(rm.dtype, torch.float32)
            x = inputs[0].to(work)
            if x.dim() >= 2 and 0 < x.numel() == x.shape[1]:  # torch refuses it below, after
                raise HyperdiffError(  # a "degrees of freedom <= 0" warning from var here
                    f"functional model: BatchNorm {prefix!r} must see more than one value per "
                    f"channel in training (got an input of shape {tuple(x.shape)} at step "
                    f"{ctx.step}): a batch of one row cannot be normalised; drop the short "
                    "last batch, e.g. DataLoader(..., drop_last=True), or size the data so that "
                    "every batch holds two rows or more")
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, correction=1)
            m = cast(float, bn.momentum)  # None is refused in __init__
            ctx.new_buffers[base + "running_mean"] = ((1 - m) * rm.to(work) + m * mean).to(rm.dtype)
            ctx.new_buffers[base + "running_var"] = ((1 - m) * rv.to(work) + m * var).to(rv.dtype)

        return hook

    def _make_eval_hook(self, prefix: str):
        base = f"{prefix}." if prefix else ""

        def hook(bn: BatchNormBase, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
            # torch's batch_norm is not differentiable in its running statistics; in eval mode
            # recompute the output from the (differentiable) buffers we carry.
            active = _ACTIVE.get()
            if active is None or active[0] is not self or (active[1].train and bn.training):
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

    def __call__(self, params: Params, /, *inputs: Any, ctx: StepContext | None = None,
                 **kw_inputs: Any) -> Any:
        """Evaluate ``module(*inputs, **kw_inputs)`` with ``params``; in training mode
        (``ctx.train``) update ``ctx.new_buffers``. A :class:`StepContext` as the last
        positional argument is the context: ``net(params, x, ctx)``."""
        if inputs and isinstance(inputs[-1], StepContext):
            if ctx is not None:
                raise HyperdiffError(
                    "functional model: ctx must be given once, positionally or as ctx= "
                    "(got both)"
                )
            ctx, inputs = inputs[-1], inputs[:-1]
        if ctx is None:
            if self.buffers:
                raise HyperdiffError(
                    "functional model: this module has BatchNorm running statistics, so it "
                    "must be called as net(params, x, ctx) from a loss taking a ctx argument "
                    "(got ctx=None)"
                )
            if self.dropout and TRAINING_LOSS.get():
                raise HyperdiffError(
                    f"functional model: this module has dropout ({self.dropout}), which is off "
                    "when it is called without ctx, so train_loss must call it as "
                    "net(params, x, ctx), taking ctx as its fourth argument (got ctx=None in a "
                    "training step); to train without dropout, set its probability to 0"
                )
            ctx = StepContext(step=-1, seed=0, train=False)
            if TRAINING_LOSS.get() and not self._mode_checked:
                self._check_mode_free(params, inputs, kw_inputs)
        device, dtype = _placement(params, ctx)
        state = dict(self._fill_ins(params, device, dtype))
        state.update(params)
        # torch's batch_norm neither differentiates through nor (in training) should update
        # our buffers: it gets detached copies, and the hooks compute the real values.
        # (Passing None instead takes a ~400x slower kernel path in training mode.)
        current = ctx.current_buffers()
        if self.buffers and not self.buffers.keys() <= current.keys():
            missing = sorted(self.buffers.keys() - current.keys())
            raise HyperdiffError(
                f"functional model: its BatchNorm running statistics {missing[:4]} must be among "
                f"the buffers training carries (got {sorted(current)[:4] or 'none'}); give the "
                "functional model itself as the model (hd.hypergradient(..., net, ...), "
                "hd.task(model=net)) or pass buffers=net.buffers with net.params"
            )
        state.update({k: v.detach().clone() for k, v in current.items()})
        for prefix in self._bn:
            state[f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"] = (
                torch.zeros((), dtype=torch.long, device=device)
            )
        was_training = self.module.training
        token = _ACTIVE.set((self, ctx))
        try:
            _set_training(self.module, ctx.train)
            if ctx.train:
                watched = None if self._buffers_checked else self._own_buffers(state)
                with _seeded_rng(ctx.next_seed, _tensor_devices(params, inputs, kw_inputs)):
                    out = self._run(self.module, state, inputs, kw_inputs)
                if watched is not None:
                    self._check_untouched(watched, state)
                return out
            if self.compiled is not None and not torch.is_grad_enabled() and not self.buffers:
                # evaluation without a graph: the compiled module is valid (no double backward)
                prefixed = {f"_orig_mod.{k}": v for k, v in state.items()}
                return self._run(self.compiled, prefixed, inputs, kw_inputs)
            return self._run(self.module, state, inputs, kw_inputs)
        finally:
            _ACTIVE.reset(token)
            _set_training(self.module, was_training)

    def _check_mode_free(self, params: Params, inputs: tuple[Any, ...],
                         kw_inputs: dict[str, Any]) -> None:
        """At the first call without ``ctx`` from a training step (eval mode), refuse a module
        whose output in training mode differs (``F.dropout(x, p, self.training)`` in a
        forward, spectral_norm's power iteration, anything else that reads ``self.training``):
        it would be trained in eval mode, silently unlike torch. One forward pass in each mode
        on the same inputs, without a graph; the module's buffers are put back after."""
        self._mode_checked = True
        device, dtype = _placement(params, StepContext(step=-1, seed=0, train=False))
        state = {**self._fill_ins(params, device, dtype), **params}
        kept = {name: tensor.detach().clone() for name, tensor in self.module.named_buffers()}
        was_training = self.module.training
        fastpath = torch.backends.mha.get_fastpath_enabled()
        outputs = []
        try:  # without attention's eval-only fast path (other kernels, another rounding)
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad():
                for mode in (False, True):
                    _set_training(self.module, mode)
                    with _seeded_rng(lambda: 0, _tensor_devices(params, inputs, kw_inputs)):
                        outputs.append(self._run(self.module, dict(state), inputs, kw_inputs))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            _set_training(self.module, was_training)
            for name, tensor in self.module.named_buffers():
                tensor.data.copy_(kept[name])
            self._fill_in_cache = {}  # copies a training-mode pass may have written to
        leaves = [_output_leaves(out) for out in outputs]
        if len(leaves[0]) != len(leaves[1]) or any(
                not _same_leaf(a, b) for a, b in zip(*leaves, strict=False)):
            raise HyperdiffError(
                "functional model: this module computes another output in training mode than "
                "in eval mode (dropout drawn in its forward, a parametrization, anything that "
                "reads self.training), and a call without ctx runs it in eval mode, so "
                "train_loss must call it as net(params, x, ctx), taking ctx as its fourth "
                "argument (got ctx=None in a training step)")

    def _own_buffers(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Copies of the module's buffers that training does not carry (all but BatchNorm's
        running statistics), as the forward pass reads them (``state``'s copy, else the
        module's own), taken before the first training call."""
        return {name: state.get(name, tensor).detach().clone()
                for name, tensor in self.module.named_buffers()
                if name not in self.buffers and not name.endswith("num_batches_tracked")}

    def _check_untouched(self, before: dict[str, Tensor], state: dict[str, Tensor]) -> None:
        """Refuse a module whose training forward pass updated a buffer in place (an
        InstanceNorm's running statistics, spectral_norm's power iteration, a hand-written
        running mean): hyperdiff carries BatchNorm's statistics only, so every replay of a step
        would read another value, and the user's module would be changed."""
        own = dict(self.module.named_buffers())
        changed = [name for name, old in before.items()
                   if not torch.equal(state.get(name, own[name]).detach(), old)]
        self._buffers_checked = True
        if changed:
            for name in changed:  # put the module back as it was given
                own[name].data.copy_(before[name].to(own[name].device, own[name].dtype))
            self._fill_in_cache = {}  # and no moved copy of them stays
            raise HyperdiffError(
                f"functional model: its forward pass in training mode updates the buffers "
                f"{changed[:4]}{' ...' if len(changed) > 4 else ''} in place; hyperdiff "
                "carries BatchNorm's running statistics only (a replayed step must read the same "
                "values), so use modules without running state there (e.g. InstanceNorm with "
                "track_running_stats=False, no spectral_norm), or keep them in eval mode")

    @staticmethod
    def _run(module: nn.Module, state: dict[str, Tensor], inputs: tuple[Any, ...],
             kw_inputs: dict[str, Any]) -> Any:
        """``module(*inputs, **kw_inputs)`` with ``state``; where a graph may be built, with
        scaled dot-product attention on its math backend, the one that is twice
        differentiable (CPU flash attention has no double backward; the outputs agree to
        rounding)."""
        attention = (sdpa_kernel(SDPBackend.MATH) if torch.is_grad_enabled()
                     else contextlib.nullcontext())
        try:
            with attention:
                return torch.func.functional_call(module, state, inputs, kw_inputs,
                                                  strict=False)
        except TypeError as err:
            if len(inputs) == 1 and isinstance(inputs[0], Mapping) and not kw_inputs:
                raise HyperdiffError(
                    "functional model: a dict input is passed to forward as one positional "
                    "argument; to call module(**batch) write net(params, **batch, ctx=ctx) "
                    f"(got TypeError: {err})"
                ) from err
            raise

    def _fill_ins(self, params: Params, device: torch.device | None,
                  dtype: torch.dtype | None) -> dict[str, Tensor]:
        """The module's own tensors that ``params`` and the carried buffers do not replace,
        copied to the parameters' device when they live elsewhere, and those in the module's
        own floating dtype (its parameters') to the parameters' dtype: a buffer the module
        keeps in another dtype on purpose (a float64 offset in a float32 model) keeps it, as
        ``module.to(device)`` would; cached per placement."""
        if device is None:
            return {}
        key = (device, dtype, tuple(params))
        cached = self._fill_in_cache.get(key)
        if cached is None:
            skip = set(params) | set(self.buffers)
            cached = {}
            own = list(itertools.chain(self.module.named_parameters(),
                                       self.module.named_buffers()))
            native = next((t.dtype for _, t in own if t.is_floating_point()), None)
            for name, tensor in own:
                if name in skip or name.endswith("num_batches_tracked"):
                    continue
                want = dtype if (dtype is not None and tensor.is_floating_point()
                                 and tensor.dtype == native) else tensor.dtype
                if tensor.device != device or tensor.dtype != want:
                    cached[name] = tensor.detach().to(device=device, dtype=want)
            self._fill_in_cache = {key: cached}  # one placement at a time
        return cached


_LEAVES = (Tensor, bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _output_leaves(out: Any) -> list[Any]:
    """The tensors and plain scalars of a model's output, in order: dicts, lists, tuples
    (namedtuples), dataclasses and registered pytree nodes are walked; any other object is
    refused, since a difference between training and eval mode could hide in it."""
    leaves: list[Any] = []
    _add_leaves(out, leaves, depth=0)
    return leaves


def _add_leaves(tree: Any, leaves: list[Any], depth: int) -> None:
    if tree is None or isinstance(tree, _LEAVES):
        leaves.append(tree)
        return
    if depth > 32:
        raise HyperdiffError("functional model: its output nests deeper than 32 levels; "
                             "call it as net(params, x, ctx) from a loss taking ctx")
    if isinstance(tree, Mapping):
        children: Any = list(tree.values())
    elif isinstance(tree, list | tuple):
        children = tree
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        children = [getattr(tree, f.name) for f in dataclasses.fields(tree)]
    else:
        flat = tree_flatten(tree)[0]
        if len(flat) == 1 and flat[0] is tree:  # not a container torch knows
            raise HyperdiffError(
                f"functional model: its output holds a {type(tree).__name__}, which hyperdiff "
                "cannot look into to check that training and eval mode compute the same "
                "output, and a call without ctx runs it in eval mode; train_loss must call it "
                "as net(params, x, ctx), taking ctx as its fourth argument (or return tensors, "
                "dicts, tuples or dataclasses)")
        children = flat
    for child in children:
        _add_leaves(child, leaves, depth + 1)


def _same_leaf(a: Any, b: Any) -> bool:
    """Whether two output leaves are the same (tensors: shape and values)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and torch.equal(a, b))
    return type(a) is type(b) and (a is b or a == b)


def _placement(params: Params, ctx: StepContext) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of the parameters (of the buffers when there are none)."""
    for tensor in itertools.chain(params.values(), ctx.current_buffers().values()):
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def functional(module: nn.Module) -> FunctionalModel:
    """Wrap ``module`` as a pure function ``net(params, *inputs, ctx=None, **kw_inputs)``.

    ``net.params`` and ``net.buffers`` hold detached copies of the initial parameters and of the
    BatchNorm running statistics. Frozen parameters (``requires_grad=False``) are not in
    ``net.params``: no method trains them, the forward pass reads them from the module as
    constants, and ``net.frozen`` names them.

    Inputs: positional inputs after ``params`` go to ``module.forward`` positionally and keyword
    inputs by keyword, so ``net(params, x1, x2, ctx=ctx)`` calls ``module(x1, x2)`` and
    ``net(params, **batch, ctx=ctx)`` calls ``module(**batch)``; a dict passed positionally
    stays one argument, ``module(batch)``. A :class:`StepContext` as the last positional
    argument is the context (``net(params, x, ctx)``).

    Devices: the module runs on the parameters' device; its tensors that ``params`` does not
    replace (frozen parameters, constant buffers) are copied there once. Dropout is seeded on
    every device that an input or parameter lives on.

    ``torch.compile``: for ``functional(torch.compile(model))`` the eager ``model`` is what
    training runs and differentiates (AOTAutograd has no double backward, and one function in
    every pass keeps replays exact); the compiled module runs evaluation calls made without a
    graph (``torch.no_grad()``, eval mode) of models without BatchNorm statistics. A compiled
    *submodule* is refused.

    >>> import torch, hyperdiff as hd
    >>> net = hd.functional(torch.nn.Linear(3, 2))
    >>> net(net.params, torch.zeros(4, 3)).shape
    torch.Size([4, 2])
    """
    return FunctionalModel(module)


def model_state(caller: str, model: Any, buffers: Any = None, name: str = "model"
                ) -> tuple[Any, Any]:
    """``(params, buffers)`` of every model form the entry points take, unchecked.

    ``model`` is a :func:`functional` model (its trained parameters and BatchNorm buffers), a
    dict name -> tensor (with ``buffers``, a dict or ``None``: none) or a pair
    ``(params, buffers)``. ``hd.hypergradient``, ``hd.make_problem`` and ``hd.task`` all read
    their model through this function, so they accept the same forms; ``name`` is the
    caller's word for the argument.

    >>> model_state("f", {"w": torch.zeros(2)})
    ({'w': tensor([0., 0.])}, {})
    """
    if isinstance(model, nn.Module):
        raise HyperdiffError(f"{caller}: {name} must be hd.functional(module), not the module "
                             "itself (the losses call it as net(params, x, ctx))")
    if isinstance(model, FunctionalModel | tuple) and buffers is not None:
        raise HyperdiffError(f"{caller}: buffers must not be given with a functional model or a "
                             "(params, buffers) pair (its own buffers are used)")
    if isinstance(model, FunctionalModel):
        return model.params, model.buffers
    if isinstance(model, tuple) and len(model) == 2:
        return model[0], model[1]
    if not isinstance(model, dict):
        raise HyperdiffError(f"{caller}: {name} must be hd.functional(module), a dict of "
                             f"parameter tensors or a pair (params, buffers) (got "
                             f"{describe(model)})")
    return model, {} if buffers is None else buffers


__all__ = ["FunctionalModel", "StepContext", "functional", "model_state"]
