"""Would a preconditioner make CG fast enough on digits? Iterations of preconditioned CG.

The implicit hypergradient's linear system on multinomial logistic regression on digits with
per-feature L2 (64 hyperparameters, 650 parameters, ``l2 = 1``; the problem of
``benchmarks/implicit.py``) is formed densely here (``H`` by autograd, once), and
preconditioned CG is run on it with a few generic preconditioners, counting iterations to a
relative residual of 1e-7 and the Hessian-vector products each preconditioner costs to build.
CG needs about one HVP per iteration; the exact solve costs 650 (one per column), so a 10x
speed-up over the exact solve needs at most ~65 HVPs in all. It also times torch's own dense
Hessian routines (is hyperdiff's exact solve a fair baseline?) and ``torch.func.linearize``
(would a linearised gradient make each HVP cheaper?), best of 3.

    python benchmarks/implicit_preconditioners.py     # a few seconds

Writes benchmarks/results/implicit_preconditioners.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hyperdiff.engine.solvers import exact
from hyperdiff.testing.linear import load_dataset, logistic

RESULTS = Path(__file__).resolve().parent / "results" / "implicit_preconditioners.json"
TOL = 1e-7


def pcg(h: Tensor, b: Tensor, apply_inverse: Callable[[Tensor], Tensor], tol: float = TOL,
        maxiter: int = 2000) -> int:
    """Iterations of preconditioned CG on ``h x = b`` until ``||b - h x|| <= tol ||b||``."""
    x, r = torch.zeros_like(b), b.clone()
    z = apply_inverse(r)
    p, rz = z.clone(), r @ z
    for k in range(1, maxiter + 1):
        hp = h @ p
        alpha = rz / (p @ hp)
        x, r = x + alpha * p, r - alpha * hp
        if r.norm() <= tol * b.norm():
            return k
        z = apply_inverse(r)
        rz, rz_old = r @ z, rz
        p = z + (rz / rz_old) * p
    return maxiter


def hutchinson_diagonal(h: Tensor, probes: int, seed: int = 0) -> Tensor:
    """``mean_k z_k * (H z_k)`` over Rademacher probes (``probes`` HVPs)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (probes, h.shape[0]), generator=g).to(h) * 2 - 1
    return (z * (z @ h)).mean(0).abs().clamp_min(1e-12)


def nystrom(h: Tensor, rank: int, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """Randomised Nystrom preconditioner of rank ``rank`` (``rank`` HVPs):
    ``P^-1 = lam_r U diag(1/lam) U' + (I - U U')``."""
    g = torch.Generator().manual_seed(seed)
    omega = torch.linalg.qr(torch.randn(h.shape[0], rank, generator=g, dtype=h.dtype))[0]
    y = h @ omega
    shift = 1e-12 * float(y.norm())
    y = y + shift * omega
    c = torch.linalg.cholesky(omega.T @ y)
    b = torch.linalg.solve_triangular(c, y.T, upper=False).T
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    lam = (s**2 - shift).clamp_min(1e-300)

    def apply(r: Tensor) -> Tensor:
        ur = u.T @ r
        return r - u @ ur + u @ (ur * lam[-1] / lam)

    return apply


def kfac(x: Tensor, probs: Tensor, h: Tensor, l2: float, n_w: int, classes: int):
    """Kronecker factors of the softmax layer, ``(X'X/n) kron mean_i(diag p_i - p_i p_i') +
    (l2/n) I`` for the weights, the Hessian's diagonal for the intercepts (no HVPs)."""
    n, d = x.shape
    sa, ua = torch.linalg.eigh(x.T @ x / n)
    sg, ug = torch.linalg.eigh((torch.diag_embed(probs) - probs[:, :, None] * probs[:, None]).mean(0))
    diag_b = torch.diagonal(h)[n_w:]

    def apply(r: Tensor) -> Tensor:
        rw = ua.T @ r[:n_w].view(d, classes) @ ug
        zw = ua @ (rw / (sa[:, None] * sg[None, :] + l2 / n)) @ ug.T
        return torch.cat([zw.reshape(-1), r[n_w:] / diag_b])

    return apply


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def timings(f: Callable[[Tensor], Tensor], flat: Tensor) -> dict[str, float]:
    """Seconds for torch's dense Hessians of ``f`` at ``flat``, and for an HVP by autograd
    (reverse over reverse, retained graph) against ``torch.func.linearize`` (trace, per call)."""
    out = {
        "torch.func.hessian": best_time(lambda: torch.func.hessian(f)(flat)),
        "torch.func.jacfwd(grad)": best_time(
            lambda: torch.func.jacfwd(torch.func.grad(f))(flat)),
        "torch.autograd.functional.hessian": best_time(
            lambda: torch.autograd.functional.hessian(f, flat, vectorize=True)),
    }
    v = torch.randn_like(flat)
    leaf = flat.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)

    def hvp(u: Tensor) -> Tensor:
        return torch.autograd.grad(g, leaf, u, retain_graph=True)[0]

    out["hyperdiff exact() (Hessian + solve)"] = best_time(lambda: exact()(hvp, v))
    out["hvp autograd (per call)"] = best_time(
        lambda: [torch.autograd.grad(g, leaf, v, retain_graph=True) for _ in range(100)]) / 100
    linearized: list = []
    out["linearize trace"] = best_time(
        lambda: linearized.append(torch.func.linearize(torch.func.grad(f), flat)[1]))
    out["hvp linearize (per call)"] = best_time(
        lambda: [linearized[-1](v) for _ in range(100)]) / 100
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"result file (default: {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    lp = logistic(data, regularization="per_feature", l2=1.0)
    theta = lp.solve()
    names = list(theta)
    sizes = [theta[k].numel() for k in names]
    flat = torch.cat([theta[k].reshape(-1) for k in names])

    def unflat(v: Tensor) -> dict[str, Tensor]:
        return {k: t.view(theta[k].shape) for k, t in zip(names, v.split(sizes), strict=True)}

    h = torch.autograd.functional.hessian(lambda v: lp.full_train_loss(unflat(v)), flat)
    h = (h + h.T) / 2
    leaf = flat.clone().requires_grad_()
    (val_grad,) = torch.autograd.grad(
        lp.val_loss(unflat(leaf), lp.hparams.view(lp.hparams.raw), lp.val_data), leaf)
    random_rhs = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(1),
                             dtype=flat.dtype)
    eig = torch.linalg.eigvalsh(h)
    x = lp.train_data[0]
    w, b = theta["w"], theta["b"]
    probs = torch.softmax(x @ w + b, 1)
    diagonal = torch.diagonal(h)

    candidates: list[tuple[str, int, Callable[[Tensor], Tensor]]] = [
        ("none", 0, lambda r: r), ("jacobi (exact diagonal)", 0, lambda r: r / diagonal)]
    for probes in (10, 20, 40):
        d = hutchinson_diagonal(h, probes)
        candidates.append((f"hutchinson diagonal, {probes} probes", probes,
                           lambda r, d=d: r / d))
    for rank in (10, 20, 40, 60):
        candidates.append((f"nystrom rank {rank}", rank, nystrom(h, rank)))
    candidates.append(("kfac (softmax layer)", 0, kfac(x, probs, h, 1.0, w.numel(), w.shape[1])))

    rows = []
    print(f"P = {flat.numel()}; eigenvalues: min {eig[0]:.2e} (intercept shift direction), "
          f"2nd {eig[1]:.2e}, median {eig.median():.2e}, max {eig[-1]:.2e}")
    print(f"{'preconditioner':<34}{'build HVPs':>11}{'iters (val rhs)':>17}"
          f"{'iters (random)':>16}{'HVPs in all':>13}")
    for name, build_cost, apply in candidates:
        its_val = pcg(h, val_grad, apply)
        its_random = pcg(h, random_rhs, apply)
        rows.append({"preconditioner": name, "build_hvps": build_cost,
                     "iterations_val_rhs": its_val, "iterations_random_rhs": its_random,
                     "total_hvps_val_rhs": build_cost + its_val})
        print(f"{name:<34}{build_cost:>11}{its_val:>17}{its_random:>16}"
              f"{build_cost + its_val:>13}")
    seconds = timings(lambda v: lp.full_train_loss(unflat(v)), flat)
    print("\ntimes (s, best of 3):")
    for name, value in seconds.items():
        print(f"  {name:<36}{value:.4f}")
    out = {"command": "python benchmarks/implicit_preconditioners.py", "tol": TOL,
           "seconds": seconds,
           "params": flat.numel(), "eigenvalues": {"min": float(eig[0]), "second": float(eig[1]),
                                                   "median": float(eig.median()),
                                                   "max": float(eig[-1])},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
