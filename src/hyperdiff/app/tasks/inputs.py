"""What a resumed run verifies about its task: the code and each data split (see
``docs/run_directory.md``).

::

    {"task": {"kind": "file", "reference": "/abs/my_task.py:build",
              "path": "/abs/my_task.py", "sha256": "<of the file>", "model": "<digest>"},
     "data": {"train": <fingerprint>, "val": ..., "selection": ..., "test": ...}}

The task's code is a ``file`` (its absolute path and sha256), a ``module`` (the dotted name,
the file it was imported from and its sha256) or a ``builtin`` task (its name and the hyperdiff
version); a task built with params (``[task.params]``) adds ``"params": {name: value}``.
Only that one file is hashed, not the modules it imports; the initial model's tensors are
(``"model"``, since s39), which a model defined in an imported module or loaded from a file
changes. The data are the splits as the
factory returned them: ``{"data": ...}`` for a whole data set that hyperdiff splits by
``task.data_seed``, one entry per split of :func:`~hyperdiff.app.tasks.spec.given_splits`; each is
a :func:`~hyperdiff.engine.data.fingerprint.split_fingerprint`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.tasks.loader import is_file_reference, split_reference
from hyperdiff.app.tasks.spec import GivenSplits, TaskSpec
from hyperdiff.engine.data.fingerprint import fingerprint_changes, split_fingerprint
from hyperdiff.engine.data.replay import fingerprint
from hyperdiff.engine.models import FunctionalModel, model_state
from hyperdiff.errors import HyperdiffError


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a missing or unreadable file is one clear error)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise HyperdiffError(f"task: file {str(path)!r} must be readable to verify the task's "
                             f"code (got {err.strerror})") from None


def code_fingerprint(name: str, *, builtin: bool, version: str,
                     params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of task ``name``'s code (call it after the task was loaded), with the
    factory's ``params`` when there are any."""
    given = {"params": dict(params)} if params else {}
    if builtin:
        return {"kind": "builtin", "name": name, "version": version, **given}
    where, _ = split_reference(name)
    if is_file_reference(where):
        path = Path(where).resolve()
        return {"kind": "file", "reference": name, "path": str(path),
                "sha256": file_sha256(path), **given}
    module_file = getattr(sys.modules.get(where), "__file__", None)
    return {"kind": "module", "reference": name, "path": module_file,
            "sha256": file_sha256(module_file) if module_file else None, **given}


def data_fingerprints(spec: TaskSpec) -> dict[str, dict[str, Any]]:
    """A fingerprint of each data split of ``spec`` (see the module doc)."""
    if isinstance(spec.data, GivenSplits):
        given = spec.data
        splits = {"train": given.train, "val": given.val, "test": given.test,
                  "selection": given.selection}
        return {k: split_fingerprint(v) for k, v in splits.items() if v is not None}
    return {"data": split_fingerprint(spec.data)}


def model_fingerprint(model: Any) -> str | None:
    """A digest of the task's initial model: every tensor of a functional model's module
    (trained, frozen, buffers) or of a ``params`` dict / ``(params, buffers)`` pair; ``None``
    for anything else (a task distribution's). It catches what the task file's hash does not:
    a model defined in a module the file imports, or weights it loads from disk."""
    if isinstance(model, FunctionalModel):
        tensors = dict(model.module.state_dict())
    elif isinstance(model, dict) or (isinstance(model, tuple) and len(model) == 2):
        params, buffers = model_state("task", model)
        if not isinstance(params, dict) or not isinstance(buffers, dict):
            return None
        tensors = {**params, **{f"buffer:{k}": v for k, v in buffers.items()}}
    else:
        return None
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return None
    return fingerprint(dict(sorted(tensors.items()))).hex()


def code_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two task-code fingerprints, one phrase each."""
    if old.get("kind") != new.get("kind") or old.get("reference") != new.get("reference"):
        return [f"the task: {_task_label(old)} at the start, {_task_label(new)} now"]
    if old.get("params", {}) != new.get("params", {}):
        return [f"the task's params: {old.get('params', {})} at the start, "
                f"{new.get('params', {})} now"]
    if old.get("kind") == "builtin":
        if old.get("version") != new.get("version"):
            return [f"the task: built-in {old.get('name')!r} of hyperdiff {old.get('version')} "
                    f"at the start, of hyperdiff {new.get('version')} now"]
        return model_change(old, new)
    if old.get("path") != new.get("path"):
        return [f"the task's code: {old.get('path')} at the start, {new.get('path')} now"]
    if old.get("sha256") != new.get("sha256"):
        return [f"the task's code: {old.get('path')} was edited (its sha256 differs)"]
    return model_change(old, new)


def model_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The initial model's change, where the start recorded its digest (runs started before
    s39 did not)."""
    if "model" in old and old.get("model") != new.get("model"):
        return ["the task's model: its initial parameters or buffers differ from the start's "
                "(code that the task file imports, or a file it loads, changed)"]
    return []


def input_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Every difference between two records of the task's inputs (``[]``: none)."""
    diffs = code_changes(old.get("task", {}), new.get("task", {}))
    old_data, new_data = old.get("data", {}), new.get("data", {})
    for split in [*old_data, *(s for s in new_data if s not in old_data)]:
        diffs += fingerprint_changes(split, old_data.get(split, {}), new_data.get(split, {}))
    return diffs


def task_file_change(recorded: Mapping[str, Any] | None) -> str | None:
    """Before a resume imports the task file it recorded: what changed about it, else
    ``None`` (also for a module or built-in task, checked after loading)."""
    task = (recorded or {}).get("task", {})
    if task.get("kind") != "file":
        return None
    path = Path(task["path"])
    if not path.is_file():
        return f"the task's code: {path} no longer exists"
    if file_sha256(path) != task.get("sha256"):
        return f"the task's code: {path} was edited (its sha256 differs)"
    return None


def _task_label(code: Mapping[str, Any]) -> str:
    if code.get("kind") == "builtin":
        return f"built-in {code.get('name')!r}"
    return repr(code.get("reference")) if code else "not recorded"
