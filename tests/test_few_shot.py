"""The few-shot task distributions: sinusoid regression and procedural glyph classes."""

from __future__ import annotations

import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.tasks.few_shot import (
    glyph_episode,
    glyph_pool,
    render,
    sinusoid_task,
    stroke_program,
)


# ------------------------------------------------------------------ sinusoids
def test_a_sinusoid_task_is_the_same_on_every_call_and_differs_between_indices():
    first, again = sinusoid_task(12, shots=5, seed=3), sinusoid_task(12, shots=5, seed=3)
    assert (first.amplitude, first.phase) == (again.amplitude, again.phase)
    for a, b in zip([*first.support, *first.query], [*again.support, *again.query],
                    strict=True):
        assert torch.equal(a, b)
    other, reseeded = sinusoid_task(13, shots=5, seed=3), sinusoid_task(12, shots=5, seed=4)
    assert other.amplitude != first.amplitude and reseeded.amplitude != first.amplitude
    assert not torch.equal(other.support[0], first.support[0])


def test_sinusoid_tasks_cover_finns_ranges_with_the_closed_form_targets():
    tasks = [sinusoid_task(i, shots=10, queries=20, dtype=torch.float64) for i in range(300)]
    amplitudes = torch.tensor([t.amplitude for t in tasks])
    phases = torch.tensor([t.phase for t in tasks])
    assert 0.1 <= float(amplitudes.min()) < 0.4 and 4.7 < float(amplitudes.max()) <= 5.0
    assert 0.0 <= float(phases.min()) < 0.15 and math.pi - 0.15 < float(phases.max()) <= math.pi
    inputs = torch.cat([torch.cat([t.support[0], t.query[0]]) for t in tasks])
    assert -5.0 <= float(inputs.min()) < -4.9 and 4.9 < float(inputs.max()) <= 5.0
    for t in tasks[:20]:
        for x, y in (t.support, t.query):
            torch.testing.assert_close(y, t.amplitude * torch.sin(x - t.phase), rtol=0,
                                       atol=1e-12)


def test_sinusoid_shapes_dtype_and_disjoint_support_and_query():
    task = sinusoid_task(0, shots=5, queries=7)
    assert task.support[0].shape == task.support[1].shape == (5, 1)
    assert task.query[0].shape == task.query[1].shape == (7, 1)
    assert task.support[0].dtype == torch.float32
    assert not set(task.support[0].flatten().tolist()) & set(task.query[0].flatten().tolist())
    assert sinusoid_task(0, shots=5).query[0].shape == (5, 1)  # queries default to shots


# ------------------------------------------------------------------ glyphs
POOL = glyph_pool(classes=60, test_classes=20, seed=1)


def test_meta_train_and_meta_test_classes_are_disjoint():
    train, test = set(POOL.split("train")), set(POOL.split("test"))
    assert not train & test and train | test == set(range(60)) and len(test) == 20
    seen = {"train": set(), "test": set()}
    for split in seen:
        for index in range(8):
            seen[split] |= set(glyph_episode(POOL, index, split=split, queries=1).classes)
    assert seen["train"] <= train and seen["test"] <= test
    programs = {c: stroke_program(POOL, c) for c in range(60)}
    for a in train:  # and no test class is a copy of a train class
        for b in test:
            assert programs[a].shape != programs[b].shape or not torch.equal(programs[a],
                                                                              programs[b])


def test_an_episode_is_the_same_on_every_call_and_differs_between_indices():
    first = glyph_episode(POOL, 4, ways=3, shots=2, queries=2)
    again = glyph_episode(POOL, 4, ways=3, shots=2, queries=2)
    assert first.classes == again.classes
    for a, b in zip([*first.support, *first.query], [*again.support, *again.query],
                    strict=True):
        assert torch.equal(a, b)
    other = glyph_episode(POOL, 5, ways=3, shots=2, queries=2)
    assert other.classes != first.classes or not torch.equal(other.support[0], first.support[0])
    reseeded = glyph_episode(glyph_pool(classes=60, test_classes=20, seed=2), 4, ways=3,
                             shots=2, queries=2)
    assert not torch.equal(reseeded.support[0], first.support[0])


def test_episode_shapes_labels_and_disjoint_support_and_query():
    ep = glyph_episode(POOL, 0, ways=5, shots=3, queries=4)
    assert ep.support[0].shape == (15, 1, 28, 28) and ep.query[0].shape == (20, 1, 28, 28)
    assert ep.support[1].tolist() == [i for i in range(5) for _ in range(3)]
    assert ep.query[1].tolist() == [i for i in range(5) for _ in range(4)]
    assert len(set(ep.classes)) == 5
    assert float(ep.support[0].min()) >= 0.0 and float(ep.support[0].max()) <= 1.0
    distances = torch.cdist(ep.support[0].reshape(15, -1), ep.query[0].reshape(20, -1))
    assert float(distances.min()) > 0.5  # no query image is a support image


def test_a_class_instances_are_closer_to_each_other_than_to_other_classes():
    within, between = [], []
    for index in range(4):
        ep = glyph_episode(POOL, index, split="test", ways=5, shots=1, queries=6)
        x = ep.query[0].reshape(30, -1).double()
        d = torch.cdist(x, x)
        same = ep.query[1][:, None] == ep.query[1][None]
        within.append(d[same & ~torch.eye(30, dtype=torch.bool)].mean())
        between.append(d[~same].mean())
    assert float(torch.stack(within).mean()) < 0.85 * float(torch.stack(between).mean())


def test_render_draws_a_stroke_where_its_points_are():
    image = render(torch.tensor([[[0.1, 0.5], [0.5, 0.5], [0.9, 0.5]]], dtype=torch.float64))
    assert float(image[14, 5:23].min()) > 0.9  # the row y = 0.5, along the stroke
    assert float(image[:5].max()) < 1e-6 and float(image[-5:].max()) < 1e-6


@pytest.mark.parametrize(("call", "said"), [
    (lambda: glyph_episode(POOL, 0, ways=41), r"^glyph_episode: ways must be at most the 40 "
     r"classes of split 'train' \(got 41\)"),
    (lambda: glyph_episode(POOL, 0, split="val"), r"^glyph_pool: split must be one of "
     r"\['train', 'test'\] \(got 'val'\)"),
    (lambda: glyph_episode(POOL, -1), r"^glyph_episode: index must be a non-negative int"),
    (lambda: glyph_pool(classes=10, test_classes=10), r"^glyph_pool: test_classes must be "
     r"below classes=10, leaving meta-train classes \(got 10\)"),
    (lambda: sinusoid_task(0, shots=0), r"^sinusoid_task: shots must be a positive int "
     r"\(got 0\)"),
    (lambda: sinusoid_task(0, queries=2.5), r"^sinusoid_task: queries must be a positive int"),
])
def test_bad_arguments_are_refused_in_our_format(call, said):
    with pytest.raises(hd.HyperdiffError, match=said):
        call()
