"""``check``, ``recommend`` and the ``hd.testing`` oracles on the inputs a reviewer found them
wrong on (s41): a float32 check judged at the float32 finite differences' tolerance although its
reference is float64, an inexact method picked over an accurate exact one, a memory budget
ignored without measured peaks, column targets broadcast into an (n x n) loss, shapes that
reached torch, a float64 copy that computed in float32, rerun warnings leaking, truncated
recommended without its bias or its call, and a partial method blamed for what it never
computed."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.diagnose.advice import recommend
from hyperdiff.diagnose.check import check
from hyperdiff.engine.precision import in_float64
from hyperdiff.engine.solvers import ConvergenceWarning
from hyperdiff.testing import load_dataset, ridge, ridge_hypergradient, ridge_solution

from conftest import rel_err

D = torch.float64


def regression(dtype: torch.dtype, hparams: hd.HyperParameters, lr, steps: int,
               cast: bool = False) -> hd.Problem:
    """Least squares with an L2 penalty ``l2`` (4 features), data drawn in float64 and cast;
    ``cast``: the validation loss calls ``.float()``."""
    g = torch.Generator().manual_seed(2)
    x, xv = torch.randn(40, 4, generator=g, dtype=D), torch.randn(20, 4, generator=g, dtype=D)
    w = torch.randn(4, generator=g, dtype=D)
    y, yv = x @ w + 0.1 * torch.randn(40, generator=g, dtype=D), xv @ w
    x, xv, y, yv = (t.to(dtype) for t in (x, xv, y, yv))

    def val(p, h, b):
        squares = (b[0] @ p["w"] - b[1]) ** 2
        return (squares.float() if cast else squares).mean()

    def train(p, h, b):
        return val(p, h, b) + (h["l2"] * p["w"] ** 2).sum()

    return hd.make_problem(train, val, hparams, {"w": torch.zeros(4, dtype=dtype)},
                           optimizer=hd.sgd(lr), train_data=(x, y), val_data=(xv, yv),
                           steps=steps, probe=False)


def l2_only(dtype: torch.dtype, steps: int = 40, cast: bool = False) -> hd.Problem:
    return regression(dtype, hd.HyperParameters(l2=hd.per_feature(0.1, 4)), 0.1, steps, cast)


def lr_and_l2(dtype: torch.dtype) -> hd.Problem:
    """The reference's norm is the learning rate's entry (0.57); the l2 entries are ~1e-4."""
    hparams = hd.HyperParameters(lr=hd.scalar(0.02), l2=hd.per_feature(1e-3, 4))
    return regression(dtype, hparams, "lr", 20)


def zero_l2() -> hd.methods.Method:
    """Reverse mode with every l2 entry replaced by 0 (wrong by 3e-4 of the norm)."""
    def run(problem, raw):
        found = hd.reverse()(problem, raw)
        return replace(found, grad={k: v if k == "lr" else torch.zeros_like(v)
                                    for k, v in found.grad.items()})
    return hd.methods.Method("zero_l2", run)


# 1. float32 check: the tolerance of the float64 reference actually used -----------------------
def test_a_float32_check_blames_a_truncation_bias_its_float64_reference_resolves():
    exact = hd.reverse()(l2_only(D)).vector
    bias = rel_err(hd.truncated(30)(l2_only(D)).vector, exact)
    assert 1e-3 < bias < 2.4e-3  # under float32 finite differences' tolerance, far over 1e-5
    report = check(l2_only(torch.float32), methods=[hd.truncated(30)], coordinates=4,
                   memory=False)
    rows = {r.label: r for r in report.rows}
    assert report.reference_dtype == "float64"
    assert rows["truncated"].rel_error == pytest.approx(bias, rel=1e-3)
    assert rows["truncated"].verdict == "disagrees"
    assert rows["reverse"].verdict == "agrees"
    assert report.advice.method != "truncated"


def test_a_float32_method_zero_on_small_entries_disagrees():
    report = check(lr_and_l2(torch.float32), methods=[zero_l2()], coordinates=5, memory=False)
    rows = {r.label: r for r in report.rows}
    reference = torch.tensor(report.reference, dtype=D)
    assert abs(report.reference[0]) > 1e3 * max(abs(v) for v in report.reference[1:])
    assert rows["zero_l2"].rel_error == pytest.approx(
        float(reference[1:].norm() / reference.norm()), rel=1e-3)
    assert rows["zero_l2"].entries[0] == "ok" and set(rows["zero_l2"].entries[1:]) == {
        "disagrees"}
    assert rows["zero_l2"].verdict == "disagrees" and rows["reverse"].verdict == "agrees"


def test_the_float64_reruns_warnings_stay_out_of_the_output():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = check(lr_and_l2(torch.float32), coordinates=1, memory=False)
    rows = {r.label: r for r in report.rows}
    # implicit disagrees (training stops early) and is rerun on the float64 copy: the rerun's
    # ConvergenceWarning stays out of the output, the row keeps the note
    assert rows["implicit(cg)"].verdict == "disagrees"
    assert "stationary point" in rows["implicit(cg)"].notes
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_measurements_never_pick_an_inexact_method_over_an_accurate_exact_one():
    measured = {"truncated": {"rel_error": 1e-9, "time_s": 0.1},
                "reverse": {"rel_error": 1e-9, "time_s": 1.0}}
    assert recommend(5, 100, 100, measured=measured).method == "reverse"
    measured["reverse"]["rel_error"] = 0.5  # no exact one accurate: the biased one, said so
    advice = recommend(5, 100, 100, measured=measured)
    assert advice.method == "truncated" and "biased by design" in advice.reason


# 2. / 8. closed forms and ridge(): shapes --------------------------------------------------------
def data(n: int = 30, d: int = 4, m: int = 20):
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(m, d, generator=g, dtype=D)
    w = torch.randn(d, generator=g, dtype=D)
    return x, x @ w + 0.3 * torch.randn(n, generator=g, dtype=D), xv, xv @ w


def val_loss_by_hand(x, y, xv, yv, lam):
    """L_val(w*(lam)) written out: w* = (X'X + diag(lam))^-1 X'y."""
    w = torch.linalg.solve(x.T @ x + torch.diag(lam), x.T @ y)
    return 0.5 * ((xv @ w - yv) ** 2).mean()


def test_column_targets_are_refused_not_broadcast():
    x, y, xv, yv = data()
    with pytest.raises(hd.HyperdiffError, match=r"ridge: y_train and y_val must be 1-D.*"
                                                r"\(30, 1\) and \(20, 1\)"):
        ridge((x, y[:, None], xv, yv[:, None]), regularization="scalar")
    with pytest.raises(hd.HyperdiffError, match=r"logistic: y_train and y_val must be 1-D"):
        logistic_binary = (x, (y > 0).to(D)[:, None], xv, (yv > 0).to(D))
        hd.testing.logistic(logistic_binary)
    with pytest.raises(hd.HyperdiffError, match=r"ridge_solution: y must have shape \(30,\)"):
        ridge_solution(x, y[:, None], 1.0)
    with pytest.raises(hd.HyperdiffError,
                       match=r"ridge_hypergradient: y must have shape \(30,\).*\(30, 1\)"):
        ridge_hypergradient(x, y[:, None], xv, yv[:, None], 1.0)
    with pytest.raises(hd.HyperdiffError, match=r"ridge_hypergradient: y_val must have shape "
                                                r"\(20,\)"):
        ridge_hypergradient(x, y, xv, yv[:, None], 1.0)


def test_closed_forms_refuse_mismatched_shapes_by_name():
    x, y, xv, yv = data()
    cases = [
        (dict(l2=torch.ones(3, dtype=D)), r"l2 must be a number, a one-element tensor or "
                                          r"shape \(4,\).*got tensor\(\[1.0, 1.0, 1.0\]\)"),
        (dict(l2=1.0, sample_weight=torch.ones(29, dtype=D)),
         r"sample_weight must be None or a tensor of shape \(30,\).*\(29,\)"),
        (dict(l2=1.0, x_val=xv[:, :3]), r"x_val must be 2-D with x's 4 columns \(got shape "
                                        r"\(20, 3\)\)"),
    ]
    for kwargs, message in cases:
        given = {"x": x, "y": y, "x_val": xv, "y_val": yv} | kwargs
        with pytest.raises(hd.HyperdiffError, match="ridge_hypergradient: " + message):
            ridge_hypergradient(**given)
    with pytest.raises(hd.HyperdiffError, match=r"ridge_solution: l2 must be .*shape \(4,\)"):
        ridge_solution(x, y, torch.ones(3, dtype=D))
    with pytest.raises(hd.HyperdiffError, match=r"ridge: data must be \(x_train, y_train, "
                                                r"x_val, y_val\).*\(got 3 items\)"):
        ridge((x, y, xv))


def test_a_one_element_l2_is_shared_and_its_gradient_summed():
    x, y, xv, yv = data()
    shared = ridge_hypergradient(x, y, xv, yv, torch.tensor([1.3], dtype=D))
    # the derivative along lam = s (1, 1, 1, 1) by central differences of the written-out loss
    h = 1e-5
    slope = (val_loss_by_hand(x, y, xv, yv, torch.full((4,), 1.3 + h, dtype=D))
             - val_loss_by_hand(x, y, xv, yv, torch.full((4,), 1.3 - h, dtype=D))) / (2 * h)
    assert shared.grad_l2.shape == (1,)
    assert float(shared.grad_l2) == pytest.approx(float(slope), rel=1e-7)
    assert float(ridge_hypergradient(x, y, xv, yv, 1.3).grad_l2) == pytest.approx(
        float(slope), rel=1e-7)


# 3. the memory budget without measured peaks ----------------------------------------------------
def test_a_memory_budget_holds_without_measured_peaks():
    # reverse's tape by its cost model: 4 T P b = 4 * 50 * 4 * 8 = 6400 bytes; forward's
    # tangents 3 (k + 1) P b = 480 bytes
    measured = {"reverse": {"rel_error": 1e-10, "time_s": 0.01},
                "forward": {"rel_error": 1e-10, "time_s": 0.1, "peak_bytes": None}}
    assert recommend(4, 4, 50, measured=measured, bytes_per_value=8).method == "reverse"
    advice = recommend(4, 4, 50, measured=measured, bytes_per_value=8, memory_bytes=2000)
    assert advice.method == "forward" and "fastest accurate method measured" in advice.reason
    report = check(l2_only(D, steps=50), memory=False, memory_bytes=2000, coordinates=2)
    assert report.advice.method == "forward"


# 4. load_dataset ---------------------------------------------------------------------------------
def test_load_dataset_refuses_an_empty_training_split_and_integer_features():
    with pytest.raises(hd.HyperdiffError, match=r"load_dataset: val_fraction must leave at "
                                                r"least 2 training rows \(got 0.999: 442 "
                                                r"validation and 0 training rows"):
        load_dataset("diabetes", val_fraction=0.999)
    with pytest.raises(hd.HyperdiffError, match=r"load_dataset: dtype must be a floating-point "
                                                r"torch dtype.*torch.int64"):
        load_dataset("diabetes", dtype=torch.int64)
    kept = load_dataset("diabetes", val_fraction=440 / 442)  # 2 training rows: the least
    assert kept.x_train.shape == (2, 10) and bool(kept.x_val.isfinite().all())


# 5. / 7. recommend's arguments -------------------------------------------------------------------
def test_recommend_reads_an_optimizer_object_and_refuses_what_it_cannot_use():
    size = (100, 100_000, 100_000)
    by_kind = recommend(*size, memory_bytes=2**29, optimizer="sgd_momentum")
    by_object = recommend(*size, memory_bytes=2**29, optimizer=hd.sgd(0.1, momentum=0.9))
    assert by_object == by_kind and by_kind.method == "reversible"
    assert recommend(*size, memory_bytes=2**29, optimizer=hd.sgd(0.1)).method == "forward"
    refused = [
        (dict(optimizer="sgd_momentun"), r"optimizer must be None, an optimizer such as "
                                         r"hd.sgd\(0.1, momentum=0.9\), or one of \['sgd', "
                                         r"'sgd_momentum'.*\(got 'sgd_momentun'\)"),
        (dict(converged="no"), r"converged must be True, False or None \(unknown\) "
                               r"\(got 'no'\)"),
        (dict(tolerance=float("nan")), r"tolerance must be a positive finite number \(got nan"),
        (dict(tolerance=-1), r"tolerance must be a positive finite number \(got -1\)"),
        (dict(tolerance="x"), r"tolerance must be a positive finite number \(got 'x'\)"),
        (dict(measured=[("reverse", 1)]), r"measured must be a dict"),
        (dict(measured={"reverse": {"rel_error": "0", "time_s": 1.0}}),
         r"measured\['reverse'\]\['rel_error'\] must be a non-negative finite number"),
        (dict(measured={"revrse": {"rel_error": 0.0, "time_s": 1.0}}),
         r"measured's keys must be method labels naming one of \['reverse', .*\(got 'revrse'\)"),
        (dict(measured={"reverse": {"rel_err": 0.0, "time_s": 1.0}}),
         r"measured\['reverse'\] must be a dict with 'rel_error' and 'time_s'"),
    ]
    for kwargs, message in refused:
        with pytest.raises(hd.HyperdiffError, match="recommend: " + message):
            recommend(1000, 10_000, 50_000, **kwargs)


def test_check_takes_one_method_and_refuses_other_values_clearly():
    problem = l2_only(D, steps=5)
    report = check(problem, methods=hd.truncated(2), coordinates=1, memory=False)
    assert "truncated" in [r.label for r in report.rows]
    for wrong in ("reverse", 5, [hd.reverse(), None]):
        with pytest.raises(hd.HyperdiffError, match=r"check: methods must be a hyperdiff "
                                                    r"method or a sequence of them"):
            check(problem, methods=wrong, memory=False)


# 6. a loss that casts to float32 ----------------------------------------------------------------
def test_a_loss_that_casts_to_float32_is_not_called_a_float64_reference():
    problem = l2_only(torch.float32, steps=20, cast=True)
    with pytest.raises(hd.HyperdiffError, match="val_loss returns a float32 loss from float64"):
        hd.reverse()(in_float64(problem))
    report = check(problem, coordinates=2, memory=False)
    assert report.reference_dtype == "float32"
    assert "its float64 copy computes in float32" in report.table()
    assert "casts to lower precision" in report.table()
    assert "a float64 copy of the problem" not in report.table()
    # a loss that keeps float64 still gets its float64 reference
    assert check(l2_only(torch.float32, steps=20), coordinates=1,
                 memory=False).reference_dtype == "float64"


# 10. truncated recommended as what it is ---------------------------------------------------------
def test_a_truncated_recommendation_says_biased_and_gives_the_call():
    advice = recommend(50, 1_000_000, 300, memory_bytes=500e6, optimizer="adam")
    assert advice.method == "truncated"
    assert advice.reason.startswith("biased: hd.truncated(30) differentiates only the last 30 "
                                    "of the T=300 steps")
    assert "k=50 hyperparameters" in advice.reason
    assert hd.truncated(30).options["k"] == 30  # the call it names runs
    exact = recommend(50, 1_000_000, 300, optimizer="adam")
    assert exact.method == "reverse" and "biased" not in exact.reason


# 11. a partial method -----------------------------------------------------------------------------
def test_a_partial_method_is_judged_only_where_it_computed():
    problem = l2_only(D, steps=10)
    first = check(problem, coordinates=2, memory=False).coordinates[0]
    partial = hd.finite_difference(coordinates=[first])
    report = check(problem, methods=[partial], coordinates=2, memory=False)
    row = next(r for r in report.rows if "coordinates=" in r.label)
    assert row.entries == ("ok", "not computed")
    assert row.verdict == "agrees" and row.rel_error < 1e-6
    assert "not computed: " + report.coordinate_names[1] in row.notes
    assert report.advice.method != row.label
