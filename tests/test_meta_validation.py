"""The meta plan's fixed validation tasks (``MetaPlan(validation_tasks=n)``,
``outer.meta_val_tasks``): every step's values are scored after adaptation on the same ``n``
tasks, and the best step, early stopping and the result use that loss, not the noisy loss of
the step's own batch.

The reference is written out here: the validation tasks drawn from ``sample`` with the
documented seeds ``task_seed(seed, j, "meta-validation")``, each adapted by an explicitly
written SGD loop from the step's theta_0, its query MSE averaged (float64).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_meta import mse, net  # the tanh MLP of the meta plan's tests

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.seeds import task_seed

D = torch.float64
LR, STEPS, BATCH, SEED, VALIDATION = 0.3, 3, 2, 4, 5


def sample(index: int, seed: int):
    """A regression task: y = a * tanh(x) + c, 4 support and 6 query points."""
    g = torch.Generator().manual_seed(seed)
    a, c = 2 * torch.randn(2, generator=g, dtype=D)
    xs, xq = torch.randn(4, 1, generator=g, dtype=D), torch.randn(6, 1, generator=g, dtype=D)
    return (xs, a * torch.tanh(xs) + c), (xq, a * torch.tanh(xq) + c)


def start_params():
    """A 1-4-1 tanh MLP."""
    g = torch.Generator().manual_seed(0)
    return {"w1": torch.randn(1, 4, generator=g, dtype=D), "b1": torch.zeros(4, dtype=D),
            "w2": torch.randn(4, 1, generator=g, dtype=D) * 0.5, "b2": torch.zeros(1, dtype=D)}


def meta_loop(validation_tasks: int, *, lr: float = 0.3, max_steps: int = 12,
              patience: int | None = None) -> hd.HyperOptimizer:
    params = start_params()
    support, query = sample(0, 1)
    problem = hd.make_problem(mse, mse, hd.HyperParameters(theta0=hd.initialization(params)),
                              params, optimizer=hd.sgd(LR), train_data=support,
                              val_data=query, steps=STEPS)
    plan = hd.plans.MetaPlan(sample, batch=BATCH, validation_tasks=validation_tasks)
    return hd.HyperOptimizer(problem, plan=plan, method="reverse", lr=lr, seed=SEED,
                             schedule="constant", optimizer="adam",
                             stopping=hd.Stopping(max_steps=max_steps, patience=patience))


def written_validation_loss(theta0: torch.Tensor) -> float:
    """The mean query MSE of the validation tasks after STEPS written-out SGD steps."""
    total = 0.0
    for j in range(VALIDATION):
        (xs, ys), (xq, yq) = sample(j, task_seed(SEED, j, "meta-validation"))
        theta, at = {}, 0
        for name, value in start_params().items():
            theta[name] = theta0[at:at + value.numel()].reshape(value.shape).clone()
            at += value.numel()
        for _ in range(STEPS):
            leaves = {k: v.requires_grad_() for k, v in theta.items()}
            grads = torch.autograd.grad(((net(leaves, xs) - ys) ** 2).mean(),
                                        list(leaves.values()))
            theta = {k: (v - LR * g).detach()
                     for (k, v), g in zip(leaves.items(), grads, strict=True)}
        total += float(((net(theta, xq) - yq) ** 2).mean())
    return total / VALIDATION


def run_stepwise(loop: hd.HyperOptimizer) -> list[torch.Tensor]:
    """Step ``loop`` to its end; the raw theta_0 of each step."""
    raws = []
    while not loop.done:
        raws.append(loop.raw["theta0"])
        loop.step()
    return raws


def test_the_best_step_is_the_argmin_of_the_fixed_validation_tasks_loss():
    # a large outer rate: the validation loss falls, then rises again
    loop = meta_loop(VALIDATION, lr=0.3)
    raws = run_stepwise(loop)
    result = loop.result()
    written = [written_validation_loss(raw) for raw in raws]
    recorded = [r.selection_loss for r in loop.history]
    assert max(abs(a - b) for a, b in zip(recorded, written, strict=True)) <= 1e-10
    best = min(range(len(written)), key=written.__getitem__)
    assert result.best_step == best
    assert torch.equal(result.best_raw["theta0"], raws[best])
    assert result.best_loss == pytest.approx(written[best], abs=1e-10)
    assert result.criterion == f"selection_loss of {VALIDATION} fixed validation tasks"
    running = [min(written[:s + 1]) for s in range(len(written))]
    assert [r.best for r in loop.history] == [
        written[s] == running[s] and (s == 0 or written[s] < running[s - 1])
        for s in range(len(written))]
    # the batch's own loss would have picked another step: the fix changes the choice
    batch = [r.val_loss for r in loop.history]
    assert min(range(len(batch)), key=batch.__getitem__) != best
    assert 0 < best < len(raws) - 1


def test_validation_tasks_are_the_same_every_step_and_not_the_batches():
    loop = meta_loop(VALIDATION, max_steps=2)
    drawn = [index for index, _ in loop.plan.validation_indices(loop)]
    seeds = [seed for _, seed in loop.plan.validation_indices(loop)]
    assert drawn == list(range(VALIDATION))
    assert seeds == [task_seed(SEED, j, "meta-validation") for j in range(VALIDATION)]
    trained = {loop.plan.task_indices(loop, s)[i][1] for s in range(50) for i in range(BATCH)}
    assert not trained & set(seeds)


def test_patience_stops_on_the_validation_tasks_loss():
    loop = meta_loop(VALIDATION, lr=0.3, max_steps=40, patience=3)
    raws = run_stepwise(loop)
    written = [written_validation_loss(raw) for raw in raws]
    best = min(range(len(written)), key=written.__getitem__)
    assert len(raws) == best + 4  # three steps without a better validation loss
    assert loop.stop_reason() == "early stopping: no better selection loss for 3 steps"


def test_without_validation_tasks_the_result_is_the_final_values():
    loop = meta_loop(0, max_steps=3)
    result = loop.run()
    # the values after the last step's update, which no step evaluated (s41: was labelled 2)
    assert result.criterion == "final values" and result.best_step == 3
    assert math.isnan(result.best_loss)
    assert all(r.selection_loss is None for r in loop.history)


def test_bad_validation_tasks_are_refused_with_our_message():
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: validation_tasks must be a "
                       r"non-negative int \(got -1\)"):
        hd.plans.MetaPlan(sample, batch=2, validation_tasks=-1)
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: selection must be None with "
                       r"validation_tasks"):
        hd.HyperOptimizer(meta_loop(0).problems[0], selection=sample(9, 9)[1],
                          plan=hd.plans.MetaPlan(sample, batch=2, validation_tasks=2))


def test_cli_meta_val_tasks_reports_the_best_step_of_the_validation_tasks(tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--task", "sinusoid_maml", "--out", str(out), "--quiet",
                 "--set", "outer.meta_val_tasks=3", "--set", "outer.meta_batch=2",
                 "--set", "stop.max_steps=4", "--set", "inner.steps=2",
                 "--set", "outer.meta_test_tasks=2", "--set", "report.seeds=1",
                 "--set", "outer.lr=0.05"])
    assert code == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [r["selection_loss"] for r in history]
    assert all(isinstance(v, float) for v in losses)
    result = json.loads((out / "result.json").read_text())
    assert result["best_step"] == min(range(len(losses)), key=losses.__getitem__)
    assert result["criterion"] == "selection_loss of 3 fixed validation tasks"
