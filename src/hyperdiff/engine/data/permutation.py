"""A seeded permutation of ``range(n)`` evaluated pointwise, in O(batch) memory.

``permute(positions, n, key)[j] = pi_key(positions[j])`` for a pseudo-random bijection
``pi_key`` of ``{0, ..., n-1}``: a balanced Feistel network on ``2h`` bits (``4^h >= n``),
restricted to ``[0, n)`` by cycle walking (apply again until the value falls below ``n``;
fewer than four applications on average). Batch ``t`` of a shuffled epoch is then
``pi_key(t B), ..., pi_key(t B + B - 1)``: random access to any batch without storing the
epoch's order, so memory does not grow with the data set (``torch.randperm(n)`` would hold
``8 n`` bytes per epoch).

The arithmetic runs on NumPy int64 arrays (every value stays below 2^63): a walk of a few
hundred positions is some 30 passes of 60 small operations, and NumPy's cost per operation is
about a quarter of torch's. Each pass handles only the positions still outside ``[0, n)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ROUNDS = 6
LOW31 = (1 << 31) - 1
MASK64 = (1 << 64) - 1
SPLITMIX, MUL1, MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over each part in turn)."""
    state = SPLITMIX
    for part in parts:
        state = _absorb(state, part)
    return state >> 1


def mix_each(prefix: tuple[int, ...], lasts: list[int]) -> list[int]:
    """``[mix(*prefix, k) for k in lasts]`` for ``0 <= k < 2^64``, the last part absorbed by
    NumPy uint64 arithmetic (which wraps modulo 2^64, as ``& MASK64`` does)."""
    state = SPLITMIX
    for part in prefix:
        state = _absorb(state, part)
    s = np.uint64(state) ^ np.asarray(lasts, dtype=np.uint64)
    s = s * np.uint64(MUL1)
    s ^= s >> np.uint64(27)
    s = s * np.uint64(MUL2)
    s ^= s >> np.uint64(31)
    return (s >> np.uint64(1)).tolist()


def _absorb(state: int, part: int) -> int:
    state = (state ^ (part & MASK64)) * MUL1 & MASK64
    state = (state ^ (state >> 27)) * MUL2 & MASK64
    return state ^ (state >> 31)


def _round(right: np.ndarray, key: int) -> np.ndarray:
    """Feistel round function: a keyed multiply-xorshift hash (values stay below 2^63)."""
    y = (right ^ key) & LOW31
    y *= 0x2545F491
    y ^= y >> 31
    y &= LOW31
    y *= 0x4F6CDD1D
    return y ^ (y >> 29)


def _feistel(x: np.ndarray, half_bits: int, keys: list[int]) -> np.ndarray:
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for key in keys:
        left, right = right, left ^ (_round(right, key) & mask)
    return (left << half_bits) | right


def permute(positions: Tensor, n: int, key: int) -> Tensor:
    """``pi_key(positions)`` for int64 ``positions`` in ``[0, n)``; same shape, same device.

    >>> import torch
    >>> p = permute(torch.arange(10), 10, key=3)
    >>> sorted(p.tolist()) == list(range(10))
    True
    """
    if n <= 1:
        return positions.clone()
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = [mix(key, r) & LOW31 for r in range(ROUNDS)]
    out = _feistel(positions.detach().cpu().reshape(-1).numpy().astype(np.int64), half_bits, keys)
    pending = np.flatnonzero(out >= n)  # cycle walking: apply again until inside [0, n)
    values = out[pending]
    while pending.size:
        values = _feistel(values, half_bits, keys)
        inside = values < n
        out[pending[inside]] = values[inside]
        pending, values = pending[~inside], values[~inside]
    return torch.from_numpy(out).reshape(positions.shape).to(positions.device)
