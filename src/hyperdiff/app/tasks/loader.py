"""Find a task factory from its reference: a built-in name, ``pkg.module:attr`` or
``path/to/file.py:attr``.

**Naming a module or a file runs its code** (it is imported, then the factory is called), in
``hyperdiff run|check|compare`` and whenever such a config is read: name only code you trust.

A factory is a function returning :func:`hyperdiff.task` (a :class:`~.spec.TaskSpec`); it is
called with the keyword arguments it declares among ``steps`` (the config's ``inner.steps``,
omitted while the config's defaults are read, so it must have a default) and ``data_seed``,
and with the task's own params (the config's ``[task.params]`` or ``build_task(params=)``,
checked against its signature by :func:`factory_parameters` and against its annotations by
:func:`check_types`, so a value the annotation refuses, ``meta_sgd="no"`` for a ``bool`` or
``"gelu"`` for a ``Literal["relu", "tanh"]``, is refused on either path rather than read as
truthy; a string for a ``Path`` is passed as the string). An attribute that already is a
``TaskSpec`` is used as is.
Every failure is one :class:`~hyperdiff.HyperdiffError` that names the reference: a missing
module, file or attribute, an attribute that is not a factory, a factory that raises or
returns something else.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from types import ModuleType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from hyperdiff.app.tasks.spec import USER_TASK_MODULE, TaskSpec, how_it_failed
from hyperdiff.errors import HyperdiffError, describe

FORMS = "a built-in task name, 'package.module:factory' or 'path/to/file.py:factory'"
RESERVED = ("steps", "data_seed")  # passed by hyperdiff from inner.steps and task.data_seed
_SPECS: dict[tuple[str, int | None, int, str], TaskSpec] = {}


def is_reference(name: str) -> bool:
    """True for ``module:attr`` or ``file.py:attr`` (not a built-in name)."""
    return ":" in name


def split_reference(ref: str) -> tuple[str, str]:
    """``(module or file, attribute)`` of ``ref``."""
    where, _, attr = ref.rpartition(":")
    if not where or not attr or not attr.isidentifier():
        raise HyperdiffError(f"task: name must be {FORMS} (got {ref!r})")
    return where, attr


def is_file_reference(where: str) -> bool:
    """True when the ``where`` part of a reference names a ``.py`` file, not a module."""
    return where.endswith(".py") or "/" in where or "\\" in where


def absolute_reference(ref: str) -> str:
    """``ref`` with a file's path made absolute (against the working directory), so that a
    resumed run loads the same file from anywhere; other references unchanged.

    >>> absolute_reference("pkg.mod:build"), absolute_reference("/abs/t.py:build")
    ('pkg.mod:build', '/abs/t.py:build')
    """
    if not is_reference(ref):
        return ref
    where, attr = split_reference(ref)
    return f"{Path(where).resolve()}:{attr}" if is_file_reference(where) else ref


def _on_path(directory: Path) -> None:
    """Put ``directory`` on ``sys.path`` (first) unless it is there already."""
    entry = str(directory.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)


def import_target(where: str, ref: str) -> ModuleType:
    """Import ``where``: a dotted module name (looked up on ``sys.path`` and in the working
    directory, as ``python -m`` would), or a ``.py`` file path relative to the working
    directory (its own directory goes on ``sys.path``, as for ``python file.py``)."""
    if is_file_reference(where):
        return _import_file(Path(where), ref)
    if "" not in sys.path:
        _on_path(Path.cwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name and (where == err.name or where.startswith(err.name + ".")):
            raise HyperdiffError(
                f"task: module {where!r} of {ref!r} must be importable (got no module named "
                f"{err.name!r}; is it installed, or on PYTHONPATH?)") from None
        raise _import_failed(ref, err) from err
    except (Exception, SystemExit) as err:
        raise _import_failed(ref, err) from err


def _import_file(path: Path, ref: str) -> ModuleType:
    if not path.is_file():
        raise HyperdiffError(f"task: file {str(path)!r} of {ref!r} must exist (got no such "
                             f"file in {Path.cwd()})")
    resolved = path.resolve()
    name = USER_TASK_MODULE + re.sub(r"\W", "_", str(resolved))
    if name in sys.modules:
        return sys.modules[name]
    _on_path(resolved.parent)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise HyperdiffError(f"task: file {str(path)!r} of {ref!r} must be a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        del sys.modules[name]
        raise _import_failed(ref, err) from err
    return module


def _import_failed(ref: str, err: BaseException) -> HyperdiffError:
    return HyperdiffError(f"task: importing {ref!r} must succeed (got: it {how_it_failed(err)})")


def _defined_in(factory: Any) -> str:
    """``" (defined in /path/file.py, line 12)"``, or ``""`` when the source is unknown."""
    try:
        path = inspect.getsourcefile(factory)
        line = inspect.getsourcelines(factory)[1]
    except (TypeError, OSError):
        return ""
    return f" (defined in {path}, line {line})" if path else ""


def resolve_factory(ref: str) -> Callable[..., Any] | TaskSpec:
    """The factory (or task spec) that ``ref`` names."""
    where, attr = split_reference(ref)
    module = import_target(where, ref)
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items()
                       if not n.startswith("_") and (callable(v) or isinstance(v, TaskSpec))
                       and getattr(v, "__module__", module.__name__) == module.__name__)
        raise HyperdiffError(f"task: {where!r} must define {attr!r} (got no such attribute; it "
                             f"defines {', '.join(names) or 'no functions'})")
    factory = getattr(module, attr)
    if isinstance(factory, TaskSpec):
        return factory
    if not callable(factory) or isinstance(factory, type):
        raise HyperdiffError(f"task: {ref!r} must be a task factory, a function returning "
                             f"hd.task(...) (got {type(factory).__name__})")
    return factory


def _signature(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return {}


def factory_parameters(factory: Callable[..., Any] | TaskSpec
                       ) -> tuple[list[str], list[str], bool]:
    """``(accepted, required, any)``: the keyword params a factory takes besides ``steps`` and
    ``data_seed``, those without a default, and whether it takes ``**kwargs`` (any name).

    >>> def build(*, steps=10, width: int = 32, depth, **extra): ...
    >>> factory_parameters(build)
    (['width', 'depth'], ['depth'], True)
    """
    if isinstance(factory, TaskSpec):
        return [], [], False
    params = _signature(factory)
    named = [p for name, p in params.items() if name not in RESERVED
             and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind == p.VAR_KEYWORD for p in params.values()))


def type_hints(fn: Any) -> dict[str, Any]:
    """``fn``'s resolved type hints; ``{}`` when they cannot be resolved (no type check)."""
    try:
        return get_type_hints(fn)
    except Exception:
        return {}


def check_types(caller: str, prefix: str, options: Mapping[str, Any],
                hints: Mapping[str, Any]) -> None:
    """Refuse an option whose value does not fit the type hint of its parameter.

    >>> def build(*, hidden: int = 64, meta_sgd: bool = False): ...
    >>> check_types("task t", "params.", {"meta_sgd": "no"}, type_hints(build))
    Traceback (most recent call last):
        ...
    hyperdiff.errors.HyperdiffError: task t: params.meta_sgd must be of type bool (got 'no')
    """
    for key, value in options.items():
        if key in hints and not matches(value, hints[key]):
            raise HyperdiffError(
                f"{caller}: {prefix}{key} must be {type_text(hints[key])} (got {describe(value)})"
            )


def matches(value: Any, hint: Any) -> bool:
    """Loose isinstance for config values against a type hint (int counts as float, a string
    as a path); a ``Literal`` takes its own values, a container hint checks its elements.

    >>> matches("gelu", Literal["relu", "tanh"]), matches([1, "a"], list[int])
    (False, False)
    >>> matches("/tmp/x", Path), matches({"a": 1.5}, dict[str, float])
    (True, True)
    """
    args = get_args(hint)
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:  # equal and of the same type: True is not Literal[1]
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if _is_path(origin or hint):  # TOML and --set give a path as a string
        return isinstance(value, (str, os.PathLike))
    if origin is tuple and isinstance(value, (list, tuple)):  # TOML has arrays, no tuples
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(map(matches, value, args)))
    try:
        fits = isinstance(value, origin or hint)
    except TypeError:
        return True
    if fits and isinstance(value, Mapping) and len(args) == 2:
        return all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if fits and isinstance(value, (list, set, frozenset)) and len(args) == 1:
        return all(matches(v, args[0]) for v in value)
    return fits


def _is_path(hint: Any) -> bool:
    """True for ``pathlib`` path classes and ``os.PathLike``."""
    return hint is os.PathLike or (isinstance(hint, type) and issubclass(hint, PurePath))


def type_text(hint: Any) -> str:
    """``"of type int"``; a union: its types joined by ``or`` (``None`` left out); a
    ``Literal``: ``"one of ['relu', 'tanh']"``; a container: ``"of type list[int]"``.

    >>> type_text(Literal["relu", "tanh"]), type_text(list[int]), type_text(Path)
    ("one of ['relu', 'tanh']", 'of type list[int]', 'of type Path (or a string)')
    """
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(type_text(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        return f"one of {list(get_args(hint))}"
    if _is_path(get_origin(hint) or hint):
        return f"of type {getattr(get_origin(hint) or hint, '__name__', str(hint))} (or a string)"
    if get_args(hint):
        return f"of type {str(hint).replace('typing.', '')}"
    return f"of type {getattr(get_origin(hint) or hint, '__name__', str(hint))}"


def call_factory(factory: Callable[..., Any] | TaskSpec, ref: str, *, steps: int | None,
                 data_seed: int, params: Mapping[str, Any] | None = None) -> TaskSpec:
    """Call ``factory`` with the options it declares and the task's ``params`` (checked by the
    config against :func:`factory_parameters`); check that it returns a TaskSpec."""
    if isinstance(factory, TaskSpec):
        return factory
    declared = _signature(factory)
    # steps is left out when the config's defaults are read; data_seed is always passed
    if "steps" in declared and declared["steps"].default is declared["steps"].empty:
        raise HyperdiffError(
            f"task: the factory {ref!r}{_defined_in(factory)} must give steps a default (got "
            "a required steps): steps is an optional argument (hyperdiff calls the factory "
            "without steps to read its defaults); write e.g. "
            "def build(*, steps: int = 100, data_seed: int = 0, ...)")
    var_kw = any(p.kind == p.VAR_KEYWORD for p in declared.values())
    options: dict[str, Any] = dict(params or {})
    if steps is not None and (var_kw or "steps" in declared):
        options["steps"] = steps
    if var_kw or "data_seed" in declared:
        options["data_seed"] = data_seed
    try:
        spec = factory(**options)
    except HyperdiffError as err:
        raise HyperdiffError(f"task: the factory {ref!r}{_defined_in(factory)} raised: "
                             f"{err}") from err
    except (Exception, SystemExit) as err:
        raise HyperdiffError(f"task: the factory {ref!r}{_defined_in(factory)} must return a "
                             f"task; it {how_it_failed(err)}") from err
    if not isinstance(spec, TaskSpec):
        raise HyperdiffError(f"task: the factory {ref!r} must return hd.task(...) (got "
                             f"{type(spec).__name__})")
    return spec


def load_spec(ref: str, factory_ref: str, *, steps: int | None = None, data_seed: int = 0,
              params: Mapping[str, Any] | None = None) -> TaskSpec:
    """The task spec of ``ref`` (``factory_ref`` is where its factory lives), cached per
    ``(ref, steps, data_seed, params)`` within the process."""
    frozen = json.dumps(dict(params or {}), sort_keys=True, default=repr)
    key = (ref, steps, data_seed, frozen)
    if key not in _SPECS:
        spec = call_factory(resolve_factory(factory_ref), ref, steps=steps,
                            data_seed=data_seed, params=params)
        if len(_SPECS) > 16:
            _SPECS.pop(next(iter(_SPECS)))
        _SPECS[key] = spec
        _SPECS.setdefault((ref, spec.steps, data_seed, frozen), spec)
    return _SPECS[key]


def forget_specs() -> None:
    """Empty the cache of :func:`load_spec`, so that the next call runs the factory again (a
    resumed run must fingerprint the data as they are now, not as an earlier run in this
    process loaded them)."""
    _SPECS.clear()


def label(ref: str) -> str:
    """A file-name-safe label of a task reference (``file.py:build`` -> ``file-build``)."""
    if not is_reference(ref):
        return ref
    where, _, attr = ref.rpartition(":")
    stem = Path(where).stem if where.endswith(".py") else where
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{stem}-{attr}")
