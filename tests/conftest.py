"""Shared fixtures: small float64 problems with independent oracles."""

from __future__ import annotations

import warnings

import pytest
import torch

import hyperdiff as hd

# The test problems are tiny: intra-op threads only add OpenMP synchronisation, which turns
# into long waits whenever the other core is busy.
torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b the reference)."""
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _float64_and_seed():
    torch.manual_seed(0)
    yield


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with hyperdiff's cost warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.CostWarning)
        return fn(*args, **kwargs)
