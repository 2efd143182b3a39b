"""Issue 18, class 6: damaged checkpoints that the manifest lists (edited, the manifest's sha256
fixed up to match) are refused before anything uses them: one error naming the entry, what
was expected and what was found, and that the checkpoint is damaged. Online runs first, then
the same audit of the offline driver's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interrupt import interrupted_run
from test_online import recipe
from test_rundir import replace_checkpoint, torch_bytes

import hyperdiff as hd
from hyperdiff.app.experiment import run_experiment

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

CURVATURE = ["output.checkpoint_seconds=0", "task.name=horizon_digits", "inner.steps=60", "outer.window=6",
             "outer.val_batch=32", "report.seeds=1", "method.name=curvature"]
DAMAGED = r"OnlineTuner.load_state_dict: the checkpoint is damaged: "
RUN_DAMAGED = DAMAGED.replace("OnlineTuner", "HyperOptimizer")  # the CLI's loop names itself


def quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A curvature run stopped at hyper-step 3 (3 windows of 6 steps trained)."""
    run = tmp_path_factory.mktemp("online") / "run"
    interrupted_run(run, CURVATURE, at=3)
    return run


def damage(source: Path, target: Path, edit) -> Path:
    """A copy of the run ``source`` whose checkpoint ``edit`` changed, listed in the manifest."""
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    state = torch.load(target / "checkpoint.pt", weights_only=True)
    edit(state)
    replace_checkpoint(target, torch_bytes(state))
    return target


def narrower_tangent(state):
    state["tangent"][0] = state["tangent"][0][:, :-1].clone()


def no_tangent(state):
    state["tangent"] = None


def inner_step_moved(state):
    state["inner_step"] += 6


def no_opt_state(state):
    del state["opt_state"]


def float64_params(state):
    name = next(iter(state["params"]))
    assert state["params"][name].dtype == torch.float32
    state["params"][name] = state["params"][name].double()


CASES = {
    "wrong tangent shape": (narrower_tangent, r"tangent\[0\] must be a float32 tensor of shape "
                            r"\(3, (\d+)\) on cpu \(got a float32 tensor of shape \(3, (?!\1\))\d+\)"),
    "None tangent": (no_tangent, r"tangent must be a list of 4 tensors \(the run trained 18 "
                     r"steps with method 'curvature'\) \(got None\)"),
    "edited inner_step": (inner_step_moved, r"inner_step must be 18 \(the steps of the ok "
                          r"windows in the history\) \(got 24\)"),
    "missing key": (no_opt_state, r"the state must be a dict with the entries \['opt_state'\] "
                    r"\(got a dict without them\)"),
    "wrong dtype": (float64_params, r"params\['[^']+'\] must be a float32 tensor of shape "
                    r"\([\d, ]+\) on cpu \(got a float64 tensor of shape "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_with_a_fixed_up_manifest_is_one_clear_error(
        interrupted, tmp_path, case):
    edit, message = CASES[case]
    run = damage(interrupted, tmp_path / "damaged", edit)
    with pytest.raises(hd.HyperdiffError, match=r"checkpoint.pt does not fit this run's driver "
                       rf"\({RUN_DAMAGED}{message}") as caught:
        run_experiment(None, resume=run, log=quiet, progress=False)
    assert "Traceback" not in str(caught.value)


def test_the_undamaged_copy_resumes(interrupted, tmp_path):
    run = damage(interrupted, tmp_path / "copy", lambda state: None)
    result = run_experiment(None, resume=run, log=quiet, progress=False)
    assert result["status"] == "finished" and result["steps"] == 10


def tuner_after(method: str, windows: int, **options) -> tuple[hd.online.OnlineTuner, dict]:
    tuner = hd.online.OnlineTuner(recipe(12), window=2, method=method, lr=0.01, **options)
    for _ in range(windows):
        tuner.step()
    return tuner, tuner.state_dict()


def fresh(method: str, **options) -> hd.online.OnlineTuner:
    return hd.online.OnlineTuner(recipe(12), window=2, method=method, lr=0.01, **options)


def test_a_forward_tangent_of_the_wrong_shape_is_refused():
    _, state = tuner_after("forward", 2)
    state["tangent"][1] = state["tangent"][1][:1].clone()
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"tangent\[1\] must be a float64 "
                       r"tensor of shape \(3, 4\) on cpu \(got a float64 tensor of shape "
                       r"\(1, 4\) on cpu\)"):
        fresh("forward").load_state_dict(state)


def test_a_tangent_where_the_method_carries_none_is_refused():
    _, state = tuner_after("reverse", 2)
    state["tangent"] = [torch.zeros(3)]
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"tangent must be None \(got a list "
                       r"of 1 entries\)"):
        fresh("reverse").load_state_dict(state)


def test_curvature_steps_must_equal_inner_step():
    _, state = tuner_after("curvature", 2)
    state["tangent"][-1] = torch.tensor(7)
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"tangent\[-1\] \(the curvature "
                       r"steps\) must be 4 \(inner_step\) \(got 7\)"):
        fresh("curvature").load_state_dict(state)


def test_guard_counts_must_match_the_failed_records():
    _, state = tuner_after("reverse", 2)
    state["guard"]["total_failures"] = 2
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"guard\['total_failures'\] must be "
                       r"0 \(the failed records in the history\) \(got 2\)"):
        fresh("reverse").load_state_dict(state)
    _, state = tuner_after("reverse", 2)
    state["guard"]["scale"] = 0.25
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"guard\['scale'\] must be 1 "):
        fresh("reverse").load_state_dict(state)


def test_the_guard_snapshot_must_exist_after_a_good_window():
    _, state = tuner_after("reverse", 2)
    state["guard"]["good"] = None
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"guard\['good'\] must be the "
                       r"snapshot of the last good step \(got None\)"):
        fresh("reverse").load_state_dict(state)
    _, state = tuner_after("reverse", 2)
    state["guard"]["good"]["outer"]["state"][0]["exp_avg_sq"] = torch.zeros(4)
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"guard\['good'\]\['outer'\]\['state'\]"
                       r"\[0\]\['exp_avg_sq'\] must be a float64 tensor of shape \(3,\)"):
        fresh("reverse").load_state_dict(state)


def test_an_outer_state_of_the_wrong_shape_is_refused():
    _, state = tuner_after("reverse", 2)
    state["outer"]["state"][0]["exp_avg"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(hd.HyperdiffError, match=DAMAGED + r"outer\['state'\]\[0\]\['exp_avg'\] "
                       r"must be a float64 tensor of shape \(3,\) on cpu"):
        fresh("reverse").load_state_dict(state)


def test_an_undamaged_state_resumes_exactly():
    whole, _ = tuner_after("curvature", 4)
    _, state = tuner_after("curvature", 2)
    resumed = fresh("curvature")
    resumed.load_state_dict(state)
    resumed.step()
    resumed.step()
    assert torch.equal(resumed.flat, whole.flat)


# ---------------------------------------------------------------------------- offline driver
OFFLINE = ["output.checkpoint_seconds=0", "task.name=ridge_diabetes", "inner.steps=20", "stop.max_steps=6", "report.seeds=1",
           "inner.warm_start=true"]
OFFLINE_DAMAGED = r"HyperOptimizer: the checkpoint is damaged: "


@pytest.fixture(scope="module")
def interrupted_offline(tmp_path_factory) -> Path:
    """An offline run with warm starts stopped at outer step 3."""
    run = tmp_path_factory.mktemp("offline") / "run"
    interrupted_run(run, OFFLINE, at=3)
    return run


def edited(key, value):
    def edit(state):
        state[key] = value(state[key])
    return edit


def narrower_warm(state):
    params, buffers = state["warm"][0]
    name = next(iter(params))
    state["warm"][0] = ({**params, name: params[name][:-1].clone()}, buffers)


def best_moved(state):
    state["best"]["step"] -= 1


def guard_scale(state):
    state["guard"]["scale"] = 0.5


def float32_best_raw(state):
    state["best"]["raw"] = {k: v.float() for k, v in state["best"]["raw"].items()}


OFFLINE_CASES = {
    "edited since_best": (edited("since_best", lambda n: n + 2),
                          r"since_best must be \d+ \(the records after the best one\)"),
    "edited trainings": (edited("trainings", lambda n: n + 5),
                         r"trainings must be 3 \(those of the last record\) \(got 8\)"),
    "best step moved": (best_moved, r"best\['step'\] must be \d+ \(the last record marked "
                        r"best\)"),
    "best raw of another dtype": (float32_best_raw, r"best\['raw'\]\['lam'\] must be a "
                                  r"float64 tensor of shape \(\) on cpu \(got a float32 "),
    "guard scale": (guard_scale, r"guard\['scale'\] must be 1 \(shrink \*\* the failed "
                    r"records that cut it\) \(got 0.5\)"),
    "warm slot of another shape": (narrower_warm, r"warm\[0\]\[0\]\['[^']+'\] must be a "
                                   r"float64 tensor of shape \(\d+,\) on cpu"),
    "missing rng": (lambda state: state.pop("rng"), r"the state must be a dict with the "
                    r"entries \['rng'\] \(got a dict without them\)"),
}


@pytest.mark.parametrize("case", list(OFFLINE_CASES))
def test_a_damaged_offline_checkpoint_is_one_clear_error(interrupted_offline, tmp_path, case):
    edit, message = OFFLINE_CASES[case]
    run = damage(interrupted_offline, tmp_path / "damaged", edit)
    with pytest.raises(hd.HyperdiffError, match=r"checkpoint.pt does not fit this run's driver "
                       rf"\({OFFLINE_DAMAGED}{message}"):
        run_experiment(None, resume=run, log=quiet, progress=False)


def test_the_undamaged_offline_copy_resumes(interrupted_offline, tmp_path):
    run = damage(interrupted_offline, tmp_path / "copy", lambda state: None)
    result = run_experiment(None, resume=run, log=quiet, progress=False)
    assert result["status"] == "finished"
