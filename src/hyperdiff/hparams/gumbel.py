"""Straight-through Gumbel-softmax weights (GDAS / SNAS style).

With logits ``u``, temperature ``tau`` and Gumbel noise ``g_i = -log(-log U_i)``, ``U ~ U(0, 1)``
drawn from ``seed``::

    y = softmax((u + g) / tau)          soft sample, differentiable in u
    k = argmax_i y_i,  w = onehot(k) - stop_grad(y) + y

so the forward pass sees (up to rounding) the one-hot sample ``onehot(k)`` and the backward pass
the gradient of the soft sample. The noise depends only on ``seed``, so every hypergradient
method (and finite differences) replays the same sample; the seed changes per training.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gumbel_noise(shape: tuple[int, ...], seed: int, like: Tensor) -> Tensor:
    """Standard Gumbel noise of ``shape`` from ``seed``, in ``like``'s dtype and device."""
    gen = torch.Generator(device=like.device).manual_seed(int(seed))
    uniform = torch.rand(shape, generator=gen, dtype=like.dtype, device=like.device)
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-12)))


def straight_through(logits: Tensor, temperature: float, seed: int) -> Tensor:
    """Straight-through Gumbel-softmax weights, shape ``(n,)`` (see the module doc)."""
    noise = gumbel_noise(tuple(logits.shape), seed, logits)
    soft = torch.softmax((logits + noise) / temperature, dim=-1)
    hard = torch.nn.functional.one_hot(soft.detach().argmax(), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


__all__ = ["gumbel_noise", "straight_through"]
