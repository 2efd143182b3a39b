"""Whole jobs on 2 gloo ranks: the final report's trainings spread over the ranks, and
data-parallel segments (online windows), each against the single-process result.

The ranks are forked from this process (tests/distributed_jobs.py's ``launch``, with a hard
timeout) after the references are computed here; one start of the ranks serves every check.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
from collections.abc import Callable
from typing import Any

import distributed_jobs
import pytest
import torch
from distributed_jobs import WORLD, close, launch, mlp_problem

import hyperdiff as hd
from hyperdiff.app import experiment, search
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tasks import base
from hyperdiff.engine.training import initial_state

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods() or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and the fork start method")

# 2 outer steps of 2 trainings, then a report of 2 rows x 3 seeds: 6 trainings, 3 per rank
REPORT_SETTINGS = ["task.name=mlp_digits", "inner.steps=8", "outer.samples=2",
                   "stop.max_steps=2", "report.seeds=3"]
# a discrete task adds a relaxed row to the report: 3 rows x 2 seeds
DISCRETE_SETTINGS = ["task.name=arch_digits", "inner.steps=6", "stop.max_steps=1",
                     "report.seeds=2"]
COMPARE_ARGS = ["compare", "--set", "task.name=mlp_digits", "--set", "inner.steps=8", "--set",
                "outer.samples=2", "--set", "stop.max_steps=2", "--set", "report.seeds=2"]
WINDOWS = ((0, 3), (3, 6))  # two online windows of the 6-step problem, the carry handed on


def segment_methods() -> dict[str, hd.methods.Method]:
    return {"reverse": hd.reverse(), "forward": hd.forward(),
            "curvature": hd.methods.curvature(horizon=20), "checkpointed": hd.checkpointed(),
            "finite_difference": hd.finite_difference(warn=False)}


def windows(method: hd.methods.Method, problem: hd.Problem) -> list[tuple[Any, ...]]:
    """The two windows of WINDOWS from theta_0: (grad, value, train losses, params, carry)."""
    raw = problem.raw_tensors(None)
    with torch.no_grad():
        state = initial_state(problem, differentiable=False)
    carry, out = None, []
    for start, stop in WINDOWS:
        part = method.segment(problem, state, raw, start, stop, list(problem.val_data), carry)
        state, carry = part.state, part.carry
        out.append((part.grad, part.value, part.train_losses, state.params,
                    None if carry is None else tuple(carry)))
    return out


def counted_report(settings: list[str], out: str) -> tuple[dict[str, Any], int]:
    """``run_experiment``'s result (timing and directory removed) and how many trainings of
    the final report this process ran."""
    calls = {"n": 0}
    train = base.trained_params

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return train(*args, **kwargs)

    base.trained_params = counting  # the report's trainings only (the outer loop's are methods)
    try:
        result = experiment.run_experiment(load_config(overrides=settings), out=out,
                                           log=lambda _: None, progress=False)
    finally:
        base.trained_params = train
    return without_timing(result), calls["n"]


def without_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("time_s", "run_dir")}


def counted_compare(out: str) -> tuple[dict[str, Any], int]:
    """``hyperdiff compare``'s comparison.json (wall times removed; written by rank 0) and
    how many black-box trials this process trained."""
    calls = {"n": 0}
    trial = search.evaluate_trial

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return trial(*args, **kwargs)

    search.evaluate_trial = counting
    try:
        assert main([*COMPARE_ARGS, "--out", out, "-q"]) == 0
    finally:
        search.evaluate_trial = trial
    if not hd.distributed.is_root():
        return {}, calls["n"]
    with open(f"{out}/comparison.json") as handle:
        report = json.load(handle)
    for row in report["methods"]:
        del row["time_s"], row["curve"]["time_s"]
        for trial in row.get("trials", []):  # when each trial ended, on its rank
            del trial["time_s"]
    return report, calls["n"]


def job_whole(rank: int, out: str, report: Callable[[str, Any], None]) -> None:
    def send(tag: str, value: Any) -> None:  # pickled here: tensors would be shared by a
        report(tag, pickle.dumps(value))     # file descriptor that ends with this process

    send("report", counted_report(REPORT_SETTINGS, f"{out}/report"))
    send("discrete", counted_report(DISCRETE_SETTINGS, f"{out}/discrete"))
    send("compare", counted_compare(f"{out}/compare"))
    problem = mlp_problem()
    for name, method in segment_methods().items():
        send(name, windows(hd.distributed.data_parallel(method), problem))


distributed_jobs.JOBS["whole"] = job_whole  # the forked ranks look their job up there


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process references, then one start of 2 ranks."""
    here = tmp_path_factory.mktemp("one")
    problem = mlp_problem()
    references = {"report": counted_report(REPORT_SETTINGS, str(here / "report")),
                  "discrete": counted_report(DISCRETE_SETTINGS, str(here / "discrete")),
                  "compare": counted_compare(str(here / "compare")),
                  **{name: windows(method, problem)
                     for name, method in segment_methods().items()}}
    out = tmp_path_factory.mktemp("two")
    reports, codes, hung = launch("whole", str(out), timeout=120.0)
    assert not hung and codes == [0, 0], (codes, hung, reports)
    return references, {key: pickle.loads(value) for key, value in reports.items()}, out


@pytest.mark.parametrize("name, rows", [("report", 2), ("discrete", 3)])
def test_the_report_trainings_are_spread_and_give_the_one_process_result(runs, name, rows):
    references, reports, out = runs
    single, trained = references[name]
    seeds = len(single["report_seeds"])
    assert trained == rows * seeds  # one process: every training of the report
    counts = []
    for rank in range(WORLD):
        result, count = reports[rank, name]
        assert result == single, rank  # bit for bit, the table's numbers and result.json's
        counts.append(count)
    assert counts == [len(range(r, rows * seeds, WORLD)) for r in range(WORLD)]
    written = RunDir(out / name).read_result()
    assert without_timing(written) == single


def test_compare_spreads_its_random_trials_and_gives_the_one_process_comparison(runs):
    references, reports, _ = runs
    single, trained = references["compare"]
    rows = {row["method"]: row for row in single["methods"]}
    # TPE's row only with Optuna installed (an optional extra; CI has none)
    assert set(rows) == {"hyperdiff", "random", *(["tpe"] if search.optuna_available() else [])}
    random, tpe = rows["random"]["trainings"], rows.get("tpe", {"trainings": 0})["trainings"]
    assert trained == random + tpe
    assert reports[0, "compare"][0] == single  # rank 0 wrote it
    for rank in range(WORLD):  # random trials spread, TPE's (sequential) on every rank
        assert reports[rank, "compare"][1] == len(range(rank, random, WORLD)) + tpe


@pytest.mark.parametrize("name", list(segment_methods()))
def test_a_data_parallel_window_equals_the_one_process_window(runs, name):
    references, reports, _ = runs
    single = references[name]
    assert float(single[0][0]["lr"].abs().max()) > 1e-6  # a real hypergradient
    for rank in range(WORLD):
        assert close(reports[rank, name], single, 1e-10), (name, rank)


def test_data_parallel_reverse_and_forward_windows_agree(runs):
    """An independent check of the sharded windows: from the same state, the first window of
    reverse mode and of forward mode (tangents from zero) are the same hypergradient."""
    _, reports, _ = runs
    for rank in range(WORLD):
        reverse, forward = reports[rank, "reverse"][0][0], reports[rank, "forward"][0][0]
        assert close(reverse, forward, 1e-10), rank
