"""``hyperdiff tasks``: list the built-in tasks."""

from __future__ import annotations

import argparse

HELP = "list the built-in tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from hyperdiff.app.tasks import DEFAULT_TASK, list_tasks, task_params_line

    rows = list_tasks()
    width = max(len(name) for name, _, _ in rows) + 2
    for name, tunes, summary in rows:
        mark = " (default)" if name == DEFAULT_TASK else ""
        print(f"{name:<{width}}{summary}{mark}")
        print(f"{'':<{width}}tunes: {tunes}")
        if params := task_params_line(name):
            print(f"{'':<{width}}params: {params}  (--set task.params.NAME=VALUE)")
    print("\nyour own task: --task package.module:build or --task path/to/file.py:build, a "
          "function returning hd.task(...) (docs/own_model.md); naming it runs that code")
    return 0
