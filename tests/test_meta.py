"""Meta-learning as a plan of the one outer loop (issue 21): hd.plans.MetaPlan, a task
distribution, first-order MAML and Reptile, iMAML through the plan.

Every reference is independent of the code under test: the MAML meta-gradient (the plan's
vmapped batch of tasks, and the per-task loop where tasks have unequal shapes) is a
hand-written unroll (plain autograd over an explicitly written SGD loop per task, averaged over
the batch); first-order MAML and Reptile are their formulas on an explicitly written loop;
iMAML is central finite differences of the proximal inner problem solved in closed form.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

import hyperdiff as hd
from hyperdiff.hparams.initialization import proximal
from hyperdiff.seeds import meta_task

D = torch.float64
LR, STEPS, BATCH, SEED = 0.3, 4, 3, 5


def sample(index: int, seed: int):
    """A regression task: y = a * tanh(x) + c, 6 support and 5 query points."""
    g = torch.Generator().manual_seed(seed)
    a, c = torch.randn(2, generator=g, dtype=D)
    xs, xq = torch.randn(6, 1, generator=g, dtype=D), torch.randn(5, 1, generator=g, dtype=D)
    return (xs, a * torch.tanh(xs) + c), (xq, a * torch.tanh(xq) + c)


def net(p, x):
    """1-3-1 tanh MLP."""
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mse(p, h, batch):
    return ((net(p, batch[0]) - batch[1]) ** 2).mean()


def start_params():
    g = torch.Generator().manual_seed(0)
    return {"w1": torch.randn(1, 3, generator=g, dtype=D), "b1": torch.zeros(3, dtype=D),
            "w2": torch.randn(3, 1, generator=g, dtype=D) * 0.5, "b2": torch.zeros(1, dtype=D)}


def template(train_loss=mse, steps=STEPS, lr=LR):
    params = start_params()
    hparams = hd.HyperParameters(theta0=hd.initialization(params))
    support, query = sample(0, 1)
    return hd.make_problem(train_loss, mse, hparams, params, optimizer=hd.sgd(lr),
                           train_data=support, val_data=query, steps=steps)


def loop_for(method, *, problem=None, batch=BATCH, tasks=sample, **kwargs):
    plan = hd.plans.MetaPlan(tasks, batch=batch)
    return hd.HyperOptimizer(problem or template(), plan=plan, method=method, seed=SEED,
                             **kwargs)


def unflat(vector):
    out, at = {}, 0
    for name, value in start_params().items():
        out[name] = vector[at:at + value.numel()].reshape(value.shape)
        at += value.numel()
    return out


def flatten(params):
    return torch.cat([params[k].reshape(-1) for k in start_params()])


def tasks_of(step, batch=BATCH):
    return [sample(*meta_task(SEED, step, batch, i)) for i in range(batch)]


def adapt(theta0, support, *, create_graph):
    """SGD written out: theta_{t+1} = theta_t - lr grad L_support(theta_t)."""
    theta = unflat(theta0)
    for _ in range(STEPS):
        loss = ((net(theta, support[0]) - support[1]) ** 2).mean()
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph)
        theta = {k: v - LR * g for (k, v), g in zip(theta.items(), grads, strict=True)}
    return theta


def hand_maml(step, raw):
    """The MAML meta-gradient by a written unroll, averaged over the step's tasks."""
    total = torch.zeros_like(raw)
    for support, query in tasks_of(step):
        theta0 = raw.clone().requires_grad_()
        theta = adapt(theta0, support, create_graph=True)
        loss = ((net(theta, query[0]) - query[1]) ** 2).mean()
        total += torch.autograd.grad(loss, theta0)[0]
    return total / BATCH


def first_order_reference(step, raw, which):
    total = torch.zeros_like(raw)
    for support, query in tasks_of(step):
        theta = {k: v.detach().requires_grad_()
                 for k, v in adapt(raw.clone().requires_grad_(), support,
                                   create_graph=False).items()}
        if which == "fomaml":
            loss = ((net(theta, query[0]) - query[1]) ** 2).mean()
            total += flatten(dict(zip(theta, torch.autograd.grad(loss, list(theta.values())),
                                      strict=True)))
        else:
            total += raw - flatten({k: v.detach() for k, v in theta.items()})
    return total / BATCH


@pytest.mark.parametrize("method", [hd.reverse(), hd.forward(), hd.checkpointed(2)],
                         ids=["reverse", "forward", "checkpointed"])
@pytest.mark.parametrize("step", [0, 3])
def test_exact_meta_gradient_equals_a_hand_written_unroll_over_the_batch(method, step):
    loop = loop_for(method)
    raw = loop.raw["theta0"] + 0.1 * torch.arange(10, dtype=D).sin()
    outcome = loop.plan.evaluate(loop, step, {"theta0": raw})
    expected = hand_maml(step, raw)
    assert torch.allclose(outcome.grad["theta0"], expected, rtol=0, atol=1e-10)
    assert outcome.grad["theta0"].norm() > 1e-3  # not a trivially equal pair of zeros
    assert outcome.fields["samples"] == BATCH


def counting(method):
    """``method`` whose batched form counts its calls (the plan took the vmapped path)."""
    calls = []

    def batch_fn(tasks, raw):
        calls.append(tasks.size)
        return method.batch_fn(tasks, raw)

    return dataclasses.replace(method, batch_fn=batch_fn), calls


@pytest.mark.parametrize("step", [0, 3])
def test_vmapped_meta_gradient_equals_the_per_task_loop_and_the_hand_written_unroll(step):
    method, calls = counting(hd.reverse())
    loop = loop_for(method)
    raw = loop.raw["theta0"] + 0.1 * torch.arange(10, dtype=D).sin()
    outcome = loop.plan.evaluate(loop, step, {"theta0": raw})
    assert calls == [BATCH]  # all the step's tasks in one batched computation
    base = loop.problems[0]
    per_task = [hd.reverse()(loop.plan.tasks.problem(base, *ij), {"theta0": raw})
                for ij in loop.plan.task_indices(loop, step)]
    loop_mean = torch.stack([hg.grad["theta0"] for hg in per_task]).mean(0)
    assert torch.allclose(outcome.grad["theta0"], loop_mean, rtol=0, atol=1e-12)
    assert abs(outcome.fields["val_loss"] - sum(hg.value for hg in per_task) / BATCH) <= 1e-12
    assert abs(outcome.fields["train_loss"]
               - sum(hg.train_loss for hg in per_task) / BATCH) <= 1e-12
    assert torch.allclose(outcome.grad["theta0"], hand_maml(step, raw), rtol=0, atol=1e-10)


def test_tasks_of_unequal_shapes_fall_back_to_the_per_task_loop():
    def uneven(index, seed):  # support sets of 6 and 5 points
        (xs, ys), query = sample(index, seed)
        return ((xs, ys) if index % 2 else (xs[:5], ys[:5])), query

    method, calls = counting(hd.reverse())
    loop = loop_for(method, tasks=uneven)
    raw = loop.raw["theta0"]
    got = loop.plan.evaluate(loop, 1, {"theta0": raw}).grad["theta0"]
    assert calls == []  # not stackable: one task at a time
    total = torch.zeros_like(raw)
    for index, seed in [meta_task(SEED, 1, BATCH, i) for i in range(BATCH)]:
        support, query = uneven(index, seed)
        theta0 = raw.clone().requires_grad_()
        theta = adapt(theta0, support, create_graph=True)
        total += torch.autograd.grad(((net(theta, query[0]) - query[1]) ** 2).mean(), theta0)[0]
    assert torch.allclose(got, total / BATCH, rtol=0, atol=1e-10)
    assert got.norm() > 1e-3


@pytest.mark.parametrize("which", ["fomaml", "reptile"])
def test_first_order_maml_and_reptile_equal_their_formulas(which):
    method = hd.methods.fomaml() if which == "fomaml" else hd.methods.reptile()
    loop = loop_for(method)
    raw = loop.raw["theta0"]
    outcome = loop.plan.evaluate(loop, 1, {"theta0": raw})
    expected = first_order_reference(1, raw, which)
    assert torch.allclose(outcome.grad["theta0"], expected, rtol=0, atol=1e-12)
    exact_loop = loop_for(hd.reverse())
    exact = exact_loop.plan.evaluate(exact_loop, 1, {"theta0": raw}).grad["theta0"]
    assert not torch.allclose(outcome.grad["theta0"], exact, atol=1e-6)  # an approximation


def test_reptile_scale_multiplies_its_hypergradient():
    problem = template()
    one = hd.methods.reptile()(problem).grad["theta0"]
    scaled = hd.methods.reptile(scale=1 / (STEPS * LR))(problem).grad["theta0"]
    assert torch.allclose(scaled, one / (STEPS * LR), rtol=1e-14, atol=0)


def test_imaml_in_the_meta_plan_equals_finite_differences_of_converged_proximal_solves():
    """Linear model, train loss mean (Xw - y)^2 + (s/2)||w - w0||^2: the solve is closed form."""
    strength = 2.0

    def linear(p, h, batch):
        return ((batch[0] @ p["w"] - batch[1]) ** 2).mean()

    def proximal_loss(p, h, batch):
        return linear(p, h, batch) + proximal(p, h, "theta0", strength)

    def tasks(index, seed):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(3, generator=g, dtype=D)
        xs, xq = torch.randn(8, 3, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D)
        return (xs, xs @ a), (xq, xq @ a + 0.1)

    params = {"w": torch.tensor([0.2, -0.1, 0.4], dtype=D)}
    support, query = tasks(0, 1)
    problem = hd.make_problem(proximal_loss, linear,
                              hd.HyperParameters(theta0=hd.initialization(params)), params,
                              optimizer=hd.sgd(0.1), train_data=support, val_data=query,
                              steps=400)
    loop = loop_for(hd.implicit(hd.solvers.exact()), problem=problem, tasks=tasks)
    raw = loop.raw["theta0"]
    got = loop.plan.evaluate(loop, 2, {"theta0": raw}).grad["theta0"]

    def meta_loss(w0):
        total = torch.zeros((), dtype=D)
        for index, seed in [meta_task(SEED, 2, BATCH, i) for i in range(BATCH)]:
            (xs, ys), (xq, yq) = tasks(index, seed)
            n = xs.shape[0]
            w = torch.linalg.solve(2 / n * xs.T @ xs + strength * torch.eye(3, dtype=D),
                                   2 / n * xs.T @ ys + strength * w0)
            total += ((xq @ w - yq) ** 2).mean()
        return total / BATCH

    eps = 1e-5
    reference = torch.stack([(meta_loss(raw + eps * e) - meta_loss(raw - eps * e)) / (2 * eps)
                             for e in torch.eye(3, dtype=D)])
    assert torch.allclose(got, reference, rtol=0, atol=1e-6)
    assert reference.norm() > 1e-2


def run_steps(loop, count):
    for _ in range(count):
        loop.step()


def test_resume_of_a_meta_run_is_exact_and_draws_the_same_tasks():
    drawn: list[tuple[str, int, int]] = []

    def recording(label):
        def tasks(index, seed):
            drawn.append((label, index, seed))
            return sample(index, seed)
        return tasks

    whole = loop_for("reverse", tasks=recording("whole"), lr=0.05,
                     stopping=hd.Stopping(max_steps=4))
    run_steps(whole, 4)
    first = loop_for("reverse", tasks=recording("first"), lr=0.05,
                     stopping=hd.Stopping(max_steps=4))
    run_steps(first, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = loop_for("reverse", tasks=recording("resumed"), lr=0.05,
                       stopping=hd.Stopping(max_steps=4))
    resumed.load_state_dict(torch.load(buffer, weights_only=False), list(first.history))
    run_steps(resumed, 2)
    assert torch.equal(resumed.raw["theta0"], whole.raw["theta0"])
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert (a.step, a.val_loss, a.train_loss, a.grad, a.hparams, a.trainings) == \
               (b.step, b.val_loss, b.train_loss, b.grad, b.hparams, b.trainings)
    tasks = {label: [(i, s) for lab, i, s in drawn if lab == label]
             for label in ("whole", "first", "resumed")}
    assert tasks["first"] + tasks["resumed"] == tasks["whole"]
    assert len({i for i, _ in tasks["whole"]}) == 4 * BATCH  # new tasks every step


def test_a_meta_run_lowers_the_post_adaptation_query_loss():
    loop = loop_for("reverse", lr=0.05, stopping=hd.Stopping(max_steps=30))
    start = loop.plan.evaluate(loop, 1000, loop.raw).fields["val_loss"]
    result = loop.run()
    end = loop.plan.evaluate(loop, 1000, result.best_raw).fields["val_loss"]
    assert end < 0.8 * start


# --- invalid arguments, in our error format
def test_invalid_meta_plan_arguments_are_refused_with_our_message():
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: batch must be a positive int "
                                                r"\(got 0\)$"):
        hd.plans.MetaPlan(sample, batch=0)
    with pytest.raises(hd.HyperdiffError, match=r"^task_distribution: sample must be a "
                                                r"function sample\(index, seed\) -> "
                                                r"\(support, query\) \(got 3\)$"):
        hd.plans.MetaPlan(3)
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: problem must be one Problem, "
                                                r".* \(got 2 problems\)$"):
        hd.HyperOptimizer([template(), template()], plan=hd.plans.MetaPlan(sample))
    online_only = hd.methods.Method(  # curvature was online only before its offline call
        "online_only", hd.reverse().run,
        capabilities=hd.methods.Capabilities(offline=False, online=True))
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: method must be a Method usable "
                                                r"offline .*\(got online_only"):
        hd.HyperOptimizer(template(), plan=hd.plans.MetaPlan(sample), method=online_only)


def test_a_task_that_is_not_a_pair_of_data_names_the_task_and_the_step():
    loop = loop_for("reverse", tasks=lambda index, seed: (None,))
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: outer step 0: tasks: "
                                                r"sample\(0, \d+\) must return a pair "
                                                r"\(support, query\) \(got tuple "):
        loop.step()
    loop = loop_for("reverse", tasks=lambda index, seed: ("text", sample(0, 1)[1]))
    with pytest.raises(hd.HyperdiffError, match=r"^MetaPlan: outer step 0: tasks: task 0's "
                                                r"data: hypergradient: support must be "):
        loop.step()


def test_first_order_methods_refuse_a_problem_without_an_initialization():
    params = start_params()
    support, query = sample(0, 1)
    problem = hd.make_problem(mse, mse, hd.HyperParameters(lr=hd.scalar(0.1)), params,
                              optimizer=hd.sgd("lr"), train_data=support, val_data=query,
                              steps=2)
    for method in (hd.methods.fomaml(), hd.methods.reptile()):
        with pytest.raises(hd.HyperdiffError, match=rf"^{method.name}: problem must tune its "
                                                    r"initialization .* \(got the "
                                                    r"hyperparameters \['lr'\]\)$"):
            method(problem)
    with pytest.raises(hd.HyperdiffError, match=r"^reptile: scale must be a positive finite "
                                                r"number \(got -1\)$"):
        hd.methods.reptile(scale=-1)


def test_check_reports_first_order_maml_and_reptile_as_approximations_with_their_error():
    problem = template()
    report = hd.check(problem, memory=False, coordinates=4)
    rows = {row.label: row for row in report.rows}
    exact = hd.reverse()(problem).vector[report.coordinates]
    for name, method in (("fomaml", hd.methods.fomaml()), ("reptile", hd.methods.reptile())):
        row = rows[name]
        assert not row.failed and row.verdict == "approximation"
        values = method(problem).vector[report.coordinates]
        expected = float((values - exact).norm() / exact.norm())
        assert row.rel_error == pytest.approx(expected, rel=1e-4)  # FD is ~ the exact one
        assert f"{name} {row.rel_error:.2g}" in report.verdict
    assert rows["reverse"].verdict == "agrees"
    assert "disagree" not in report.verdict


# --- the CLI: outer.mode = "meta", the built-in sinusoid_maml, a user's task distribution
CLI_SMALL = ["--task", "sinusoid_maml", "--set", "stop.max_steps=3", "--set",
             "outer.meta_batch=2", "--set", "outer.meta_test_tasks=3", "--set", "inner.steps=2",
             "--set", "report.seeds=1", "--quiet"]


def net_relu(p, x):
    """The 1-40-40-1 ReLU MLP, written out."""
    h = torch.relu(x @ p["W0"] + p["b0"])
    return torch.relu(h @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def written_out_query_loss(params, support, query, steps, lr):
    """Plain SGD on the support set, written out, then the query MSE (float32 as the task)."""
    f = net_relu
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    for _ in range(steps):
        loss = ((f(theta, support[0]) - support[1]) ** 2).mean()
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {k: (v - lr * g).detach().requires_grad_()
                 for (k, v), g in zip(theta.items(), grads, strict=True)}
    with torch.no_grad():
        return float(((f(theta, query[0]) - query[1]) ** 2).mean())


def test_cli_meta_run_reports_held_out_tasks_adapted_from_the_initial_values(tmp_path, capsys):
    import json

    from hyperdiff.app.cli import main
    from hyperdiff.app.tasks.few_shot import sinusoid_task
    from hyperdiff.app.tasks.sinusoid_maml import INNER_LR, init_mlp
    from hyperdiff.seeds import REPORT_SEED, task_seed

    run_dir = tmp_path / "run"
    assert main(["run", *CLI_SMALL, "--out", str(run_dir)]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["mode"] == "meta" and result["steps"] == 3
    assert result["criterion"] == "final values" and result["best_step"] == 3  # after step 2
    held_out = result["held_out_tasks"]
    expected = []
    for j in range(3):  # the held-out stream, never drawn by meta-training
        drawn = sinusoid_task(0, shots=10, queries=10, seed=task_seed(REPORT_SEED, j,
                                                                      "meta-test"))
        expected.append(written_out_query_loss(init_mlp(0), drawn.support, drawn.query, 2,
                                               INNER_LR))
    assert held_out["initial"]["query_loss"] == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert held_out["tuned"]["tasks"] == 3
    assert held_out["tuned"]["query_loss"] != held_out["initial"]["query_loss"]
    # the baseline: Adam (the run's outer lr 0.003) on the pooled support and query sets of
    # the 3 steps x 2 tasks that meta-training drew, written out, then adapted as above
    params = {k: v.clone().requires_grad_() for k, v in init_mlp(0).items()}
    adam = torch.optim.Adam(params.values(), lr=0.003)
    for step in range(3):
        parts = []
        for i in range(2):
            drawn = sinusoid_task(0, shots=10, queries=10, seed=meta_task(0, step, 2, i)[1])
            parts += [drawn.support, drawn.query]
        adam.zero_grad()
        losses = [((net_relu(params, x) - y) ** 2).mean() for x, y in parts]
        (sum(losses) / len(losses)).backward()
        adam.step()
    pretrained = {k: v.detach() for k, v in params.items()}
    expected = []
    for j in range(3):
        drawn = sinusoid_task(0, shots=10, queries=10, seed=task_seed(REPORT_SEED, j,
                                                                      "meta-test"))
        expected.append(written_out_query_loss(pretrained, drawn.support, drawn.query, 2,
                                               INNER_LR))
    assert held_out["pretrained"]["query_loss"] == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_cli_meta_run_extended_by_resume_equals_one_longer_run(tmp_path):
    import json

    from hyperdiff.app.cli import main

    def records(run_dir):
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "time" not in k}
                for line in lines]

    whole, part = tmp_path / "whole", tmp_path / "part"
    longer = [*CLI_SMALL, "--set", "stop.max_steps=4"]
    assert main(["run", *longer, "--out", str(whole)]) == 0
    short = [*CLI_SMALL, "--set", "stop.max_steps=2"]
    assert main(["run", *short, "--out", str(part)]) == 0
    assert main(["run", "--resume", str(part), "--set", "stop.max_steps=4", "--quiet"]) == 0
    assert records(part) == records(whole)


def test_cli_meta_mode_needs_a_task_with_a_distribution(tmp_path, capsys):
    from hyperdiff.app.cli import main

    assert main(["run", "--task", "ridge_diabetes", "--set", "outer.mode=meta",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config: outer.mode must be 'offline' or 'online' for task 'ridge_diabetes', " \
           "which has no task distribution (got 'meta')" in err


USER_TASK = '''
import torch
import hyperdiff as hd

def sample(index, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, generator=g, dtype=torch.float64)
    xs, xq = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g,
                                                                              dtype=torch.float64)
    return (xs, xs @ a), (xq, xq @ a)

def mse(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()

def build(*, steps=3, data_seed=0):
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    (xs, ys), (xq, yq) = sample(0, 1)
    return hd.task("user_meta", model=params, train_loss=mse, val_loss=mse,
                   hparams=hd.HyperParameters(theta0=hd.initialization(params)),
                   optimizer=hd.sgd(0.1), steps=steps, tasks=sample,
                   data=hd.given_splits(train=(xs, ys), val=(xq, yq), test=(xq, yq),
                                        allow_shared_rows=True))
'''


def test_cli_runs_a_users_task_distribution(tmp_path):
    import json

    from hyperdiff.app.cli import main

    path = tmp_path / "meta_task.py"
    path.write_text(USER_TASK)
    run_dir = tmp_path / "run"
    assert main(["run", "--task", f"{path}:build", "--set", "outer.mode=meta", "--set",
                 "outer.meta_batch=3", "--set", "stop.max_steps=3", "--set",
                 "outer.meta_test_tasks=4", "--set", "task.selection_fraction=0", "--set",
                 "report.seeds=1", "--out", str(run_dir), "--quiet"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["meta_batch"] == 3 and result["held_out_tasks"]["initial"]["tasks"] == 4


def test_tasks_follow_a_template_moved_to_another_dtype():
    """A template moved by .to(device, dtype) (as --device moves a task) trains each task's
    data there too: float32 tasks on a float64 template equal float64 tasks."""
    def float32_tasks(index, seed):
        (xs, ys), (xq, yq) = sample(index, seed)
        return (xs.float(), ys.float()), (xq.float(), yq.float())

    moved = template().to("cpu", torch.float64)
    loop = loop_for(hd.reverse(), problem=moved, tasks=float32_tasks)
    got = loop.plan.evaluate(loop, 0, loop.raw).grad["theta0"]
    def as_float64(index, seed):
        return tuple(tuple(t.double() for t in part) for part in float32_tasks(index, seed))

    reference_loop = loop_for(hd.reverse(), tasks=as_float64)
    expected = reference_loop.plan.evaluate(reference_loop, 0, reference_loop.raw).grad["theta0"]
    assert torch.equal(got, expected)
