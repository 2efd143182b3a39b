"""Online tuning and schedules: window hypergradients against a hand derivation (against the
offline methods: the methods x (offline, online) table of tests/test_segments.py), schedules against finite differences and their documented formulas, resume
against an uninterrupted run (float64, tiny problems)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from interrupt import interrupted_run
from online_resume import assert_resumes_bit_for_bit

import hyperdiff as hd
from hyperdiff.app.rundir import RunDir
from hyperdiff.engine.training import train, validation_loss

from conftest import sine_data

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64


def mlp_params(seed: int = 0, d: int = 5, hidden: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W1": torch.randn(d, hidden, generator=g, dtype=DT) * 0.5,
            "b1": torch.zeros(hidden, dtype=DT),
            "W2": torch.randn(hidden, 1, generator=g, dtype=DT) * 0.5}


def predict(p, x):
    return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]


def val_loss(p, h, batch):
    x, y = batch
    return ((predict(p, x) - y) ** 2).mean()


def train_loss(p, h, batch):
    decay = h["wd"] * sum((v**2).sum() for v in p.values()) if "wd" in h else 0.0
    return val_loss(p, h, batch) + decay


def problem(hparams, optimizer, steps, *, batch_size=6, seed=0):
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(train_loss, val_loss, hparams, mlp_params(), optimizer=optimizer,
                           train_data=hd.minibatches(x, y, batch_size=batch_size),
                           val_data=(xv, yv), steps=steps, seed=seed, probe=False)


def recipe(steps=6):
    hp = hd.HyperParameters(lr=hd.scalar(0.3), momentum=hd.scalar(0.6, (0.0, 1.0)),
                            wd=hd.scalar(1e-2))
    return problem(hp, hd.sgd("lr", "momentum"), steps)


def test_window_one_with_sgd_is_hypergradient_descent_by_hand():
    """K=1, plain SGD, a free lr and an SGD outer step: lr <- lr + beta <grad L_val(theta_{t+1}),
    grad L_train(theta_t)> (Baydin et al. 2018, with the validation batch)."""
    steps, beta = 7, 0.05
    hp = hd.HyperParameters(lr=hd.scalar(0.2, "free"))
    prob = problem(hp, hd.sgd("lr"), steps)
    result = hd.online.OnlineTuner(prob, window=1, method="reverse", optimizer="sgd", lr=beta).run()

    theta = {k: v.clone() for k, v in prob.params.items()}
    lr, lrs = 0.2, []
    for t in range(steps):
        lrs.append(lr)
        params = {k: v.clone().requires_grad_() for k, v in theta.items()}
        g = torch.autograd.grad(train_loss(params, {}, prob.train_data.batch(t, 0)),
                                list(params.values()))
        theta = {k: v - lr * gk for (k, v), gk in zip(theta.items(), g, strict=True)}
        after = {k: v.clone().requires_grad_() for k, v in theta.items()}
        gv = torch.autograd.grad(val_loss(after, {}, prob.val_data[0]), list(after.values()))
        dot = sum(float((a * b).sum()) for a, b in zip(gv, g, strict=True))
        lr = lr + beta * dot
    assert [r.hparams["lr"] for r in result.history] == pytest.approx(lrs, rel=1e-12)
    assert float(result.final_raw["lr"]) == pytest.approx(lr, rel=1e-12)
    for k, v in theta.items():
        assert torch.allclose(result.params[k], v, rtol=0, atol=1e-13)


def fd_loss(prob, hp, **natural):
    raw = hp.with_natural(**natural).raw
    state, _ = train(prob, raw)
    with torch.no_grad():
        return float(validation_loss(prob, state.params, state.buffers,
                                     hp.view(prob.raw_tensors(raw))))


@pytest.mark.parametrize("family", ["warmup_cosine", "warmup_linear"])
def test_parametric_schedule_hypergradient_matches_finite_differences(family):
    steps = 8
    sched = hd.schedule(family, steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.4, warmup=0.23, final=0.1))
    prob = problem(hp, hd.sgd(sched, 0.5), steps)
    grad = hd.reverse()(prob).grad_natural
    values = {"lr_peak": 0.4, "lr_warmup": 0.23, "lr_final": 0.1}
    for name in ("lr_peak", "lr_warmup", "lr_final"):
        eps = 1e-5
        up = fd_loss(prob, hp, **{**values, name: values[name] + eps})
        down = fd_loss(prob, hp, **{**values, name: values[name] - eps})
        assert float(grad[name]) == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-10)


def test_schedule_formulas_and_horizon_transfer():
    hp = hd.HyperParameters(**hd.schedule("warmup_cosine", 11).hyperparameters(
        peak=0.5, warmup=0.2, final=0.1))
    values = hd.schedule("warmup_cosine", 11).values(hp)
    s = np.arange(11) / 10
    ramp = np.minimum(s / 0.2, 1)
    p = np.clip((s - 0.2) / 0.8, 0, 1)
    expected = 0.5 * ramp * (0.1 + 0.9 * 0.5 * (1 + np.cos(math.pi * p)))
    assert np.allclose(values.numpy(), expected, rtol=1e-12, atol=1e-15)
    long = hd.schedule("warmup_cosine", 11).with_steps(101).values(hp)
    assert torch.allclose(long[::10], values, rtol=1e-12)  # same s, same value
    exp = hd.schedule("exponential", 5)
    hpe = hd.HyperParameters(**exp.hyperparameters(peak=1.0, final=0.01))
    assert np.allclose(exp.values(hpe).numpy(), 0.01 ** (np.arange(5) / 4), rtol=1e-12)
    step = hd.schedule("step_decay", 7, drops=2)
    hps = hd.HyperParameters(**step.hyperparameters(peak=1.0, gamma=0.5))
    assert step.values(hps).tolist() == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_resample_is_linear_interpolation_on_normalised_time():
    values = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.05], dtype=DT)
    out = hd.schedules.resample(values, 9)
    expected = np.interp(np.arange(9) / 8, np.arange(5) / 4, values.numpy())
    assert np.allclose(out.numpy(), expected, rtol=0, atol=1e-15)
    assert hd.schedules.resample(values, 2).tolist() == pytest.approx([0.1, 0.05])
    hp = hd.HyperParameters(lr=hd.per_step(5, values), m=hd.scalar(0.7, (0.0, 1.0)))
    longer = hd.schedules.resampled(hp, 13)
    assert longer["lr"].shape == (13,)
    assert np.allclose(longer.natural()["lr"].numpy(),
                       np.interp(np.arange(13) / 12, np.arange(5) / 4, values.numpy()))
    assert float(longer.natural()["m"]) == pytest.approx(0.7)


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(method, tmp_path):
    steps = 9
    sched = hd.schedule("warmup_cosine", steps)

    def tuner():
        hp = hd.HyperParameters(**sched.hyperparameters(peak=0.3, warmup=0.3, final=0.2),
                                momentum=hd.scalar(0.5, (0.0, 1.0)))
        prob = problem(hp, hd.sgd(sched, "momentum"), steps, batch_size=5)
        return hd.online.OnlineTuner(prob, window=2, method=method, lr=0.05, val_batch_size=7,
                              seed=3)

    _, whole = assert_resumes_bit_for_bit(tuner, tmp_path)
    assert whole.steps == steps


def test_validation_batches_are_drawn_from_the_seed():
    tuner = hd.online.OnlineTuner(recipe(4), val_batch_size=5, seed=1)
    a, b = tuner.val_batches(3)[0], tuner.val_batches(3)[0]
    assert torch.equal(a[0], b[0]) and a[0].shape == (5, 5)
    assert not torch.equal(a[0], tuner.val_batches(4)[0][0])


def test_online_tuning_raises_a_too_small_lr_and_lowers_the_validation_loss():
    """Full-batch least squares, lr 100x too small: every window's hypergradient says larger."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=DT)
    y = x @ torch.randn(5, 1, generator=g, dtype=DT)
    steps = 40
    sched = hd.schedule("exponential", steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.002, final=0.5))
    lin = {"W": torch.zeros(5, 1, dtype=DT)}

    def mse(p, h, batch):
        return ((batch[0] @ p["W"] - batch[1]) ** 2).mean()

    prob = hd.make_problem(mse, mse, hp, lin, optimizer=hd.sgd(sched), train_data=(x, y),
                           val_data=(x, y), steps=steps, probe=False)
    result = hd.online.OnlineTuner(prob, window=2, lr=0.2).run()
    tuned = {k: float(v) for k, v in result.final_hparams.natural().items()}
    assert tuned["lr_peak"] > 0.02
    assert fd_loss(prob, hp, **tuned) < 0.5 * fd_loss(prob, hp)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "truncated"}, "method must be one of"),
    ({"window": 0}, "window must be a positive int"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"solver": "gmres"}, "solver must be"),
    ({"val_batch_size": -1}, "val_batch_size must be a positive int"),
])
def test_bad_online_arguments_raise_a_clear_error(kwargs, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        hd.online.OnlineTuner(recipe(4), **kwargs)


def test_a_schedule_for_another_horizon_is_refused_by_the_online_tuner():
    sched = hd.schedule("exponential", 4)
    with pytest.raises(hd.HyperdiffError, match=r"over the run's steps=3 \(got 4"):
        problem(hd.HyperParameters(**sched.hyperparameters()), hd.sgd(sched), 3)
    # a problem shortened after it was made (Problem.with_steps) meets the tuner's own check
    prob = problem(hd.HyperParameters(**sched.hyperparameters()), hd.sgd(sched), 4).with_steps(3)
    with pytest.raises(hd.HyperdiffError, match=r"over the run's 3 steps \(got 4\)"):
        hd.online.OnlineTuner(prob)


def test_bad_schedule_arguments_raise_a_clear_error():
    with pytest.raises(hd.HyperdiffError, match="family must be one of"):
        hd.schedule("cosine", 10)
    with pytest.raises(hd.HyperdiffError, match="steps must be a positive int"):
        hd.schedule("warmup_cosine", 0)
    with pytest.raises(hd.HyperdiffError, match="with_steps"):
        hd.schedule("exponential", 3)({"lr_peak": torch.tensor(1.0),
                                       "lr_final": torch.tensor(0.5)}, 3)
    with pytest.raises(hd.HyperdiffError, match="values must be a non-empty 1-D tensor"):
        hd.schedules.resample(torch.zeros(2, 2), 4)


ONLINE = ["output.checkpoint_seconds=0", "task.name=horizon_digits", "inner.steps=60", "outer.window=6", "outer.val_batch=32",
          "report.seeds=1"]


def test_online_run_directory_resumes_to_the_same_history_and_result(tmp_path):
    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import run_experiment

    def log(_: str) -> None:
        return None

    whole = run_experiment(load_config(overrides=ONLINE), out=tmp_path / "a", log=log,
                           progress=False)
    interrupted_run(tmp_path / "b", ONLINE, at=4)
    resumed = run_experiment(None, resume=tmp_path / "b", log=log, progress=False)
    history = [[r.without_timing() for r in RunDir(tmp_path / d).read_history()] for d in "ab"]
    assert len(history[0]) == 10 and history[0] == history[1]
    assert resumed["tuned"] == whole["tuned"] and resumed["online_model"] == whole["online_model"]
    assert whole["warnings"] == resumed["warnings"] == []  # the task's start is not hot
    assert whole["tuned"]["metrics"]["test"]["loss"] < whole["initial"]["metrics"]["test"]["loss"]


@pytest.mark.parametrize("overrides, message", [
    (["method.name=fomaml"], "method.name must be one of"),
    # an option of the offline call that the segment does not read (forward's chunk_size is
    # read by its segment, and accepted)
    (["method.name=implicit", "method.fixed_point=true"],
     r"method.fixed_point is not used by online implicit; it accepts \['solver'\]"),
    (["task.cv_folds=3"], "task.cv_folds must be 0 with outer.mode = 'online'"),
    (["outer.window=0"], r"outer.window must be an int >= 1"),
    (["outer.backprop=3"], r"outer.backprop is used by method.name = 'reverse' only"),
])
def test_bad_online_config_raises_a_clear_error(overrides, message, tmp_path):
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    with pytest.raises(hd.HyperdiffError, match=message):
        build_online(load_config(overrides=[*ONLINE, *overrides]))


def blowup_tuner(steps=100, window=20):
    """Full-batch least squares (stable for lr < ~0.5) at lr 0.05, with an outer Adam lr of 5:
    the first update raises lr ~150x and the second window's training blows up."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=DT)
    y = x @ torch.randn(5, 1, generator=g, dtype=DT)
    hp = hd.HyperParameters(lr=hd.scalar(0.05))

    def mse(p, h, batch):
        return ((batch[0] @ p["W"] - batch[1]) ** 2).mean()

    prob = hd.make_problem(mse, mse, hp, {"W": torch.zeros(5, 1, dtype=DT)},
                           optimizer=hd.sgd("lr"), train_data=(x, y), val_data=(x, y),
                           steps=steps, probe=False)
    return hd.online.OnlineTuner(prob, window=window, lr=5.0, max_failures=4)


def test_a_window_that_blows_up_is_discarded_and_the_run_goes_on(caplog):
    tuner = blowup_tuner()
    first = tuner.step()
    before = {k: v.clone() for k, v in tuner.state.params.items()}
    assert tuner.raw["lr"] > math.log(1.0)  # lr ~7.4: far past the stability limit
    failed = tuner.step()
    assert failed.status == "failed" and "absurd" in failed.message
    assert "restored the hyperparameters" in failed.message
    # the window is discarded: training state, data position and values of the last good one
    assert tuner.inner_step == 20 and torch.equal(tuner.state.params["W"], before["W"])
    assert float(tuner.raw["lr"]) == pytest.approx(math.log(first.hparams["lr"]), abs=1e-15)
    assert tuner.guard.scale == 0.5 and tuner.outer_lr(1) == 2.5
    assert "window of steps 20..39" in caplog.text
    result = tuner.run()
    assert result.steps == 100 and torch.isfinite(result.params["W"]).all()
    ok = [r for r in result.history if r.status == "ok"]
    assert len(ok) == 5 and ok[1].hparams["lr"] == first.hparams["lr"]
    # the run trained the least-squares problem: its final loss is far below the start
    assert ok[-1].val_loss < 1e-3 * ok[0].val_loss


def test_resume_after_a_failed_window_is_exact(tmp_path):
    whole = blowup_tuner().run()
    assert [r.status for r in whole.history][:2] == ["ok", "failed"]
    first = blowup_tuner()
    first.step(), first.step()
    rundir = RunDir(tmp_path)
    rundir.path.mkdir(exist_ok=True)
    rundir.save_checkpoint(first.state_dict())
    second = blowup_tuner()
    second.load_state_dict(rundir.load_checkpoint())
    assert second.guard.scale == 0.5 and second.guard.good is not None
    resumed = second.run()
    assert torch.equal(resumed.params["W"], whole.params["W"])
    assert torch.equal(resumed.final_raw["lr"], whole.final_raw["lr"])
    assert [r.without_timing() for r in resumed.history] == [
        r.without_timing() for r in whole.history]


def test_non_finite_hypergradients_stop_the_run_after_max_failures(monkeypatch):
    tuner = hd.online.OnlineTuner(recipe(12), window=2, lr=0.01, max_failures=3)
    good_raw = tuner.raw  # the values of the last good window, restored after each failure
    tuner.step()
    good_state = tuner.state
    window = tuner.plan.segments

    def nan_grad(*args, **kwargs):
        return [out._replace(grad={n: g * math.nan for n, g in out.grad.items()})
                for out in window(*args, **kwargs)]

    monkeypatch.setattr(tuner.plan, "segments", nan_grad)
    for _ in range(2):
        record = tuner.step()
        assert record.status == "failed" and "hypergradient of" in record.message
        assert tuner.state is good_state and tuner.inner_step == 2
        assert all(torch.equal(tuner.raw[n], good_raw[n]) for n in good_raw)
    with pytest.raises(hd.NonFiniteError, match="OnlineTuner: 3 outer steps in a row failed"):
        tuner.step()
    assert tuner.history[-1].status == "failed"


def test_values_outside_their_constraint_fail_without_training():
    tuner = hd.online.OnlineTuner(recipe(8), window=2, lr=0.01)
    tuner.step()
    state = tuner.state
    with torch.no_grad():  # momentum's raw logit so large that sigmoid rounds onto 1.0
        tuner.flat[tuner.hparams.coordinate_names().index("momentum")] = 1e4
    record = tuner.step()
    assert record.status == "failed" and "outside its constraint" in record.message
    assert tuner.state is state and tuner.inner_step == 2
    assert tuner.hparams.natural(tuner.raw)["momentum"] < 1.0
    assert tuner.run().steps == 8


def test_a_first_window_that_fails_stops_with_a_clear_message():
    tuner = blowup_tuner()
    with torch.no_grad():
        tuner.flat.fill_(math.log(1e10))  # the loss overflows to inf in the first window
    with pytest.raises(hd.NonFiniteError, match="OnlineTuner: the initial hyperparameters"):
        tuner.step()
    with pytest.raises(hd.HyperdiffError, match="OnlineTuner: guard shrink must be in"):
        hd.online.OnlineTuner(recipe(4), shrink=1.5)


def test_normalised_sgd_moves_the_raw_values_by_lr_along_the_hypergradient():
    """normalize=True with SGD: u <- u - lr g / ||g||_2, g the offline reverse hypergradient
    of the same window (one window = the whole run)."""
    prob = recipe(6)
    tuner = hd.online.OnlineTuner(prob, window=6, optimizer="sgd", normalize=True, lr=0.1)
    before = tuner.hparams.flatten(tuner.raw)
    tuner.step()
    g = prob.hparams.flatten(hd.reverse()(prob).grad).to(DT)
    after = tuner.hparams.flatten(tuner.raw)
    assert torch.allclose(after, before - 0.1 * g / g.norm(), rtol=0, atol=1e-12)
    assert float((after - before).norm()) == pytest.approx(0.1, rel=1e-12)
    with pytest.raises(hd.HyperdiffError, match="normalize must be True or False"):
        hd.online.OnlineTuner(prob, normalize=1)


def test_online_runs_feed_the_log_files_and_callbacks(tmp_path):
    import csv

    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import run_experiment

    seen: list[int] = []
    run_experiment(load_config(overrides=[*ONLINE, "log.csv=steps.csv"]), out=tmp_path,
                   log=lambda _: None, progress=False,
                   callbacks=[lambda opt, record: seen.append(record.step)])
    history = RunDir(tmp_path).read_history()
    with open(tmp_path / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert seen == [r.step for r in history] == [int(r["step"]) for r in rows]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(
        [r.val_loss for r in history], rel=1e-12)


def test_online_mode_under_torchrun_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hyperdiff.app import experiment
    from hyperdiff.app.config import load_config

    group = SimpleNamespace(is_root=True, timeout_s=None, world=2)
    monkeypatch.setattr(experiment, "init_from_env", lambda *_: group)
    with pytest.raises(hd.HyperdiffError, match=r"distributed.data_parallel must be true for "
                       r"outer.mode = 'online' under torchrun \(got false: each of the 2 ranks "
                       "would repeat the one training run"):
        experiment.run_experiment(load_config(overrides=ONLINE), out=tmp_path / "r",
                                  log=lambda _: None, progress=False)


def test_an_online_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path):
    import hashlib
    import io
    import json

    from hyperdiff.app.experiment import run_experiment

    interrupted_run(tmp_path, ONLINE, at=2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["params"]  # a checkpoint the manifest lists, but not an OnlineTuner state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tmp_path / "checkpoint.pt").write_bytes(buffer.getvalue())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["checkpoints"][-1]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(hd.HyperdiffError, match=r"checkpoint.pt does not fit this run's driver "
                       r"\(HyperOptimizer.load_state_dict: the checkpoint is damaged: the state "
                       r"must be a dict with the entries \['params'\] \(got a dict without them\)\); "
                       r"restore it, or"):
        run_experiment(None, resume=tmp_path, log=lambda _: None, progress=False)


def test_an_outer_optimizer_state_with_missing_entries_is_one_clear_error():
    tuner = hd.online.OnlineTuner(recipe(6), window=2, lr=0.01)  # outer Adam
    tuner.step()
    state = tuner.state_dict()
    del state["outer"]["state"][0]["exp_avg_sq"]
    with pytest.raises(hd.HyperdiffError, match=r"OnlineTuner.load_state_dict: the outer "
                       r"optimizer state lacks the entries \['exp_avg_sq'\]"):
        hd.online.OnlineTuner(recipe(6), window=2, lr=0.01).load_state_dict(state)
