"""Export to torch: torch.optim + TunedSchedule train as hd.testing.train does; resample; load_into."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hyperdiff as hd

STEPS = 12


def make_module(batch_norm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(3, 5)]
    if batch_norm:
        layers.append(torch.nn.BatchNorm1d(5))
    layers += [torch.nn.Tanh(), torch.nn.Linear(5, 2)]
    return torch.nn.Sequential(*layers).double()


def make_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.sin(x[:, :2]) + 0.1 * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def problem_for(module: torch.nn.Module, optimizer: hd.optimizers.Optimizer, hparams: hd.HyperParameters,
                *, batch_size: int = 8) -> tuple[hd.Problem, hd.FunctionalModel]:
    net = hd.functional(module)
    x, y = make_data()

    def loss(params, h, batch, ctx):
        xb, yb = batch
        return F.mse_loss(net(params, xb, ctx), yb)

    problem = hd.make_problem(loss, loss, hparams, net.params, buffers=net.buffers,
                              optimizer=optimizer, train_data=hd.minibatches(x, y, batch_size=8),
                              val_data=(x, y), steps=STEPS, probe=False)
    return problem, net


def train_with_torch(module, problem, torch_opt, scheduler, steps=STEPS):
    module.train()
    for step in range(steps):
        xb, yb = problem.train_data.batch(step, problem.seed)
        torch_opt.zero_grad()
        F.mse_loss(module(xb), yb).backward()
        torch_opt.step()
        scheduler.step()
    return {k: v.detach() for k, v in module.named_parameters()}


def schedule(steps: int = STEPS) -> torch.Tensor:
    return 0.05 + 0.04 * torch.cos(torch.linspace(0, 3, steps, dtype=torch.float64))


CASES = {
    "sgd_momentum": (lambda: hd.sgd("lr", "momentum", weight_decay="wd"),
                     lambda p: hd.HyperParameters(lr=hd.per_step(STEPS, schedule()),
                                                  momentum=hd.scalar(0.8, (0.0, 1.0)),
                                                  wd=hd.per_tensor(p, {n: 1e-3 * (i + 1) for i, n
                                                                       in enumerate(p)}))),
    "sgd_nesterov_dampening": (lambda: hd.sgd("lr", 0.9, nesterov=True, weight_decay="wd"),
                               lambda p: hd.HyperParameters(lr=hd.per_step(STEPS, schedule()),
                                                            wd=hd.per_tensor(p, 1e-2))),
    "sgd_dampening": (lambda: hd.sgd("lr", 0.7, dampening=0.3),
                      lambda p: hd.HyperParameters(lr=hd.per_step(STEPS, schedule()))),
    "adam": (lambda: hd.adam("lr", betas=("b1", 0.99), weight_decay="wd"),
             lambda p: hd.HyperParameters(lr=hd.per_step(STEPS, schedule() / 5),
                                          b1=hd.scalar(0.85, (0.0, 1.0)),
                                          wd=hd.per_tensor(p, 1e-2))),
    "sgd_warmup_cosine": (lambda: hd.sgd(hd.schedule("warmup_cosine", STEPS), 0.9),
                          lambda p: hd.HyperParameters(**hd.schedule(
                              "warmup_cosine", STEPS).hyperparameters(peak=0.1, warmup=0.2))),
    "adamw": (lambda: hd.adamw("lr", weight_decay="wd"),
              lambda p: hd.HyperParameters(lr=hd.per_step(STEPS, schedule() / 5),
                                           wd=hd.per_tensor(p, {n: 0.1 / (i + 1) for i, n
                                                                in enumerate(p)}))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_optimizer_trains_like_hd_train(case):
    make_opt, make_hp = CASES[case]
    module = make_module()
    net = hd.functional(module)
    problem, _ = problem_for(module, make_opt(), make_hp(net.params))
    state, _ = hd.testing.train(problem)
    torch_opt, scheduler = hd.torch_optimizer(problem.optimizer, problem.hparams, module)
    trained = train_with_torch(module, problem, torch_opt, scheduler)
    for name, value in state.params.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("optimizer", [hd.sgd(0.05, 0.9, nesterov=True, weight_decay=1e-3),
                                       hd.adam(1e-2, weight_decay=1e-3), hd.adamw(1e-2)])
def test_constant_coefficients_match_bit_for_bit(optimizer):
    module = make_module()
    hparams = hd.HyperParameters(unused=hd.scalar(1.0))  # every coefficient is a number
    problem, _ = problem_for(module, optimizer, hparams)
    state, _ = hd.testing.train(problem)
    torch_opt, scheduler = hd.torch_optimizer(optimizer, hparams, module)
    trained = train_with_torch(module, problem, torch_opt, scheduler)
    assert all(torch.equal(trained[n], v) for n, v in state.params.items())


def test_per_tensor_values_become_param_groups():
    module = make_module()
    params = hd.functional(module).params
    wd = {n: 1e-3 * (i + 1) for i, n in enumerate(params)}
    hparams = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.per_tensor(params, wd))
    torch_opt, _ = hd.torch_optimizer(hd.sgd("lr", weight_decay="wd"), hparams, module)
    named = dict(module.named_parameters())
    seen = {}
    for group in torch_opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in named.items() if q is p)
            seen[name] = group["weight_decay"]
    assert seen == pytest.approx(wd, rel=1e-12)


def test_resample_is_linear_interpolation_in_normalised_time():
    values = torch.tensor([0.3, 0.1, 0.7, 0.2, 0.25], dtype=torch.float64)
    for steps in (1, 2, 5, 9, 17, 3):
        got = hd.schedules.resample(values, steps).numpy()
        u = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
        want = np.interp(u, np.linspace(0.0, 1.0, 5), values.numpy())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


def test_stretched_schedule_follows_the_resampled_values():
    module = make_module()
    lr = schedule()
    hparams = hd.HyperParameters(lr=hd.per_step(STEPS, lr))
    torch_opt, scheduler = hd.torch_optimizer(hd.sgd("lr"), hparams, module, steps=2 * STEPS)
    seen = []
    for _ in range(2 * STEPS + 3):
        seen.append(torch_opt.param_groups[0]["lr"])
        torch_opt.step()
        scheduler.step()
    want = hd.schedules.resample(lr, 2 * STEPS).tolist()
    assert seen[: 2 * STEPS] == pytest.approx(want, rel=1e-14)
    assert seen[2 * STEPS :] == pytest.approx([want[-1]] * 3, rel=1e-14)  # held after the end


def test_load_into_reproduces_the_functional_eval_model():
    module = make_module(batch_norm=True)
    params = hd.functional(module).params
    problem, net = problem_for(module, hd.sgd(0.1, 0.9), hd.HyperParameters(
        wd=hd.per_tensor(params, 1e-3)))
    state, _ = hd.testing.train(problem)
    x, _ = make_data()
    ctx = hd.models.StepContext(step=-1, seed=0, train=False, buffers=state.buffers)
    want = net(state.params, x, ctx)
    hd.load_into(module, state.params, state.buffers).eval()
    torch.testing.assert_close(module(x), want, rtol=0, atol=1e-13)
    bn = module[1]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    assert not torch.equal(bn.running_mean, torch.zeros(5, dtype=torch.float64))


def test_tuned_hparams_from_result_file_and_run_directory(tmp_path):
    hparams = hd.HyperParameters(lr=hd.per_step(3, 0.1), wd=hd.scalar(1e-3))
    result = {"tuned": {"hparams": {"lr": [0.2, 0.1, 0.05], "wd": 1e-2}}}
    (tmp_path / "result.json").write_text(json.dumps(result))
    for source in (result, tmp_path, tmp_path / "result.json", str(tmp_path)):
        tuned = hd.tuned_hparams(hparams, source).natural()
        assert tuned["lr"].tolist() == pytest.approx([0.2, 0.1, 0.05], rel=1e-14)
        assert float(tuned["wd"]) == pytest.approx(1e-2, rel=1e-14)


@pytest.mark.parametrize("call, match", [
    (lambda m, p: hd.torch_optimizer(hd.sgd("lr"), hd.HyperParameters(
        lr=hd.per_element(p, 0.1)), m), "per_element"),
    (lambda m, p: hd.torch_optimizer(hd.sgd("lr"), {"lr": 0.1}, m), "hparams must be"),
    (lambda m, p: hd.torch_optimizer(hd.sgd(0.1), hd.HyperParameters(a=hd.scalar(1.0)), 3),
     "module_or_params"),
    (lambda m, p: hd.torch_optimizer(hd.sgd(0.1), hd.HyperParameters(a=hd.scalar(1.0)), m,
                                     steps=0), "steps"),
    (lambda m, p: hd.load_into(m, {"nope": torch.zeros(1)}), "unknown: \\['nope'\\]"),
    (lambda m, p: hd.load_into(m, {**p, "0.weight": torch.zeros(2, 2)}), "shape"),
    (lambda m, p: hd.tuned_hparams(hd.HyperParameters(a=hd.scalar(1.0)), {"x": 1}), "tuned"),
    (lambda m, p: hd.tuned_hparams(hd.HyperParameters(a=hd.scalar(1.0)), "/nonexistent/r"),
     "does not exist"),
    (lambda m, p: hd.schedules.resample(torch.zeros(2, 2), 3), "1-D"),
])
def test_bad_input_is_a_clear_error(call, match):
    module = make_module()
    with pytest.raises(hd.HyperdiffError, match=match):
        call(module, hd.functional(module).params)


def test_load_into_with_a_wrong_shape_leaves_the_module_unchanged():
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    new = {k: v + 1.0 for k, v in hd.functional(module).params.items()}
    new["2.bias"] = torch.zeros(3, dtype=torch.float64)  # the last one given: wrong shape
    with pytest.raises(hd.HyperdiffError, match="'2.bias' must have shape"):
        hd.load_into(module, new)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
