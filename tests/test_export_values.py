"""Exports that lose values: every scheduled coefficient keeps its values over the whole run.

The reference values are the schedule's formula written out here in numpy (docs of
hyperdiff.hparams.schedules), not the code under test."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import hyperdiff as hd


def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).double()


def exported_lrs(torch_opt, scheduler, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(torch_opt.param_groups[0]["lr"])
        torch_opt.step()
        scheduler.step()
    return seen


def warmup_cosine(steps: int, peak: float, warmup: float, final: float) -> np.ndarray:
    s = np.linspace(0.0, 1.0, steps)
    ramp = np.minimum(s / warmup, 1.0)
    p = np.clip((s - warmup) / (1.0 - warmup), 0.0, 1.0)
    return peak * ramp * (final + (1.0 - final) * 0.5 * (1.0 + np.cos(math.pi * p)))


def schedule_and_values(steps: int = 12):
    lr = hd.schedule("warmup_cosine", steps)
    return lr, hd.HyperParameters(**lr.hyperparameters(peak=0.2, warmup=0.25, final=0.1))


def test_a_schedule_coefficient_exports_the_length_it_declares():
    lr, hparams = schedule_and_values(12)
    torch_opt, scheduler = hd.torch_optimizer(hd.sgd(lr, 0.9), hparams, module())
    seen = exported_lrs(torch_opt, scheduler, 12)
    np.testing.assert_allclose(seen, warmup_cosine(12, 0.2, 0.25, 0.1), rtol=1e-12, atol=0)
    assert min(seen[1:]) > 0.0  # not held at its step-0 value, 0.0


def test_a_schedule_exported_over_another_horizon_is_the_same_curve_in_normalised_time():
    lr, hparams = schedule_and_values(12)
    torch_opt, scheduler = hd.torch_optimizer(hd.sgd(lr), hparams, module(), steps=30)
    seen = exported_lrs(torch_opt, scheduler, 30)
    np.testing.assert_allclose(seen, warmup_cosine(30, 0.2, 0.25, 0.1), rtol=1e-12, atol=0)


def test_a_plain_function_coefficient_needs_steps():
    hparams = hd.HyperParameters(base=hd.scalar(0.3))
    decay = hd.sgd(lambda h, t, _: h["base"] / (1.0 + t))
    with pytest.raises(hd.HyperdiffError, match=r"torch_optimizer: steps must be the number of "
                       r"training steps T when coefficient lr is a function of the step "
                       r"\(got steps=None\); pass steps=T"):
        hd.torch_optimizer(decay, hparams, module())
    torch_opt, scheduler = hd.torch_optimizer(decay, hparams, module(), steps=7)
    assert exported_lrs(torch_opt, scheduler, 7) == pytest.approx(
        [0.3 / (1 + t) for t in range(7)], rel=1e-15)


def test_schedules_of_different_lengths_need_steps():
    lr, values = schedule_and_values(12)
    hparams = hd.HyperParameters(**{name: values[name] for name in values},
                                 momentum=hd.per_step(5, 0.9, (0.0, 1.0)))
    with pytest.raises(hd.HyperdiffError, match=r"steps must be given when the schedules' "
                       r"lengths differ \(got steps=None, lengths \{'lr': 12, 'momentum': 5\}"):
        hd.torch_optimizer(hd.sgd(lr, "momentum"), hparams, module())


def test_the_horizon_digits_optimizer_exports_its_whole_schedule():
    spec = hd.tasks.load_task_spec("horizon_digits", steps=40)
    params = {k: v.clone().requires_grad_() for k, v in spec.model.items()}
    torch_opt, scheduler = hd.torch_optimizer(spec.optimizer, spec.hparams, params)
    seen = exported_lrs(torch_opt, scheduler, 40)
    natural = {k: float(v) for k, v in spec.hparams.natural().items()}
    want = warmup_cosine(40, natural["lr_peak"], natural["lr_warmup"], natural["lr_final"])
    np.testing.assert_allclose(seen, want, rtol=1e-12, atol=0)


def toy_task(name: str) -> hd.tasks.TaskSpec:
    x = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x @ torch.ones(3, dtype=torch.float64)

    def mse(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    return hd.task(name, model={"w": torch.zeros(3, dtype=torch.float64)},
                   train_loss=lambda p, h, b: mse(p, h, b) + h["lam"] * p["w"].square().sum(),
                   val_loss=mse, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), data=(x, y), steps=5)


def run_directory(tmp_path, task_name: str):
    """A run directory as ``hyperdiff run`` leaves it: result.json records the task's name."""
    result = {"task": task_name, "status": "finished", "tuned": {"hparams": {"lam": 0.025}}}
    (tmp_path / "result.json").write_text(json.dumps(result))
    return tmp_path


def test_tuned_hparams_reads_a_run_of_the_same_task(tmp_path):
    spec = toy_task("toy")
    run_dir = run_directory(tmp_path, "toy")
    for task in (spec, spec.build(selection_fraction=0.5)):
        tuned = hd.tuned_hparams(task, run_dir).natural()
        assert float(tuned["lam"]) == pytest.approx(0.025, rel=1e-15)


def test_tuned_hparams_refuses_a_run_of_another_task_with_the_same_names(tmp_path):
    run_dir = run_directory(tmp_path, "ridge")  # another task that also tunes "lam"
    for task in (toy_task("toy"), toy_task("toy").build(selection_fraction=0.5)):
        with pytest.raises(hd.HyperdiffError, match=r"tuned_hparams: source must be a run of "
                           r"task 'toy' \(got .*result.json, a run of task 'ridge'\)"):
            hd.tuned_hparams(task, run_dir)
    with pytest.raises(hd.HyperdiffError, match="a run of task None"):
        hd.tuned_hparams(toy_task("toy"), {"tuned": {"hparams": {"lam": 0.025}}})


def test_tuned_hparams_needs_a_built_task_when_its_hparams_depend_on_the_data(tmp_path):
    spec = dataclasses.replace(toy_task("toy"), hparams=lambda data: hd.HyperParameters(
        lam=hd.scalar(0.1)))
    with pytest.raises(hd.HyperdiffError, match=r"task must be built .* pass spec.build"):
        hd.tuned_hparams(spec, run_directory(tmp_path, "toy"))
