"""The three scikit-learn datasets the built-in tasks use, read from the files that ship with
scikit-learn (nothing downloads).

Importing ``sklearn.datasets`` costs seconds (it pulls in scipy), so the bundled CSV files are
read directly when they are where scikit-learn keeps them, and the official loaders are used
otherwise. ``tests/test_tasks.py`` checks that both paths give the same arrays.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

SHAPES = {"diabetes": (442, 10), "breast_cancer": (569, 30), "digits": (1797, 64)}


def load(name: str, *, fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of ``name``: raw (unscaled) diabetes features, breast_cancer, digits."""
    if fast:
        try:
            x, y = _read_bundled(name)
            if x.shape == SHAPES[name] and y.shape == (SHAPES[name][0],):
                return x, y
        except (OSError, ValueError, IndexError):
            pass
    return _sklearn_loader(name)


def _data_dir() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def _open(directory: Path, name: str):
    for candidate in (name, name + ".gz"):
        path = directory / candidate
        if path.exists():
            return gzip.open(path, "rt") if candidate.endswith(".gz") else open(path)
    raise OSError(f"{name} is not bundled here")


def _read_bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    directory = _data_dir()
    if directory is None:
        raise OSError("scikit-learn is not installed")
    if name == "diabetes":
        with _open(directory, "diabetes_data_raw.csv") as f:
            x = np.loadtxt(f)
        with _open(directory, "diabetes_target.csv") as f:
            y = np.loadtxt(f)
        return x, y
    if name == "breast_cancer":
        with _open(directory, "breast_cancer.csv") as f:
            rows = np.loadtxt(f, delimiter=",", skiprows=1)
        return rows[:, :-1], rows[:, -1].astype(np.int64)
    if name == "digits":
        with _open(directory, "digits.csv") as f:
            rows = np.loadtxt(f, delimiter=",")
        return rows[:, :-1], rows[:, -1].astype(np.int64)
    raise ValueError(f"unknown dataset {name!r}")


def _sklearn_loader(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name == "diabetes":
        return datasets.load_diabetes(return_X_y=True, scaled=False)
    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    return loader(return_X_y=True)
