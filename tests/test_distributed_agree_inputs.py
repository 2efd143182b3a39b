"""What the ranks of a group must agree on: losses with BatchNorm, the time budget, the
problems, settling online, and the world size a data-parallel run resumes on.

Each test starts 2 gloo ranks (tests/distributed_jobs.py's ``launch``, forked, with a hard
timeout) for one job registered below.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from dataclasses import replace
from typing import Any

import distributed_jobs
import pytest
import torch
from distributed_jobs import WORLD, close, launch, mlp_problem, records, selection_split

import hyperdiff as hd
from hyperdiff.engine.training import validation_loss
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.online_plan import OnlinePlan

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods() or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and the fork start method")


def batchnorm_problem() -> hd.Problem:
    """A float64 MLP with BatchNorm1d: each rank's running statistics are its shard's."""
    torch.manual_seed(0)
    net = hd.functional(torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
        torch.nn.Linear(8, 1)).double())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.3 * x[:, :1]

    def loss(p, h, batch, ctx):
        return ((net(p, batch[0], ctx) - batch[1]) ** 2).mean()

    hparams = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-3))
    return hd.make_problem(loss, loss, hparams, net.params, buffers=net.buffers,
                           optimizer=hd.sgd("lr", 0.9, weight_decay="wd"),
                           train_data=hd.minibatches(x, y, batch_size=16), val_data=(x, y),
                           steps=4, probe=False)


def gathered(value: Any) -> list[Any]:
    """Every rank's ``value`` (torch.distributed's own gather, not hyperdiff's)."""
    out: list[Any] = [None] * WORLD
    torch.distributed.all_gather_object(out, value)
    return out


def own_loss(problem: hd.Problem, hg: Any) -> float:
    """The rank's own validation loss at its trained parameters and buffers."""
    hview = problem.hparams.view(problem.hparams.raw)
    with torch.no_grad():
        return float(validation_loss(problem, hg.params, hg.buffers, hview))


# ---------------------------------------------------------------------- rank jobs
def job_batchnorm(rank: int, out: str, report: Any) -> None:
    problem = batchnorm_problem()
    hg = hd.distributed.data_parallel("reverse")(problem)
    report("bn", (hg.value, gathered(own_loss(problem, hg))))
    plain = mlp_problem()  # no buffers: every rank's own loss, bit for bit
    hg = hd.distributed.data_parallel("reverse")(plain)
    report("plain", (hg.value, own_loss(plain, hg)))
    opt = HyperOptimizer(batchnorm_problem(), method=hd.distributed.data_parallel("reverse"),
                         plan=OfflinePlan(explore=0), lr=0.1, selection=selection_split(),
                         stopping=Stopping(max_steps=4))
    result = opt.run()
    report("history", ([(r.val_loss, r.selection_loss, r.best) for r in opt.history],
                       result.best_step))


def job_time(rank: int, out: str, report: Any) -> None:
    def root_logger(opt: Any, record: Any) -> None:  # a slow first write on rank 0 only
        if hd.distributed.is_root() and record.step == 0:
            time.sleep(1.0)

    opt = HyperOptimizer(mlp_problem(), samples=2, lr=0.1,
                         stopping=Stopping(max_steps=30, max_time_s=0.8, patience=None))
    opt.run(callbacks=[root_logger])
    report("time", (len(opt.history), opt.stop_reason()))


def job_mismatch(rank: int, out: str, report: Any) -> None:
    def unseeded(seed_shift: int) -> hd.Problem:
        problem = mlp_problem()
        gen = torch.Generator().manual_seed(100 + seed_shift)
        params = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype)
                  for k, v in problem.params.items()}
        return hd.make_problem(problem.train_loss, problem.val_loss, problem.hparams, params,
                               optimizer=problem.optimizer, train_data=problem.train_data,
                               val_data=problem.val_data, steps=problem.steps, probe=False)

    def attempt(tag: str, fn: Any) -> None:
        try:
            fn()
            report(tag, "no error")
        except hd.HyperdiffError as err:
            report(tag, str(err))

    mine = unseeded(rank)
    attempt("spread", lambda: HyperOptimizer(mine, samples=2,
                                             stopping=Stopping(max_steps=1)).run())
    attempt("dp loop", lambda: HyperOptimizer(
        mine, method=hd.distributed.data_parallel("reverse"),
        stopping=Stopping(max_steps=1)).run())
    attempt("dp method", lambda: hd.distributed.data_parallel("reverse")(mine))
    start = mlp_problem()
    other = start.hparams.with_raw({**start.hparams.raw,
                                    "wd": start.hparams.raw["wd"] + 0.5 * rank})
    attempt("start", lambda: HyperOptimizer(replace(start, hparams=other), samples=2,
                                            stopping=Stopping(max_steps=1)).run())


def online_loop(method: Any) -> HyperOptimizer:
    return HyperOptimizer(mlp_problem(), plan=OnlinePlan(window=2, settle=0.5), method=method,
                          lr=0.1)


def job_online(rank: int, out: str, report: Any) -> None:
    opt = online_loop(hd.distributed.data_parallel("reverse"))
    result = opt.run()
    report("online", pickle.dumps((records(opt), result.final_raw)))


def job_resume(rank: int, out: str, report: Any) -> None:
    opt = HyperOptimizer(mlp_problem(), method=hd.distributed.data_parallel("reverse"),
                         samples=2, lr=0.1, stopping=Stopping(max_steps=3))
    opt.step()
    saved, history = opt.state_dict(), list(opt.history)
    opt.run()
    again = HyperOptimizer(mlp_problem(), method=hd.distributed.data_parallel("reverse"),
                           samples=2, lr=0.1, stopping=Stopping(max_steps=3))
    again.load_state_dict(saved, history)  # the same world size: resumes
    again.run()
    spread = HyperOptimizer(mlp_problem(), samples=2, lr=0.1, stopping=Stopping(max_steps=1))
    spread.run()
    report("resume", pickle.dumps((saved, history, records(opt), records(again),
                                   spread.state_dict(), list(spread.history))))


distributed_jobs.JOBS.update({  # the forked ranks look their job up there
    "agree_batchnorm": job_batchnorm, "agree_time": job_time, "agree_mismatch": job_mismatch,
    "agree_online": job_online, "agree_resume": job_resume})


def started(job: str, timeout: float = 40.0) -> dict[tuple[int, str], Any]:
    reports, codes, hung = launch(job, "", timeout=timeout)
    assert not hung and codes == [0, 0], (codes, hung, reports)
    return reports


# ---------------------------------------------------------------------- tests
def test_batchnorm_data_parallel_ranks_record_the_mean_of_their_losses():
    reports = started("agree_batchnorm")
    _, own = reports[0, "bn"]
    assert abs(own[0] - own[1]) > 1e-4  # the shards' running statistics differ
    for rank in range(WORLD):
        value, _ = reports[rank, "bn"]
        assert abs(value - (own[0] + own[1]) / 2) <= 1e-15
        value, mine = reports[rank, "plain"]
        assert value == mine  # no buffers: the rank's own loss, bit for bit
    history0, best0 = reports[0, "history"]
    history1, best1 = reports[1, "history"]
    assert len(history0) == 4 and history0 == history1 and best0 == best1
    assert all(r[1] is not None for r in history0), history0  # selection losses agree too


def test_the_time_budget_is_judged_once_for_every_rank():
    reports = started("agree_time")
    steps0, reason0 = reports[0, "time"]
    steps1, reason1 = reports[1, "time"]
    # rank 0's clock passed the budget in its callback after step 0: every rank stops there
    assert (steps0, reason0) == (steps1, reason1) == (1, "time: 0.8 s")


def test_ranks_whose_problems_differ_are_refused_on_every_rank():
    reports = started("agree_mismatch")
    for rank in range(WORLD):
        for tag, caller in (("spread", "HyperOptimizer"), ("dp loop", "HyperOptimizer"),
                            ("dp method", "data_parallel")):
            message = reports[rank, tag]
            assert message.startswith(f"{caller}: every rank of the process group must train "
                                      "the same problem"), (tag, message)
            assert "rank 1 differing from rank 0 in theta_0 ('b1', 'w1', 'w2')" in message
        assert "rank 1 differing from rank 0 in the hyperparameters' raw values ('wd')" in \
            reports[rank, "start"]


def test_a_data_parallel_online_run_settles_as_one_process_does():
    reference = online_loop("reverse")
    result = reference.run()
    expected = records(reference)
    assert any(r["message"] == "plain window at the settled values" for r in expected)
    reports = started("agree_online")
    for rank in range(WORLD):
        history, raw = pickle.loads(reports[rank, "online"])
        assert close(history, expected, 1e-10), rank
        assert close(raw, result.final_raw, 1e-10)


def test_a_data_parallel_run_resumes_on_its_own_world_size_only():
    reports = started("agree_resume")
    saved, history, whole, resumed, spread_state, spread_history = pickle.loads(
        reports[0, "resume"])
    assert close(resumed, whole, 0.0)  # 2 ranks, resumed on 2 ranks: bit for bit
    one = HyperOptimizer(mlp_problem(), method=hd.distributed.data_parallel("reverse"),
                         samples=2, lr=0.1, stopping=Stopping(max_steps=3))
    with pytest.raises(hd.HyperdiffError) as err:
        one.load_state_dict(saved, history)
    assert "a data-parallel run must resume on the world size it trained on (got a " \
        "checkpoint of 2 rank(s), resumed on 1)" in str(err.value)
    older = {k: v for k, v in saved.items() if k != "data_parallel_world"}
    one.load_state_dict(older, history)  # written before the size was recorded: as before
    assert one.step_index == 1
    spread = HyperOptimizer(mlp_problem(), samples=2, lr=0.1, stopping=Stopping(max_steps=1))
    spread.load_state_dict(spread_state, spread_history)  # spread mode: any world size
    assert spread.step_index == 1
