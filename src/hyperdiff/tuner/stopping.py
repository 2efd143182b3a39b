"""When the outer loop stops, and which of its steps it returns.

:class:`Stopping` holds the stopping rules. The best step is ranked by one of two losses:
``"val"``, the validation loss the hypergradient sees (averaged over folds and samples), or
``"selection"``, the loss on a split it never sees. Without a selection split every step is
ranked by ``"val"``. With one and ``tie_steps = k > 0``, steps ``0 .. k`` (whose values come
from tied updates only, see :func:`tied`) are ranked by ``"val"``: they have one degree of
freedom per hyperparameter, like a grid over a shared value, and the validation loss is the
larger, less noisy estimate. Every later step must beat the best so far on ``"selection"``, the
split that guards against fitting the validation set with many free entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from hyperdiff.errors import fail, positive_float, positive_int


@dataclass(frozen=True)
class Stopping:
    """When :meth:`HyperOptimizer.run` stops (the first rule that fires).

    Attributes:
        max_steps: budget of outer steps (failed steps count).
        max_time_s: wall-time budget in seconds (``None``: none).
        patience: stop after this many steps without a new best selection loss (``None``: off).
        min_delta: a new best must beat the old one by more than this.
        grad_tol: converged when the hypergradient norm falls below this (0: off).
        step_tol: converged when no raw value moved by more than this in a step (0: off).
    """

    max_steps: int = 50
    max_time_s: float | None = None
    patience: int | None = 10
    min_delta: float = 0.0
    grad_tol: float = 0.0
    step_tol: float = 0.0

    def __post_init__(self) -> None:
        positive_int("Stopping", "max_steps", self.max_steps)
        if self.max_time_s is not None:
            positive_float("Stopping", "max_time_s", self.max_time_s)
        if self.patience is not None:
            positive_int("Stopping", "patience", self.patience)
        for name in ("min_delta", "grad_tol", "step_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.0 <= value < math.inf
            ):
                raise fail("Stopping", name, "a finite number >= 0", value)

    def reason(self, *, steps: int, elapsed: float, since_best: int,
               has_selection: bool) -> str | None:
        """The first rule that fires after ``steps`` outer steps, ``elapsed`` seconds and
        ``since_best`` steps without a new best, or ``None`` to go on."""
        if steps >= self.max_steps:
            return f"budget: {self.max_steps} outer steps"
        if self.max_time_s is not None and elapsed >= self.max_time_s:
            return f"time: {self.max_time_s:g} s"
        if self.patience and since_best >= self.patience:
            which = "selection" if has_selection else "validation"
            return f"early stopping: no better {which} loss for {self.patience} steps"
        return None


def ranking_loss(step: int, tie_steps: int, has_selection: bool) -> str:
    """``"val"`` or ``"selection"``: the loss that ranks outer ``step`` (see the module doc)."""
    tied_values = tie_steps > 0 and step <= tie_steps
    return "selection" if has_selection and not tied_values else "val"


def ranking_name(tie_steps: int, has_selection: bool) -> str:
    """How the best step is picked, for reports."""
    if not has_selection:
        return "val_loss"
    if tie_steps:
        return f"val_loss (tied steps <= {tie_steps}), then selection_loss"
    return "selection_loss"


def tied(grad: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each hyperparameter's gradient replaced by its mean over its entries (same shape)."""
    return {name: g.mean().expand_as(g) for name, g in grad.items()}
