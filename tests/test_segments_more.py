"""Issue 19 item 2: segments of training for ``checkpointed``, ``reversible`` and
``finite_difference``.

References, all float64: a hand-written unroll of the same K steps from the same mid-training
state (heavy-ball SGD and Adam written out, their gradients by ``torch.autograd.grad`` with
``create_graph``), differentiated by ``torch.autograd`` for the hypergradient; and the online
run with ``reverse``, window by window.
"""

from __future__ import annotations

import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.engine.training import TrainState, initial_state, unroll
from hyperdiff.tuner.driver import HyperOptimizer

from conftest import sine_data

DT = torch.float64
START, STOP = 5, 12  # the segment: K = 7 steps from a state trained for 5
BETAS, ADAM_EPS = (0.9, 0.99), 1e-8
pytestmark = pytest.mark.filterwarnings("ignore::hyperdiff.methods.CostWarning")


def predict(p, h, x):
    """A tanh network whose output is scaled by the hyperparameter ``scale``, which so enters
    the validation loss directly (the segments' direct term)."""
    return h["scale"] * (torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"])


def val_loss(p, h, batch):
    x, y = batch
    return ((predict(p, h, x) - y) ** 2).mean()


def train_loss(p, h, batch):
    return val_loss(p, h, batch) + h["wd"] * sum((v**2).sum() for v in p.values())


def make(optimizer: str, free: bool = True) -> hd.Problem:
    """Minibatch training of the network; free hyperparameters (raw = natural), so that the
    hand-written unroll differentiates the same values that the methods' raw gradients are of
    (``free=False``: positive ones, the momentum in (0, 1))."""
    g = torch.Generator().manual_seed(0)
    params = {"W1": torch.randn(5, 4, generator=g, dtype=DT) * 0.5,
              "b1": torch.zeros(4, dtype=DT),
              "W2": torch.randn(4, 1, generator=g, dtype=DT) * 0.5}
    values = {"lr": 0.2, "wd": 1e-2, "scale": 1.1} | ({"momentum": 0.7} if optimizer == "sgd"
                                                       else {"lr": 0.02})
    hp = hd.HyperParameters(**{n: hd.scalar(v, "free" if free else (0.0, 1.0) if n == "momentum"
                                            else None) for n, v in values.items()})
    opt = hd.sgd("lr", "momentum") if optimizer == "sgd" else hd.adam("lr", BETAS, ADAM_EPS)
    x, y = sine_data(24, 5, seed=1)
    return hd.make_problem(train_loss, val_loss, hp, params, optimizer=opt,
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=[sine_data(16, 5, seed=2)], steps=STOP, probe=False)


def mid_training(problem: hd.Problem) -> TrainState:
    """The state after ``START`` steps of the problem's own (plain) training."""
    hview = problem.hparams.view(problem.raw_tensors(None))
    with torch.no_grad():
        state = initial_state(problem, hview, differentiable=False)
    return unroll(problem, hview, state, stop=START, differentiable=False)[0]


def by_hand(problem: hd.Problem, state: TrainState, u: dict[str, torch.Tensor]):
    """Steps ``START .. STOP-1`` written out from ``state`` at the hyperparameters ``u``:
    ``(params, optimizer slots, validation loss)``, differentiable in ``u``."""
    theta = {k: v.detach().clone().requires_grad_() for k, v in state.params.items()}
    slots = [{k: v.detach().clone() for k, v in part.items()} for part in state.opt_state]
    for t in range(START, STOP):
        batch = problem.train_data.batch(t, problem.seed)
        grads = torch.autograd.grad(train_loss(theta, u, batch), list(theta.values()),
                                    create_graph=True)
        for (k, p), g in zip(list(theta.items()), grads, strict=True):
            if "momentum" in u:  # heavy ball, v_t = mu v_{t-1} + g_t, theta -= lr v_t
                slots[0][k] = u["momentum"] * slots[0][k] + g
                theta[k] = p - u["lr"] * slots[0][k]
            else:  # Adam with bias corrections at step t + 1
                m = BETAS[0] * slots[0][k] + (1 - BETAS[0]) * g
                v = BETAS[1] * slots[1][k] + (1 - BETAS[1]) * g * g
                slots[0][k], slots[1][k], n = m, v, t + 1
                denom = v.sqrt() / math.sqrt(1 - BETAS[1] ** n) + ADAM_EPS
                theta[k] = p - u["lr"] / (1 - BETAS[0] ** n) * m / denom
    return theta, slots, val_loss(theta, u, problem.val_data[0])


def reference(problem: hd.Problem, state: TrainState):
    """The hand-written unroll's end state, validation loss and ``dL/du`` by autograd."""
    u = {n: v.detach().clone().requires_grad_() for n, v in problem.hparams.raw.items()}
    assert all(torch.equal(problem.hparams.natural(u)[n], u[n]) for n in u)  # raw = natural
    theta, slots, value = by_hand(problem, state, u)
    grad = dict(zip(u, torch.autograd.grad(value, list(u.values())), strict=True))
    return theta, slots, float(value.detach()), grad


def largest_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[k] - want[k].detach()).abs().max()) for k in want)


CASES = [  # (method, inner optimizer, hypergradient tolerance relative to max(1, |g|))
    (hd.checkpointed(), "sgd", 1e-10),
    (hd.checkpointed(), "adam", 1e-10),
    (hd.checkpointed(segments=7), "sgd", 1e-10),  # one step per sub-segment
    (hd.checkpointed(segments=1), "adam", 1e-10),
    (hd.reversible(), "sgd", 1e-10),
    (hd.finite_difference(), "sgd", 1e-6),  # the truncation error of central differences
    (hd.finite_difference(), "adam", 1e-6),
]


@pytest.mark.parametrize("method, optimizer, tol", CASES,
                         ids=[f"{m!r}-{o}" for m, o, _ in CASES])
def test_a_segment_from_a_mid_training_state_is_the_hand_written_unroll(method, optimizer, tol):
    """The state at stop (parameters and optimizer slots) within 1e-12 of the loop written out;
    the hypergradient (direct term of ``scale`` included) that of autograd through it."""
    problem = make(optimizer)
    state = mid_training(problem)
    before = [v.clone() for v in state.params.values()]
    raw = problem.raw_tensors(None)
    segment = method.segment(problem, state, raw, START, STOP, problem.val_data)
    theta, slots, value, grad = reference(problem, state)
    assert largest_difference(segment.state.params, theta) <= 1e-12
    for got, want in zip(segment.state.opt_state, slots, strict=True):
        assert largest_difference(got, want) <= 1e-12
    assert segment.value == pytest.approx(value, rel=1e-12)
    for name, g in grad.items():
        assert abs(float(segment.grad[name]) - float(g)) <= tol * max(1.0, abs(float(g))), name
    assert segment.train_losses.shape == (STOP - START,) and segment.carry is None
    assert all(torch.equal(a, b) for a, b in zip(before, state.params.values(), strict=True))


def test_the_reversible_segment_reverses_to_its_start_and_refuses_what_it_cannot_reverse():
    """Its backward pass retraces the window exactly (else it raises); its integer training
    rounds only to 2^-R; and Adam, which has no exact inverse, is refused by name."""
    problem = make("sgd")
    state = mid_training(problem)
    raw = problem.raw_tensors(None)
    coarse = hd.reversible(fraction_bits=24).segment(problem, state, raw, START, STOP,
                                                     problem.val_data)
    theta, _, _, grad = reference(problem, state)
    assert 1e-12 < largest_difference(coarse.state.params, theta) < 1e-5  # the 2^-24 grid
    assert float(coarse.grad["lr"]) == pytest.approx(float(grad["lr"]), rel=1e-4)
    adam = make("adam")
    with pytest.raises(hd.HyperdiffError, match=r"^reversible: the optimizer must be hd.sgd "
                                                r"with momentum \(got adam\)"):
        hd.reversible().segment(adam, mid_training(adam), adam.raw_tensors(None), START, STOP,
                                adam.val_data)


def test_a_finite_difference_segment_refuses_partial_coordinates():
    problem = make("sgd")
    with pytest.raises(hd.HyperdiffError, match=r"^finite_difference: coordinates must be None "
                                                r"\(all\) for a segment of training, .* "
                                                r"\(got \[0\]\)"):
        hd.finite_difference(coordinates=[0]).segment(
            problem, mid_training(problem), problem.raw_tensors(None), START, STOP,
            problem.val_data)


# --- online runs: window by window, the hypergradients of the online run with reverse
def online_run(method: hd.methods.Method) -> list:
    opt = HyperOptimizer(make("sgd", free=False), plan=hd.plans.OnlinePlan(window=3, val_batch_size=8),
                         method=method, lr=0.05, schedule="constant")
    return list(opt.run().history)


@pytest.fixture(scope="module")
def reverse_run() -> list:
    return online_run(hd.reverse())


@pytest.mark.parametrize("method, rel", [(hd.checkpointed(), 1e-10), (hd.reversible(), 1e-10),
                                         (hd.finite_difference(), 1e-6)],
                         ids=["checkpointed", "reversible", "finite_difference"])
def test_an_online_run_gives_the_window_hypergradients_of_reverse(method, rel, reverse_run):
    records = online_run(method)
    assert len(records) == len(reverse_run) == 4
    for j, (got, want) in enumerate(zip(records, reverse_run, strict=True)):
        assert got.val_loss == pytest.approx(want.val_loss, rel=1e-12), j
        for name, g in want.grad.items():
            assert abs(got.grad[name] - g) <= rel * max(1.0, abs(g)), (j, name)


# --- the CLI: the capabilities decide, no list of names
CLI = ["task.name=mlp_digits", "outer.mode=online", "inner.steps=20", "outer.window=5"]


@pytest.mark.parametrize("name, option", [("checkpointed", "segments=2"),
                                          ("reversible", "fraction_bits=40"),
                                          ("finite_difference", "eps=0.0001")])
def test_the_online_cli_builds_each_method_with_the_options_its_segment_reads(name, option):
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    _, loop = build_online(load_config(overrides=[*CLI, f"method.name={name}",
                                                  f"method.{option}"]))
    key, value = option.split("=")
    assert loop.method.name == name and loop.method.segment_fn is not None
    assert str(loop.method.options[key]) == value


def test_the_online_cli_refuses_finite_difference_coordinates():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    with pytest.raises(hd.HyperdiffError, match=r"^config: method.coordinates is not used by "
                                                r"online finite_difference; it accepts "
                                                r"\['eps', 'warn'\]"):
        build_online(load_config(overrides=[*CLI, "method.name=finite_difference",
                                            "method.coordinates=[0]"]))
