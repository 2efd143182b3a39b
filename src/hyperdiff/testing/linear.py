"""Ridge and L2-regularised logistic regression as ready-made bilevel problems.

The classic test beds of hyperparameter optimization, with exact answers. With ``n`` training
examples, per-example losses ``l_i(theta)``, example weights ``c_i`` and an L2 penalty on the
weights ``w`` (``w_j`` the row of feature ``j``),

    L_train = (1/n) [ sum_i c_i l_i + 1/2 sum_j lam_j ||w_j||^2 + 1/2 mu ||b||^2 ],
    L_val   = mean_i l_i over the validation set (no penalty, no weights),

the scikit-learn convention (``lam = 1 / C``; ``Ridge(alpha=lam)``). ``l_i`` is
``1/2 (x_i'w - y_i)^2`` for ridge (no intercept: centre the data), the logistic loss for binary
labels (``w`` of shape ``(d,)``, intercept ``b`` of shape ``()``) and the softmax cross-entropy
for ``c > 2`` classes (``w`` of shape ``(d, c)``, ``b`` of shape ``(c,)``). ``mu`` is a small
fixed intercept penalty that keeps the multinomial problem identifiable (softmax is invariant to
adding a constant to every intercept).

Regularisation (the hyperparameter, positive):

- ``"scalar"``: ``lam_j = l2`` for all features (hyperparameter ``l2``, shape ``()``);
- ``"per_feature"``: one ``lam_j`` per feature (``l2``, shape ``(d,)``);
- ``"per_sample"``: the example weights ``c_i`` (``sample_weight``, shape ``(n,)``), with a
  fixed ``lam_j = fixed_l2``.

Training batches are ``(x, y, index)`` so that per-example weights follow minibatches.
:func:`ridge_solution` and :func:`ridge_hypergradient` give the closed-form answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hyperdiff.engine.device import tensor_of
from hyperdiff.engine.make import make_problem
from hyperdiff.engine.optimizers import Optimizer, sgd
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError, describe, positive_float, positive_int
from hyperdiff.hparams.hyperparams import HyperParameters, per_feature, scalar
from hyperdiff.testing.closed_form import RidgeAnswer, ridge_hypergradient, ridge_solution
from hyperdiff.typing import Params

REGULARIZATIONS = ("scalar", "per_feature", "per_sample")
DATASETS = ("breast_cancer", "digits", "diabetes")


class Dataset(NamedTuple):
    """A train/validation split: ``x`` float ``(n, d)``, ``y`` float (regression, binary) or
    long (classes)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def load_dataset(
    name: str, *, val_fraction: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Dataset:
    """One of scikit-learn's bundled data sets (offline), shuffled, split and standardised.

    Features are standardised with the training mean and std (constant features become 0);
    ``diabetes`` targets are centred (ridge has no intercept); ``breast_cancer`` labels are
    0./1.; ``digits`` labels are class indices 0..9.

    Raises:
        HyperdiffError: an unknown ``name``, ``val_fraction`` not in (0, 1) or leaving fewer
            than 2 training rows (the standardisation needs them), ``dtype`` not a floating
            torch dtype.
    """
    from sklearn import datasets

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "diabetes": datasets.load_diabetes,
    }
    if name not in loaders:
        raise HyperdiffError(f"load_dataset: name must be one of {DATASETS} (got {name!r})")
    if not 0.0 < val_fraction < 1.0:
        raise HyperdiffError(
            f"load_dataset: val_fraction must be in (0, 1) (got {describe(val_fraction)})"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HyperdiffError(f"load_dataset: dtype must be a floating-point torch dtype, e.g. "
                             f"torch.float64 (got {describe(dtype)})")
    raw = loaders[name]()
    x = torch.as_tensor(raw.data, dtype=torch.float64, device="cpu")
    y = torch.as_tensor(raw.target, device="cpu")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed), device="cpu")
    n_val = max(1, round(val_fraction * len(y)))
    if len(y) - n_val < 2:
        raise HyperdiffError(
            f"load_dataset: val_fraction must leave at least 2 training rows (got "
            f"{describe(val_fraction)}: {n_val} validation and {len(y) - n_val} training rows of "
            f"{name}'s {len(y)})")
    train, val = perm[n_val:], perm[:n_val]
    mean, std = x[train].mean(0), x[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = ((x - mean) / std).to(dtype)
    if name == "digits":
        y = y.long()
    elif name == "diabetes":
        y = (y.double() - y[train].double().mean()).to(dtype)
    else:
        y = y.to(dtype)
    return Dataset(x[train], y[train], x[val], y[val])


@dataclass(frozen=True)
class LinearProblem:
    """A ready-made linear bilevel problem (see the module doc); :meth:`problem` makes the
    :class:`~hyperdiff.Problem`, :meth:`solve` the exact inner solution by Newton's method."""

    kind: str  # "ridge", "logistic" (binary) or "multinomial"
    regularization: str
    hparams: HyperParameters
    params: Params
    train_loss: Any = field(repr=False)
    val_loss: Any = field(repr=False)
    train_data: tuple[Tensor, Tensor, Tensor] = field(repr=False)
    val_data: tuple[Tensor, Tensor] = field(repr=False)
    fixed_l2: float = 1.0
    intercept_l2: float = 0.0

    @property
    def num_params(self) -> int:
        return sum(int(p.numel()) for p in self.params.values())

    def full_train_loss(self, params: Params, raw: dict[str, Tensor] | None = None) -> Tensor:
        """``L_train`` on all training data at ``raw`` (default: current values)."""
        raw = self.hparams.raw if raw is None else raw
        raw = {k: v.to(self.train_data[0].dtype) for k, v in raw.items()}
        return self.train_loss(params, self.hparams.view(raw), self.train_data)

    def smoothness(self, raw: dict[str, Tensor] | None = None) -> float:
        """An upper bound on the largest Hessian eigenvalue of ``L_train`` (any ``theta``)."""
        x, _, _ = self.train_data
        n = x.shape[0]
        nat = self.hparams.natural(self.hparams.raw if raw is None else raw)
        weight = nat["sample_weight"].to(x) if "sample_weight" in nat else x.new_ones(n)
        lam_max = float(nat["l2"].max()) if "l2" in nat else self.fixed_l2
        if self.kind != "ridge":
            x = torch.cat([x, x.new_ones(n, 1)], 1)
        curvature = {"ridge": 1.0, "logistic": 0.25, "multinomial": 0.5}[self.kind]
        gram = x.T @ (weight[:, None] * x)
        top = float(torch.linalg.eigvalsh(gram)[-1]) * curvature
        return (top + max(lam_max, self.intercept_l2)) / n

    def problem(
        self,
        optimizer: Optimizer | None = None,
        steps: int = 200,
        *,
        params: Params | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> Problem:
        """The bilevel :class:`~hyperdiff.Problem`.

        Args:
            optimizer: inner optimizer (default ``sgd(lr=1/L)``, ``L`` from :meth:`smoothness`:
                gradient descent that converges monotonically).
            steps: inner steps T.
            params: initial parameters (default zeros).
            batch_size: minibatches of this size (default: full batch).
            seed: minibatch order.
        """
        from hyperdiff.engine.data import minibatches

        optimizer = sgd(1.0 / self.smoothness()) if optimizer is None else optimizer
        data: Any = self.train_data
        if batch_size is not None:
            data = minibatches(*self.train_data, batch_size=batch_size)
        return make_problem(
            self.train_loss,
            self.val_loss,
            self.hparams,
            self.params if params is None else params,
            optimizer=optimizer,
            train_data=data,
            val_data=self.val_data,
            steps=steps,
            seed=seed,
            probe=False,
        )

    def solve(
        self,
        raw: dict[str, Tensor] | None = None,
        *,
        init: Params | None = None,
        tol: float = 1e-13,
        maxiter: int = 100,
    ) -> Params:
        """``theta*(lam)`` by Newton's method with backtracking, from ``init`` (default zeros).

        Stops after a Newton step shorter than ``tol * (1 + ||theta||)``: convergence is
        quadratic, so the result is then exact to rounding.
        """
        names = list(self.params)
        shapes = [p.shape for p in self.params.values()]
        sizes = [p.numel() for p in self.params.values()]

        def unflat(v: Tensor) -> Params:
            return {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}

        def f(v: Tensor) -> Tensor:
            return self.full_train_loss(unflat(v), raw)

        start = self.params if init is None else init
        theta = torch.cat([start[n].reshape(-1) for n in names]).detach().clone()
        for _ in range(maxiter):
            leaf = theta.detach().requires_grad_()
            (grad,) = torch.autograd.grad(f(leaf), leaf)
            if float(grad.norm()) == 0.0:
                break
            hessian = torch.autograd.functional.hessian(f, theta, vectorize=True)
            direction = torch.linalg.solve(hessian, grad)
            step, current = 1.0, float(f(theta))
            while float(f(theta - step * direction)) > current and step > 1e-10:
                step /= 2
            theta = theta - step * direction
            if step * float(direction.norm()) <= tol * (1.0 + float(theta.norm())):
                break
        return unflat(theta.detach())


def _penalty(hview: Any, w: Tensor, fixed_l2: float, regularization: str) -> Tensor:
    """``sum_j lam_j ||w_j||^2`` (row j of ``w``)."""
    rows = (w * w).reshape(w.shape[0], -1).sum(1)
    if regularization == "per_sample":
        return fixed_l2 * rows.sum()
    return (hview["l2"] * rows).sum()


def _example_losses(kind: str, params: Params, x: Tensor, y: Tensor) -> Tensor:
    if kind == "ridge":
        return 0.5 * (x @ params["w"] - y) ** 2
    logits = x @ params["w"] + params["b"]
    if kind == "logistic":
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def _losses(kind: str, regularization: str, n: int, fixed_l2: float, intercept_l2: float):
    def train_loss(params: Params, hview: Any, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, index = batch
        per_example = _example_losses(kind, params, x, y)
        if regularization == "per_sample":
            per_example = hview["sample_weight"][index] * per_example
        penalty = _penalty(hview, params["w"], fixed_l2, regularization)
        if "b" in params and intercept_l2:
            penalty = penalty + intercept_l2 * (params["b"] ** 2).sum()
        return per_example.mean() + 0.5 * penalty / n

    def val_loss(params: Params, hview: Any, batch: tuple[Tensor, ...]) -> Tensor:
        x, y = batch[0], batch[1]
        return _example_losses(kind, params, x, y).mean()

    return train_loss, val_loss


def _build(
    kind: str,
    data: Dataset,
    regularization: str,
    l2: float,
    fixed_l2: float,
    intercept_l2: float,
    classes: int,
) -> LinearProblem:
    caller = "ridge" if kind == "ridge" else "logistic"
    if regularization not in REGULARIZATIONS:
        raise HyperdiffError(
            f"{caller}: regularization must be one of {REGULARIZATIONS} (got {regularization!r})"
        )
    l2 = positive_float(caller, "l2", l2)
    fixed_l2 = positive_float(caller, "fixed_l2", fixed_l2)
    x, y, x_val, y_val = (tensor_of(t) for t in data)
    if x.dim() != 2 or x_val.dim() != 2 or x.shape[1] != x_val.shape[1]:
        raise HyperdiffError(
            f"{caller}: x_train and x_val must be 2-D with the same number of columns "
            f"(got shapes {tuple(x.shape)} and {tuple(x_val.shape)})"
        )
    if y.dim() != 1 or y_val.dim() != 1:
        raise HyperdiffError(
            f"{caller}: y_train and y_val must be 1-D, one target per row (got shapes "
            f"{tuple(y.shape)} and {tuple(y_val.shape)}; a column (n, 1) would broadcast "
            "against the predictions: pass y.squeeze(1))")
    if y.shape[0] != x.shape[0] or y_val.shape[0] != x_val.shape[0]:
        raise HyperdiffError(f"{caller}: y must have one entry per row of x (got {len(y)})")
    n, d = x.shape
    if regularization == "scalar":
        hparams = HyperParameters(l2=scalar(l2))
    elif regularization == "per_feature":
        hparams = HyperParameters(l2=per_feature(l2, d))
    else:
        hparams = HyperParameters(sample_weight=per_feature(1.0, n))
    zeros = {
        "ridge": {"w": x.new_zeros(d)},
        "logistic": {"w": x.new_zeros(d), "b": x.new_zeros(())},
        "multinomial": {"w": x.new_zeros(d, classes), "b": x.new_zeros(classes)},
    }[kind]
    train_loss, val_loss = _losses(kind, regularization, n, fixed_l2, intercept_l2)
    return LinearProblem(
        kind,
        regularization,
        hparams,
        zeros,
        train_loss,
        val_loss,
        (x, y, torch.arange(n, device=x.device)),
        (x_val, y_val),
        fixed_l2,
        intercept_l2,
    )


def ridge(
    data: Dataset | tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    regularization: str = "per_feature",
    l2: float = 1.0,
    fixed_l2: float = 1.0,
) -> LinearProblem:
    """Ridge regression ``l_i = 1/2 (x_i'w - y_i)^2`` (no intercept) as a bilevel problem.

    Args:
        data: ``(x_train, y_train, x_val, y_val)``, e.g. ``load_dataset("diabetes")``.
        regularization: ``"scalar"``, ``"per_feature"`` or ``"per_sample"``.
        l2: initial penalty (scalar / per feature); ``fixed_l2``: the penalty for per-sample.
    """
    return _build("ridge", _dataset("ridge", data), regularization, l2, fixed_l2, 0.0, 1)


def logistic(
    data: Dataset | tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    regularization: str = "per_feature",
    l2: float = 1.0,
    fixed_l2: float = 1.0,
    intercept_l2: float = 1e-3,
) -> LinearProblem:
    """L2-regularised logistic regression: binary for float 0/1 labels, multinomial (softmax)
    for long class labels ``0..c-1``; see the module doc for the losses."""
    data = _dataset("logistic", data)
    y = tensor_of(data.y_train)
    intercept_l2 = _nonnegative("logistic", "intercept_l2", intercept_l2)
    if y.is_floating_point():
        if not bool(((y == 0) | (y == 1)).all()):
            raise HyperdiffError("logistic: float labels must be 0 or 1 (got other values)")
        return _build("logistic", data, regularization, l2, fixed_l2, intercept_l2, 1)
    classes = positive_int("logistic", "number of classes", int(y.max()) + 1)
    return _build(
        "multinomial", data, regularization, l2, fixed_l2, intercept_l2, classes
    )


def _dataset(caller: str, data: Any) -> Dataset:
    """``data`` as a :class:`Dataset`: four arrays ``(x_train, y_train, x_val, y_val)``."""
    items = None if isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(
        data, Iterable) else tuple(data)
    if items is None or len(items) != 4:
        got = describe(data) if items is None else f"{len(items)} items"
        raise HyperdiffError(f"{caller}: data must be (x_train, y_train, x_val, y_val), e.g. "
                             f"load_dataset('diabetes') (got {got})")
    return Dataset(*items)


def _nonnegative(caller: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise HyperdiffError(f"{caller}: {name} must be a non-negative number (got {value!r})")
    return float(value)


__all__ = ["DATASETS", "REGULARIZATIONS", "Dataset", "LinearProblem", "RidgeAnswer",
           "load_dataset", "logistic", "ridge", "ridge_hypergradient", "ridge_solution"]
