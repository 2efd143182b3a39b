"""Issue 20 item 3/5: the seed of an online run's one training (``OnlinePlan(train_seed=...)``,
``outer.train_seed``). With its outer step frozen (lr 0) the run's own model is a plain
training written out by hand at that seed (its minibatches and its per-step noise, float64);
another seed trains another model; a resumed run equals the straight one; the config records
the key, refuses it offline and reads old run directories as they ran."""

from __future__ import annotations

import pytest
import tomllib
import torch
from interrupt import interrupted_run
from online_resume import assert_resumes_bit_for_bit

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.plans import build_online
from hyperdiff.app.rundir import RunDir
from hyperdiff.engine.models import StepContext
from hyperdiff.tuner.online_plan import OnlinePlan

from conftest import sine_data

DT = torch.float64
STEPS, WINDOW, LR = 9, 3, 0.2


def predict(p, x):
    return torch.tanh(x @ p["W1"]) @ p["W2"]


def val_loss(p, h, batch):
    x, y = batch
    return ((predict(p, x) - y) ** 2).mean()


def noise(ctx: StepContext) -> torch.Tensor:
    """A per-step factor drawn from ``(ctx.seed, ctx.step)``, as dropout is."""
    gen = torch.Generator().manual_seed(1000 * ctx.seed + ctx.step)
    return 1.0 + 0.5 * torch.rand((), generator=gen, dtype=DT)


def train_loss(p, h, batch, ctx):
    return noise(ctx) * val_loss(p, h, batch) + h["wd"] * sum((v**2).sum() for v in p.values())


def problem(seed: int = 0) -> hd.Problem:
    x, y = sine_data(30, 4, seed=1)
    xv, yv = sine_data(12, 4, seed=2)
    g = torch.Generator().manual_seed(0)
    params = {"W1": torch.randn(4, 3, generator=g, dtype=DT) * 0.5,
              "W2": torch.randn(3, 1, generator=g, dtype=DT) * 0.5}
    hp = hd.HyperParameters(lr=hd.scalar(LR), wd=hd.scalar(1e-2))
    return hd.make_problem(train_loss, val_loss, hp, params, optimizer=hd.sgd("lr"),
                           train_data=hd.minibatches(x, y, batch_size=5), val_data=(xv, yv),
                           steps=STEPS, seed=seed, probe=False)


def frozen_run(prob: hd.Problem, train_seed: int | None) -> hd.OnlineResult:
    """An online run whose values never move (outer lr 0): only its training is left."""
    plan = OnlinePlan(window=WINDOW, train_seed=train_seed)
    return hd.HyperOptimizer(prob, plan=plan, method=hd.reverse(), optimizer="sgd",
                             lr=0.0).run()


def plain_training(prob: hd.Problem, seed: int) -> dict[str, torch.Tensor]:
    """SGD written out by hand: theta <- theta - lr grad L_train(theta; batch(t, seed),
    noise(seed, t)), the minibatches a plain training at ``seed`` reads."""
    theta = {k: v.clone() for k, v in prob.params.items()}
    wd = torch.tensor(1e-2, dtype=DT)
    for t in range(prob.steps):
        p = {k: v.clone().requires_grad_() for k, v in theta.items()}
        ctx = StepContext(step=t, seed=seed, train=True, buffers={})
        loss = train_loss(p, {"wd": wd}, prob.train_data.batch(t, seed), ctx)
        grads = torch.autograd.grad(loss, list(p.values()))
        theta = {k: v - LR * g for (k, v), g in zip(theta.items(), grads, strict=True)}
    return theta


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_the_own_model_is_a_plain_training_at_the_train_seed(seed):
    prob = problem()
    result = frozen_run(prob, seed)
    assert result.steps == STEPS and len(result.history) == STEPS // WINDOW
    assert_same(result.params, plain_training(prob, seed))


def test_another_train_seed_trains_another_model():
    prob = problem()
    runs = [frozen_run(prob, s).params for s in (3, 4)]
    assert max(float((runs[0][k] - runs[1][k]).abs().max()) for k in runs[0]) > 1e-4


@pytest.mark.parametrize("own", [0, 7])
def test_no_train_seed_is_the_problems_own_seed(own):
    """``None`` (the default) trains on ``problem.seed``: every run before the setting."""
    prob = problem(seed=own)
    default = frozen_run(prob, None).params
    assert_same(default, plain_training(prob, own))
    assert_same(frozen_run(prob, own).params, default)


def test_the_validation_draws_still_follow_the_loops_seed():
    """``train_seed`` moves the training only: with the same training seed, the loop's
    ``seed`` changes the validation rows of a window, so its hypergradient, not its model."""
    prob = problem()

    def first_grad(loop_seed):
        plan = OnlinePlan(window=WINDOW, train_seed=5, val_batch_size=4)
        loop = hd.HyperOptimizer(prob, plan=plan, method=hd.reverse(), optimizer="sgd",
                                 lr=0.0, seed=loop_seed)
        result = loop.run()
        return result.history[0].grad["lr"], result.params

    (g0, p0), (g1, p1) = first_grad(0), first_grad(1)
    assert g0 != g1
    assert_same(p0, p1)
    assert_same(p0, plain_training(prob, 5))


def test_a_resumed_run_with_a_train_seed_equals_the_straight_run(tmp_path):
    def make():
        return hd.HyperOptimizer(problem(), plan=OnlinePlan(window=WINDOW, train_seed=3),
                                 method=hd.reverse(), optimizer="adam", lr=0.1)

    _, whole = assert_resumes_bit_for_bit(make, tmp_path, windows=1)
    other = hd.HyperOptimizer(problem(), plan=OnlinePlan(window=WINDOW, train_seed=4),
                              method=hd.reverse(), optimizer="adam", lr=0.1).run()
    assert not torch.equal(other.params["W1"], whole.params["W1"])


def test_a_checkpoint_resumes_only_with_its_train_seed():
    first = hd.HyperOptimizer(problem(), plan=OnlinePlan(window=WINDOW, train_seed=3),
                              method=hd.reverse(), optimizer="adam", lr=0.1)
    first.step()
    state = first.state_dict()
    assert state["train_seed"] == 3
    other = hd.HyperOptimizer(problem(), plan=OnlinePlan(window=WINDOW, train_seed=4),
                              method=hd.reverse(), optimizer="adam", lr=0.1)
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer\.load_state_dict: "
                       r"train_seed must match the saved run \(3; got 4\)$"):
        other.load_state_dict(state)
    # a checkpoint written before the setting (no entry) trained on its problem's own seed
    old = {k: v for k, v in first.state_dict().items() if k != "train_seed"}
    same = hd.HyperOptimizer(problem(seed=3), plan=OnlinePlan(window=WINDOW),
                             method=hd.reverse(), optimizer="adam", lr=0.1)
    same.load_state_dict(old)
    assert same.plan.inner_step == WINDOW


# ------------------------------------------------------------------------------ the config
GRU = ["task.name=horizon_digits", "inner.steps=24", "outer.window=6", "outer.val_batch=32",
       "report.seeds=1", "output.checkpoint_seconds=0"]


def test_the_config_key_reaches_the_plan():
    online = [*GRU, "outer.mode=online"]
    assert load_config(overrides=online).outer.train_seed == -1
    _, loop = build_online(load_config(overrides=online))
    assert loop.plan.train_seed is None and loop.plan.problem.seed == loop.problems[0].seed
    _, loop = build_online(load_config(overrides=[*online, "outer.train_seed=1000000"]))
    assert loop.plan.train_seed == 1000000 and loop.plan.problem.seed == 1000000


@pytest.mark.parametrize("mode", ["offline", "meta"])
def test_the_train_seed_is_refused_outside_online_runs(mode):
    with pytest.raises(hd.HyperdiffError) as err:
        load_config(overrides=["task.name=sinusoid_maml", f"outer.mode={mode}",
                               "outer.train_seed=2"])
    assert str(err.value) == (f"config: outer.train_seed must be -1 with outer.mode = "
                              f"{mode!r} (it seeds an online run's one training; offline and "
                              "meta trainings take their minibatch seeds from outer.seed; got 2)")


def test_a_stored_config_without_the_key_reads_the_problems_own_seed(tmp_path):
    """A run directory written before the key trained on its problem's own seed: its config
    (read as stored, with ``legacy_values``) reads the default -1."""
    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "horizon_digits"\n[outer]\nmode = "online"\n'
                    'window_growth = 0.2\nexplore_when = "broken"\nbeta1 = 0.5\n'
                    'beta2 = 0.99\n')
    assert load_config(path, stored=True).outer.train_seed == -1


def test_a_killed_run_with_a_train_seed_resumes_to_the_straight_run(tmp_path):
    settings = [*GRU, "outer.mode=online", "outer.train_seed=1000001"]
    whole = run_experiment(load_config(overrides=settings), out=tmp_path / "a",
                           log=lambda _: None, progress=False)
    interrupted_run(tmp_path / "b", settings, at=2)
    stored = tomllib.loads((tmp_path / "b" / "config.toml").read_text())
    assert stored["outer"]["train_seed"] == 1000001
    resumed = run_experiment(None, resume=tmp_path / "b", log=lambda _: None, progress=False)
    history = [[r.without_timing() for r in RunDir(tmp_path / d).read_history()] for d in "ab"]
    assert len(history[0]) >= 3 and history[0] == history[1]
    assert resumed["online_model"] == whole["online_model"]
    assert resumed["tuned"] == whole["tuned"]
    default = run_experiment(load_config(overrides=[*GRU, "outer.mode=online"]),
                             out=tmp_path / "c", log=lambda _: None, progress=False)
    assert default["online_model"] != whole["online_model"]
