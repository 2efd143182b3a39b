"""Signal-to-noise ratio of a sampled hypergradient, and how many samples to draw.

With a stochastic inner training (minibatches, augmentation, dropout) the hypergradient of one
training is a random estimate. At each outer step the driver draws ``n`` of them with different
minibatch seeds, ``g_1 .. g_n`` (flat raw hypergradients, each already averaged over
cross-validation folds, so that the systematic differences between folds are not counted as
noise), and estimates

    m = mean_i g_i,   s_c = std_i g_i[c] (per coordinate c, unbiased),   se = ||s|| / sqrt(n)

    SNR = ||m|| / se

the norm of the averaged hypergradient over the norm of its standard error. Below 1 the
direction of the outer step is mostly noise: the step is as likely to point the wrong way as
the right one. ``SNR`` is ``None`` with one sample (not measured) and ``inf`` when the samples
agree exactly (a deterministic training; stored as ``None`` in the JSON history with the number
of samples, which tells the two apart).

``samples="auto"`` (:class:`AutoSamples`) starts with ``minimum`` samples (2) and adds one at a
time until the SNR reaches ``target`` (1) or ``maximum`` samples (16 by default) are drawn.
Since the standard error shrinks as ``1 / sqrt(n)``, an SNR of ``r`` with ``n`` samples becomes
about ``1`` with ``n / r^2`` of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from hyperdiff.errors import fail, positive_int
from hyperdiff.wording import option

SNR_TARGET = 1.0
"""The signal-to-noise ratio below which the driver warns and ``samples="auto"`` adds samples."""


def signal_to_noise(per_sample: Tensor) -> float | None:
    """SNR (module doc) of ``per_sample``, shape ``(n, k)``: ``None`` for ``n < 2``."""
    n = per_sample.shape[0]
    if n < 2:
        return None
    values = per_sample.double()
    mean_norm = float(values.mean(0).norm())
    standard_error = float(values.std(0).norm()) / math.sqrt(n)
    if standard_error == 0.0:
        return math.inf if mean_norm > 0 else None
    return mean_norm / standard_error


def below(value: float, bound: float) -> str:
    """``value`` with the fewest significant digits (at least 2) that still print it below
    ``bound``: ``below(0.996, 1) == "0.996"`` where ``%.2g`` would print ``1 < 1``.

    >>> below(0.4321, 1.0), below(0.996, 1.0)
    ('0.43', '0.996')
    """
    for digits in range(2, 18):
        text = f"{value:.{digits}g}"
        if float(text) < bound:
            return text
    return repr(value)


def more_samples_advice(auto: bool, samples: int) -> str:
    """How to draw more samples per step, named as the user sets it (:mod:`..wording`)."""
    if not auto:
        return option("samples='auto'", "outer.auto_samples = true")
    return option(f"samples='auto' with max_samples > {samples}",
                  f"outer.max_samples > {samples}")


@dataclass(frozen=True)
class AutoSamples:
    """``samples="auto"``: draw between ``minimum`` and ``maximum`` samples per outer step,
    stopping as soon as the SNR reaches ``target``."""

    minimum: int = 2
    maximum: int = 16
    target: float = SNR_TARGET

    def __post_init__(self) -> None:
        positive_int("HyperOptimizer", "max_samples", self.maximum)
        if self.minimum < 2 or self.maximum < self.minimum:
            raise fail("HyperOptimizer", "max_samples", f"an int >= {self.minimum} with "
                       "samples='auto'", self.maximum)

    def enough(self, per_sample: Tensor) -> bool:
        """Whether to stop drawing: the maximum is reached, or the SNR is at the target."""
        n = per_sample.shape[0]
        if n < self.minimum:
            return False
        if n >= self.maximum:
            return True
        snr = signal_to_noise(per_sample)
        return snr is None or snr >= self.target


def sample_means(grads: Tensor, folds: int) -> Tensor:
    """Per-sample hypergradients averaged over folds: ``grads`` is ``(folds * n, k)`` in
    fold-major order (fold j's samples at rows ``j n .. j n + n - 1``); returns ``(n, k)``."""
    return grads.reshape(folds, -1, grads.shape[-1]).mean(0)
