"""Export inputs that used to train apart from hyperdiff without a word, or fail with a raw
torch error (the review of s41):

- ``hd.torch_optimizer``: an SGD momentum hyperparameter that is 0 at every step, with
  dampening (hyperdiff keeps the buffer and damps, torch.optim.SGD skips momentum) or Nesterov
  (torch refuses it); values outside the optimizer's valid ranges at a later step (a negative
  learning rate ascends, a beta2 of 1.5 failed inside ``opt.step()``); a callable coefficient
  giving a tensor of the parameter's shape, None or NaN; a dict naming one tensor twice.
- ``hd.tuned_hparams``: a run directory whose ``config.toml`` is missing or damaged skipped
  the data_seed check; natural values read back an ulp off (``0.3`` -> ``0.30000000000000004``);
  a task built with its default params written out was refused; a diverged run's best values
  could not be read.
- Lightning: an hparams name that ``schedules=`` also sets was tuned without effect.
"""

from __future__ import annotations

import json

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.lightning.optim import inner_optimizer
from hyperdiff.app.tasks import build_task
from hyperdiff.hparams.constraints import Interval, Positive


def make_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 2)).double()


def per_tensor_zero_first(params, rest: float = 0.9) -> hd.HyperParameters:
    """A momentum of 0 for the first tensor, ``rest`` for the others."""
    return hd.HyperParameters(mu=hd.per_tensor(
        params, {n: (0.0 if i == 0 else rest) for i, n in enumerate(params)}, "free"))


def refused(call) -> str:
    with pytest.raises(hd.HyperdiffError) as err:
        call()
    return str(err.value)


# --- SGD momentum 0 with dampening or Nesterov ------------------------------------------------

def hand_sgd_zero_momentum(grads: list[torch.Tensor], lr: float, dampening: float
                           ) -> torch.Tensor:
    """hyperdiff's SGD update with momentum 0 (docstring of hd.sgd), summed over steps:
    b_0 = d, b_t = 0 * b_{t-1} + (1 - dampening) d_t, p -= lr * b_t."""
    return sum((-lr * (g if t == 0 else (1 - dampening) * g) for t, g in enumerate(grads)),
               torch.zeros_like(grads[0]))


def test_a_zero_momentum_with_dampening_is_refused():
    """torch.optim.SGD with momentum 0 steps by -lr * g; hyperdiff's by -lr (1 - d) g after
    step 0: the two differ (the hand-written sums), so the export is refused."""
    grads = [torch.ones(2, dtype=torch.float64)] * 3
    assert not torch.equal(hand_sgd_zero_momentum(grads, 0.1, 0.5), -0.1 * sum(grads))
    module = make_module()
    params = hd.functional(module).params
    first = next(iter(params))
    message = refused(lambda: hd.torch_optimizer(hd.sgd(0.1, "mu", dampening=0.5),
                                                 per_tensor_zero_first(params), module))
    assert message.startswith(
        "torch_optimizer: the SGD momentum must be nonzero for every tensor with "
        f"dampening=0.5 (got 0 at every step for tensors [{first!r}]): hyperdiff keeps the "
        "momentum buffer")
    scalar = hd.HyperParameters(mu=hd.scalar(0.0, "free"))
    assert "dampening=0.5" in refused(lambda: hd.torch_optimizer(
        hd.sgd(0.1, "mu", dampening=0.5), scalar, module))


def test_a_constant_zero_momentum_with_dampening_is_exported():
    """Control: a momentum of the number 0 has no buffer in hyperdiff either."""
    opt, _ = hd.torch_optimizer(hd.sgd(0.1, 0.0, dampening=0.5),
                                hd.HyperParameters(x=hd.scalar(1.0)), make_module())
    assert opt.param_groups[0]["momentum"] == 0.0


def test_nesterov_with_a_zero_momentum_tensor_is_refused_in_our_words():
    module = make_module()
    params = hd.functional(module).params
    message = refused(lambda: hd.torch_optimizer(hd.sgd(0.1, "mu", nesterov=True),
                                                 per_tensor_zero_first(params), module))
    assert message.startswith("torch_optimizer: the SGD momentum must be nonzero for every "
                              "tensor with nesterov=True (got 0 at every step for tensors")
    assert "torch.optim.SGD refuses Nesterov momentum without momentum" in message


# --- values outside the optimizer's valid ranges ----------------------------------------------

@pytest.mark.parametrize(("optimizer", "hparams", "expected"), [
    (hd.sgd("lr"), hd.HyperParameters(lr=hd.per_step(4, torch.tensor(
        [0.1, 0.1, -0.1, 0.1], dtype=torch.float64), "free")),
     "coefficient lr='lr' of sgd must be a finite number >= 0 at every step (got -0.1 at "
     "step 2 for tensor '0.weight')"),
    (hd.adam(1e-2, (0.9, "b2")), hd.HyperParameters(b2=hd.per_step(4, torch.tensor(
        [0.99, 0.99, 1.5, 0.99], dtype=torch.float64), "free")),
     "coefficient beta2='b2' of adam must be a finite number in [0, 1) at every step (got 1.5 "
     "at step 2 for tensor '0.weight')"),
    (hd.sgd(lambda h, t, n: float("nan")), hd.HyperParameters(x=hd.scalar(1.0)),
     "coefficient lr of sgd must be a finite number >= 0 at every step (got nan at step 0 "
     "for tensor '0.weight', and 2 more steps)"),
    (hd.sgd(lambda h, t, n: -0.1), hd.HyperParameters(x=hd.scalar(1.0)),
     "coefficient lr of sgd must be a finite number >= 0 at every step (got -0.1 at step 0"),
])
def test_values_the_optimizer_refuses_are_refused_at_every_step(optimizer, hparams, expected):
    steps = None if any(isinstance(c, str) for c in optimizer.coefficients.values()) else 3
    message = refused(lambda: hd.torch_optimizer(optimizer, hparams, make_module(),
                                                 steps=steps))
    assert message.startswith(f"torch_optimizer: {expected}")


def test_a_per_tensor_value_outside_the_range_names_its_tensor():
    module = make_module()
    params = hd.functional(module).params
    names = list(params)
    wd = hd.HyperParameters(wd=hd.per_tensor(
        params, {n: (-1e-3 if n == names[2] else 1e-3) for n in names}, "free"))
    message = refused(lambda: hd.torch_optimizer(hd.sgd(0.1, weight_decay="wd"), wd, module))
    assert message.startswith(
        "torch_optimizer: coefficient weight_decay='wd' of sgd must be a finite number >= 0 at "
        f"every step (got -0.001 at step 0 for tensor {names[2]!r})")


@pytest.mark.parametrize(("coef", "got"), [
    (lambda h, t, n: h.at("wd", param=n), "got tensor of shape (4, 3) (float64) at step 0 "
     "for tensor '0.weight'"),
    (lambda h, t, n: None, "got None at step 0 for tensor '0.weight'"),
])
def test_a_callable_must_give_one_number_per_step_and_tensor(coef, got):
    module = make_module()
    hp = hd.HyperParameters(wd=hd.per_element(hd.functional(module).params, 1e-3))
    message = refused(lambda: hd.torch_optimizer(hd.sgd(0.1, weight_decay=coef), hp, module,
                                                 steps=3))
    assert message.startswith(
        "torch_optimizer: coefficient weight_decay must give one real number per step and "
        f"tensor, as a torch.optim param group holds one ({got})")


# --- one tensor named twice -------------------------------------------------------------------

class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_dict_naming_one_tensor_twice_is_refused():
    torch.manual_seed(0)
    tied = Tied().double()
    message = refused(lambda: hd.torch_optimizer(
        hd.sgd(0.1), hd.HyperParameters(x=hd.scalar(1.0)),
        dict(tied.named_parameters(remove_duplicate=False))))
    assert message.startswith(
        "torch_optimizer: module_or_params must name each tensor once (got 'a.weight' and "
        "'b.weight' for one tensor: tied weights, which torch.optim would update twice per "
        "step)")


def test_a_tied_module_steps_its_shared_tensor_once():
    """Control: the module itself names the shared tensor once; one step equals p - lr * g."""
    torch.manual_seed(0)
    tied = Tied().double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = tied.a.weight.detach().clone()
    tied(x).pow(2).mean().backward()
    expected = before - 0.1 * tied.a.weight.grad
    opt, _ = hd.torch_optimizer(hd.sgd(0.1), hd.HyperParameters(x=hd.scalar(1.0)), tied)
    opt.step()
    torch.testing.assert_close(tied.a.weight.detach(), expected, rtol=0, atol=1e-15)


# --- natural values read back exactly ---------------------------------------------------------

@pytest.mark.parametrize("constraint", [Positive("log"), Positive("softplus"), Interval(0.0, 1.0),
                                        Interval(-3.0, 7.0)], ids=str)
def test_tuned_natural_values_round_trip_through_result_json(constraint):
    """What a run writes: natural values of raw values (to_natural in float64), as JSON."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2000, generator=gen, dtype=torch.float64) * 3
    written = json.loads(json.dumps(constraint.to_natural(raw).tolist()))
    hp = hd.HyperParameters(w=hd.per_element({"p": torch.zeros(2000)}, 0.5, constraint))
    back = hd.tuned_hparams(hp, {"tuned": {"hparams": {"w": written}}}).natural()["w"]
    assert back.tolist() == written


@pytest.mark.parametrize(("value", "constraint"), [(0.3, "softplus"), (0.8, "softplus"),
                                                   (0.3, (0.0, 1.0)), (0.1, "free")])
def test_recorded_values_come_back_exactly(value, constraint):
    hp = hd.HyperParameters(x=hd.scalar(0.5, constraint))
    back = hp.with_recorded({"x": torch.tensor(value, dtype=torch.float64)})
    assert float(back.natural()["x"]) == value


def test_with_natural_is_unchanged():
    """Control: with_natural is to_raw itself (the loops' hot start and fixed choices use it)."""
    hp = hd.HyperParameters(x=hd.scalar(0.5, "softplus")).with_natural(x=0.3)
    assert torch.equal(hp.raw["x"], Positive("softplus").to_raw(
        torch.tensor(0.3, dtype=torch.float64)))


def test_a_value_no_raw_value_reaches_keeps_its_raw_value():
    """Control: exp(u) is 0.1 for no float64 u; the recorded 0.1 keeps log(0.1), as before."""
    hp = hd.HyperParameters(lr=hd.scalar(0.5)).with_recorded(
        {"lr": torch.tensor(0.1, dtype=torch.float64)})
    log = torch.log(torch.tensor(0.1, dtype=torch.float64))
    assert torch.equal(hp.raw["lr"], log)
    assert abs(float(hp.natural()["lr"]) - 0.1) <= 2 ** -55  # one ulp of 0.1


# --- run directories: config.toml, default params, a diverged run ---------------------------

TASK = '''import torch, hyperdiff as hd
def build(*, steps: int = 5, data_seed: int = 0, high: float = 1.0):
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(data_seed),
                    dtype=torch.float64)
    def mse(params, h, batch):
        return ((batch[0] @ params["w"] - batch[1]) ** 2).mean()
    def train_loss(params, h, batch):
        return mse(params, h, batch) + h["lam"] * params["w"].square().sum()
    return hd.task("bounded", model={"w": torch.zeros(3, dtype=torch.float64)},
                   train_loss=train_loss, val_loss=mse,
                   hparams=hd.HyperParameters(lam=hd.scalar(0.5 * high, (0.0, high))),
                   optimizer=hd.sgd(0.1), data=(x, x[:, 0]), steps=steps)
'''
CONFIG = "[task]\nname = \"NAME\"\ndata_seed = SEED\nparams = PARAMS\n\n[inner]\nsteps = 5\n"


@pytest.fixture(scope="module")
def task_name(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "bounded_task.py"
    path.write_text(TASK)
    return f"{path}:build"


def run_dir(folder, name: str, *, seed: int = 0, params: str = "{}", result=None):
    """A run directory as ``hyperdiff run`` leaves it, for what tuned_hparams reads: its
    ``result.json`` (the ``hd.task`` name) and its ``config.toml`` (the factory)."""
    folder.mkdir()
    result = result or {"task": "bounded", "status": "finished",
                        "tuned": {"hparams": {"lam": 0.25}}}
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "config.toml").write_text(CONFIG.replace("NAME", name).replace(
        "SEED", str(seed)).replace("PARAMS", params))
    return folder


def test_a_missing_or_damaged_config_toml_is_refused(task_name, tmp_path):
    task = build_task(task_name, steps=5, data_seed=0)
    assert float(hd.tuned_hparams(task, run_dir(tmp_path / "ok", task_name)).natural()[
        "lam"]) == 0.25
    other = run_dir(tmp_path / "seed5", task_name, seed=5)
    assert "a run with task.data_seed = 5" in refused(lambda: hd.tuned_hparams(task, other))
    gone = run_dir(tmp_path / "gone", task_name, seed=5)
    (gone / "config.toml").unlink()
    assert refused(lambda: hd.tuned_hparams(task, gone)).startswith(
        f"tuned_hparams: {gone / 'config.toml'} must be the run's config.toml, which records "
        "the task settings (task.data_seed, task.params) its values were tuned with (it does "
        "not exist)")
    cut = run_dir(tmp_path / "cut", task_name, seed=5)
    (cut / "config.toml").write_text((cut / "config.toml").read_text()[:30])
    assert refused(lambda: hd.tuned_hparams(task, cut)).startswith(
        f"tuned_hparams: {cut / 'config.toml'} must be the run's config.toml")


def test_default_params_written_out_match_a_run_that_left_them_out(task_name, tmp_path):
    plain = run_dir(tmp_path / "plain", task_name)  # result.json leaves out empty task_params
    spelled = build_task(task_name, steps=5, params={"high": 1.0})
    assert float(hd.tuned_hparams(spelled, plain).natural()["lam"]) == 0.25
    recorded = run_dir(tmp_path / "recorded", task_name, result={
        "task": "bounded", "status": "finished", "task_params": {"high": 1.0},
        "tuned": {"hparams": {"lam": 0.25}}})
    assert float(hd.tuned_hparams(build_task(task_name, steps=5), recorded).natural()[
        "lam"]) == 0.25
    other = build_task(task_name, steps=5, params={"high": 2.0})
    assert refused(lambda: hd.tuned_hparams(other, plain)).startswith(
        "tuned_hparams: source must be a run of task 'bounded' with the task's params "
        "{'high': 2.0}")


def test_a_diverged_runs_best_values_are_read(task_name, tmp_path):
    """As ``--from`` starts from them (docs/driver.md); its task params are config.toml's."""
    diverged = {"task": "bounded", "status": "diverged", "message": "NonFiniteError: x",
                "steps": 3, "best_step": 1, "best_loss": 0.5, "best_values": {"lam": 0.375}}
    task = build_task(task_name, steps=5, params={"high": 2.0})
    folder = run_dir(tmp_path / "div", task_name, params="{ high = 2.0 }", result=diverged)
    assert float(hd.tuned_hparams(task, folder).natural()["lam"]) == 0.375
    plain = run_dir(tmp_path / "div_plain", task_name, result=diverged)
    assert "a run with the params {}" in refused(lambda: hd.tuned_hparams(task, plain))


def test_a_run_that_diverged_before_any_good_step_says_so(task_name, tmp_path):
    folder = run_dir(tmp_path / "early", task_name, result={
        "task": "bounded", "status": "diverged", "message": "NonFiniteError: x", "steps": 0})
    assert refused(lambda: hd.tuned_hparams(build_task(task_name, steps=5), folder)) == (
        "tuned_hparams: source must be a finished run, or one that diverged after a good step "
        f"(got {folder / 'result.json'}, a run that diverged before any good step: "
        "NonFiniteError: x); it holds no tuned values: start a new run with a smaller outer.lr")


# --- Lightning: an hparams name that schedules= also sets -------------------------------------

def test_lightning_refuses_a_coefficient_in_hparams_and_schedules():
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr = hd.schedule("warmup_cosine", 10)
    both = hd.HyperParameters(lr=hd.per_step(10, 0.05), **lr.hyperparameters(peak=0.1))
    message = refused(lambda: inner_optimizer(opt, both, params, "lightning_task",
                                              schedules={"lr": lr}))
    assert message.startswith("lightning_task: hparams must not name a coefficient that "
                              "schedules sets (got 'lr' in both)")
    alone = hd.HyperParameters(**lr.hyperparameters(peak=0.1))  # control
    assert inner_optimizer(opt, alone, params, "lightning_task",
                           schedules={"lr": lr}).coefficients["lr"] is lr
