"""What the tuning subcommands (``run``, ``compare``) share: config arguments, the list of
config overrides and the torch thread count (messages go through :mod:`hyperdiff.logs`)."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``[CONFIG.toml] [--task NAME] [--set KEY=VALUE ...] [--device DEVICE]``."""
    parser.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    parser.add_argument("--task", help="built-in task, or your own task factory as "
                        "package.module:build or path/to/file.py:build, which runs that code "
                        "(same as --set task.name=TASK)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a config key, e.g. stop.max_steps=10")
    parser.add_argument("--device", help='cpu, cuda, cuda:N, mps or auto (same as --set '
                        "run.device=DEVICE)")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, with ``--task NAME`` first as ``task.name=NAME`` and ``--device D``
    last as ``run.device=D``."""
    overrides = list(args.overrides)
    if args.task:
        named = [o.split("=", 1)[1].strip().strip("'\"") for o in overrides
                 if o.replace(" ", "").startswith("task.name=")]
        if any(name != args.task for name in named):
            from hyperdiff.errors import HyperdiffError

            raise HyperdiffError(f"run: --task and --set task.name must name the same task, or "
                                 f"give one of them (got --task {args.task} and task.name = "
                                 f"{named[-1]})")
        overrides.insert(0, f"task.name={args.task}")
    if getattr(args, "device", None):
        overrides.append(f'run.device="{args.device}"')
    return overrides


def set_threads(command: str, threads: int) -> None:
    """``torch.set_num_threads(threads)``, refusing a non-positive count."""
    from hyperdiff.errors import HyperdiffError

    if threads < 1:
        raise HyperdiffError(f"{command}: --threads must be a positive int (got {threads})")
    import torch

    torch.set_num_threads(threads)


