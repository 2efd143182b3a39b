"""TensorBoard and MLflow show the model: the tag scheme of hyperdiff.app.tags, read back with
each tool's own reader (TensorBoard's EventAccumulator, MLflow's MlflowClient), for an offline
and an online run, each interrupted and resumed (no step logged twice), with the final report
and the HParams view."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tags import VECTOR_LIMIT, hparam_tags, record_tags, report_tags, window_steps
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.discrete import categorical
from hyperdiff.hparams.hyperparams import per_feature, scalar
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.plans import OnlinePlan

OFFLINE = ["output.checkpoint_seconds=0", "task.name=mlp_digits", "inner.steps=4", "stop.max_steps=4", "report.seeds=1",
           "output.checkpoint_every=2", "log.tensorboard=tb", "log.mlflow=mlruns"]
ONLINE = ["output.checkpoint_seconds=0", "task.name=horizon_digits", "inner.steps=40", "outer.window=10", "report.seeds=1",
          "outer.hot_start=ignore", "output.checkpoint_every=2", "log.tensorboard=tb",
          "log.mlflow=mlruns"]


def interrupted_then_resumed(overrides, out, at):
    """Run until the callbacks of record ``at`` (logged, not yet checkpointed: every 2nd
    step is), interrupt there, resume; the result."""

    def stop(opt, record):
        if record.step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(overrides=overrides), out=out, progress=False,
                       log=lambda _: None, callbacks=[stop])
    return run_experiment(None, resume=out, progress=False, log=lambda _: None)


def logged_run(overrides, out):
    """An interrupted and resumed run of 4 steps: its result, history, TensorBoard events
    and MLflow run (client, run)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    result = interrupted_then_resumed(overrides, out, at=2)
    records = RunDir(out).read_history()
    assert [r.step for r in records] == [0, 1, 2, 3]
    return result, records, tensorboard(out / "tb"), *mlflow_run(out / "mlruns")


def tensorboard(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalars(events, tag):
    """``{step: value}``, failing on a step drawn twice."""
    points = events.Scalars(tag)
    counts = Counter(p.step for p in points)
    assert max(counts.values()) == 1, f"{tag}: steps logged twice {counts}"
    return {p.step: p.value for p in points}


def mlflow_run(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hyperdiff").experiment_id])
    return client, run


def mlflow_metric(client, run, key):
    points = client.get_metric_history(run.info.run_id, key)
    counts = Counter(p.step for p in points)
    assert max(counts.values()) == 1, f"{key}: steps logged twice {counts}"
    return {p.step: p.value for p in points}


def hparams_view(events):
    """The HParams plugin's session: hyperparameter names -> values, and metric tags."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    values = {k: (v.number_value if v.HasField("number_value") else v.string_value)
              for k, v in start.hparams.items()}
    return values, {m.name.tag for m in experiment.metric_infos}


def test_an_offline_run_shows_its_hyperparameters_losses_and_report(tmp_path):
    result, records, events, client, run = logged_run(OFFLINE, tmp_path)
    # mlp_digits: lr per step (T=4 values), momentum scalar, weight decay per tensor (4)
    expected = {"loss/val": [r.val_loss for r in records],
                "loss/selection": [r.selection_loss for r in records],
                "outer/lr": [r.lr for r in records],
                "hparam/momentum": [r.hparams["momentum"] for r in records],
                "hparam/lr/2": [r.hparams["lr"][2] for r in records],
                "hparam/weight_decay/3": [r.hparams["weight_decay"][3] for r in records]}
    for tag, values in expected.items():
        for logged in (scalars(events, tag), mlflow_metric(client, run, tag)):
            assert sorted(logged) == [0, 1, 2, 3]
            assert [logged[s] for s in range(4)] == pytest.approx(values, rel=1e-6)
    assert "lr" not in events.Tags()["scalars"]  # the outer rate is outer/lr, not the model's
    tuned = result["tuned"]["metrics"]
    for tag, value in {"test/loss": tuned["test"]["loss"],
                       "test/accuracy": tuned["test"]["accuracy"],
                       "initial/test/loss": result["initial"]["metrics"]["test"]["loss"]}.items():
        assert scalars(events, tag) == {4: pytest.approx(value, rel=1e-6)}
        assert mlflow_metric(client, run, tag) == {4: pytest.approx(value, rel=1e-12)}
    values, metrics = hparams_view(events)
    assert values["outer.lr"] == pytest.approx(load_config(overrides=OFFLINE).outer.lr)
    assert values["method.name"] == "reverse"
    assert values["hparam/momentum"] == pytest.approx(result["tuned"]["hparams"]["momentum"])
    assert {"test/loss", "test/accuracy", "val/loss"} <= metrics
    params = run.data.params
    assert params["inner.steps"] == "4" and params["task.name"] == "mlp_digits"
    assert float(params["hparam/momentum"]) == result["tuned"]["hparams"]["momentum"]
    assert run.info.status == "FINISHED"


def schedule_value(natural, t, steps):
    """warmup_cosine at inner step t, written out in float64 (docs of hparams/schedules.py)."""
    s = t / (steps - 1)
    warm, final = natural["lr_warmup"], natural["lr_final"]
    ramp = min(s / warm, 1.0)
    p = min(max((s - warm) / (1.0 - warm), 0.0), 1.0)
    return natural["lr_peak"] * ramp * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p)))


def test_an_online_run_shows_the_learning_rate_used_at_every_inner_step(tmp_path):
    result, records, events, client, run = logged_run(ONLINE, tmp_path)
    inner = tensorboard(tmp_path / "tb" / "inner")
    # the schedule's rate at step t is computed from the natural values of t's window
    expected = [schedule_value(records[t // 10].hparams, t, 40) for t in range(40)]
    for logged in (scalars(inner, "inner/lr"), mlflow_metric(client, run, "inner/lr")):
        assert sorted(logged) == list(range(40))
        assert [logged[t] for t in range(40)] == pytest.approx(expected, rel=1e-6)
    assert expected[0] == 0.0 and max(expected) > 0  # the warmup starts at zero
    for tag, key in (("loss/val", "val_loss"), ("outer/lr", "lr")):
        for logged in (scalars(events, tag), mlflow_metric(client, run, tag)):
            assert [logged[s] for s in range(4)] == pytest.approx(
                [getattr(r, key) for r in records], rel=1e-6)
    for logged in (scalars(events, "hparam/wd"), mlflow_metric(client, run, "hparam/wd")):
        assert [logged[s] for s in range(4)] == pytest.approx(
            [r.hparams["wd"] for r in records], rel=1e-6)
    model = result["online_model"]["test"]["accuracy"]
    assert scalars(events, "online_model/test/accuracy") == {4: pytest.approx(model)}
    assert mlflow_metric(client, run, "test/loss") == {
        4: pytest.approx(result["tuned"]["metrics"]["test"]["loss"], rel=1e-12)}
    values, _ = hparams_view(events)
    assert values["outer.mode"] == "online"


def test_the_tags_of_vectors_discrete_choices_and_unsafe_names():
    specs = {"act": categorical(("relu", "tanh", "a b+c")), "w": per_feature(0.5, 20),
             "x": scalar(1.0)}
    tags = hparam_tags({"act": [0.5, 0.25, 0.25], "w": [float(i) for i in range(20)],
                        "x": 2.0, "v": [1.0, None, 3.0]}, specs)
    assert tags == {"hparam/act/p/relu": 0.5, "hparam/act/p/tanh": 0.25,
                    "hparam/act/p/a b_c": 0.25, "hparam/w/mean": 9.5, "hparam/w/min": 0.0,
                    "hparam/w/max": 19.0, "hparam/x": 2.0, "hparam/v/0": 1.0,
                    "hparam/v/2": 3.0}
    short = hparam_tags({"w": [0.0] * VECTOR_LIMIT})
    assert sorted(short) == sorted(f"hparam/w/{i}" for i in range(VECTOR_LIMIT))
    record = SimpleNamespace(train_loss=1.0, val_loss=float("nan"), val_loss_std=None,
                             selection_loss=None, lr=0.1, grad_norm=2.0, grad_std=None,
                             grad_snr=None, trainings=3, hparams={"x": 2.0})
    assert record_tags(record) == {"loss/train": 1.0, "outer/lr": 0.1, "outer/grad_norm": 2.0,
                                   "outer/trainings": 3.0, "hparam/x": 2.0}
    report = {"tuned": {"metrics": {"test": {"loss": 0.5, "accuracy": 0.9}}},
              "initial": {"metrics": {"test": {"loss": 0.7}}},
              "online_model": {"val": {"loss": 0.6}}}
    assert report_tags(report) == {"test/loss": 0.5, "test/accuracy": 0.9,
                                   "initial/test/loss": 0.7, "online_model/val/loss": 0.6}


def test_the_window_of_inner_steps_read_from_the_loop():
    ok = SimpleNamespace(status="ok")
    assert window_steps(SimpleNamespace(inner_step=30, span=(20, 30)), ok) == range(20, 30)
    # a failed window trained nothing that stays; after a hot-start restart the loop is at 0
    assert not window_steps(SimpleNamespace(inner_step=30, span=(20, 30)),
                            SimpleNamespace(status="failed"))
    assert not window_steps(SimpleNamespace(inner_step=0, span=(20, 30)), ok)
    assert not window_steps(SimpleNamespace(step_index=3), ok)  # offline: no inner steps


def test_the_logged_windows_are_the_grown_windows_the_run_trained():
    """With growth c a window from step t trains K + floor(c t) steps (the last one shorter
    than K joins the one before): the logged windows cover the run once, in those lengths.
    Until s39 they were read as multiples of K (the grown window 26..35 logged as 35..35)."""
    steps, window, growth = 50, 5, 0.2
    expected, start = [], 0
    while start < steps:
        stop = min(start + window + int(growth * start), steps)
        stop = steps if steps - stop < window else stop
        expected.append(range(start, stop))
        start = stop
    assert [len(r) for r in expected] == [5, 6, 7, 8, 10, 14]  # the last one merged
    x = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(8, 2)
    y = x.sum(1)
    problem = hd.make_problem(
        lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
        lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
        hd.HyperParameters(lr=hd.scalar(0.1)), {"w": torch.zeros(2, dtype=torch.float64)},
        optimizer=hd.sgd("lr"), train_data=(x, y), val_data=(x, y), steps=steps, probe=False)
    logged = []
    opt = HyperOptimizer(problem, plan=OnlinePlan(window=window, growth=growth),
                         method="reverse", optimizer="adam", lr=0.05)
    opt.run([lambda loop, record: logged.append(window_steps(loop, record))])
    assert logged == expected


@pytest.mark.parametrize(("overrides", "message"), [
    (["log.mlflow=/abs"], "log.mlflow"),
    (["log.mlflow=../up"], "log.mlflow"),
    (["log.mlflow=logs/ml", "log.csv=logs"], "log.csv must not be log.mlflow's directory"),
    (["log.mlflow=logs", "log.tensorboard=logs/tb"], "log.mlflow must be a directory apart"),
    (["log.mlflow=same", "log.tensorboard=same"], "log.mlflow must be a directory apart"),
])
def test_mlflow_paths_are_refused_like_tensorboards(overrides, message):
    with pytest.raises(HyperdiffError, match=message):
        load_config(overrides=overrides)


def test_mlflow_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    config = load_config(overrides=["task.name=ridge_diabetes", "log.mlflow=mlruns"])
    with pytest.raises(HyperdiffError, match=r"hyperdiff\[mlflow\]"):
        run_experiment(config, out=tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_the_inner_rate_of_a_per_tensor_coefficient_is_its_mean(tmp_path):
    # mlp_digits: weight decay per tensor, read by the optimizer by name
    from hyperdiff.app.tags import inner_tags
    from hyperdiff.app.tasks import build_task

    problem = build_task("mlp_digits", steps=3).problems[0]
    natural = {n: (v.tolist() if v.dim() else float(v))
               for n, v in problem.hparams.natural().items()}
    natural["weight_decay"] = [1e-3, 2e-3, 3e-3, 4e-3]
    natural["lr"] = [0.1, 0.2, 0.3]
    values = inner_tags(problem, natural, range(3))
    assert [values[t]["inner/lr"] for t in range(3)] == pytest.approx([0.1, 0.2, 0.3], rel=1e-12)
    assert values[1]["inner/weight_decay"] == pytest.approx(2.5e-3, rel=1e-12)
    assert values[0]["inner/momentum"] == pytest.approx(natural["momentum"], rel=1e-12)
    assert torch.get_default_dtype() == torch.float32  # nothing changed globally


@pytest.mark.parametrize("link", ["mlruns", "mlruns/mlflow.db"])
def test_a_link_planted_in_the_mlflow_store_is_refused(tmp_path, link):
    pytest.importorskip("mlflow")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "run"
    (out / "mlruns").mkdir(parents=True)
    if link == "mlruns":
        (out / "mlruns").rmdir()
        (out / link).symlink_to(outside, target_is_directory=True)
    else:
        (out / link).symlink_to(outside / "mlflow.db")
    config = load_config(overrides=["task.name=ridge_diabetes", "log.mlflow=mlruns"])
    with pytest.raises(HyperdiffError, match="symbolic link"):
        run_experiment(config, out=out, progress=False, log=lambda m: None)
    assert list(outside.iterdir()) == []
