"""theta_0 as a hyperparameter (``hd.initialization``): MAML's meta-gradient by every exact method.

Oracles, all float64: a hand-written unroll (plain autograd over an explicitly written SGD
loop, not hyperdiff's training code) for reverse, forward, checkpointed and reversible mode,
with per-element learning rates (Meta-SGD) tuned together; central finite differences of a
proximal inner problem solved to convergence by a hand-written gradient descent for implicit
differentiation (iMAML).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.engine.training import initial_state
from hyperdiff.hparams.initialization import initial_values, proximal
from hyperdiff.tuner.driver_checks import check_warm_start

D = torch.float64
STEPS = 6


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": 0.7 * torch.randn(4, 2, generator=g, dtype=D),
            "b1": 0.1 * torch.randn(4, generator=g, dtype=D),
            "w2": 0.7 * torch.randn(1, 4, generator=g, dtype=D),
            "b2": torch.zeros(1, dtype=D)}


def _mlp(p, x):
    return (torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]).squeeze(-1)


def _task(seed: int):
    """A sinusoid regression task: support (train) and query (validation) sets."""
    g = torch.Generator().manual_seed(seed)
    amplitude, phase = 1.0 + torch.rand((), generator=g, dtype=D), torch.rand((), generator=g,
                                                                              dtype=D)
    xs, xq = 4 * torch.rand(10, 2, generator=g, dtype=D) - 2, 4 * torch.rand(
        12, 2, generator=g, dtype=D) - 2
    return ((xs, amplitude * torch.sin(xs[:, 0] - phase)),
            (xq, amplitude * torch.sin(xq[:, 0] - phase)))


def _mse(p, h, batch):
    return ((_mlp(p, batch[0]) - batch[1]) ** 2).mean()


LR = torch.tensor([0.3, 0.2, 0.25, 0.15], dtype=D)  # Meta-SGD: per tensor, spread per element


def _lr_values(params):
    """Per-element learning rates: the tensor's base value times 1 + 0.1 * (element index)."""
    return {n: LR[i] * (1 + 0.1 * torch.arange(p.numel(), dtype=D).reshape(p.shape) / p.numel())
            for i, (n, p) in enumerate(params.items())}


def _problem(params, momentum: float = 0.0, order=None):
    support, query = _task(1)
    lrs = _lr_values(params)
    start = params if order is None else {n: params[n] for n in order}
    hp = hd.HyperParameters(theta0=hd.initialization(start),
                            lr=hd.per_element(params, 0.1))
    hp = hp.with_natural(lr=torch.cat([lrs[n].reshape(-1) for n in params]))
    return hd.make_problem(_mse, _mse, hp, params, optimizer=hd.sgd("lr", momentum=momentum),
                           train_data=support, val_data=query, steps=STEPS)


def _hand_written(params, momentum: float = 0.0):
    """``dL_val/dtheta_0`` and ``dL_val/dlr`` of an explicitly written (heavy-ball) SGD loop."""
    support, query = _task(1)
    theta0 = {n: p.clone().requires_grad_() for n, p in params.items()}
    lrs = {n: v.clone().requires_grad_() for n, v in _lr_values(params).items()}
    theta, velocity = dict(theta0), None
    for _ in range(STEPS):
        loss = ((_mlp(theta, support[0]) - support[1]) ** 2).mean()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()),
                                                    create_graph=True), strict=True))
        velocity = grads if velocity is None else {
            n: momentum * velocity[n] + grads[n] for n in theta}
        theta = {n: theta[n] - lrs[n] * velocity[n] for n in theta}
    value = ((_mlp(theta, query[0]) - query[1]) ** 2).mean()
    g0 = torch.autograd.grad(value, list(theta0.values()), retain_graph=True)
    glr = torch.autograd.grad(value, list(lrs.values()))
    return torch.cat([g.reshape(-1) for g in g0]), torch.cat([g.reshape(-1) for g in glr])


METHODS = {"reverse": hd.reverse, "forward": hd.forward,
           "forward_jvp": lambda: hd.forward(engine="jvp"),
           "checkpointed": hd.checkpointed, "checkpointed_4": lambda: hd.checkpointed(4)}


@pytest.mark.parametrize("name", list(METHODS))
def test_meta_gradient_equals_a_hand_written_unroll(name):
    params = _params()
    hg = METHODS[name]()(_problem(params))
    theta0, lr = _hand_written(params)
    assert float(theta0.abs().max()) > 1e-3  # the oracle is not trivially zero
    torch.testing.assert_close(hg.grad["theta0"], theta0, rtol=0, atol=1e-10)
    torch.testing.assert_close(hg.grad_natural["lr"], lr, rtol=0, atol=1e-10)


def test_reversible_meta_gradient_equals_a_hand_written_heavy_ball_unroll():
    params = _params(2)
    hg = hd.reversible()(_problem(params, momentum=0.9))
    theta0, lr = _hand_written(params, momentum=0.9)
    # reversible runs theta and v on a 2^-44 grid: the training it differentiates is rounded
    torch.testing.assert_close(hg.grad["theta0"], theta0, rtol=0, atol=1e-9)
    torch.testing.assert_close(hg.grad_natural["lr"], lr, rtol=0, atol=1e-9)
    assert hg.diagnostics["info_bytes"] >= 0


def _batchnorm_problem():
    """A BatchNorm MLP (buffers start as the problem's) trained by Adam on minibatches (eps 0.01:
    with the default 1e-8 the first steps are nearly sign(g), whose curvature where g is small
    leaves central differences no accurate step size)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1)).to(D)
    net = hd.functional(module)
    (xs, ys), query = _task(5)

    def loss(p, h, batch, ctx):
        return ((net(p, batch[0], ctx).squeeze(-1) - batch[1]) ** 2).mean()

    hp = hd.HyperParameters(theta0=hd.initialization(net.params), lr=hd.scalar(0.05))
    return hd.make_problem(loss, loss, hp, net, optimizer=hd.adam("lr", eps=0.01),
                           train_data=hd.minibatches(xs, ys, batch_size=5), val_data=query,
                           steps=4)


@pytest.mark.filterwarnings("ignore::hyperdiff.methods.finite_difference.CostWarning")
@pytest.mark.parametrize("name", ["reverse", "forward", "checkpointed"])
def test_meta_gradient_with_batchnorm_adam_and_minibatches_equals_finite_differences(name):
    problem = _batchnorm_problem()
    reference = hd.finite_difference(1e-6)(problem)
    hg = METHODS[name]()(problem)
    assert float(reference.grad["theta0"].abs().max()) > 1e-2
    for key in ("theta0", "lr"):
        torch.testing.assert_close(hg.grad[key], reference.grad[key], rtol=0, atol=1e-8)


def test_the_initialization_is_looked_up_by_name_whatever_its_order():
    params = _params()
    reordered = _problem(params, order=["b2", "w1", "w2", "b1"])
    hg = hd.reverse()(reordered)
    theta0, _ = _hand_written(params)
    by_name = initial_values(hg.hparams.with_raw(hg.grad))  # the gradient, split by name
    sizes = [p.numel() for p in params.values()]
    for (n, _), expected in zip(params.items(), theta0.split(sizes), strict=True):
        torch.testing.assert_close(by_name[n].reshape(-1), expected, rtol=0, atol=1e-10)


def test_training_starts_from_the_hyperparameter_not_the_problem_params():
    params = _params()
    problem = _problem(params)
    moved = {n: p + 0.3 for n, p in params.items()}
    raw = problem.hparams.raw
    raw["theta0"] = torch.cat([moved[n].reshape(-1) for n in params])
    hg = hd.reverse()(problem, raw)
    again = hd.reverse()(_problem(moved))  # the same training with the model's params moved
    assert hg.value == again.value
    torch.testing.assert_close(hg.grad["theta0"], again.grad["theta0"], rtol=0, atol=0)


# ------------------------------------------------------------------ implicit (iMAML)
LAM = 2.0  # proximal strength: the inner problem is strongly convex near theta_0


def _proximal_train(p, h, batch):
    return _mse(p, h, batch) + proximal(p, h, "theta0", LAM)


def _proximal_problem(params, steps: int = 400):
    support, query = _task(3)
    hp = hd.HyperParameters(theta0=hd.initialization(params))
    return hd.make_problem(_proximal_train, _mse, hp, params, optimizer=hd.sgd(0.2),
                           train_data=support, val_data=query, steps=steps)


def _solve(theta0: torch.Tensor, shapes, support, iterations: int = 1500) -> dict:
    """A converged minimiser of ``mse + LAM/2 ||theta - theta0||^2``, by plain gradient
    descent written out here."""
    sizes = [int(torch.Size(s).numel()) for s in shapes.values()]
    centre = {n: v.reshape(s) for (n, s), v in zip(shapes.items(), theta0.split(sizes),
                                                   strict=True)}
    theta = {n: v.clone() for n, v in centre.items()}
    for _ in range(iterations):
        leaves = {n: v.detach().requires_grad_() for n, v in theta.items()}
        loss = ((_mlp(leaves, support[0]) - support[1]) ** 2).mean() + LAM / 2 * sum(
            ((leaves[n] - centre[n]) ** 2).sum() for n in leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        theta = {n: v.detach() - 0.2 * g for (n, v), g in zip(leaves.items(), grads,
                                                               strict=True)}
    return theta


def test_implicit_meta_gradient_with_a_proximal_term_equals_finite_differences():
    params = _params(4)
    support, query = _task(3)
    hg = hd.implicit(hd.solvers.exact())(_proximal_problem(params))
    assert hg.diagnostics["stationary"]
    shapes = {n: p.shape for n, p in params.items()}
    u = torch.cat([p.reshape(-1) for p in params.values()])
    eps = 1e-5
    reference = torch.empty_like(u)
    for i in range(u.numel()):
        values = []
        for sign in (1, -1):
            shifted = u.clone()
            shifted[i] += sign * eps
            theta = _solve(shifted, shapes, support)
            values.append(float(((_mlp(theta, query[0]) - query[1]) ** 2).mean()))
        reference[i] = (values[0] - values[1]) / (2 * eps)
    assert float(reference.abs().max()) > 1e-2
    torch.testing.assert_close(hg.grad["theta0"], reference, rtol=0, atol=1e-6)


def test_implicit_refuses_an_initialization_the_train_loss_does_not_read():
    params = _params()
    support, query = _task(3)
    problem = hd.make_problem(_mse, _mse, hd.HyperParameters(theta0=hd.initialization(params)),
                              params, optimizer=hd.sgd(0.2), train_data=support,
                              val_data=query, steps=3)
    with pytest.raises(hd.HyperdiffError, match=r"^implicit: the initialization 'theta0' must "
                       r"be read by train_loss \(got a train_loss that does not read it, .*\); "
                       r"add iMAML's proximal term .* or use reverse\(\), forward\(\) or "
                       r"checkpointed\(\)"):
        hd.implicit()(problem)


def test_truncated_refuses_to_leave_out_the_steps_that_theta0_acts_through():
    problem = _problem(_params())
    with pytest.raises(hd.HyperdiffError, match=rf"^truncated: k must be at least the {STEPS} "
                       r"inner steps for a problem whose initialization 'theta0' is a "
                       r"hyperparameter \(got k=2\)"):
        hd.truncated(2)(problem)
    whole = hd.truncated(STEPS)(problem)  # k = T is reverse mode
    torch.testing.assert_close(whole.grad["theta0"], _hand_written(_params())[0], rtol=0,
                               atol=1e-10)


# ------------------------------------------------------------------ outer loop and export
def test_online_segments_refuse_an_initialization():
    problem = _problem(_params())
    state = initial_state(problem, differentiable=False)
    with pytest.raises(hd.HyperdiffError, match=r"^reverse: an online segment must train a "
                       r"problem without an initialization hyperparameter \(got 'theta0'\)"):
        hd.reverse().segment(problem, state, problem.raw_tensors(), 0, 2, problem.val_data)


def test_warm_start_and_an_initialization_are_refused_together():
    problem = _problem(_params())
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: warm_start must be false "
                       r"for a problem whose initialization is a hyperparameter \(got true "
                       r"with the initialization 'theta0'\)"):
        check_warm_start([problem], True)
    check_warm_start([problem], False)
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: warm_start must be false"):
        hd.HyperOptimizer(problem, warm_start=True)  # the loop calls the check


def test_raw_values_round_trip_through_a_checkpoint():
    problem = _problem(_params())
    tuner = hd.HyperOptimizer(problem, lr=0.01, selection=problem.val_data,
                              stopping=hd.Stopping(max_steps=3))
    tuner.step()
    tuner.step()
    buffer = io.BytesIO()
    torch.save(tuner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    resumed = hd.HyperOptimizer(problem, lr=0.01, selection=problem.val_data,
                                stopping=hd.Stopping(max_steps=3))
    resumed.load_state_dict(state, list(tuner.history))
    assert not torch.equal(tuner.raw["theta0"], problem.hparams.raw["theta0"])  # it moved
    for name in ("theta0", "lr"):
        assert torch.equal(resumed.raw[name], tuner.raw[name])
    resumed.step()
    tuner.step()  # the resumed run goes on exactly as the one it was saved from
    assert torch.equal(resumed.raw["theta0"], tuner.raw["theta0"])


def test_the_learned_initialization_loads_into_the_module():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    net = hd.functional(model)
    hp = hd.HyperParameters(theta0=hd.initialization(net.params))
    learned = {n: torch.full_like(p, 0.5 + i) for i, (n, p) in enumerate(net.params.items())}
    tuned = hp.with_raw({"theta0": torch.cat([v.reshape(-1) for v in learned.values()])})
    hd.load_into(model, tuned)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), learned[name])
    with pytest.raises(hd.HyperdiffError, match=r"^load_into: params must be a dict name -> "
                       r"tensor, or tuned hyperparameters that hold an initialization"):
        hd.load_into(model, hd.HyperParameters(lr=hd.scalar(0.1)))


# ------------------------------------------------------------------ invalid input
@pytest.mark.parametrize("params", [None, {}, torch.zeros(3), {"w": [1.0]},
                                    {"w": torch.zeros(2, dtype=torch.long)},
                                    {"w": torch.tensor([float("nan")])}, {3: torch.zeros(2)}],
                         ids=repr)
def test_initialization_refuses_what_is_not_a_dict_of_float_tensors(params):
    with pytest.raises(hd.HyperdiffError, match=r"^initialization: params.* must be .*\(got "):
        hd.initialization(params)


def _make(hp, params, optimizer=None):
    support, query = _task(1)
    return hd.make_problem(_mse, _mse, hp, params, optimizer=optimizer or hd.sgd(0.1),
                           train_data=support, val_data=query, steps=2)


@pytest.mark.parametrize(("start", "said"), [
    ({**_params(), "w1": torch.zeros(2, 4, dtype=D)},
     r"must have the shapes and dtypes of the trained parameters \{'w1': '\(4, 2\) float64'\} "
     r"\(got \{'w1': '\(2, 4\) float64'\}\)"),
    ({n: p.float() for n, p in _params().items()},
     r"must have the shapes and dtypes of the trained parameters \{'w1': '\(4, 2\) float64'"),
    ({"w1": torch.zeros(4, 2, dtype=D)},
     r"must be defined over the trained parameters \['w1', 'b1', 'w2', 'b2'\] \(got \['w1'\]\)"),
])
def test_make_problem_refuses_an_initialization_unlike_the_model(start, said):
    with pytest.raises(hd.HyperdiffError, match=r"^hypergradient: initialization 'theta0' "
                       + said):
        _make(hd.HyperParameters(theta0=hd.initialization(start)), _params())


def test_make_problem_refuses_two_initializations_and_an_initialization_as_coefficient():
    params = _params()
    two = hd.HyperParameters(a=hd.initialization(params), b=hd.initialization(params))
    with pytest.raises(hd.HyperdiffError, match=r"^hypergradient: hparams must hold at most "
                       r"one initialization.*\(got 2: \['a', 'b'\]\)"):
        _make(two, params)
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: optimizer coefficient "
                       r"lr='a' must be a scalar, per_step, per_tensor or per_element "
                       r"hyperparameter \(got initialization\)"):
        _make(hd.HyperParameters(a=hd.initialization(params)), params, hd.sgd("a"))


def test_the_probe_sees_the_initialization_reach_the_losses(recwarn):
    _problem(_params())
    assert not [w for w in recwarn if "never reaches" in str(w.message)]
