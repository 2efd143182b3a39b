"""float64 agreement check: every peer vs. reference.py (T=10 by default).

Usage (from the repo root):  python -m benchmarks.peers.compare [--steps 10]

Prints, per optimizer and peer, the validation loss difference and the relative error of the
hypergradient g = (d/dlog_lr, d/dlog_wd[0..3]) w.r.t. the reference:
  rel_norm = ||g - g_ref|| / ||g_ref||,   rel_max = max_i |g_i - g_ref_i| / |g_ref_i|.
Then diagnostics that pin down each deviation, and a zero-gradient probe for sqrt(0) NaNs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
import warnings

if __package__ in (None, ""):  # allow `python benchmarks/peers/compare.py`
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.peers"

import torch

from .common import digits_problem, init_params, initial_hyperparameters

PEERS = ("torchopt", "higher", "betty")


def load_peer(name: str):
    return importlib.import_module(f"benchmarks.peers.{name}_impl")


def _vec(res) -> torch.Tensor:
    return torch.cat([res[1].reshape(1), res[2].reshape(-1)]).to(torch.float64)


def errors(res, ref) -> tuple[float, float, float]:
    g, g_ref = _vec(res), _vec(ref)
    rel_norm = float((g - g_ref).norm() / g_ref.norm())
    rel_max = float(((g - g_ref).abs() / g_ref.abs()).max())
    return abs(res[0] - ref[0]), rel_norm, rel_max


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def row(label: str, res, ref) -> str:
    if isinstance(res, Exception):
        return f"{label:<44} ERROR {type(res).__name__}: {res}"
    dv, rn, rm = errors(res, ref)
    nan = " NaN!" if not all(map(math.isfinite, _vec(res).tolist())) else ""
    return f"{label:<44} |dval|={dv:9.2e}  rel_norm={rn:9.2e}  rel_max={rm:9.2e}{nan}"


def run(fn, *args, **kw):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kw)
    except Exception as exc:  # report, do not hide
        return exc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    T = args.steps
    from . import reference as R

    prob = digits_problem(torch.float64)
    p0 = init_params(torch.float64)
    peers = {n: load_peer(n) for n in PEERS}
    print(
        f"torch {torch.__version__}; "
        + "; ".join(
            f"{n} {m.VERSION} ({'available' if m.AVAILABLE else 'UNAVAILABLE: ' + m.REASON})"
            for n, m in peers.items()
        )
    )
    print(f"float64, T={T}, default dtype {torch.get_default_dtype()}\n")

    for opt in ("sgd", "adam"):
        llr, lwd = initial_hyperparameters(opt, torch.float64)
        ref = R.hypergradient(prob, p0, llr, lwd, opt, T)
        print(
            f"[{opt}] reference: val={ref[0]:.15f} g_lr={ref[1].item():.15e} "
            f"g_wd={[f'{v:.15e}' for v in ref[2].tolist()]}"
        )
        for name, mod in peers.items():
            print("  " + row(name, run(mod.hypergradient, prob, p0, llr, lwd, opt, T), ref))
        if opt == "sgd":
            print(
                "  "
                + row(
                    "torchopt style=meta (MetaSGD)",
                    run(peers["torchopt"].hypergradient, prob, p0, llr, lwd, opt, T, style="meta"),
                    ref,
                )
            )
            continue
        print(
            "  "
            + row(
                "torchopt style=meta (MetaAdam)",
                run(peers["torchopt"].hypergradient, prob, p0, llr, lwd, opt, T, style="meta"),
                ref,
            )
        )
        print("  diagnostics:")
        with default_dtype(torch.float64):
            print(
                "    "
                + row(
                    "torchopt, default dtype float64",
                    run(peers["torchopt"].hypergradient, prob, p0, llr, lwd, opt, T),
                    ref,
                )
            )
        ref_legacy = R.hypergradient(prob, p0, llr, lwd, opt, T, adam_formula="legacy_eps")
        print(
            "    "
            + row(
                "higher vs reference(adam_formula=legacy_eps)",
                run(peers["higher"].hypergradient, prob, p0, llr, lwd, opt, T),
                ref_legacy,
            )
        )
        ref_off = R.hypergradient(prob, p0, llr, lwd, opt, T, adam_step_offset=1)
        print(
            "    "
            + row(
                "betty vs reference(adam_step_offset=1)",
                run(peers["betty"].hypergradient, prob, p0, llr, lwd, opt, T),
                ref_off,
            )
        )
        with default_dtype(torch.float64):
            print(
                "    "
                + row(
                    "  same, default dtype float64",
                    run(peers["betty"].hypergradient, prob, p0, llr, lwd, opt, T),
                    ref_off,
                )
            )
            print(
                "    "
                + row(
                    "betty reset_adam_step=True, dflt float64",
                    run(
                        peers["betty"].hypergradient,
                        prob,
                        p0,
                        llr,
                        lwd,
                        opt,
                        T,
                        reset_adam_step=True,
                    ),
                    ref,
                )
            )
        print(
            "    "
            + row(
                "betty reset_adam_step=True",
                run(peers["betty"].hypergradient, prob, p0, llr, lwd, opt, T, reset_adam_step=True),
                ref,
            )
        )

    # sqrt(0) probe: pixel column 0 is zero in every training row, so with fc1.weight[:, 0] = 0
    # those entries get an exactly-zero gradient (CE term and wd*p term), v = 0 and sqrt(0)
    # has an infinite derivative in the reverse pass.
    print("\n[adam, zero-gradient probe: fc1.weight[:, 0] = 0 at init]")
    p_probe = {k: v.clone() for k, v in p0.items()}
    p_probe["fc1.weight"][:, 0] = 0.0
    llr, lwd = initial_hyperparameters("adam", torch.float64)
    results = {"reference": run(R.hypergradient, prob, p_probe, llr, lwd, "adam", T)}
    for name, mod in peers.items():
        results[name] = run(mod.hypergradient, prob, p_probe, llr, lwd, "adam", T)
    for name, res in results.items():
        if isinstance(res, Exception):
            print(f"  {name:<10} ERROR {type(res).__name__}: {res}")
        else:
            g = _vec(res)
            print(
                f"  {name:<10} val={res[0]:.6f} finite={bool(torch.isfinite(g).all())} "
                f"g={[f'{v:.6e}' for v in g.tolist()]}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
