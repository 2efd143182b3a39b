"""Few-shot task distributions (data only): sinusoid regression and procedural glyph classes.

Each task is a function of ``(seed, index)``: task ``i`` is the same on every call, in every
process, so a meta-training run that samples task indices resumes exactly.

**Sinusoid regression** (Finn et al. 2017, MAML section 5.1): task ``i`` draws an amplitude
``A ~ U[0.1, 5]`` and a phase ``phi ~ U[0, pi]``; its inputs are ``x ~ U[-5, 5]`` and its
targets ``y = A sin(x - phi)``, with ``K`` support and ``Q`` query points (shapes ``(K, 1)``,
``(Q, 1)``).

**Procedural glyphs**: a pool of classes, each a random *stroke program* (2 to 4 strokes,
each a quadratic Bezier curve through 3 random control points in the unit square) drawn from
the class's own seed. An instance renders the program as a ``28 x 28`` image in ``[0, 1]``
after a small random affine jitter (rotation, scale, shear, translation) of its control
points, with Gaussian pixel noise. Classes ``[0, train_classes)`` of the pool are meta-train,
the rest meta-test, so the two sets are disjoint; an ``N``-way ``K``-shot episode picks ``N``
classes of one split and ``K`` support and ``Q`` query instances of each, labelled ``0 ..
N-1`` in the episode's order. Nothing is downloaded.

>>> task = sinusoid_task(7, shots=5)
>>> task.support[0].shape, task.query[1].shape
(torch.Size([5, 1]), torch.Size([5, 1]))
>>> pool = glyph_pool(classes=20, test_classes=5)
>>> ep = glyph_episode(pool, 0, ways=5, shots=1, queries=2)
>>> ep.support[0].shape, ep.query[1].tolist()
(torch.Size([5, 1, 28, 28]), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, nonnegative_int, positive_int
from hyperdiff.seeds import task_seed

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUTS = (-5.0, 5.0)
SIZE = 28  # glyph images are SIZE x SIZE
CURVE_POINTS = 8  # points sampled along each stroke's Bezier curve
STROKE_WIDTH = 1.2  # pixels: the standard deviation of a stroke's Gaussian profile
JITTER = {"rotation": 0.15, "scale": 0.1, "shear": 0.1, "shift": 0.06, "noise": 0.05}
"""Instance jitter: rotation (radians), scale and shear (fractions), shift (unit square) are
the half-widths of uniform draws; noise is the pixel noise's standard deviation."""
SPLITS = ("train", "test")


class SinusoidTask(NamedTuple):
    """One sinusoid regression task: its amplitude and phase, support and query sets."""

    amplitude: float
    phase: float
    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float,
             dtype: torch.dtype) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=dtype, device="cpu")


def sinusoid_task(index: int, *, shots: int = 5, queries: int | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> SinusoidTask:
    """Task ``index`` of the sinusoid distribution (module doc): ``shots`` support points and
    ``queries`` query points (default: ``shots``), inputs and targets of shape ``(n, 1)``."""
    index = nonnegative_int("sinusoid_task", "index", index)
    shots = positive_int("sinusoid_task", "shots", shots)
    queries = shots if queries is None else positive_int("sinusoid_task", "queries", queries)
    seed = nonnegative_int("sinusoid_task", "seed", seed)
    g = torch.Generator(device="cpu").manual_seed(task_seed(seed, index, "sinusoid"))
    amplitude = float(_uniform(g, (), *AMPLITUDE, torch.float64))
    phase = float(_uniform(g, (), *PHASE, torch.float64))
    x = _uniform(g, (shots + queries, 1), *INPUTS, torch.float64)
    y = amplitude * torch.sin(x - phase)
    x, y = x.to(dtype), y.to(dtype)
    return SinusoidTask(amplitude, phase, (x[:shots], y[:shots]), (x[shots:], y[shots:]))


class GlyphPool(NamedTuple):
    """A pool of procedural glyph classes: ``[0, train_classes)`` meta-train, the rest
    meta-test."""

    seed: int
    classes: int
    train_classes: int

    def split(self, name: str) -> range:
        """The class ids of split ``"train"`` or ``"test"``."""
        if name not in SPLITS:
            raise HyperdiffError(f"glyph_pool: split must be one of {list(SPLITS)} "
                                 f"(got {name!r})")
        return range(self.train_classes) if name == "train" else range(self.train_classes,
                                                                       self.classes)


def glyph_pool(classes: int = 1600, test_classes: int = 400, seed: int = 0) -> GlyphPool:
    """``classes`` glyph classes, the last ``test_classes`` of them held out for meta-test."""
    classes = positive_int("glyph_pool", "classes", classes)
    test_classes = positive_int("glyph_pool", "test_classes", test_classes)
    if test_classes >= classes:
        raise HyperdiffError(f"glyph_pool: test_classes must be below classes={classes}, "
                             f"leaving meta-train classes (got {test_classes})")
    return GlyphPool(nonnegative_int("glyph_pool", "seed", seed), classes, classes - test_classes)


def stroke_program(pool: GlyphPool, class_id: int) -> Tensor:
    """The control points of class ``class_id``: shape ``(strokes, 3, 2)`` in ``[0.15,
    0.85]^2``, 2 to 4 strokes, a function of ``(pool.seed, class_id)`` only."""
    g = torch.Generator(device="cpu").manual_seed(task_seed(pool.seed, class_id, "glyph_class"))
    strokes = int(torch.randint(2, 5, (), generator=g, device="cpu"))
    return _uniform(g, (strokes, 3, 2), 0.15, 0.85, torch.float64)


def _curve(points: Tensor) -> Tensor:
    """Quadratic Bezier curves through control points ``(S, 3, 2)``, sampled at
    ``CURVE_POINTS`` parameters: ``(S, CURVE_POINTS, 2)``."""
    t = torch.linspace(0.0, 1.0, CURVE_POINTS, dtype=points.dtype, device=points.device)[:, None]
    p0, p1, p2 = points[:, None, 0], points[:, None, 1], points[:, None, 2]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def render(points: Tensor, size: int = SIZE) -> Tensor:
    """An image ``(size, size)`` in ``[0, 1]`` of the strokes with control points ``(S, 3,
    2)`` (unit square, ``x`` right and ``y`` down): each pixel the largest Gaussian profile
    ``exp(-d^2 / (2 w^2))`` of its distance ``d`` (pixels) to a segment of a curve."""
    curve = _curve(points) * size  # (S, C, 2) in pixels
    a, b = curve[:, :-1].reshape(-1, 2), curve[:, 1:].reshape(-1, 2)  # segments (M, 2)
    centres = torch.arange(size, dtype=points.dtype, device=points.device) + 0.5
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 1, 2)
    ab = b - a
    t = (((grid - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0.0, 1.0)
    distance2 = ((grid - (a + t[..., None] * ab)) ** 2).sum(-1)  # (pixels, M)
    ink = torch.exp(-distance2.min(dim=1).values / (2 * STROKE_WIDTH**2))
    return ink.reshape(size, size)


def _jitter(points: Tensor, g: torch.Generator) -> Tensor:
    """``points`` under a random affine map about the centre of the unit square (JITTER)."""
    angle = float(_uniform(g, (), -JITTER["rotation"], JITTER["rotation"], torch.float64))
    scale = 1 + _uniform(g, (2,), -JITTER["scale"], JITTER["scale"], torch.float64)
    shear = float(_uniform(g, (), -JITTER["shear"], JITTER["shear"], torch.float64))
    shift = _uniform(g, (2,), -JITTER["shift"], JITTER["shift"], torch.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    matrix = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64, device="cpu") @ \
        torch.tensor([[1.0, shear], [0.0, 1.0]], dtype=torch.float64, device="cpu") @ \
        torch.diag(scale)
    return (points - 0.5) @ matrix.T + 0.5 + shift


def glyph_instance(program: Tensor, g: torch.Generator, size: int = SIZE) -> Tensor:
    """One instance of a class: its ``program`` jittered, rendered and noised, in ``[0, 1]``,
    shape ``(size, size)``; the draws come from ``g``."""
    image = render(_jitter(program, g), size)
    noise = JITTER["noise"] * torch.randn(image.shape, generator=g, dtype=image.dtype,
                                          device="cpu")
    return (image + noise).clamp(0.0, 1.0)


class Episode(NamedTuple):
    """An N-way K-shot episode: support and query ``(images (n, 1, 28, 28), labels (n,))``,
    labels ``0 .. N-1``, and the pool ids of its classes (label ``i`` is ``classes[i]``)."""

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    classes: tuple[int, ...]


def glyph_episode(pool: GlyphPool, index: int, *, split: str = "train", ways: int = 5,
                  shots: int = 1, queries: int = 15,
                  dtype: torch.dtype = torch.float32) -> Episode:
    """Episode ``index`` of ``split`` (module doc): ``ways`` classes of the split, ``shots``
    support and ``queries`` query instances of each, all drawn from the episode's seed."""
    index = nonnegative_int("glyph_episode", "index", index)
    ways = positive_int("glyph_episode", "ways", ways)
    shots = positive_int("glyph_episode", "shots", shots)
    queries = positive_int("glyph_episode", "queries", queries)
    ids = pool.split(split)
    if ways > len(ids):
        raise HyperdiffError(f"glyph_episode: ways must be at most the {len(ids)} classes of "
                             f"split {split!r} (got {ways})")
    g = torch.Generator(device="cpu").manual_seed(task_seed(pool.seed, index, f"episode:{split}"))
    chosen = tuple(ids[int(i)] for i in torch.randperm(len(ids), generator=g, device="cpu")[:ways])
    images = torch.stack([torch.stack([glyph_instance(stroke_program(pool, c), g)
                                       for _ in range(shots + queries)]) for c in chosen])
    images = images.to(dtype)[:, :, None]  # (ways, shots + queries, 1, size, size)
    labels = torch.arange(ways, device="cpu")[:, None]

    def part(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return (images[:, lo:hi].reshape(-1, 1, SIZE, SIZE),
                labels.expand(ways, hi - lo).reshape(-1))

    return Episode(part(0, shots), part(shots, shots + queries), chosen)


__all__ = ["AMPLITUDE", "INPUTS", "JITTER", "PHASE", "SIZE", "Episode", "GlyphPool",
           "SinusoidTask", "glyph_episode", "glyph_instance", "glyph_pool", "render",
           "sinusoid_task", "stroke_program"]
