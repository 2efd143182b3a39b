"""torch.distributed: 2 gloo ranks on 127.0.0.1 against the single-process results.

The ranks are started here (multiprocessing, forked from a server that imported torch and
hyperdiff once) with a hard timeout, so a hung rank fails the test instead of hanging it.
Several checks share one start-up.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
from distributed_jobs import (
    WORLD,
    close,
    diverging_loop,
    dp_methods,
    dropout_problem,
    launch,
    mlp_problem,
    outer_loop,
    records,
    revert_loop,
    run_settings,
    run_to_failure,
)

import hyperdiff as hd
from hyperdiff.app.rundir import RunDir
from hyperdiff.tuner.distributed.data_parallel import ShardedBatches

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods() or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and the fork start method")


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The single-process results, computed before the ranks fork (which then start warm)."""
    spread = outer_loop()  # 3 samples over 2 ranks, warm starts, a selection split
    spread.run()
    reverting = revert_loop()  # common seeds and returns to the best, 3 samples over 2 ranks
    reverting.run()
    problem = mlp_problem()
    methods = {name: method(problem) for name, method in dp_methods().items()}
    dp_outer = outer_loop(samples=2, steps=1)
    dp_outer.run()
    run_dir = tmp_path_factory.mktemp("dist") / "reference"
    run_settings(str(run_dir))  # uninterrupted, in one process
    return {"spread": spread, "reverting": reverting, "methods": methods, "dp_outer": records(dp_outer),
            "dropout": hd.reverse()(dropout_problem(emulate_ranks=True)),
            "diverging": run_to_failure(diverging_loop()),
            "run": [r.without_timing() for r in RunDir(run_dir).read_history()]}


@pytest.fixture(scope="module")
def first(references, tmp_path_factory):
    """One start of 2 ranks: the agreement checks, then a run in which rank 1 dies."""
    out = tmp_path_factory.mktemp("dist") / "run"
    started = time.monotonic()
    reports, codes, hung = launch("first", str(out))
    assert not hung, f"ranks {hung} hung"
    return reports, codes, out, time.monotonic() - started


def test_two_ranks_equal_one_process(references, first):
    reports, spread = first[0], references["spread"]
    for rank in range(WORLD):
        history, raw = reports[rank, "spread"]
        assert close(history, records(spread), 1e-12)
        assert close(raw, spread.raw, 1e-12)
        history, raw = reports[rank, "revert"]
        assert close(history, records(references["reverting"]), 1e-12)
        assert close(raw, references["reverting"].raw, 1e-12)
    assert sum("back to the values" in r.message for r in references["reverting"].history) == 2
    methods = references["methods"]
    assert float(methods["reverse"].vector.abs().min()) > 1e-6  # a real one, not zeros
    for name, hg in methods.items():  # data-parallel == one-process full batch
        for rank in range(WORLD):
            vector, value, train_loss = reports[rank, name]
            assert (vector - hg.vector).abs().max() <= 1e-10, name
            assert abs(value - hg.value) <= 1e-10 and abs(train_loss - hg.train_loss) <= 1e-10
    # the full-batch reference against independent methods: forward mode, differences
    assert (methods["reverse"].vector - methods["forward"].vector).abs().max() < 1e-10
    assert (methods["reverse"].vector - methods["finite_difference"].vector).abs().max() < 1e-6
    for rank in range(WORLD):
        assert close(reports[rank, "dp_outer"], references["dp_outer"], 1e-10)


def test_dropout_per_rank_and_divergence_agree_across_ranks(references, first):
    reports, dropout = first[0], references["dropout"]
    for rank in range(WORLD):  # rank r's dropout masks come from rank_seed(seed, r)
        vector, value = reports[rank, "dropout"]
        assert (vector - dropout.vector).abs().max() <= 1e-10 and abs(value - dropout.value) < 1e-10
    message, history = references["diverging"]
    assert message == "no failure" and [r["status"] for r in history] == [
        "ok", "failed", "ok", "ok"] and "diverged at step 0" in history[1]["message"]
    for rank in range(WORLD):  # every rank fails the same steps and gives up together
        assert reports[rank, "diverging"] == references["diverging"]


def test_root_only_runs_every_call_on_rank_0(first):
    reports, out = first[0], first[2]
    root_pid = reports[0, "root_calls"][0]
    for rank in range(WORLD):  # every rank got rank 0's answers, even through a lock handle
        _, writer, owner, path = reports[rank, "root_calls"]
        assert writer == owner == root_pid and path == f"{out}.journal"
    with open(f"{out}.journal") as handle:
        lines = handle.read().splitlines()
    assert lines == [f"{what} by {root_pid}" for what in ("hello", "locked", "unlocked")]


def test_a_rank_that_dies_mid_step_ends_the_others_with_its_name(first):
    reports, codes, out, seconds = first
    assert codes[1] == 3 and (1, "error") not in reports  # rank 1 died inside a step
    message = reports[0, "error"]
    assert "LostRankError" in message, message
    assert "outer step 2" in message and "rank 1 is lost" in message, message
    assert codes[0] == 1 and seconds < 45
    assert len(RunDir(out).read_history()) == 2  # steps 0 and 1 were checkpointed


def test_the_last_checkpoint_resumes_and_a_hung_rank_is_named(references, first):
    out = first[2]
    reports, codes, hung = launch("resume", str(out))
    assert not hung and codes == [1, 0], reports
    got = [r.without_timing() for r in RunDir(out).read_history()]
    assert len(got) == 4 and close(got, references["run"], 1e-12)
    assert reports[0, "result"]["tuned"] == reports[1, "result"]["tuned"]
    # then rank 1 hangs, alive: rank 0 gives up after its 1 s timeout, naming it
    assert "hang probe: rank 1 did not arrive within 1 s (hung?)" in reports[0, "error"]


def test_a_rank_that_dies_inside_a_data_parallel_training_is_named(first):
    reports, codes, hung = launch("dp_death", "")
    assert not hung and codes == [1, 3], reports
    message = reports[0, "error"]
    assert "LostRankError: data_parallel reverse (seed 0): rank 1 is lost" in message, message


def test_data_parallel_refuses_what_it_cannot_do():
    with pytest.raises(hd.HyperdiffError, match="data_parallel: method must be one of"):
        hd.distributed.data_parallel("implicit")
    with pytest.raises(hd.HyperdiffError, match="engine must be"):
        hd.distributed.data_parallel(hd.forward(engine="jvp"))
    problem = mlp_problem()  # one process: the method runs unchanged
    dp = hd.distributed.data_parallel("reverse")(problem)
    assert torch.equal(dp.vector, hd.reverse()(problem).vector)
    shard = ShardedBatches(problem.train_data, 0, 3)
    with pytest.raises(hd.HyperdiffError, match="split evenly over 3 ranks"):
        shard.batch(0, 0)
