"""Issue 20 item 3: what ``outer.mode = "online"`` alone chooses (app/config.py's online layer):
the curvature method, windows of 5 and an outer learning rate that lets one run travel a
fixed distance in log space whatever its length; a task's defaults and the user's settings win."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import hyperdiff as hd
from hyperdiff.app.config import ONLINE_BETAS, load_config, online_lr
from hyperdiff.app.plans import build_online

GRU = Path(__file__).resolve().parents[1] / "benchmarks" / "suite_tasks" / "gru_seq.py:build"


@pytest.mark.parametrize(("steps", "window", "growth", "expected"), [
    (100, 5, 0.0, 0.5),       # 20 windows: 10 / 20
    (150, 5, 0.0, 1 / 3),     # 30 windows
    (2000, 10, 0.0, 0.05),    # 200 windows
    (2001, 10, 0.0, 10 / 201),  # the last, shorter window counts
    (10, 5, 0.0, 0.7),        # 2 windows: capped at 0.7
    (100, 5, 0.2, 0.7),       # 9 windows (0, 5, 11, 18, 26, 36, 48, 62, 79): capped
    (2000, 20, 0.2, 10 / 17),  # 17 growing windows (tuner/windows.py's doctest rule)
])
def test_the_online_lr_is_ten_over_the_windows_capped_at_0_7(steps, window, growth, expected):
    assert online_lr(steps, window, growth) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("betas", [(0.9, 0.999), ONLINE_BETAS])
def test_adam_under_the_online_lr_can_travel_a_factor_of_about_150(betas):
    """The distance the rule promises, by simulation: Adam (torch.optim) with a constant-sign
    hypergradient under a cosine decay over W windows moves a raw value by lr W / 2 = 5."""
    # with constant signs m / sqrt(v) = 1 whatever the betas: the online betas keep the travel
    import torch

    windows = 200
    u = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([u], lr=online_lr(windows * 10, 10), betas=betas)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=windows)
    for _ in range(windows):
        opt.zero_grad()
        u.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert -float(u.detach()) == pytest.approx(5.0, rel=0.02)
    assert math.exp(-float(u.detach())) > 100


def test_online_mode_alone_picks_curvature_windows_of_5_and_the_travel_lr():
    # a user task without recommended settings (the suite's GRU task)
    config = load_config(overrides=[f"task.name={GRU}", "outer.mode=online", "inner.steps=300"])
    assert (config.method.name, config.outer.window) == ("curvature", 5)
    assert config.outer.window_growth == 0.2
    # windows 0, 5, 11, 18, 26, 36, 48, 62, 79, 99, 123, 152, 187, 229, 279 (K + floor(0.2 t))
    assert config.outer.lr == pytest.approx(10 / 15)


def test_the_users_settings_and_the_tasks_defaults_win_over_the_online_layer():
    config = load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                    "outer.lr=0.02", "method.name=reverse", "outer.window=7"])
    assert (config.method.name, config.outer.window, config.outer.lr) == ("reverse", 7, 0.02)
    # horizon_digits recommends its own online settings (curvature, K=20, outer lr 0.2)
    horizon = load_config(overrides=["task.name=horizon_digits"])
    assert (horizon.method.name, horizon.outer.window, horizon.outer.lr) == (
        "curvature", 20, 0.2)
    # (mlp_digits no longer recommends an outer lr since signstep became the offline default,
    # so horizon_digits is the task whose own values are checked to win)


def test_offline_defaults_are_unchanged():
    config = load_config(overrides=["task.name=ridge_diabetes", "outer.optimizer=adam"])
    default = load_config(overrides=["task.name=reweight_digits", "outer.lr=0.05"])
    assert config.method.name == "reverse" and config.outer.mode == "offline"
    assert default.outer.lr == 0.05 and default.method.name == "reverse"


def test_an_online_run_with_no_other_settings_runs_curvature_windows():
    config = load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                    "inner.steps=20", "task.params.hidden=8"])
    _, loop = build_online(config)
    result = loop.run()
    assert loop.plan.label == "curvature" and loop.plan.window == 5
    assert result.hyper_steps == 3 and result.steps == 20  # steps 0-4, 5-10, 11-19
    assert isinstance(result.final_hparams, hd.HyperParameters)
