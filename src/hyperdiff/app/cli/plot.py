"""``hyperdiff plot RUN_DIR``: write PNG figures of a run.

Failed steps are marked in every figure; a run whose every step failed is drawn too (its
panels say it has no successful step). The history is read with the checks of a resume: a
damaged record is one error naming the file and the line.
"""

from __future__ import annotations

import argparse

HELP = "write PNG figures of a run (trajectories, losses, hypergradient norm, sensitivity)"


EPILOG = ("Failed steps are marked in every figure; a run whose every step failed is drawn "
          "too, its hyperparameter panels titled 'no successful step'. A damaged history line "
          "is one error naming the file and the line.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("run_dir", help="run directory written by `hyperdiff run`")
    parser.add_argument("--out", help="figure directory (default: RUN_DIR/figures)")


def run(args: argparse.Namespace) -> int:
    from hyperdiff.app.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
