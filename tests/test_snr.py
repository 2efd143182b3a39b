"""The hypergradient's signal-to-noise ratio per outer step, its warning, samples="auto", and
the driver's defaults."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import Config, OuterConfig, load_config
from hyperdiff.app.experiment import build
from hyperdiff.app.plans import outer_optimizer_name
from hyperdiff.methods.base import Method
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.outer_steps import default_schedule, outer_optimizer
from hyperdiff.tuner.snr import signal_to_noise

D = torch.float64


def ridge(batch_size=None, steps=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=D)
    y = x @ torch.tensor([1.0, -1.0, 0.5], dtype=D) + 0.3 * torch.randn(24, generator=g, dtype=D)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["lam"] * p["w"].square().sum()

    data = (x, y) if batch_size is None else hd.minibatches(x, y, batch_size=batch_size)
    return hd.make_problem(train, val, hd.HyperParameters(lam=hd.scalar(0.3)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.1), train_data=data,
                           val_data=(x, y), steps=steps, probe=False)


def noise_of(seed: int) -> float:
    return float(torch.randn((), generator=torch.Generator().manual_seed(seed), dtype=D))


def noisy(sigma: float) -> Method:
    """Reverse mode plus N(0, sigma^2) noise drawn from the minibatch seed: known noise."""
    exact = hd.reverse()

    def run(problem, raw):
        hg = exact.run(problem, raw)
        return replace(hg, grad={"lam": hg.grad["lam"] + sigma * noise_of(problem.seed)})

    return Method("noisy", run)


def snr_by_hand(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return abs(mean) / (std / math.sqrt(n))


def test_signal_to_noise_closed_form():
    samples = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]], dtype=D)
    mean_norm = math.hypot(2.0, 3.0)
    std_norm = math.hypot(1.0, math.sqrt(3.0))  # per-coordinate unbiased stds: 1 and sqrt(3)
    assert signal_to_noise(samples) == pytest.approx(mean_norm / (std_norm / math.sqrt(3)))
    assert signal_to_noise(samples[:1]) is None
    assert signal_to_noise(torch.ones(3, 2, dtype=D)) == math.inf


def test_recorded_snr_of_real_minibatch_noise():
    problem = ridge(batch_size=6)
    opt = HyperOptimizer(problem, samples=4, seed=2)
    record = opt.step()
    grads = [float(hd.reverse()(replace(problem, seed=opt.plan.seed_for(0, i))).grad["lam"])
             for i in range(4)]
    assert len(set(grads)) == 4
    assert record.samples == 4
    assert record.grad_snr == pytest.approx(snr_by_hand(grads), rel=1e-9)
    assert StepRecord.from_json(record.to_json()) == record


def test_known_noise_gives_the_expected_ratio_and_a_warning(caplog):
    problem = ridge()
    signal = abs(float(hd.reverse()(problem).grad["lam"]))
    # sigma = 3 |g|: one sample has SNR 1/3, sixteen about sqrt(16) / 3 = 1.33
    opt = HyperOptimizer(problem, method=noisy(3 * signal), samples=16, selection=None)
    record = opt.step()
    expected = snr_by_hand([signal * (1 if signal > 0 else -1) + 3 * signal
                            * noise_of(opt.plan.seed_for(0, i)) for i in range(16)])
    assert record.grad_snr == pytest.approx(expected, rel=1e-6)
    assert 0.6 < record.grad_snr < 3.0
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        # pure noise: the ratio is then |t|-distributed; these seeds give 0.19
        low = HyperOptimizer(problem, method=noisy(100 * signal), samples=8, seed=0).step()
    assert low.grad_snr < 1
    assert "signal-to-noise ratio" in caplog.text and "samples='auto'" in caplog.text


def test_auto_samples_stop_at_the_first_ratio_above_one():
    problem = ridge()
    sigma = 3 * abs(float(hd.reverse()(problem).grad["lam"]))
    opt = HyperOptimizer(problem, method=noisy(sigma), samples="auto", max_samples=16)
    for step in range(3):
        g = float(hd.reverse()(problem, opt.raw).grad["lam"])
        record = opt.step()
        draws = [g + sigma * noise_of(opt.plan.seed_for(step, i)) for i in range(16)]
        expected = next((n for n in range(2, 17) if snr_by_hand(draws[:n]) >= 1), 16)
        assert record.samples == expected
        assert record.grad_snr == pytest.approx(snr_by_hand(draws[:expected]), rel=1e-6)
        assert record.grad["lam"] == pytest.approx(sum(draws[:expected]) / expected, rel=1e-9)
    assert opt.trainings == sum(r.samples for r in opt.history)


def test_auto_samples_on_a_deterministic_problem_use_two():
    record = HyperOptimizer(ridge(), samples="auto").step()
    assert record.samples == 2 and record.grad_snr is None  # identical samples: no noise


def test_config_auto_samples_reach_the_driver():
    config = load_config(overrides=["task.name=ridge_diabetes", "outer.auto_samples=true",
                                    "outer.max_samples=5", "inner.steps=3"])
    _, driver = build(config)
    assert driver.plan.auto is not None and driver.plan.auto.maximum == 5
    with pytest.raises(hd.HyperdiffError, match="samples must be a positive int or 'auto'"):
        HyperOptimizer(ridge(), samples="many")


def test_library_defaults_match_the_command_line(caplog):
    config = OuterConfig()  # the defaults before a task's recommendations
    opt = HyperOptimizer(ridge(), stopping=Stopping(max_steps=4))
    # outer.schedule = "auto": constant with signstep (the offline default), cosine otherwise
    assert config.schedule == "auto" and opt.schedule == default_schedule("signstep")
    assert (opt.plan.explore, opt.plan.explore_when) == (config.explore, config.explore_when)
    assert opt.lr == config.lr and opt.plan.samples == config.samples
    # outer.optimizer = "auto" is the library's default offline (Adam online)
    assert config.optimizer == "auto"
    assert type(opt.optimizer) is outer_optimizer(outer_optimizer_name(Config()))
    assert outer_optimizer_name(replace(Config(), outer=replace(config, mode="online"))) == "adam"
    assert opt.learning_rate(2) == opt.lr  # signstep's auto schedule: constant
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        HyperOptimizer(ridge())
    assert "no selection split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hyperdiff"):
        HyperOptimizer(ridge(), selection=ridge().val_data)
    assert "no selection split" not in caplog.text
