"""The score-function (REINFORCE) estimate of the hypergradient of a choice's logits.

For choices ``z ~ p = softmax(u)`` and the validation loss ``L(z)`` of a training with the
plain choice ``z``, the expected loss ``J(u) = E_p[L(z)] = sum_z p(z) L(z)`` has

    dJ/du = E_p[(L(z) - b) * d log p(z)/du],      d log p(z)/du = onehot(z) - p

for any baseline ``b`` that does not depend on ``z`` (its expectation term
``b * E_p[onehot(z) - p] = 0``). With S samples per step the estimate is the mean of the
per-sample terms. Baselines: ``"none"`` (``b = 0``), ``"moving_average"`` (of the mean loss of
the previous outer steps) and ``"leave_one_out"`` (``b_i`` = mean of the step's other samples'
losses, so ``b_i`` is independent of ``z_i``; needs S >= 2). Several discrete hyperparameters
sampled independently share the loss: each gets ``(L - b) * (onehot(z_k) - p_k)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError


def draw(probs: Tensor, seed: int) -> int:
    """One index ``z ~ probs`` from a generator seeded by ``seed`` (CPU draw: portable)."""
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    return int(torch.multinomial(probs.detach().double().cpu(), 1, generator=gen))


def score(index: int, probs: Tensor) -> Tensor:
    """``d log p(z)/du = onehot(z) - p`` for logits ``u``, shape ``(n,)``."""
    return torch.nn.functional.one_hot(
        torch.tensor(index, device=probs.device), probs.shape[-1]).to(probs.dtype) - probs


def baselines(losses: Tensor, kind: str, moving_average: float | None = None) -> Tensor:
    """One baseline per sample, shape ``(S,)``, for the step's losses ``(S,)``."""
    if kind == "none" or (kind == "moving_average" and moving_average is None):
        return torch.zeros_like(losses)
    if kind == "moving_average":
        return torch.full_like(losses, float(moving_average))  # type: ignore[arg-type]
    if kind == "leave_one_out":
        count = losses.numel()
        if count < 2:
            raise HyperdiffError(
                "reinforce: baseline 'leave_one_out' needs samples >= 2 per outer step "
                f"(got samples={count}); use baseline='moving_average' or more samples"
            )
        return (losses.sum() - losses) / (count - 1)
    raise HyperdiffError(f"reinforce: baseline must be one of 'moving_average', "
                         f"'leave_one_out', 'none' (got {kind!r})")


def advantages(losses: Tensor, kind: str, moving_average: float | None = None) -> Tensor:
    """``L_i - b_i`` per sample, shape ``(S,)``, for :func:`baselines` of ``kind``.

    Leave-one-out computes it as ``sum_{j != i} (L_i - L_j) / (S - 1)``, the same number as
    ``L_i - mean_{j != i} L_j`` but exactly 0 for equal losses (``L_i - b_i`` with ``b_i``
    rounded first leaves a residue of ~1e-17 whose sign a sign-based outer step would follow).

    >>> advantages(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), "leave_one_out").tolist()
    [0.0, 0.0, 0.0]
    >>> advantages(torch.tensor([1.0, 2.0, 4.0]), "leave_one_out").tolist()
    [-2.0, -0.5, 2.5]
    """
    base = baselines(losses, kind, moving_average)  # checks kind and the sample count
    if kind != "leave_one_out":
        return losses - base
    return (losses.unsqueeze(-1) - losses).sum(-1) / (losses.numel() - 1)


def estimates(losses: Tensor, scores: Tensor, baseline: Tensor) -> Tensor:
    """Per-sample estimates ``(L_i - b_i) * score_i``, shape ``(S, n)``; their mean over
    samples is the hypergradient estimate of the logits (the outer loop forms ``L_i - b_i``
    by :func:`advantages`, exact for equal leave-one-out losses)."""
    return (losses - baseline).unsqueeze(-1) * scores


def leave_one_out_terms(terms: Tensor, indices: list[int]) -> Tensor:
    """The per-sample terms ``(S, n)`` of a leave-one-out estimate (:func:`estimates`) with
    exact zeros in the columns of the choices that no sample or every sample drew.

    With ``b_i`` = the mean of the other samples' losses, ``c_i = L_i - b_i =
    S/(S-1) (L_i - Lbar)`` sums to 0 over the samples, so the estimate is
    ``mean_i c_i (onehot(z_i) - p) = S/(S-1) mean_i (L_i - Lbar) onehot(z_i)``: for a choice
    ``k`` drawn by none of the samples it is ``-p_k mean_i c_i = 0``, by all of them
    ``(1 - p_k) mean_i c_i = 0``, identically. In floats ``mean_i c_i`` is a rounding residue
    (~1e-17) with a sign, which a sign-based outer step would follow by its full length; those
    columns are set to 0 (the p-term's split of a zero sum, no information on the choice). The
    other columns are kept as they are.

    >>> losses, probs = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25, 0.25])
    >>> scores = torch.stack([score(0, probs), score(1, probs)])
    >>> terms = estimates(losses, scores, baselines(losses, "leave_one_out"))
    >>> leave_one_out_terms(terms, [0, 1]).tolist()  # choice 2 drawn by none
    [[-0.5, 0.25, 0.0], [-0.5, 0.75, 0.0]]
    """
    counts = torch.bincount(torch.tensor(indices, dtype=torch.long, device=terms.device),
                            minlength=terms.shape[-1])
    varies = (counts > 0) & (counts < len(indices))
    return torch.where(varies, terms, torch.zeros_like(terms))


def exact_gradient(losses_by_choice: Tensor, probs: Tensor) -> Tensor:
    """``dJ/du = sum_z p(z) L(z) (onehot(z) - p)`` for one choice with ``n`` options, by
    enumeration (the oracle of the tests), shape ``(n,)``."""
    expected = (probs * losses_by_choice).sum()
    return probs * (losses_by_choice - expected)


__all__ = ["advantages", "baselines", "draw", "estimates", "exact_gradient", "leave_one_out_terms",
           "score"]
