"""Every derived seed: how one base seed becomes the seeds of samples, steps, ranks and calls.

Each formula is a small pure function of Python ints, so two parts of the library can never
derive the same seed in two ways, and a change to one is a change in one place. The values are
those hyperdiff has always used (runs recorded before this module reproduce exactly). The
large odd multipliers (1_000_003, 100_003, 7_919, 104_729, 7_368_787) spread neighbouring
inputs far apart; the moduli keep seeds within what ``torch.Generator.manual_seed`` (2**62,
2**63) and NumPy / scikit-learn (2**31) accept.

>>> minibatch_seed(3, step=2, samples=4, sample=1)
3000018
>>> rank_seed(5, 0), rank_seed(5, 1)
(5, 7368792)
"""

from __future__ import annotations

import zlib

REPORT_SEED = 1_000_000
"""Report trainings use seeds ``REPORT_SEED + i``, distinct from the tuning seeds."""


def report_seeds(count: int) -> tuple[int, ...]:
    """The seeds of the ``count`` report trainings: ``REPORT_SEED, REPORT_SEED + 1, ...``."""
    return tuple(REPORT_SEED + i for i in range(count))


def minibatch_seed(seed: int, step: int, samples: int, sample: int) -> int:
    """Minibatch seed of ``sample`` (of ``samples``) at outer ``step`` of a tuner seeded ``seed``:
    ``(seed * 1_000_003 + step * samples + sample) mod 2**31``."""
    return (seed * 1_000_003 + step * samples + sample) % (2**31)


def confirm_seed(seed: int, step: int, k: int) -> int:
    """Minibatch seed of confirmation ``k`` of outer ``step``'s values (``outer.confirm``) of a
    tuner seeded ``seed``: ``(seed * 1_000_003 + 2**30 + step * 1_009 + k) mod 2**31``, away
    from the steps' own :func:`minibatch_seed` for any run of fewer than 10^6 steps.

    >>> confirm_seed(0, 3, 1)
    1073744852
    """
    return (seed * 1_000_003 + 2**30 + step * 1_009 + k) % (2**31)


def window_seed(seed: int, hyper_step: int) -> int:
    """Seed of the validation rows drawn for window ``hyper_step`` of an online run:
    ``seed * 1_000_003 + hyper_step``."""
    return seed * 1_000_003 + hyper_step


def window_sample_seed(seed: int, hyper_step: int, sample: int) -> int:
    """Seed of the validation rows of ``sample`` of window ``hyper_step`` of an online run with
    several samples per window: :func:`window_seed` for sample 0 (so a one-sample run draws
    what it always drew), else ``(window_seed(seed, h) * 104_729 + sample) mod 2**62``.

    >>> window_sample_seed(7, 9, 0), window_sample_seed(7, 9, 1)
    (7000030, 733106141871)
    """
    if sample == 0:
        return window_seed(seed, hyper_step)
    return (window_seed(seed, hyper_step) * 104_729 + sample) % (2**62)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffle of ``epoch`` of in-memory minibatches: ``seed * 100_003 + epoch``."""
    return seed * 100_003 + epoch


def rank_seed(seed: int, rank: int) -> int:
    """The dropout seed of ``rank`` for a training with ``seed`` (rank 0 keeps ``seed``):
    ``(seed + rank * 7_368_787) mod 2**31``."""
    return (seed + rank * 7_368_787) % (2**31)


def name_hash(name: str) -> int:
    """A stable hash of a hyperparameter's name (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(name.encode())


def gumbel_seed(noise_seed: int, name: str) -> int:
    """Gumbel noise seed of the discrete hyperparameter ``name`` in a training whose noise seed
    is ``noise_seed``: ``(noise_seed * 1_000_003 + crc32(name)) mod 2**62``."""
    return (noise_seed * 1_000_003 + name_hash(name)) % (2**62)


def choice_seed(seed: int, step: int, sample: int, name: str) -> int:
    """Seed of the choice drawn for ``name`` in ``sample`` at outer ``step`` (REINFORCE, Gumbel
    noise): ``(seed * 1_000_003 + step * 7_919 + sample * 104_729 + crc32(name)) mod 2**62``."""
    return (seed * 1_000_003 + step * 7_919 + sample * 104_729 + name_hash(name)) % (2**62)


def call_seed(seed: int, step: int, call: int) -> int:
    """Seed of model call ``call`` at inner ``step`` of a training seeded ``seed``:
    ``(seed * 1_000_003 + (step + 1) * 7_919 + call) mod 2**62``."""
    return (seed * 1_000_003 + (step + 1) * 7_919 + call) % (2**62)


def segment_seed(seed: int, segment: int) -> int:
    """Seed of ``segment`` of a long training cut into segments: ``seed + 7919 * segment``."""
    return seed + 7919 * segment


def task_seed(seed: int, index: int, stream: str) -> int:
    """Seed of item ``index`` (a task, a class, an episode) of the random stream ``stream`` of
    a task distribution seeded ``seed``, the same on every call:
    ``(seed * 1_000_003 + index * 7_919 + crc32(stream)) mod 2**62``."""
    return (seed * 1_000_003 + index * 7_919 + name_hash(stream)) % (2**62)


def meta_task(seed: int, step: int, batch: int, task: int) -> tuple[int, int]:
    """Index and seed of task ``task`` of the batch of ``batch`` tasks drawn at outer ``step``
    of a meta run seeded ``seed``: index ``step * batch + task`` (every outer step draws new
    tasks), seed :func:`task_seed` ``(seed, index, "meta")``.

    >>> meta_task(0, 2, 4, 1)
    (9, 3623037596)
    """
    index = step * batch + task
    return index, task_seed(seed, index, "meta")


__all__ = ["REPORT_SEED", "call_seed", "choice_seed", "confirm_seed", "epoch_seed", "gumbel_seed",
           "meta_task", "minibatch_seed", "name_hash", "rank_seed", "report_seeds",
           "segment_seed", "task_seed", "window_sample_seed", "window_seed"]
