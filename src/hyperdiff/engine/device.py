"""Put a problem on a device (and dtype): parameters, buffers, validation and training data.

:func:`to_device` returns a copy of a :class:`~hyperdiff.Problem` whose parameters, buffers and
validation batches live on ``device`` (floating-point tensors cast to ``dtype`` when given;
integer tensors such as labels keep theirs), and whose training source moves each batch to the
device as it is read (:class:`OnDevice`), so a streaming source never has to fit on the device.
Hyperparameter values need no moving: every method takes them through
:meth:`~hyperdiff.Problem.raw_tensors`, which puts them on the parameters' device in
``hparam_dtype`` (the parameters' dtype, at least float32).

:func:`resolve_device` turns a user's device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"mps"``, ``"auto"``) into a ``torch.device`` and refuses one that this machine does not have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import Tensor

from hyperdiff.engine.data import BatchSource, FullBatch, Minibatches, Recorded, Sequence
from hyperdiff.engine.data.evaluation import EvaluationSplit
from hyperdiff.engine.optimizers import (
    Optimizer,
    check_coefficient_values,
    check_number_coefficients,
    working_dtype,
)
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.tree import leaves, move, tree_flatten
from hyperdiff.typing import Batch

# a Problem; device.py sits below problem.py (whose Problem.to calls to_device), so it names the
# problem's type by a variable instead of importing it
ProblemT = TypeVar("ProblemT")

DEVICE_HELP = '"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "mps"'


def resolve_device(spec: str | torch.device, caller: str = "device",
                   what: str = "device") -> torch.device:
    """The ``torch.device`` named by ``spec``; ``"auto"`` picks CUDA when there is one.

    Raises:
        HyperdiffError: ``spec`` is not a device name, or names a device this machine lacks.
    """
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise HyperdiffError(f"{caller}: {what} must be {DEVICE_HELP} (got {describe(spec)})"
                             ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HyperdiffError(
                f"{caller}: {what} must be a device this machine has (got {str(device)!r}, "
                f"which is not available: torch {torch.__version__} sees no CUDA device); "
                'use "cpu" or "auto"'
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise HyperdiffError(
                f"{caller}: {what} must be one of cuda:0 .. cuda:{count - 1} on this machine "
                f"(got {str(device)!r})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise HyperdiffError(
            f"{caller}: {what} must be a device this machine has (got 'mps', which is not "
            'available); use "cpu" or "auto"'
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise HyperdiffError(f"{caller}: {what} must be {DEVICE_HELP} (got {str(device)!r})")
    return device


def tensor_of(value: Any) -> Tensor:
    """``value`` as a tensor: a tensor stays where it is, anything else (a numpy array, a list)
    becomes a CPU tensor, as ``torch.as_tensor`` makes it."""
    return value if isinstance(value, Tensor) else torch.as_tensor(value, device="cpu")


class OnDevice(BatchSource):
    """A batch source whose batches are moved to ``device`` (and ``dtype``) as they are read.

    It wraps any :class:`~hyperdiff.engine.data.BatchSource` by composition: ``batch(step, seed)``
    moves the wrapped source's batch; every other attribute and method (those of the
    ``BatchSource`` base class included) is the wrapped source's. The last batch is cached, so
    a full-batch source is copied to the device once: its copy is reused while the batch is the
    same container holding the same tensors, none of them written in place since (the identity
    of the container and of each leaf, and each tensor's version counter). A container filled
    with new tensors, or a tensor refreshed in place, is copied again.
    """

    def __init__(self, source: BatchSource, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.source, self.device, self.dtype = source, device, dtype
        self._last: tuple[Any, list[tuple[Any, int | None]], Any] | None = None

    def batch(self, step: int, seed: int) -> Batch:
        original = self.source.batch(step, seed)
        key = _cache_key(original)
        last = self._last
        if (last is not None and last[0] is original and len(last[1]) == len(key)
                and all(a is b and u == v for (a, u), (b, v) in zip(last[1], key, strict=True))):
            return last[2]
        moved = move(original, self.device, self.dtype)
        self._last = (original, key, moved)
        return moved

    def check(self, steps: int, seed: int) -> None:
        self.source.check(steps, seed)

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not yet set (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"OnDevice({self.source!r}, device={str(self.device)!r})"


def _cache_key(batch: Any) -> list[tuple[Any, int | None]]:
    """Each leaf of ``batch`` with its version counter (tensors; ``None`` for other leaves and
    inference tensors, which keep none): equal keys, compared leaf by leaf with ``is``, mean
    the same values."""
    return [(leaf, leaf._version if isinstance(leaf, Tensor) and not leaf.is_inference()
             else None) for leaf in tree_flatten(batch)[0]]


def _forwarding(name: str) -> Any:
    def method(self: OnDevice, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.source, name)(*args, **kwargs)

    method.__name__ = name
    return method


def _forwarded(name: str) -> property:
    """The wrapped source's attribute ``name``: a class attribute of ``BatchSource`` (such as
    ``fixed_batch = False``) would otherwise be found before ``__getattr__`` forwards it."""
    return property(lambda self: getattr(self.source, name),
                    doc=f"The wrapped source's ``{name}``.")


for _name, _value in list(vars(BatchSource).items()):
    if not _name.startswith("_") and _name not in vars(OnDevice):
        setattr(OnDevice, _name, _forwarding(_name) if callable(_value) else _forwarded(_name))


def unwrap(source: Any) -> Any:
    """The source under any :class:`OnDevice` wrappers."""
    while isinstance(source, OnDevice):
        source = source.source
    return source


FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""The dtypes hyperdiff trains in (float8 has no arithmetic of its own in torch)."""
FLOAT_DTYPES_TEXT = "torch.float64, torch.float32, torch.float16 or torch.bfloat16"


def _check_dtype(dtype: Any, caller: str) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise HyperdiffError(
            f"{caller}: dtype must be a floating-point torch.dtype that hyperdiff trains in: "
            f"{FLOAT_DTYPES_TEXT} (got {describe(dtype)})"
        )
    return dtype


def held_batches(source: Any) -> list[Batch]:
    """The batches a train source holds in memory (none for ``fn(step)`` or a DataLoader)."""
    source = unwrap(source)
    if isinstance(source, Minibatches):
        return [tuple(source.tensors)]
    if isinstance(source, FullBatch):
        return [source.data]
    if isinstance(source, (Sequence, Recorded)):
        return list(source.batches)
    return []


def _check_fits(problem: Any, dtype: torch.dtype) -> None:
    """Refuse a cast to ``dtype`` that turns a finite parameter, buffer or held batch value into
    inf (float16 holds at most 65504): training would read inf and blame the learning rate.
    Casting is monotonic, so the cast of each tensor's largest magnitude tells."""
    named: list[tuple[str, list[Batch]]] = [
        ("params", [problem.params]), ("buffers", [problem.buffers]),
        ("val_data", list(problem.val_data)), ("train_data", held_batches(problem.train_data))]
    for name, batches in named:
        for i, batch in enumerate(batches):
            which = name if len(batches) == 1 else f"{name}[{i}]"
            for path, leaf in leaves(batch):
                if (not isinstance(leaf, Tensor) or not leaf.is_floating_point()
                        or leaf.numel() == 0):
                    continue
                largest = leaf.detach().abs().amax()
                if not bool(torch.isfinite(largest) & ~torch.isfinite(largest.to(dtype))):
                    continue  # fits (a NaN or inf already there is the data checks' to name)
                dtype_name = str(dtype).removeprefix("torch.")
                raise HyperdiffError(
                    f"Problem.to: {which}{path} must fit in {dtype_name} (got values up to "
                    f"{float(largest):.6g} in magnitude, which overflow to inf there: "
                    f"{dtype_name} holds at most {torch.finfo(dtype).max:.6g}); rescale them, "
                    "or keep a wider dtype such as torch.float32")


def to_device(problem: ProblemT, device: torch.device | str,
              dtype: torch.dtype | None = None) -> ProblemT:
    """A copy of ``problem`` on ``device`` (see the module doc); the original is unchanged.

    >>> import torch, hyperdiff as hd
    >>> p = hd.make_problem(lambda w, h, b: (w["w"] ** 2).sum() * h["c"],
    ...                     lambda w, h, b: (w["w"] ** 2).sum(),
    ...                     hd.HyperParameters(c=hd.scalar(1.0)),
    ...                     {"w": torch.ones(2, dtype=torch.float64)}, optimizer=hd.sgd(0.1),
    ...                     train_data=torch.zeros(1), val_data=torch.zeros(1), steps=2)
    >>> p.to("cpu", torch.float32).dtype
    torch.float32
    """
    device = resolve_device(device, "Problem.to")  # a torch.device or an int is checked too
    dtype = _check_dtype(dtype, "Problem.to")
    p: Any = problem
    if dtype is not None:
        _check_fits(p, dtype)
    # without a dtype, the training batches keep the cast of an earlier .to (as params do)
    train_dtype = dtype if dtype is not None else _cast_dtype(p.train_data)
    moved: ProblemT = dataclasses.replace(
        p,
        params=move(p.params, device, dtype),
        buffers=move(p.buffers, device, dtype),
        val_data=[move(batch, device, dtype) for batch in p.val_data],
        train_data=OnDevice(unwrap(p.train_data), device, train_dtype),
    )
    optimizer = getattr(p, "optimizer", None)
    if dtype is not None and isinstance(optimizer, Optimizer):  # as make_problem checks: a
        working = working_dtype(torch.empty((), dtype=dtype, device="meta"))  # coefficient must
        check_number_coefficients(optimizer, working, "Problem.to")  # stay valid (and finite)
        for name, coef in optimizer.coefficients.items():  # in the new dtype
            if isinstance(coef, str) and coef in p.hparams:
                check_coefficient_values(optimizer, name, coef, p.hparams, working)
    return moved


def _cast_dtype(source: Any) -> torch.dtype | None:
    """The dtype that the outermost casting :class:`OnDevice` wrapper gives the batches."""
    while isinstance(source, OnDevice):
        if source.dtype is not None:
            return source.dtype
        source = source.source
    return None


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def task_to_device(task: Any, device: torch.device | str,
                   dtype: torch.dtype | None = None) -> Any:
    """A copy of a task (a dataclass with ``problems``, ``final_problem`` and ``splits``) with
    every problem and evaluation split on ``device``. Fields it lacks are left alone."""
    device = resolve_device(device, "task")
    problems = [*getattr(task, "problems", ()), getattr(task, "final_problem", None)]
    if dtype is None and all(p is None or p.device == device for p in problems):
        return task  # already there: nothing to move or wrap
    if not _is_dataclass_instance(task):
        raise HyperdiffError(
            f"task_to_device: task must be a Task dataclass (got {describe(task)})"
        )
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(task)}
    if "problems" in names:
        changes["problems"] = tuple(to_device(p, device, dtype) for p in task.problems)
    if "final_problem" in names:
        changes["final_problem"] = to_device(task.final_problem, device, dtype)
    if "splits" in names:
        changes["splits"] = {k: v.to(device, dtype) if isinstance(v, EvaluationSplit)
                             else move(v, device, dtype) for k, v in task.splits.items()}
    return dataclasses.replace(task, **changes)


__all__ = ["FLOAT_DTYPES", "OnDevice", "held_batches", "move", "resolve_device",
           "task_to_device", "tensor_of", "to_device", "unwrap"]
