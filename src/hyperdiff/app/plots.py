"""PNG figures of a run directory (``hyperdiff plot RUN_DIR``).

- ``hparams.png``: each hyperparameter per successful outer step (natural units; failed steps
  are red lines); a vector is drawn as its mean with a 10-90% band, a discrete hyperparameter
  as one line per choice, its probability. A run whose every step failed is drawn too: its
  failed steps marked, each panel titled "no successful step".
- ``losses.png``: train, validation and selection loss per outer step; the best step and failed
  steps are marked.
- ``hypergradient.png``: norm of the mean raw hypergradient per step, with the spread over the
  step's trainings when there were several, and the outer learning rate.
- ``sensitivity.png``: hyperparameters (left) and single coordinates (right, top 20) ranked by
  the mean absolute raw hypergradient over the successful steps. Raw units are log units for
  positive hyperparameters, so sizes compare across very different scales.

Figures are drawn with matplotlib's object API (no pyplot, no global state, no display) and
written atomically. matplotlib's config and font cache go to a private temporary directory,
removed at exit, not to ``~/.config/matplotlib`` and ``~/.cache/matplotlib``
(:func:`private_matplotlib_config`; the font list is built again each time, a fraction of a
second). The history is read as ``--resume`` reads it: an unfinished last line is
skipped with a warning (blank lines at the end silently), any other damage is one error naming
the file and the line; so is a record whose ``hparams`` or ``grad`` do not give every
hyperparameter of ``hparams.json`` its size in numbers (:func:`check_values`). The lines that
the last checkpoint covers must hash as the manifest records (an edited value is refused, as
``--resume`` refuses it), and a finished run's lines past its result's ``steps`` are left out
with a warning (:meth:`~hyperdiff.app.rundir.RunDir.verify_history`).
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.rundir import FIGURES, HISTORY, RunDir, atomic_write_bytes
from hyperdiff.app.rundir.files import os_errors, refuse_link
from hyperdiff.app.rundir.records import recover
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.hparams.discrete import Softmax
from hyperdiff.tuner.history import History, StepRecord

FIGURE_NAMES = ("hparams.png", "losses.png", "hypergradient.png", "sensitivity.png")
MPLCONFIGDIR, MATPLOTLIBRC = "MPLCONFIGDIR", "MATPLOTLIBRC"


@contextmanager
def private_matplotlib_config() -> Iterator[None]:
    """Import matplotlib in the block with its config and cache directory (``MPLCONFIGDIR``)
    a private temporary one, removed at exit: else its first import makes
    ``~/.config/matplotlib`` and writes its font list to ``~/.cache/matplotlib``, outside the
    run directory. The variable is set for the block alone (matplotlib reads it once, at
    import); nothing changes where it is set already or matplotlib is imported."""
    if MPLCONFIGDIR in os.environ or "matplotlib" in sys.modules:
        yield
        return
    path = tempfile.mkdtemp(prefix="hyperdiff-matplotlib-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ[MPLCONFIGDIR] = path
    own_rc = None if MATPLOTLIBRC in os.environ else _users_matplotlibrc()
    if own_rc is not None:  # the user's settings are still read, from where they are
        os.environ[MATPLOTLIBRC] = str(own_rc)
    try:
        yield
    finally:
        os.environ.pop(MPLCONFIGDIR, None)
        if own_rc is not None:
            os.environ.pop(MATPLOTLIBRC, None)


def _users_matplotlibrc() -> Path | None:
    """The ``matplotlibrc`` that matplotlib would read from the user's config directory
    (``$XDG_CONFIG_HOME/matplotlib`` or ``~/.config/matplotlib``), if there is one."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    rc = Path(base) / "matplotlib" / "matplotlibrc"
    return rc if rc.is_file() else None


with private_matplotlib_config():
    import matplotlib.font_manager  # noqa: F401  (writes its font list now, in the block)
    from matplotlib.figure import Figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the figures of ``run_dir`` into ``out`` (default ``run_dir/figures``)."""
    rundir = RunDir(run_dir)
    records = rundir.read_history()
    if not records:
        raise HyperdiffError(f"plot: {rundir.path} must hold at least one outer step (got 0)")
    meta = rundir.read_hparams()
    check_values(records, meta, rundir.file(HISTORY))
    history = History(rundir.verify_history(records))
    target = Path(out) if out else rundir.path / FIGURES
    if not out:
        refuse_link(target)  # a planted link must not send the figures elsewhere
    for name in FIGURE_NAMES:  # refused before any figure is written, not halfway
        refuse_link(target / name)
    with os_errors(target, "create the figure directory"):
        target.mkdir(parents=True, exist_ok=True)
    figures = dict(zip(FIGURE_NAMES, (hparams_figure(history, meta), losses_figure(history),
                                      hypergradient_figure(history),
                                      sensitivity_figure(history, meta,
                                                         rundir.file("hparams.json"))),
                       strict=True))
    paths = []
    for name, figure in figures.items():
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(target / name, png.getvalue())
        paths.append(target / name)
    return paths


def check_values(records: Sequence[StepRecord], meta: Mapping[str, Any], path: Path) -> None:
    """Raise, naming ``path`` and the line, unless every record's ``hparams`` (and ``grad``,
    when it has one) give each hyperparameter of ``meta`` (``hparams.json``; without it, of
    line 1) its size in numbers or nulls."""
    sizes = expected_sizes(meta, records[0].hparams) if records else {}
    for number, record in enumerate(records, 1):
        for field, values in (("hparams", record.hparams), ("grad", record.grad)):
            problem = None if values is None else values_problem(values, sizes)
            if problem is not None:
                raise HyperdiffError(
                    f"run directory: {path} line {number} is not a step record: field "
                    f"{field!r} {problem}; {recover(path.parent)}")


def expected_sizes(meta: Mapping[str, Any], first: Mapping[str, Any]) -> dict[str, int]:
    """Each hyperparameter's number of values: ``meta``'s ``size``, else line 1's."""
    def size(name: str) -> int:
        entry = meta.get(name)
        stated = entry.get("size") if isinstance(entry, dict) else None
        if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:
            return stated
        value = first.get(name)
        return len(value) if isinstance(value, list) else 1

    return {name: size(name) for name in (meta or first)}


def values_problem(values: Mapping[str, Any], sizes: Mapping[str, int]) -> str | None:
    """What is wrong with one record's values by name (``None``: nothing)."""
    if set(values) != set(sizes):
        return f"must name {sorted(sizes)} (got {sorted(values)})"
    for name, size in sizes.items():
        value = values[name]
        scalar = size == 1 and _is_number(value)
        if not scalar and not (isinstance(value, list) and len(value) == size
                               and all(_is_number(v) for v in value)):
            valid = "a number or null" if size == 1 else f"a list of {size} numbers or nulls"
            return f"must give {name!r} {valid} (got {value!r:.60})"
    return None


def _is_number(value: Any) -> bool:
    """A JSON number or null (a value that was not finite)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def hparams_figure(history: History, meta: Mapping[str, Any] | None = None) -> Figure:
    """Values of the successful steps; a failed step (whose values may be absurd or not
    finite) is a red line. A discrete hyperparameter (``softmax`` in ``meta``, the run's
    ``hparams.json``) is one line per choice, its probability. Without a successful step,
    each panel says so."""
    names = list(history[0].hparams)
    figure = Figure(figsize=(5.0 * min(len(names), 3), 3.4 * ((len(names) + 2) // 3)),
                    layout="constrained")
    axes = figure.subplots((len(names) + 2) // 3, min(len(names), 3), squeeze=False).ravel()
    ok = [r for r in history if r.status == "ok"]
    steps = [r.step for r in ok]
    for ax, name in zip(axes, names, strict=False):
        values = _rows([_as_list(r.hparams[name]) for r in ok])
        choices = choice_labels(meta or {}, name, values.shape[1])
        if choices is not None:
            for column, choice in enumerate(choices):
                ax.plot(steps, values[:, column], marker=".", label=f"p({choice})")
            ax.legend(fontsize=8)
        elif values.shape[1] == 1:
            ax.plot(steps, values[:, 0], marker=".")
        elif len(ok):
            low, high = torch.quantile(values, values.new_tensor([0.1, 0.9]), 1)
            ax.fill_between(steps, low, high, alpha=0.3, label="10-90%")
            ax.plot(steps, values.mean(1), label=f"mean of {values.shape[1]}")
            ax.legend(fontsize=8)
        for step in (r.step for r in history if r.status != "ok"):
            ax.axvline(step, color="red", alpha=0.3)
        if (choices is None and len(ok) and bool((values > 0).all())
                and float(values.max() / values.min()) > 50):
            ax.set_yscale("log")
        title = name if choices is None else f"{name}: probability of each choice"
        ax.set_title(title if ok else f"{name}: no successful step")
        ax.set_xlabel("outer step")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    figure.suptitle("hyperparameters (natural units; red: failed steps)")
    return figure


def choice_labels(meta: Mapping[str, Any], name: str, count: int) -> list[str] | None:
    """The ``count`` choices of ``name`` when ``meta`` (``hparams.json``) says it is discrete
    (its constraint is ``softmax``): its ``choices`` if recorded, else its coordinate names;
    ``None`` for a continuous hyperparameter."""
    entry = meta.get(name)
    if not isinstance(entry, Mapping) or entry.get("constraint") != Softmax.name:
        return None
    for key in ("choices", "coordinates"):
        labels = entry.get(key)
        if isinstance(labels, list) and len(labels) == count:
            return [str(label) for label in labels]
    return [f"{name}[{i}]" for i in range(count)]


def losses_figure(history: History) -> Figure:
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    steps = history.column("step")
    for column, label in (("train_loss", "train (last inner step)"),
                          ("val_loss", "validation (hypergradient)"),
                          ("selection_loss", "selection (held out from hypergradients)")):
        values = [float("nan") if v is None else v for v in history.column(column)]
        if any(v == v for v in values):
            ax.plot(steps, values, marker=".", label=label)
    best = history.best()
    if best is not None:
        ax.axvline(best.step, color="gray", linestyle="--", label=f"best step {best.step}")
    failed = [r.step for r in history if r.status != "ok"]
    for i, step in enumerate(failed):
        ax.axvline(step, color="red", alpha=0.4, label="failed step" if i == 0 else None)
    ax.set_xlabel("outer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("losses per outer step")
    return figure


def hypergradient_figure(history: History) -> Figure:
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    ok = [r for r in history if r.grad_norm is not None]
    steps = [r.step for r in ok]
    norms = [float(r.grad_norm) for r in ok if r.grad_norm is not None]
    ax.plot(steps, norms, marker=".", label="||mean hypergradient||")
    spread = [r.grad_std for r in ok if r.grad_std is not None]
    if spread and len(spread) == len(ok):
        ax.plot(steps, spread, linestyle=":", label="spread over trainings (||std||)")
    if norms and min(norms) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.set_ylabel("raw hypergradient norm")
    twin = ax.twinx()
    twin.plot(history.column("step"), history.column("lr"), color="gray", alpha=0.5,
              label="outer lr")
    twin.set_ylabel("outer learning rate")
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="upper right")
    ax.set_title("hypergradient norm")
    return figure


def sensitivity_figure(history: History, meta: dict, source: Path | str = "hparams.json"
                       ) -> Figure:
    grads = [r.grad for r in history if r.grad is not None]
    names = list(history[0].hparams)
    figure = Figure(figsize=(11.0, 4.4), layout="constrained")
    left, right = figure.subplots(1, 2)
    if not grads:
        left.set_title("no successful step")
        return figure
    mean_abs = {n: torch.tensor([_as_list(g[n]) for g in grads], device="cpu").abs().mean(0)
                for n in names}
    per_name = sorted(((float(v.mean()), n) for n, v in mean_abs.items()), reverse=True)
    left.barh([n for _, n in per_name][::-1], [v for v, _ in per_name][::-1])
    left.set_xlabel("mean |dL/du| per coordinate")
    left.set_title("hyperparameters by hypergradient size")
    coords: list[tuple[float, str]] = []
    for name, values in mean_abs.items():
        labels = coordinate_labels(meta, name, len(values), source)
        coords.extend(zip(values.tolist(), labels, strict=True))
    top = sorted(coords, reverse=True)[:20]
    right.barh([c for _, c in top][::-1], [v for v, _ in top][::-1])
    right.set_xlabel("mean |dL/du|")
    right.set_title(f"top {len(top)} of {len(coords)} coordinates")
    right.tick_params(axis="y", labelsize=7)
    figure.suptitle("sensitivity: raw hypergradient size over the run (u = raw value)")
    return figure


def coordinate_labels(meta: dict, name: str, count: int, source: Path | str) -> list[str]:
    """The ``count`` coordinate names of ``name`` in ``hparams.json``'s ``meta`` (read from
    ``source``), or ``name[i]`` when it has none; a damaged entry raises naming the file."""
    entry = meta.get(name, {})
    labels = entry.get("coordinates") if isinstance(entry, dict) else entry
    if not labels:
        return [name] if count == 1 else [f"{name}[{i}]" for i in range(count)]
    if not (isinstance(labels, list) and len(labels) == count
            and all(isinstance(label, str) for label in labels)):
        raise HyperdiffError(
            f"run directory: {source} is damaged (its entry {name!r} must be an object whose "
            f"'coordinates' are {count} name{'s' if count != 1 else ''}, got "
            f"{describe(entry)}); restore it, or delete "
            "it (figures then name coordinates by index)")
    return labels


def _rows(rows: list[list[float]]) -> torch.Tensor:
    """``rows`` as a ``(steps, size)`` tensor; ``(0, 1)`` when there are none."""
    if not rows:
        return torch.empty(0, 1, dtype=torch.float64, device="cpu")
    return torch.tensor(rows, dtype=torch.float64, device="cpu").reshape(len(rows), -1)


def _as_list(value: float | list[float | None] | None) -> list[float]:
    """A record's value as a list; ``None`` (not finite, in a failed step) is drawn as a gap."""
    values = value if isinstance(value, list) else [value]
    return [float("nan") if v is None else v for v in values]
