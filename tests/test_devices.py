"""Every method on every available device and dtype agrees with the CPU float64 result.

The reference is each method on a problem built natively in float64 on the CPU (checked
against the other methods first). The same problem is moved with ``Problem.to`` to each
placement: CPU float64 (must agree to 1e-10), CPU float32, and CUDA float64 / float32 when a
GPU is present (skipped otherwise). On the CPU, a "fake device" run puts every tensor that
hyperdiff would make without ``device=`` on the ``meta`` device (``with torch.device("meta")``),
where mixing it with the CPU problem fails: a device bug shows up without a GPU.

float32 tolerances (relative, on the whole hypergradient vector): the exact methods measured
2e-7 to 3e-7 here (a few float32 roundings, eps = 1.2e-7, through T = 6 steps), checked at
1e-5; implicit measured 1.5e-6 (the solve amplifies rounding by the Hessian's condition),
checked at 1e-4; finite differences measured 4e-5 to 1e-4 (central differences in float32 are
accurate to about eps^(2/3) = 2.4e-5 times the problem's scale), checked at 2e-3.
"""

from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.engine.device import OnDevice, move, resolve_device, to_device, unwrap
from hyperdiff.engine.training import train

T = 6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

METHODS = {
    "reverse": hd.reverse,
    "checkpointed": lambda: hd.checkpointed(2),
    "truncated": lambda: hd.truncated(3),
    "reversible": hd.reversible,
    "forward": hd.forward,
    "implicit": lambda: hd.implicit("exact", warn=False),
    "finite_difference": lambda: hd.finite_difference(warn=False),
}
NO_BUFFERS = {"reversible", "implicit"}  # refuse models with BatchNorm statistics
FLOAT32_TOL = {"implicit": 1e-4, "finite_difference": 2e-3}
CUDA64_TOL = {"finite_difference": 1e-8, "implicit": 1e-9}  # other reduction orders on GPU


def build(batch_norm: bool) -> hd.Problem:
    """A small MLP (optionally with BatchNorm) on minibatches, in float64 on the CPU: a
    per-step lr schedule and per-tensor weight decay, heavy-ball SGD."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 1)]
    net = hd.functional(nn.Sequential(*layers).double())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    x_val = torch.randn(16, 4, generator=g, dtype=torch.float64)

    def val_loss(p, h, batch, ctx):
        xb, yb = batch
        return ((net(p, xb, ctx) - yb) ** 2).mean()

    def train_loss(p, h, batch, ctx):
        return val_loss(p, h, batch, ctx) + sum(
            h.at("wd", param=k) * (v**2).sum() for k, v in p.items())

    hparams = hd.HyperParameters(lr=hd.per_step(T, 0.1), wd=hd.per_tensor(net.params, 1e-3))
    return hd.make_problem(
        train_loss, val_loss, hparams, net.params, buffers=net.buffers,
        optimizer=hd.sgd("lr", 0.9), steps=T, val_data=(x_val, torch.sin(x_val.sum(1, True))),
        train_data=hd.minibatches(x, torch.sin(x.sum(1, True)), batch_size=8),
    )


PROBLEMS = {False: build(False), True: build(True)}
CASES = [(name, bn) for name in METHODS for bn in (False, True)
         if not (bn and name in NO_BUFFERS)]
_REFERENCE: dict[tuple[str, bool], hd.HyperGradient] = {}


def run(name: str, problem: hd.Problem) -> hd.HyperGradient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.ConvergenceWarning)
        return METHODS[name]()(problem)


def reference(name: str, batch_norm: bool) -> hd.HyperGradient:
    key = (name, batch_norm)
    if key not in _REFERENCE:
        _REFERENCE[key] = run(name, PROBLEMS[batch_norm])
    return _REFERENCE[key]


def rel(result: hd.HyperGradient, ref: hd.HyperGradient) -> float:
    a, b = result.vector.detach().cpu().double(), ref.vector
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_reference_methods_agree_in_float64(batch_norm):
    exact = reference("reverse", batch_norm)
    assert rel(reference("checkpointed", batch_norm), exact) <= 1e-10
    assert rel(reference("forward", batch_norm), exact) <= 1e-10
    assert rel(reference("finite_difference", batch_norm), exact) <= 1e-6
    if not batch_norm:  # fixed-point arithmetic at 2^-44
        assert rel(reference("reversible", batch_norm), exact) <= 1e-8


PLACEMENTS = [
    pytest.param("cpu", torch.float64, id="cpu-float64"),
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cuda", torch.float64, id="cuda-float64", marks=CUDA),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=CUDA),
]


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize(("name", "batch_norm"), CASES)
def test_method_on_device_agrees_with_cpu_float64(name, batch_norm, device, dtype):
    problem = PROBLEMS[batch_norm].to(device, dtype)
    result = run(name, problem)
    if dtype == torch.float64:
        tol = CUDA64_TOL.get(name, 1e-10) if device == "cuda" else 1e-10
    else:
        tol = FLOAT32_TOL.get(name, 1e-5)
    assert rel(result, reference(name, batch_norm)) <= tol
    assert abs(result.value - reference(name, batch_norm).value) <= tol * 10
    where = torch.device(device).type
    assert all(g.device.type == where for g in result.grad.values())
    assert all(p.device.type == where and p.dtype == dtype for p in result.params.values())
    assert all(b.device.type == where for b in result.buffers.values())


@pytest.mark.parametrize(("name", "batch_norm"), CASES)
def test_fake_device_every_tensor_follows_the_parameters(name, batch_norm):
    problem = PROBLEMS[batch_norm]
    with torch.device("meta"):  # a tensor made without device= lands on meta and fails
        result = run(name, problem)
    assert rel(result, reference(name, batch_norm)) <= 1e-12
    assert all(g.device.type == "cpu" for g in result.grad.values())


def test_fake_device_catches_a_constructor_without_device(monkeypatch):
    forward_mode = importlib.import_module("hyperdiff.methods.forward")  # not the function

    def buggy_tangents(problem, raw):  # the one-hot tangents without device=
        k, out, start = problem.hparams.numel, {}, 0
        eye = torch.zeros(k, k, dtype=problem.hparam_dtype)  # the bug: no device=
        eye.diagonal().fill_(1.0)
        for name, value in raw.items():
            out[name] = eye[:, start : start + value.numel()].reshape(k, *value.shape)
            start += value.numel()
        return out

    monkeypatch.setattr(forward_mode, "_coordinate_tangents", buggy_tangents)
    run("forward", PROBLEMS[False])  # unnoticed on a single device ...
    with pytest.raises((RuntimeError, NotImplementedError)), torch.device("meta"):
        run("forward", PROBLEMS[False])  # ... caught on the fake one


def test_bf16_model_sees_float32_hyperparameters_and_a_float32_update():
    w0 = torch.zeros(3, dtype=torch.bfloat16)
    x = torch.full((8, 3), 12.5, dtype=torch.bfloat16)  # gradient of sum(w * x): 100 exactly

    def loss(p, h, batch):
        return (p["w"] * batch).sum()

    problem = hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.05)), {"w": w0},
                              optimizer=hd.sgd("lr"), train_data=x, val_data=x, steps=1)
    lr = problem.hparams.view(problem.raw_tensors())["lr"]
    assert problem.hparam_dtype == torch.float32 and lr.dtype == torch.float32
    assert abs(float(lr) - 0.05) <= 2 * 2.0**-24 * 0.05  # float32 precision
    rounded_lr = torch.exp(torch.log(torch.tensor(0.05, dtype=torch.float64)).bfloat16())
    assert abs(float(rounded_lr) - 0.05) > 1e-4  # what a bf16 raw value gave: 0.0498
    state, _ = train(problem)
    grad = x.float().sum(0)
    hand = (w0.float() - lr * grad).to(torch.bfloat16)  # in float32, rounded once
    assert state.params["w"].dtype == torch.bfloat16
    assert torch.equal(state.params["w"], hand)
    assert torch.equal(hand, torch.full((3,), -5.0, dtype=torch.bfloat16))
    assert not torch.equal(hand, (w0 - rounded_lr.bfloat16() * grad.bfloat16()))
    hg = hd.reverse()(problem)  # d/d lr of sum(w1 * x) = -|grad|^2: float32 raw gradient
    assert hg.grad["lr"].dtype == torch.float32
    assert abs(float(hg.grad_natural["lr"]) + 3 * 100.0**2) <= 1e-3 * 3e4


def test_autocast_inside_the_loss():
    """bf16 autocast in a float32 model's loss: reverse = checkpointed (same operations),
    forward within bf16 rounding of them, and all within 10% of the float32 run (bf16 keeps 8
    significant bits, 0.4% per rounding; measured 2%)."""
    torch.manual_seed(0)
    net = hd.functional(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))

    def problem(autocast: bool) -> hd.Problem:
        def val_loss(p, h, batch, ctx):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = net(p, batch[0], ctx)
            return ((out.float() - batch[1]) ** 2).mean()

        def train_loss(p, h, batch, ctx):
            return val_loss(p, h, batch, ctx) + h["wd"] * sum((v**2).sum() for v in p.values())

        return hd.make_problem(
            train_loss, val_loss, hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-3)),
            net.params, optimizer=hd.sgd("lr", 0.9), steps=5, val_data=(x, y),
            train_data=hd.minibatches(x, y, batch_size=8))

    mixed, plain = problem(True), problem(False)
    reverse = hd.reverse()(mixed)
    assert rel(hd.checkpointed(2)(mixed), reverse) <= 1e-5
    assert rel(hd.forward()(mixed), reverse) <= 1e-2
    assert rel(reverse, hd.reverse()(plain)) <= 0.1


def test_problem_to_moves_everything_and_keeps_the_original():
    base = PROBLEMS[True]
    moved = base.to("cpu", torch.float32)
    assert base.dtype == torch.float64 and moved.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in moved.buffers.values())
    assert moved.val_data[0][0].dtype == torch.float32
    assert isinstance(moved.train_data, OnDevice)
    assert unwrap(moved.train_data) is unwrap(base.train_data)
    assert moved.train_data.batch(0, 0)[0].dtype == torch.float32
    assert moved.train_data.per_epoch == unwrap(base.train_data).per_epoch  # delegated
    again = to_device(moved, torch.device("cpu"))  # no wrapper on a wrapper
    assert isinstance(again.train_data, OnDevice) and not isinstance(
        again.train_data.source, OnDevice)
    # a .to without dtype keeps the earlier cast of the training batches, as of the params
    assert again.dtype == torch.float32 and again.train_data.batch(0, 0)[0].dtype == torch.float32
    labels = move({"y": torch.arange(3), "x": torch.zeros(3), "n": 4}, "cpu", torch.float16)
    assert labels["y"].dtype == torch.long and labels["x"].dtype == torch.float16
    assert labels["n"] == 4
    raw = moved.raw_tensors()
    assert all(v.dtype == torch.float32 for v in raw.values())


def test_float64_copy_casts_every_batch_and_keeps_the_source_visible():
    from hyperdiff.engine.precision import in_float64
    from hyperdiff.methods.implicit import epoch_batches

    low = PROBLEMS[True].to("cpu", torch.float32)
    copy = in_float64(low)
    assert copy.dtype == torch.float64 and low.dtype == torch.float32
    assert all(b.dtype == torch.float64 for b in copy.buffers.values())
    assert copy.val_data[0][0].dtype == torch.float64
    x = copy.train_data.batch(1, 0)[0]
    assert x.dtype == torch.float64 and torch.equal(x, low.train_data.batch(1, 0)[0].double())
    # the implicit method's L_train averages the source's epoch through the wrappers
    assert unwrap(copy.train_data) is unwrap(low.train_data)
    assert epoch_batches(copy) == epoch_batches(low) > 1


def test_problem_to_refuses_bad_devices_and_dtypes():
    with pytest.raises(hd.HyperdiffError, match="dtype must be a floating-point"):
        PROBLEMS[False].to("cpu", torch.int64)
    with pytest.raises(hd.HyperdiffError, match="device must be"):
        resolve_device("gpu7")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(hd.HyperdiffError, match="'cuda:1', which is not available"):
            PROBLEMS[False].to("cuda:1")


def test_params_on_two_devices_are_refused():
    loss = lambda p, h, b: (p["a"] ** 2).sum() * h["c"]  # noqa: E731
    params = {"a": torch.zeros(2), "b": torch.zeros(2, device="meta")}
    with pytest.raises(hd.HyperdiffError, match="must live on one device"):
        hd.make_problem(loss, loss, hd.HyperParameters(c=hd.scalar(1.0)), params,
                        optimizer=hd.sgd(0.1), train_data=torch.zeros(1),
                        val_data=torch.zeros(1), steps=1)


SMALL_RUN = ["--task", "ridge_diabetes", "--set", "inner.steps=5", "--set", "stop.max_steps=1",
             "--set", "report.seeds=1", "--quiet"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("command", ["run", "compare", "check"])
def test_cli_device_that_is_not_there_is_a_clear_error(command, tmp_path, capsys):
    from hyperdiff.app.cli import main

    args = ["ridge_diabetes"] if command == "check" else [*SMALL_RUN, "--out", str(tmp_path)]
    assert main([command, *args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "must be a device this machine has (got 'cuda'" in err
    assert "run.device" in err or "--device" in err


def test_config_run_device_places_the_task_problems():
    from hyperdiff.app.cli.common import config_overrides
    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import build

    args = types.SimpleNamespace(overrides=["inner.steps=5"], task="ridge_diabetes",
                                 device="auto")
    config = load_config(overrides=config_overrides(args))
    assert config.run.device == "auto" and 'device = "auto"' in config.to_toml()
    _, driver = build(config)
    expected = resolve_device("auto")
    assert all(p.device.type == expected.type for p in driver.problems)
    assert load_config().run.device == "cpu"  # the default
    with pytest.raises(hd.HyperdiffError, match="run.device must be"):
        build(load_config(overrides=["run.device=tpu9"]))


def test_task_moved_to_float32_evaluates_like_float64():
    from hyperdiff.app.tasks import build_task
    from hyperdiff.engine.device import task_to_device

    task = build_task("logistic_cancer", steps=10)
    moved = task_to_device(task, "cpu", torch.float32)
    assert task_to_device(task, "cpu") is task  # nothing to move
    assert moved.final_problem.dtype == torch.float32
    assert all(batch[0].dtype == torch.float32
               for batches in moved.splits.values() for batch in batches)
    a, b = task.evaluate(), moved.evaluate()
    for split in a:  # float32 training of a well-conditioned linear model
        assert abs(a[split]["loss"] - b[split]["loss"]) <= 1e-4 * abs(a[split]["loss"])
