"""The three scikit-learn data sets the built-in tasks use, through scikit-learn's public
loaders (bundled with scikit-learn: nothing downloads). Loaded once per process."""

from __future__ import annotations

from functools import cache

import numpy as np

LOADERS = ("diabetes", "breast_cancer", "digits")


@cache
def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name == "diabetes":
        return datasets.load_diabetes(return_X_y=True, scaled=False)
    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    return loader(return_X_y=True)


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of ``name``: raw (unscaled) diabetes features, breast_cancer, digits
    (fresh copies: callers may modify them)."""
    if name not in LOADERS:
        from hyperdiff.errors import HyperdiffError

        raise HyperdiffError(f"datasets: name must be one of {list(LOADERS)} (got {name!r})")
    x, y = _load(name)
    return x.copy(), y.copy()
