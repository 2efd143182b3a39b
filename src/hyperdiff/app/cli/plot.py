"""``hyperdiff plot RUN_DIR``: write PNG figures of a run."""

from __future__ import annotations

import argparse

HELP = "write PNG figures of a run (trajectories, losses, hypergradient norm, sensitivity)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by `hyperdiff run`")
    parser.add_argument("--out", help="figure directory (default: RUN_DIR/figures)")


def run(args: argparse.Namespace) -> int:
    from hyperdiff.app.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
