"""Solver, implicit, check and device inputs that gave silent wrong numbers or raw torch errors
(the review of session 40), each against an independent reference or its exact message:

- a NaN Hessian at the end point: every solver flags ``matrix_finite=False`` and ``implicit``
  raises ``NonFiniteError`` naming the Hessian (CG and Neumann returned 0.0 with a warning);
- ``tol >= 1`` refused (``x = 0`` "converged"); ``init`` on another device refused;
- Neumann's series that grows past its start is reported as divergence (closed form on a
  diagonal system);
- ``check(methods=[finite_difference(eps)])`` judges the user's row instead of hiding it under
  the reference's label; ``check``'s own bool options are checked;
- ``implicit(fixed_point=..., warn=...)`` take bools only; ``train_batches`` past a one-shot
  iterator names ``train_batches``;
- ``Problem.to`` and ``task_to_device`` check a ``torch.device`` or an index as they check a
  name; ``make_problem`` refuses parameters or data on the ``meta`` device;
- ``OnDevice`` forwards ``fixed_batch`` (curvature gave another hypergradient after
  ``Problem.to``);
- ``hyperdiff check`` words its notes as check can use them; ``implicit``'s docstring and
  ``docs/implicit.md`` quote the same measurement; ``[method] solver = "neumann"`` loads.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from test_ridge_unrolled import train_loss, val_loss

import hyperdiff as hd
from hyperdiff.engine.data import as_source
from hyperdiff.engine.device import DEVICE_HELP, OnDevice, task_to_device
from hyperdiff.engine.solvers import ConvergenceWarning, cg, exact, neumann
from hyperdiff.methods import curvature
from hyperdiff.methods.curvature import batch_scale
from hyperdiff.methods.implicit import implicit

D = torch.float64
DOCS = Path(__file__).resolve().parents[1] / "docs"
SOLVERS = [cg(), neumann(), exact()]
IDS = ["cg", "neumann", "exact"]


def ridge_data(n: int = 40, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, d, generator=g, dtype=D), torch.randn(d, generator=g, dtype=D)
    y = x @ w + 0.1 * torch.randn(n, generator=g, dtype=D)
    xv = torch.randn(n, d, generator=g, dtype=D)
    return x, y, xv, xv @ w + 0.1 * torch.randn(n, generator=g, dtype=D)




def ridge(train_data=None, val_data=None, steps: int = 20, params=None):
    x, y, xv, yv = ridge_data()
    return hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(lam=hd.scalar(0.5)),
        params if params is not None else {"w": torch.zeros(5, dtype=D)},
        optimizer=hd.sgd(0.3), train_data=(x, y) if train_data is None else train_data,
        val_data=(xv, yv) if val_data is None else val_data, steps=steps)


def device_error(where: str, got: str) -> str:
    return re.escape(f"make_problem: the device of {where} must be {DEVICE_HELP} (got {got!r})")


# 1. a Hessian that is not finite -------------------------------------------------------------
def kinked_problem() -> hd.Problem:
    """Ridge plus ``|v| ** 1.5`` with ``v`` at 0, where it stays: its second derivative is
    ``inf * 0 = NaN``; the validation loss reads ``v``, so the solve needs that row."""
    x, y, xv, yv = ridge_data()

    def kinked(p, h, b):
        return train_loss(p, h, b) + (p["v"].abs() ** 1.5).sum()

    def val(p, h, b):
        return val_loss(p, h, b) + 0.1 * p["v"].sum()

    return hd.make_problem(kinked, val, hd.HyperParameters(lam=hd.scalar(0.5)),
                           {"w": torch.zeros(5, dtype=D), "v": torch.zeros(1, dtype=D)},
                           optimizer=hd.sgd(0.3), train_data=(x, y), val_data=(xv, yv), steps=50)


@pytest.mark.parametrize("solver", [cg(), neumann(), neumann(step=0.1), exact()],
                         ids=["cg", "neumann", "neumann-step", "exact"])
def test_a_nan_matrix_is_flagged_by_every_solver(solver):
    a = torch.diag(torch.tensor([1.0, math.nan, 3.0], dtype=D))
    with pytest.warns(ConvergenceWarning, match="the matrix is not finite"):
        result = solver(lambda v: a @ v, torch.ones(3, dtype=D))
    assert not result.matrix_finite and not result.converged


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_implicit_refuses_a_hessian_that_is_not_finite(solver):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the error alone, no solver warning
        with pytest.raises(hd.NonFiniteError, match=re.escape(
                "implicit: the Hessian of train_loss at the end point of training must be finite "
                f"for the linear solve (got NaN or inf in its products with vectors in the "
                f"{solver.name} solve); train_loss is not twice differentiable there")):
            implicit(solver)(kinked_problem())


def test_the_fixed_point_form_names_its_own_matrix():
    with pytest.raises(hd.NonFiniteError, match=re.escape(
            "implicit: I - dPhi/dtheta (Phi one optimizer step) at the end point of training "
            "must be finite")):
        implicit(exact(), fixed_point=True, warn=False)(kinked_problem())


def test_a_finite_indefinite_matrix_is_not_called_non_finite():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=D))
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        result = cg()(lambda v: a @ v, torch.ones(3, dtype=D))
    assert result.matrix_finite and not result.converged
    assert exact()(lambda v: a @ v, torch.ones(3, dtype=D)).matrix_finite


# 2. and 6. solver options ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [cg, neumann, exact], ids=IDS)
@pytest.mark.parametrize("tol", [1.0, 5.0])
def test_a_tolerance_of_one_or_more_is_refused(make, tol):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"{make.__name__}: tol must be below 1, the relative residual ||b - A x|| / ||b|| "
            f"of x = 0 (got {tol!r})")):
        make(tol=tol)
    assert make(tol=0.5).options["tol"] == 0.5


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_init_on_another_device_is_refused(solver):
    a, b = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=D)), torch.ones(3, dtype=D)
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"{solver.name}: init must be on b's device 'cpu' (got a tensor on 'meta'); move it "
            "with init.to(b.device)")):
        solver(lambda v: a @ v, b, init=torch.zeros(3, dtype=D, device="meta"))


# 8. Neumann's divergence ----------------------------------------------------------------------
def test_neumann_just_above_two_over_lambda_max_reports_divergence():
    """``A = diag(1, 10, 100)``, ``b = 1``: after ``J`` terms from 0 the residual is
    ``(1 - step a_i)^J``; at ``step = 0.021 > 2 / 100`` its last entry grows as 1.1^J."""
    eig = torch.tensor([1.0, 10.0, 100.0], dtype=D)
    step, terms = 0.021, 100
    with pytest.warns(ConvergenceWarning, match=r"diverged after 100 terms .*use exact\(\) "
                                                r"for an indefinite system"):
        result = neumann(step=step, iterations=terms)(lambda v: eig * v, torch.ones(3, dtype=D))
    expected = float(((1 - step * eig) ** terms).norm() / 3**0.5)
    assert result.residual == pytest.approx(expected, rel=1e-9)
    assert expected > 1 and not result.converged


def test_neumann_that_shrinks_its_residual_is_not_called_divergent():
    eig = torch.tensor([1.0, 10.0, 100.0], dtype=D)
    with pytest.warns(ConvergenceWarning) as caught:
        result = neumann(step=0.019, iterations=5)(lambda v: eig * v, torch.ones(3, dtype=D))
    expected = float(((1 - 0.019 * eig) ** 5).norm() / 3**0.5)
    assert result.residual == pytest.approx(expected, rel=1e-9) and expected < 1
    assert "ran all 5 terms" in str(caught[0].message) and "diverged" not in result.info


# 3. check's labels and options ----------------------------------------------------------------
def test_check_judges_a_finite_difference_method_passed_in():
    report = hd.check(ridge(), methods=[hd.finite_difference(eps=0.5)], memory=False)
    label = "finite_difference(eps=0.5)"
    row = next(r for r in report.rows if r.label == label)
    mine = report.results[label].vector[report.coordinates]
    reference = torch.tensor(report.reference, dtype=D)
    assert row.rel_error == pytest.approx(float((mine - reference).norm() / reference.norm()))
    assert row.verdict == "disagrees" and label in report.verdict
    assert report.results["finite_difference"].diagnostics.get("eps") != 0.5
    assert [r.label for r in report.rows].count("finite_difference") == 1


@pytest.mark.parametrize(("option", "value", "valid"), [
    ("memory", "no", "True or False"), ("progress", "x", "True, False or None")])
def test_check_options_must_be_bools(option, value, valid):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"check: {option} must be {valid} (got {value!r})")):
        hd.check(ridge(steps=2), **{option: value})


# 4. and 10. implicit's options ----------------------------------------------------------------
@pytest.mark.parametrize(("option", "value"), [("fixed_point", "no"), ("fixed_point", None),
                                               ("fixed_point", 1), ("warn", "no")])
def test_implicit_flags_must_be_bools(option, value):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"implicit: {option} must be True or False (got {value!r})")):
        implicit(**{option: value})


def test_train_batches_past_a_one_shot_iterator_names_train_batches():
    x, y, _, _ = ridge_data()
    batches = [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(5)]
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "implicit: train_batches must be at most 5, the batches the one-shot train_data "
            "iterator held (got 50)")):
        implicit(train_batches=50, warn=False)(ridge(iter(batches), steps=3))
    # within the iterator, the average over its 5 batches is the list source's
    found = implicit(train_batches=5, warn=False)(ridge(iter(batches), steps=3))
    listed = implicit(train_batches=5, warn=False)(ridge(batches, steps=3))
    assert torch.allclose(found.vector, listed.vector, rtol=1e-12, atol=0)


# 5. and 7. devices ----------------------------------------------------------------------------
def test_problem_to_checks_a_torch_device_as_it_checks_a_name():
    problem = ridge(steps=2)
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"Problem.to: device must be {DEVICE_HELP} (got 'meta')")):
        problem.to(torch.device("meta"))
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"task: device must be {DEVICE_HELP} (got 'meta')")):
        task_to_device(object(), torch.device("meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", [torch.device("cuda"), 0], ids=["cuda", "index"])
def test_problem_to_a_missing_accelerator_is_a_hyperdiff_error(device):
    with pytest.raises(hd.HyperdiffError, match=r"^Problem.to: device must be"):
        ridge(steps=2).to(device)


def test_make_problem_refuses_parameters_and_data_on_the_meta_device():
    x, y, xv, yv = ridge_data()
    meta = [t.to("meta") for t in (x, y, xv, yv)]
    with pytest.raises(hd.HyperdiffError, match=device_error("params['w']", "meta")):
        ridge(params={"w": torch.zeros(5, dtype=D, device="meta")})
    with pytest.raises(hd.HyperdiffError, match=device_error("train_data[0]", "meta")):
        ridge(train_data=(meta[0], meta[1]))
    with pytest.raises(hd.HyperdiffError, match=device_error("val_data[1]", "meta")):
        ridge(val_data=(xv, meta[3]))
    with pytest.raises(hd.HyperdiffError, match=device_error("train_data[1][0]", "meta")):
        ridge(train_data=[(x, y), (meta[0], meta[1])])
    with pytest.raises(hd.HyperdiffError, match=device_error("train_data[0][0]", "meta")):
        ridge(train_data=iter([(meta[0], meta[1])] * 20), steps=3)  # 3 batches read


# 12. OnDevice forwards fixed_batch -----------------------------------------------------------
def test_on_device_forwards_fixed_batch():
    x, y, _, _ = ridge_data()
    for source in (as_source((x, y)), as_source([(x, y)]), as_source([(x, y), (x, y)])):
        wrapped = OnDevice(source, torch.device("cpu"), torch.float32)
        assert wrapped.fixed_batch is source.fixed_batch
        assert OnDevice(wrapped, torch.device("cpu")).fixed_batch is source.fixed_batch


def test_curvature_gives_the_same_hypergradient_after_problem_to():
    x, y, xv, yv = ridge_data()
    problem = hd.make_problem(  # the learning rate's tangent is scaled by the batch noise
        train_loss, val_loss, hd.HyperParameters(lam=hd.scalar(0.5), lr=hd.scalar(0.1)),
        {"w": torch.zeros(5, dtype=D)}, optimizer=hd.sgd("lr", 0.75), train_data=(x, y),
        val_data=(xv, yv), steps=4)
    moved = problem.to("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(curvature()(problem).vector, curvature()(moved).vector)
    assert batch_scale(problem, 0, None) == batch_scale(moved, 0, None) == 1.0


# 9. and 11. wording and docs ------------------------------------------------------------------
def test_check_command_names_options_as_check_can_use_them(capsys):
    from hyperdiff.app.cli import main

    assert main(["check", "ridge_diabetes", "--steps", "50", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(stationarity_tol=0.001)" in out and "method.stationarity_tol" not in out


def test_implicit_docstring_quotes_the_measurement_in_the_docs():
    text = (DOCS / "implicit.md").read_text(encoding="utf-8")
    ratio = re.search(r"relative error was (\d+-\d+) times the relative validation change",
                      text.replace("\n", " "))
    assert ratio is not None
    assert f"relative error was {ratio.group(1)} times" in " ".join(implicit.__doc__.split())


def test_implicit_solver_by_name_from_a_config_runs():
    from hyperdiff.app.config import load_config
    from hyperdiff.methods.registry import make_method

    config = load_config(data={"task": {"name": "ridge_diabetes"},
                               "method": {"name": "implicit", "solver": "neumann"}})
    method = make_method(config.method.name, **config.method.options)
    assert method.options["solver"].name == "neumann"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = method(ridge(steps=300))
    assert result.diagnostics["solver"].startswith("neumann(")
    text = " ".join((DOCS / "driver.md").read_text(encoding="utf-8").split())
    assert '`implicit`\'s `solver` takes a name, `solver = "cg"`, `"neumann"`' in text
