"""A batch of same-shaped tasks trained as one vmapped computation (engine/task_batch.py).

``method.batch(problems, raw)`` must give each task the hypergradient that the method gives it
alone (the per-task loop, float64, <= 1e-12), which the meta tests check against a hand-written
MAML unroll; here also for Meta-SGD's learning rates (against central finite differences),
for optimizers with state (momentum, Adam), for a problem without an initialization, and on
two ranks that split the batch. Tasks that cannot be stacked, and losses that vmap refuses,
take the per-task loop.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.engine.data import minibatches
from hyperdiff.engine.task_batch import stack_tasks
from hyperdiff.engine.task_distribution import task_distribution
from hyperdiff.seeds import meta_task
from hyperdiff.tuner.distributed.group import Group

D = torch.float64
STEPS, LR = 3, 0.2


def sample(index, seed):
    """y = a sin(x) + c: 7 support and 5 query points."""
    g = torch.Generator().manual_seed(seed)
    a, c = torch.randn(2, generator=g, dtype=D)
    xs, xq = torch.randn(7, 1, generator=g, dtype=D), torch.randn(5, 1, generator=g, dtype=D)
    return (xs, a * torch.sin(xs) + c), (xq, a * torch.sin(xq) + c)


def start_params():
    g = torch.Generator().manual_seed(1)
    return {"w1": torch.randn(1, 4, generator=g, dtype=D), "b1": torch.zeros(4, dtype=D),
            "w2": torch.randn(4, 1, generator=g, dtype=D) * 0.5, "b2": torch.zeros(1, dtype=D)}


def net(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mse(p, h, batch):
    return ((net(p, batch[0]) - batch[1]) ** 2).mean()


def template(*, meta_sgd=False, optimizer=None, train_loss=mse, initialization=True):
    params = start_params()
    specs = {"theta0": hd.initialization(params)} if initialization else {}
    if meta_sgd:
        specs["lr"] = hd.per_tensor(params, LR, "log")
    if not initialization:
        specs["wd"] = hd.scalar(0.05, "log")
    support, query = sample(0, 1)
    optimizer = optimizer or hd.sgd("lr" if meta_sgd else LR,
                                    weight_decay=0.0 if initialization else "wd")
    return hd.make_problem(train_loss, mse, hd.HyperParameters(specs), params,
                           optimizer=optimizer, train_data=support, val_data=query, steps=STEPS)


def tasks_for(base, count=4, sampler=sample):
    tasks = task_distribution(sampler)
    return [tasks.problem(base, index, 100 + index) for index in range(count)]


def max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def assert_batch_equals_loop(method, problems, raw=None, tol=1e-12):
    batched = method.batch(problems, raw)
    alone = [method(p, raw) for p in problems]
    for hb, hl in zip(batched, alone, strict=True):
        assert max_diff(hb.grad, hl.grad) <= tol
        assert abs(hb.value - hl.value) <= tol and abs(hb.train_loss - hl.train_loss) <= tol
        assert max_diff(hb.params, hl.params) <= tol
        assert float(hl.vector.abs().max()) > 1e-6  # real hypergradients, not zeros
    return batched, alone


@pytest.mark.parametrize("optimizer", [None, hd.sgd(LR, momentum=0.9),
                                       hd.adam(0.05, betas=(0.8, 0.9))],
                         ids=["sgd", "momentum", "adam"])
def test_batched_reverse_equals_each_task_alone(optimizer):
    problems = tasks_for(template(optimizer=optimizer))
    batched, _ = assert_batch_equals_loop(hd.reverse(), problems)
    assert all(hg.diagnostics["batched"] == len(problems) for hg in batched)


@pytest.mark.parametrize("method", [hd.methods.fomaml(), hd.methods.reptile(scale=2.0)],
                         ids=["fomaml", "reptile"])
def test_batched_first_order_methods_equal_each_task_alone(method):
    problems = tasks_for(template(optimizer=hd.sgd(LR, momentum=0.5)))
    batched, _ = assert_batch_equals_loop(method, problems)
    assert all(hg.diagnostics["batched"] == len(problems) for hg in batched)


def test_meta_sgd_learning_rates_equal_the_loop_and_central_differences():
    base = template(meta_sgd=True)
    problems = tasks_for(base)
    raw = {n: v + 0.05 * torch.arange(v.numel(), dtype=D).reshape(v.shape).cos()
           for n, v in base.hparams.raw.items()}
    batched, _ = assert_batch_equals_loop(hd.reverse(), problems, raw)

    def query_loss(problem, lr_raw):  # plain training at raw with lr_raw, no graph
        state, _ = hd.engine.training.train(problem, {**raw, "lr": lr_raw})
        return float(hd.engine.training.validation_loss(
            problem, state.params, state.buffers, problem.hparams.view({**raw, "lr": lr_raw})))

    eps = 1e-6
    for problem, hg in zip(problems, batched, strict=True):
        for j in range(raw["lr"].numel()):
            e = torch.zeros_like(raw["lr"])
            e[j] = eps
            fd = (query_loss(problem, raw["lr"] + e) - query_loss(problem, raw["lr"] - e)) / (2 * eps)
            assert abs(float(hg.grad["lr"][j]) - fd) <= 1e-7


def test_a_problem_without_an_initialization_batches_its_other_hyperparameters():
    problems = tasks_for(template(initialization=False))
    assert_batch_equals_loop(hd.reverse(), problems)


def test_float32_tasks_agree_with_the_loop_to_rounding():
    base = template().to("cpu", torch.float32)
    problems = tasks_for(base, count=5)
    batched, _ = assert_batch_equals_loop(hd.reverse(), problems, tol=1e-5)
    assert batched[0].grad["theta0"].dtype == torch.float32


def test_tasks_that_cannot_be_stacked_are_refused_by_stack_tasks():
    base = template()
    problems = tasks_for(base)
    assert stack_tasks(problems).size == len(problems)
    assert stack_tasks(problems[:1]) is None  # one task: nothing to batch
    short = replace(problems[1], val_data=[(b[0][:3], b[1][:3]) for b in problems[1].val_data])
    assert stack_tasks([problems[0], short]) is None  # query sets of 5 and 3 points
    xs, ys = sample(3, 3)[0]
    sliced = replace(problems[1], train_data=minibatches(xs, ys, batch_size=2))
    assert stack_tasks([problems[0], sliced]) is None  # minibatches: not one fixed batch
    other = replace(problems[1], optimizer=hd.sgd(0.1))
    assert stack_tasks([problems[0], other]) is None  # anything but the data differs
    two_queries = replace(problems[1], val_data=problems[1].val_data * 2)
    assert stack_tasks([problems[0], two_queries]) is None


def test_a_loss_vmap_refuses_falls_back_to_the_loop():
    def python_branch(p, h, batch):  # data-dependent Python control flow
        loss = mse(p, h, batch)
        return loss * 2 if float(loss.detach()) > 1e6 else loss

    problems = tasks_for(template(train_loss=python_branch))
    batched, _ = assert_batch_equals_loop(hd.reverse(), problems)
    assert "batched" not in batched[0].diagnostics  # the per-task loop ran


def test_a_diverging_task_in_a_batch_names_reverse_and_the_step():
    def overflowing(index, seed):
        (xs, ys), query = sample(index, seed)
        return (xs, ys * 1e200 if index == 2 else ys), query  # finite data, a loss that overflows

    problems = tasks_for(template(), sampler=overflowing)
    assert stack_tasks(problems) is not None
    with pytest.raises(hd.NonFiniteError, match=r"^reverse: inner training diverged at step"):
        hd.reverse().batch(problems)


# ---------------------------------------------------------------- two ranks split a batch
class ThreadGroup(Group):
    """Two ranks as threads of this process: ``all_gather`` through a shared board."""

    def __init__(self, rank, board, barrier):
        self.rank, self.world, self.board, self.barrier = rank, 2, board, barrier

    def all_gather(self, where, obj):
        self.board[self.rank] = obj
        self.barrier.wait(timeout=60)
        parts = [self.board[r] for r in range(self.world)]
        self.barrier.wait(timeout=60)
        return parts


def meta_loop(group=None, tasks=sample, batch=5, method=None):
    return hd.HyperOptimizer(template(), plan=hd.plans.MetaPlan(tasks, batch=batch),
                             method=method or hd.reverse(), seed=3, process_group=group)


def evaluated(loop, step=2):
    return loop.plan.evaluate(loop, step, loop.raw)


def on_two_ranks(fn):
    board, barrier, out = {}, threading.Barrier(2), {}

    def run(rank):
        try:
            out[rank] = fn(ThreadGroup(rank, board, barrier))
        except Exception as err:  # compared by the caller
            out[rank] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def test_two_ranks_split_the_batch_and_equal_one_process():
    alone = evaluated(meta_loop())
    sizes = {}

    def evaluate(group):
        method = hd.reverse()

        def batch_fn(tasks, raw):
            sizes[group.rank] = tasks.size
            return method.batch_fn(tasks, raw)

        return evaluated(meta_loop(group, method=replace(method, batch_fn=batch_fn)))

    outcomes = on_two_ranks(evaluate)
    assert sizes == {0: 3, 1: 2}  # tasks 0, 2, 4 on rank 0 and 1, 3 on rank 1, each stacked
    for outcome in outcomes.values():
        assert torch.allclose(outcome.grad["theta0"], alone.grad["theta0"], rtol=0, atol=1e-12)
        assert outcome.values == pytest.approx(alone.values, abs=1e-12)
        assert outcome.fields["val_loss"] == pytest.approx(alone.fields["val_loss"], abs=1e-12)


def test_a_failure_on_one_rank_is_raised_on_both():
    bad = meta_task(3, 0, 5, 1)[0]  # the step's second task, on rank 1

    def tasks(index, seed):
        (xs, ys), query = sample(index, seed)
        return (xs, ys * 1e200 if index == bad else ys), query  # its loss overflows

    errors = on_two_ranks(lambda group: evaluated(meta_loop(group, tasks), step=0))
    for err in errors.values():
        assert isinstance(err, hd.NonFiniteError), err
        assert str(err).startswith("reverse: inner training diverged at step 0")
