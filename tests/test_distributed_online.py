"""Online runs on 2 gloo ranks with ``distributed.data_parallel = true``: every rank trains the
same windows on its shard of every batch, and the run (history, result, the model it trained)
is the single-process run's to 1e-10, for reverse, forward and curvature (also with
``method.loss_terms``); an interrupted
data-parallel online run resumes to the same history; without data_parallel an online run
under torchrun is refused naming the key to set.

The references run here in one process, without data_parallel; the ranks are forked from this
process (tests/distributed_jobs.py's ``launch``, with a hard timeout), once for every check.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path
from typing import Any

import distributed_jobs
import pytest
import torch
from distributed_jobs import WORLD, close, launch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods() or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and the fork start method")

TASK = f"task.name={Path(__file__).with_name('online_dp_task.py')}:build"  # float64
ONLINE = [TASK, "outer.mode=online", "inner.steps=8", "outer.window=4", "report.seeds=1"]
RUNS = {  # two windows each
    "reverse": ["method.name=reverse"],
    "forward": ["method.name=forward"],
    "curvature": ["method.name=curvature", "method.horizon=20"],
    # the train loss's wd through the loss-term row and its frozen Jacobian's extra backward
    "curvature_loss_terms": ["method.name=curvature", "method.horizon=20",
                             "method.loss_terms=carried"],
}
# three windows of forward mode (its tangents are in the checkpoint), stopped after the first
RESUMED = ["method.name=forward", "inner.steps=12"]
DATA_PARALLEL = ["distributed.data_parallel=true"]


class Stop(KeyboardInterrupt):
    """Ctrl-C after the first window (a callback raises it on every rank)."""


def stop_after_first(_loop: Any, record: Any) -> None:
    raise Stop


def finished(settings: list[str], out: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``run_experiment``'s result and the history it wrote, without timing fields."""
    result = run_experiment(load_config(overrides=[*ONLINE, *settings]), out=out,
                            log=lambda _: None, progress=False)
    return written(out, result)


def written(out: str, result: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not hd.distributed.is_root():
        return untimed(result), []
    history = [r.without_timing() for r in RunDir(out).read_history()]
    return untimed(result), history


def untimed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("time_s", "run_dir")}


def interrupted_and_resumed(out: str) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The RESUMED run stopped after its first window, then resumed; and the windows its
    history held at the stop."""
    config = load_config(overrides=[*ONLINE, *RESUMED, *DATA_PARALLEL])
    with pytest.raises(Stop):
        run_experiment(config, out=out, log=lambda _: None, progress=False,
                       callbacks=[stop_after_first])
    at_stop = len(RunDir(out).read_history()) if hd.distributed.is_root() else 0
    result = run_experiment(None, resume=out, log=lambda _: None, progress=False)
    return (*written(out, result), at_stop)


def refused(out: str) -> str:
    """The message that refuses an online run under torchrun without data_parallel."""
    try:
        run_experiment(load_config(overrides=[*ONLINE, *RUNS["reverse"]]), out=out,
                       log=lambda _: None, progress=False)
    except hd.HyperdiffError as err:
        return str(err)
    return "not refused"


def job_online(rank: int, out: str, report: Any) -> None:
    def send(tag: str, value: Any) -> None:  # pickled here (no tensors shared by descriptor)
        report(tag, pickle.dumps(value))

    send("refused", refused(f"{out}/refused"))
    for name, settings in RUNS.items():
        send(name, finished([*settings, *DATA_PARALLEL], f"{out}/{name}"))
    send("resumed", interrupted_and_resumed(f"{out}/resumed"))


distributed_jobs.JOBS["online"] = job_online  # the forked ranks look their job up there


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process references (without data_parallel), then one start of 2 ranks."""
    here = tmp_path_factory.mktemp("one")
    references = {name: finished(settings, str(here / name)) for name, settings in RUNS.items()}
    references["resumed"] = finished(RESUMED, str(here / "resumed"))
    out = tmp_path_factory.mktemp("two")
    reports, codes, hung = launch("online", str(out), timeout=300.0)
    assert not hung and codes == [0, 0], (codes, hung, reports)
    return references, {key: pickle.loads(value) for key, value in reports.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_data_parallel_online_run_gives_the_one_process_run(runs, name):
    references, reports = runs
    result, history = references[name]
    assert len(history) == 2 and result["method"] == name.split("_")[0]
    grads = [abs(v) for record in history for g in record["grad"].values()
             for v in (g if isinstance(g, list) else [g])]
    assert max(grads) > 1e-6  # real hypergradients, also of the second window (carry)
    for rank in range(WORLD):  # every rank holds the result; rank 0 wrote the history
        assert close(reports[rank, name][0], result, 1e-10), (name, rank)
    assert close(reports[0, name][1], history, 1e-10), name
    assert reports[1, name][1] == []


def test_an_interrupted_data_parallel_online_run_resumes_to_the_one_process_run(runs):
    references, reports = runs
    result, history = references["resumed"]
    assert len(history) == 3
    _, got_history, at_stop = reports[0, "resumed"]
    assert at_stop == 1  # stopped after the first of three windows
    assert close(got_history, history, 1e-10)
    for rank in range(WORLD):
        assert close(reports[rank, "resumed"][0], result, 1e-10), rank


def test_an_online_run_under_torchrun_without_data_parallel_is_refused(runs):
    _, reports = runs
    for rank in range(WORLD):
        message = reports[rank, "refused"]
        assert message.startswith("run: distributed.data_parallel must be true for "
                                  "outer.mode = 'online' under torchrun (got false"), message
        assert "Set distributed.data_parallel = true" in message

