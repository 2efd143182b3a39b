"""The hypergradient check and the method advice (float64)."""

from __future__ import annotations

import functools

import pytest
import torch

import hyperdiff as hd
from hyperdiff.diagnose.advice import CANDIDATES, Candidate, recommend
from hyperdiff.diagnose.check import CheckReport, check, peak_memory
from hyperdiff.engine.solvers import neumann
from hyperdiff.methods.implicit import implicit
from hyperdiff.testing.linear import ridge, ridge_hypergradient

from conftest import synthetic_regression

D = torch.float64


synthetic = functools.partial(synthetic_regression, n=80, d=5, n_val=40)


def test_check_on_converged_ridge():
    data = synthetic()
    lp = ridge(data, regularization="per_feature", l2=2.0)
    problem = lp.problem(steps=80)
    report = check(problem, methods=[implicit(neumann(iterations=300))], memory=False)
    assert isinstance(report, CheckReport)
    labels = [r.label for r in report.rows]
    assert labels == [
        "reverse",
        "forward",
        "implicit(cg)",
        "implicit(exact)",
        "implicit(neumann)",
        "finite_difference",
    ]
    assert len(report.coordinates) == 3 and len(set(report.coordinates)) == 3
    # the finite-difference reference agrees with the closed form on its coordinates
    exact = ridge_hypergradient(*data, lp.hparams.natural()["l2"]).grad_l2
    raw_exact = exact * lp.hparams.natural()["l2"]  # d/du with l2 = exp(u)
    reference = torch.tensor(report.reference, dtype=D)
    assert torch.allclose(reference, raw_exact[report.coordinates], rtol=1e-7, atol=1e-12)
    for row in report.rows[:-1]:
        assert not row.failed and row.rel_error <= 1e-6 and row.time_s > 0
    table = report.table()
    for label in labels:
        assert label in table
    assert "rel. error" in table and "peak MiB" in table
    assert report.advice.method in labels
    assert report.recommendation.startswith(report.advice.method)


def test_check_flags_biased_implicit_when_training_stops_early():
    lp = ridge(synthetic(), regularization="scalar", l2=2.0)
    report = check(lp.problem(steps=4), coordinates=1, memory=False)
    rows = {r.label: r for r in report.rows}
    assert rows["reverse"].rel_error <= 1e-6
    assert rows["implicit(cg)"].rel_error > 1e-3
    assert "stationary" in rows["implicit(cg)"].notes
    assert not report.advice.method.startswith("implicit")


def test_peak_memory_counts_torch_allocations():
    def allocate():
        blocks = [torch.ones(2**17, dtype=D) for _ in range(4)]  # 4 x 1 MiB alive together
        total = sum(float(b.sum()) for b in blocks)
        del blocks
        return total

    total, peak = peak_memory(allocate)
    assert total == 4 * 2**17
    assert 4 * 2**20 <= peak <= 4.5 * 2**20


def test_reverse_memory_grows_with_steps_and_implicit_does_not():
    lp = ridge(synthetic(n=200, d=40), regularization="scalar", l2=2.0)
    short = check(lp.problem(steps=10), coordinates=1, memory=True)
    long = check(lp.problem(steps=80), coordinates=1, memory=True)
    peak = {
        (r.label, which): r.peak_bytes
        for which, rep in (("short", short), ("long", long))
        for r in rep.rows
    }
    assert peak[("reverse", "long")] > 4 * peak[("reverse", "short")]
    assert peak[("implicit(cg)", "long")] < 2 * peak[("implicit(cg)", "short")]


def test_check_bad_input():
    with pytest.raises(hd.HyperdiffError, match="check: problem must be a hyperdiff Problem"):
        check("problem")
    lp = ridge(synthetic(), regularization="scalar")
    with pytest.raises(hd.HyperdiffError, match="check: coordinates must be a positive int"):
        check(lp.problem(steps=2), coordinates=0)


# Advice -------------------------------------------------------------------------------------
def test_recommend_from_cost_models():
    # few hyperparameters, short training: reverse is cheapest
    assert recommend(10, 10_000, 100).method == "reverse"
    # converged long training: implicit, independent of T
    assert recommend(1000, 10_000, 50_000, converged=True).method == "implicit"
    # not converged: never implicit
    assert recommend(1000, 10_000, 50_000, converged=False).method == "reverse"
    # the tape does not fit in memory: forward (memory independent of T) for few hparams
    advice = recommend(3, 1_000_000, 10_000, memory_bytes=2**30)
    assert advice.method == "forward" and "reverse" in advice.reason


def test_recommend_from_measurements():
    measured = {
        "reverse": {"rel_error": 1e-9, "time_s": 2.0, "peak_bytes": 5e8},
        "forward": {"rel_error": 1e-9, "time_s": 6.0, "peak_bytes": 1e6},
        "implicit(cg)": {"rel_error": 1e-2, "time_s": 0.5, "peak_bytes": 1e6},
    }
    assert recommend(5, 1000, 100, measured=measured, converged=False).method == "reverse"
    limited = recommend(5, 1000, 100, measured=measured, memory_bytes=1e8)
    assert limited.method == "forward" and "fastest accurate" in limited.reason
    measured["implicit(cg)"]["rel_error"] = 1e-8
    assert recommend(5, 1000, 100, measured=measured, converged=True).method == "implicit(cg)"


def test_candidate_table_is_extensible():
    cheap = Candidate("truncated", time=lambda s: 1.0, memory=lambda s: 1.0)
    assert recommend(10, 100, 100, candidates=(*CANDIDATES, cheap)).method == "truncated"
    with pytest.raises(hd.HyperdiffError, match="recommend: num_params must be a positive int"):
        recommend(1, 0, 10)
