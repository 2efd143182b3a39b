"""Meta plan inputs (s41 review): what a meta run was given and did not read, or read and did
not report, is refused or reported. A selection split ranks the result as it ranks early
stopping; the final values are not labelled with the last step's loss; first-order methods
refuse hyperparameters the validation loss does not read; a task's failure names its outer
step, index and seed; a task's batches must have the template's structure, dimensions and
dtypes; a redrawn task must be the same; the stopping rules and config keys a meta run does
not read are refused; a one-process data-parallel method keeps the batched (vmapped) path.

The references are written out here: the selection loss's argmin over the records, the tasks'
seeds from :func:`hyperdiff.seeds.meta_task` and ``task_seed``, and the plain method's
hypergradients."""

from __future__ import annotations

import math

import pytest
import torch
from test_meta import mse, sample, start_params  # the meta plan tests' tanh MLP

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build_meta
from hyperdiff.methods.registry import make_method
from hyperdiff.seeds import meta_task, task_seed
from hyperdiff.tuner.distributed import data_parallel

D = torch.float64
LR, STEPS, BATCH, SEED = 0.3, 3, 3, 3


def template(train_loss=mse, val_loss=mse, **hparams) -> hd.Problem:
    params = start_params()
    support, query = sample(0, 1)
    return hd.make_problem(train_loss, val_loss,
                           hd.HyperParameters(theta0=hd.initialization(params), **hparams),
                           params, optimizer=hd.sgd(LR), train_data=support, val_data=query,
                           steps=STEPS)


def meta_loop(tasks=sample, *, method="reverse", batch=BATCH, validation_tasks=0,
              stopping=None, selection=None, problem=None) -> hd.HyperOptimizer:
    return hd.HyperOptimizer(problem or template(), plan=hd.plans.MetaPlan(
        tasks, batch=batch, validation_tasks=validation_tasks), method=method, seed=SEED,
        lr=0.3, schedule="constant", selection=selection,
        stopping=stopping or hd.Stopping(max_steps=3, patience=None))


def test_a_selection_split_ranks_the_result_as_it_stops_the_run():
    loop = meta_loop(selection=sample(99, 12345)[1],
                     stopping=hd.Stopping(max_steps=12, patience=3))
    result = loop.run()
    losses = [r.selection_loss for r in loop.history]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best != len(losses) - 1  # the case: the last step is not the best
    assert len(losses) == best + 4
    assert result.stop_reason == "early stopping: no better selection loss for 3 steps"
    assert result.best_step == best and result.best_loss == losses[best]
    assert result.criterion == "selection_loss"
    recorded = torch.tensor(loop.history[best].hparams["theta0"], dtype=D)
    assert torch.allclose(result.best_hparams.natural()["theta0"], recorded, rtol=0,
                          atol=1e-12)


def test_the_final_values_are_labelled_as_no_step_evaluated_them():
    loop = meta_loop()
    result = loop.run()
    assert result.criterion == "final values"
    assert torch.equal(result.best_raw["theta0"], loop.raw["theta0"])
    assert torch.equal(result.best_raw["theta0"], result.final_raw["theta0"])
    last = torch.tensor(loop.history[-1].hparams["theta0"], dtype=D)
    assert not torch.allclose(result.best_raw["theta0"], last)  # the last update moved them
    assert result.best_step == 3 and math.isnan(result.best_loss)  # the step that would


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_first_order_methods_refuse_what_the_validation_loss_does_not_read(method):
    def penalized(p, h, batch):
        return mse(p, h, batch) + h["wd"] * sum((v ** 2).sum() for v in p.values())

    with pytest.raises(hd.HyperdiffError, match=rf"^{method}: tuned hyperparameters other than "
                       r"the initialization must be read by the validation loss \(got "
                       r"\['wd'\], which it does not read"):
        meta_loop(method=method, problem=template(penalized, wd=hd.scalar(0.05)))

    def scaled(p, h, batch):  # a hyperparameter the validation loss reads: its direct part
        return h["scale"] * mse(p, h, batch)

    loop = meta_loop(method=method, problem=template(val_loss=scaled, scale=hd.scalar(2.0)))
    assert len(loop.run().history) == 3


def test_a_task_failure_names_its_outer_step_index_and_seed():
    def wide_four(index, seed):  # task 4 has features of width 2 where the model takes 1
        (xs, ys), (xq, yq) = sample(index, seed)
        return ((torch.cat([xs, xs], 1), ys) if index == 4 else (xs, ys)), (xq, yq)

    tasks = hd.tasks.distribution(wide_four, name="my tasks")
    for method in ["reverse", hd.methods.fomaml()]:
        loop = meta_loop(tasks, method=method)
        loop.step()
        index, seed = meta_task(SEED, 1, BATCH, 1)
        assert index == 4
        with pytest.raises(hd.HyperdiffError, match=rf"^MetaPlan: outer step 1: my tasks: task "
                           rf"4 \(seed {seed}\): hypergradient: train_loss raised RuntimeError"):
            loop.step()
    loop = meta_loop(tasks, batch=2, validation_tasks=5)
    seed = task_seed(SEED, 4, "meta-validation")
    with pytest.raises(hd.HyperdiffError, match=rf"^MetaPlan: outer step 0: my tasks: "
                       rf"validation task 4 \(seed {seed}\): hypergradient: train_loss raised"):
        loop.step()


@pytest.mark.parametrize(("split", "position", "name"), [(0, 1, "support set"),
                                                         (1, 1, "query set"),
                                                         (0, 0, "support set")])
def test_a_task_batch_must_have_the_template_dimensions_and_dtypes(split, position, name):
    def changed(index, seed):
        pair = [list(part) for part in sample(index, seed)]
        tensor = pair[split][position]
        pair[split][position] = tensor[:, 0] if position == 1 else tensor.float()
        return tuple(pair[0]), tuple(pair[1])

    shape = tuple(sample(0, 1)[split][position].shape)
    got = (rf"shape \({shape[0]},\) float64\); a loss would broadcast it silently" if position
           else rf"shape \({shape[0]}, 1\) float32\)$")
    index, seed = meta_task(SEED, 0, BATCH, 0)
    with pytest.raises(hd.HyperdiffError, match=rf"^MetaPlan: outer step 0: tasks: task "
                       rf"{index} \(seed {seed}\): {name}\[{position}\] must be a 2-d float64 "
                       rf"tensor, as in the template's \w+ batch \(shape \(\d+, 1\)\) \(got "
                       + got):
        meta_loop(changed).step()

    def more_shots(index, seed):  # other sizes are tasks of their own: accepted
        (xs, ys), query = sample(index, seed)
        return (torch.cat([xs, xs]), torch.cat([ys, ys])), query

    assert meta_loop(more_shots).step().status == "ok"


def test_a_redrawn_task_must_be_the_first_draw():
    calls = []

    def drifting(index, seed):  # a state the calls change: another task every call
        calls.append(index)
        return sample(index, seed + len(calls))

    tasks = hd.tasks.distribution(drifting, name="my tasks")
    base = template()
    tasks.problem(base, 0, 7)
    with pytest.raises(hd.HyperdiffError, match=r"^my tasks: sample\(0, 7\) must give the same "
                       r"task every time it is called with the same arguments"):
        tasks.problem(base, 0, 7)
    loop = meta_loop(drifting)
    loop.plan.evaluate(loop, 0, loop.raw)
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: outer step 0: tasks: sample\("):
        loop.plan.evaluate(loop, 0, loop.raw)  # a retried step draws its tasks again
    steady = hd.tasks.distribution(sample)
    first, again = steady.problem(base, 0, 7), steady.problem(base, 0, 7)
    assert torch.equal(first.train_data.batch(0, 0)[1], again.train_data.batch(0, 0)[1])


@pytest.mark.parametrize(("rule", "expected"), [
    ({"chaos_ratio": 30.0}, r"stopping.chaos_ratio must be None, its default \(a rule of the "
                            r"offline plan, which the meta plan does not read\) \(got 30.0\)"),
    ({"travel": 1}, r"stopping.travel must be 3, its default .* \(got 1\)"),
    ({"extend": 5}, r"stopping.extend must be 0, its default .* \(got 5\)"),
    ({"travel": 0, "extend": 5}, r"stopping.travel must be 3, its default .* \(got 0\)"),
    ({"patience": 2}, r"stopping.patience must be None or its default 10 without "
                      r"validation_tasks or a selection split .* \(got 2\)"),
])
def test_the_meta_plan_refuses_stopping_rules_it_does_not_read(rule, expected):
    with pytest.raises(hd.HyperdiffError, match=rf"^MetaPlan: {expected}"):
        meta_loop(stopping=hd.Stopping(max_steps=3, **{"patience": None, **rule}))


def test_patience_is_read_with_validation_tasks_or_a_selection_split():
    stopping = hd.Stopping(max_steps=3, patience=2)
    assert meta_loop(validation_tasks=2, stopping=stopping).plan.validation_tasks == 2
    assert meta_loop(selection=sample(99, 5)[1], stopping=stopping).selection is not None
    assert meta_loop(stopping=hd.Stopping(max_steps=3)).stopping.patience == 10  # default


def test_cli_meta_refuses_patience_without_validation_tasks():
    base = ["task.name=sinusoid_maml"]  # its default stop.patience is 0
    with pytest.raises(hd.HyperdiffError, match=r"^config: stop.patience must be left at its "
                       r"default 0 with outer.mode = 'meta' \(without outer.meta_val_tasks a "
                       r"meta run has no early stopping: .*; got 3\)$"):
        load_config(None, [*base, "stop.patience=3"])
    assert load_config(None, [*base, "stop.patience=3", "outer.meta_val_tasks=2"]
                       ).stop.patience == 3
    assert load_config(None, [*base, "stop.patience=0"]).stop.patience == 0


def test_cli_meta_reads_a_selection_fraction_for_its_report():
    """The meta report's val and selection rows split the template's query set by it (s41:
    the refusal of the day before was wrong)."""
    config = load_config(None, ["task.name=sinusoid_maml", "task.selection_fraction=0.2"])
    assert config.outer.mode == "meta" and config.task.selection_fraction == 0.2


def test_cli_meta_refuses_a_task_batch_size(tmp_path):
    path = tmp_path / "my_meta.py"
    path.write_text(
        "import torch, hyperdiff as hd\n"
        "def sample(index, seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randn(16, 1, generator=g)\n"
        "    return (x[:8], 2 * x[:8]), (x[8:12], 2 * x[8:12])\n"
        "def mse(p, h, b): return ((b[0] @ p['w'] - b[1]) ** 2).mean()\n"
        "def build(batch_size=None):\n"
        "    p = {'w': torch.zeros(1, 1)}\n"
        "    (xs, ys), (xq, yq) = sample(0, 1)\n"
        "    (xt, yt), _ = sample(1, 2)\n"
        "    return hd.task('my_meta', model=p, train_loss=mse, val_loss=mse,\n"
        "                   hparams=hd.HyperParameters(theta0=hd.initialization(p)),\n"
        "                   optimizer=hd.sgd(0.1), steps=2, batch_size=batch_size, tasks=sample,\n"
        "                   data=hd.tasks.given_splits(train=(xs, ys), val=(xq, yq),\n"
        "                                              test=(xt, yt)),\n"
        "                   defaults={'outer.mode': 'meta'})\n")
    name = f"task.name={path}:build"
    with pytest.raises(hd.HyperdiffError, match=r"^config: task my_meta's batch_size must be "
                       r"None with outer.mode = 'meta' \(got 4: .* return hd.minibatches\(x, y, "
                       r"batch_size=4\) as the support set\)$"):
        build_meta(load_config(None, [name, "task.params.batch_size=4"]))
    _, loop = build_meta(load_config(None, [name]))
    assert loop.plan.batch == 4


def test_a_one_process_data_parallel_method_keeps_the_batched_tasks():
    base = template()
    problems = [hd.tasks.distribution(sample).problem(base, *meta_task(SEED, 0, 3, i))
                for i in range(3)]
    raw = base.hparams.raw
    plain = make_method("reverse").batch(problems, raw)
    wrapped = data_parallel("reverse").batch(problems, raw)
    assert [hg.diagnostics.get("batched") for hg in wrapped] == [3, 3, 3]
    for mine, reference in zip(wrapped, plain, strict=True):
        assert torch.equal(mine.grad["theta0"], reference.grad["theta0"])
