"""Inner optimizers' and schedules' inputs (s40 review): a schedule's value is recomputed when
the hyperparameters it reads change (it returned the value of the first peak for any later
one in the same mapping), a used schedule deep-copies (its cached value held an autograd
graph), and NumPy scalars are accepted as coefficients, as torch.optim accepts them (they were
refused as "not a number"). References: the warmup-cosine formula written out here, and
torch.optim.SGD / Adam on the same gradients."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import hyperdiff as hd

D = torch.float64


def warmup_cosine(peak: float, warmup: float, final: float, t: int, steps: int) -> float:
    """The documented formula at step ``t`` of ``steps``."""
    s = t / (steps - 1)
    ramp = min(s / warmup, 1.0)
    p = min(max((s - warmup) / (1 - warmup), 0.0), 1.0)
    return peak * ramp * (final + (1 - final) * (1 + math.cos(math.pi * p)) / 2)


def test_a_schedule_reads_the_values_it_is_given_now():
    schedule = hd.schedule("warmup_cosine", 11)
    natural = {"lr_warmup": torch.tensor(0.2, dtype=D), "lr_final": torch.tensor(0.1, dtype=D)}
    for peak in (0.1, 0.2, 0.4):  # the same mapping, a new peak each time
        natural["lr_peak"] = torch.tensor(peak, dtype=D)
        assert float(schedule.value(natural, 5)) == pytest.approx(
            warmup_cosine(peak, 0.2, 0.1, 5, 11), rel=1e-14)
    natural["lr_peak"].mul_(2.0)  # changed in place: 0.8
    assert float(schedule.value(natural, 5)) == pytest.approx(
        warmup_cosine(0.8, 0.2, 0.1, 5, 11), rel=1e-14)


def test_a_used_schedule_and_its_problem_deep_copy():
    steps = 4
    schedule = hd.schedule("warmup_cosine", steps)
    loss = lambda p, h, b: ((p["w"] - b) ** 2).sum()  # noqa: E731
    problem = hd.make_problem(loss, loss, hd.HyperParameters(**schedule.hyperparameters()),
                              {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(schedule, 0.9),
                              train_data=torch.ones(3, dtype=D), val_data=torch.ones(3, dtype=D),
                              steps=steps)
    found = hd.reverse()(problem)
    copied = copy.deepcopy(problem)  # raised: the cached value is not a graph leaf
    assert torch.equal(hd.reverse()(copied).vector, found.vector)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_numpy_scalar_coefficients_train_as_torch_optim_with_them(kind):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, generator=g)
    grads = [torch.randn(4, generator=g) for _ in range(5)]
    if kind == "sgd":
        ours = hd.sgd(np.float32(0.1), np.float64(0.9), weight_decay=np.float32(1e-2))
        theirs_of = lambda p: torch.optim.SGD(  # noqa: E731
            [p], lr=np.float32(0.1), momentum=np.float64(0.9), weight_decay=np.float32(1e-2))
    else:
        ours = hd.adam(np.float32(0.01), betas=(np.float32(0.8), 0.99), eps=np.float64(1e-6))
        theirs_of = lambda p: torch.optim.Adam(  # noqa: E731
            [p], lr=np.float32(0.01), betas=(float(np.float32(0.8)), 0.99),  # torch: floats
            eps=np.float64(1e-6))
    params, state = {"w": start.clone()}, ours.init({"w": start})
    hparams = hd.HyperParameters(unused=hd.scalar(1.0))
    view = hparams.view(hparams.raw)
    for step, grad in enumerate(grads):
        params, state = ours.update({"w": grad}, state, params, view, step)
    p = start.clone().requires_grad_()
    theirs = theirs_of(p)
    for grad in grads:
        p.grad = grad.clone()
        theirs.step()
    assert torch.equal(params["w"], p.detach())


def schedule_problem(schedule: hd.schedules.Schedule, **specs) -> hd.Problem:
    loss = lambda p, h, b: ((p["w"] - b) ** 2).sum()  # noqa: E731
    return hd.make_problem(loss, loss, hd.HyperParameters(**specs), {"w": torch.zeros(3, dtype=D)},
                           optimizer=hd.sgd(schedule), train_data=torch.ones(3, dtype=D),
                           val_data=torch.ones(3, dtype=D), steps=schedule.steps)


@pytest.mark.parametrize("field, spec, message", [
    ("warmup", hd.scalar(1.0), r"'lr_warmup' must be a finite number in \(0, 1\) \(got 1.0\)"),
    ("final", hd.scalar(3.0), r"'lr_final' must be a finite number in \(0, 1\) \(got 3.0"),
    ("peak", hd.scalar(-0.1, "free"), r"'lr_peak' must be a finite number > 0 \(got -0.1\)"),
])
def test_a_schedule_field_outside_its_family_is_refused(field, spec, message):
    """warmup 1 gave a NaN at the last step, final 3 a rising "decay", peak -0.1 a negative
    learning rate; all trained."""
    schedule = hd.schedule("warmup_cosine", 5)
    specs = {**schedule.hyperparameters(peak=0.1, warmup=0.2, final=0.1), f"lr_{field}": spec}
    with pytest.raises(hd.HyperdiffError, match="the warmup_cosine schedule of lr: " + message):
        schedule_problem(schedule, **specs)


def test_a_schedule_whose_fields_are_missing_is_refused_by_name():
    schedule = hd.schedule("warmup_cosine", 5)  # reads lr_peak, ...; the collection has sched_*
    specs = hd.schedule("warmup_cosine", 5, prefix="sched").hyperparameters()
    with pytest.raises(hd.HyperdiffError, match=r"schedule of lr must read its peak from a "
                       r"scalar hyperparameter 'lr_peak' \(got no such hyperparameter"):
        schedule_problem(schedule, **specs)  # a KeyError from inside training before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_optimizer_refuses_low_precision_parameters(dtype):
    module = torch.nn.Linear(3, 2).to(dtype)
    hparams = hd.HyperParameters(lr=hd.scalar(0.1))
    with pytest.raises(hd.HyperdiffError, match=r"torch_optimizer: parameters must be float32 "
                       r"or float64 to train as hyperdiff did \(got \['weight', 'bias'\] in "):
        hd.torch_optimizer(hd.adam("lr"), hparams, module)
    hd.torch_optimizer(hd.adam("lr"), hparams, module.float())


def test_torch_optimizer_names_a_schedule_whose_fields_are_missing():
    schedule = hd.schedule("warmup_cosine", 5)
    hparams = hd.HyperParameters(**hd.schedule("warmup_cosine", 5, prefix="s").hyperparameters())
    with pytest.raises(hd.HyperdiffError, match=r"torch_optimizer: the warmup_cosine schedule of "
                       r"lr must read hyperparameters of the collection \(got \['lr_final', "
                       r"'lr_peak', 'lr_warmup'\] missing"):  # a KeyError before
        hd.torch_optimizer(hd.sgd(schedule), hparams, torch.nn.Linear(3, 2))
