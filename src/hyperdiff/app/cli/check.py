"""``hyperdiff check [TASK] [--set task.params.NAME=VALUE ...]``: diagnose a task's inner problem
(``hyperdiff.diagnose.check``), the task built with the given ``[task]`` keys."""

from __future__ import annotations

import argparse
import contextvars

HELP = "check a task's problem (method agreement, cost) and recommend a method"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", nargs="?", help="built-in task, or your own as "
                        "package.module:build or path/to/file.py:build (runs that code; "
                        "default: the default task)")
    parser.add_argument("--task", dest="task_option", metavar="TASK",
                        help="the same as the positional TASK")
    parser.add_argument("--steps", type=int, help="inner steps T (default: the task's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="a [task] config key, as for `hyperdiff run`: "
                        "task.params.NAME=VALUE passes NAME to the task's factory, "
                        "task.data_seed=N draws another split")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:N, mps or auto")


def run(args: argparse.Namespace) -> int:
    from hyperdiff.app.config import load_config
    from hyperdiff.app.tasks import DEFAULT_TASK, build_task
    from hyperdiff.errors import HyperdiffError

    try:
        from hyperdiff.diagnose.check import check
    except ImportError as err:
        raise HyperdiffError(
            f"check: the hyperdiff.diagnose.check module must be installed to run checks (got "
            f"ImportError: {err})"
        ) from err
    from hyperdiff.engine.device import resolve_device, task_to_device

    if args.steps is not None and args.steps < 1:
        raise HyperdiffError(f"check: --steps must be a positive int (got {args.steps})")
    for item in args.overrides:
        if not item.strip().startswith("task."):
            raise HyperdiffError(f"check: --set must set a [task] key, e.g. "
                                 f"task.params.NAME=VALUE (got {item!r})")
    device = resolve_device(args.device, "check", "--device")
    named = {k: v for k, v in (("TASK", args.task), ("--task", args.task_option)) if v}
    name = next(iter(named.values()), DEFAULT_TASK)
    given = load_config(data={"task": {"name": name}}, overrides=args.overrides).task
    if given.name != name:
        named["--set task.name"] = given.name
    if len(set(named.values())) > 1:
        raise HyperdiffError("check: the task must be named once, or the same each time (got "
                             + ", ".join(f"{k} {v}" for k, v in named.items()) + ")")
    task = task_to_device(build_task(
        name, steps=args.steps, selection_fraction=given.selection_fraction,
        cv_folds=given.cv_folds, data_seed=given.data_seed, params=given.params), device)
    # check() runs its own methods with their library defaults, none of which --set reaches
    # (only [task] keys): its notes name their options in the library's keyword form, as in
    # hd.check(problem, methods=[hd.implicit(stationarity_tol=...)]), not as [method] keys.
    # A fresh context leaves the CLI's config_syntax() (hyperdiff.wording) behind.
    report = contextvars.Context().run(check, task.problems[0],
                                       progress=False if args.quiet else None)
    print(report.table())
    print(report.recommendation)
    return 0
