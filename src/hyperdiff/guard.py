"""The divergence guard of the outer loop.

When an outer step fails (inner training diverged, or a loss or hypergradient is not finite),
the driver goes back to the snapshot of the last successful step (its raw values, outer
optimizer state and warm-start parameters), multiplies the outer learning rate by ``shrink``
and goes on. ``max_failures`` failures in a row end the run with a
:class:`~hyperdiff.errors.NonFiniteError` that says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import NonFiniteError, fail


@dataclass
class DivergenceGuard:
    """Counts failures, holds the last good snapshot and the learning-rate scale."""

    shrink: float = 0.5
    max_failures: int = 5
    scale: float = 1.0
    failures: int = 0
    total_failures: int = 0
    good: Any = None

    def __post_init__(self) -> None:
        if not 0.0 < self.shrink < 1.0:
            raise fail("HyperOptimizer", "guard shrink", "in (0, 1)", self.shrink)
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or (
            self.max_failures < 1
        ):
            raise fail("HyperOptimizer", "guard max_failures", "a positive int", self.max_failures)

    def succeeded(self, snapshot: Any) -> None:
        """Remember ``snapshot`` (taken before the successful step) as the last good one."""
        self.good = snapshot
        self.failures = 0

    def failed(self, step: int, reason: str) -> tuple[Any, str]:
        """Register a failure; return the snapshot to restore and a log message.

        Raises:
            NonFiniteError: at the first step (nothing good to restore) or after
                ``max_failures`` failures in a row.
        """
        self.failures += 1
        self.total_failures += 1
        if self.good is None:
            raise NonFiniteError(
                f"HyperOptimizer: the initial hyperparameters already fail at step {step}: "
                f"{reason}. Start from safer values (e.g. a smaller inner learning rate or "
                "fewer inner steps)"
            )
        if self.failures >= self.max_failures:
            raise NonFiniteError(
                f"HyperOptimizer: {self.failures} outer steps in a row failed (last at step "
                f"{step}: {reason}), although the outer learning rate was cut to "
                f"{self.scale:.3g} x its initial value. Lower the outer learning rate, turn on "
                "clipping, or bound the hyperparameters that drive training to diverge"
            )
        self.scale *= self.shrink
        message = (
            f"step {step} failed ({reason}); restored the hyperparameters of the last good "
            f"step and cut the outer learning rate to {self.scale:.3g} x"
        )
        return self.good, message

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "failures": self.failures,
                "total_failures": self.total_failures, "good": self.good}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.failures = int(state["failures"])
        self.total_failures = int(state["total_failures"])
        self.good = state["good"]
