"""A run directory written by an earlier hyperdiff resumes and extends although it set a key
that earlier code did not read and today's refuses for new runs (s41: `outer.max_samples`
without `outer.auto_samples`, an online `outer.seed` nothing reads, a meta run's
`stop.patience` without validation tasks, a meta template's `batch_size`): the run ran
without the key, so the resume passes it at its default, and a new run is still refused."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.plans import build, build_meta, build_online

RIDGE = ["task.name=ridge_diabetes", "inner.steps=10", "report.seeds=1",
         "output.checkpoint_seconds=0"]
TIMES = ("time_s", "step_time_s")


def quiet(_: str) -> None:
    return None


def history(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (out / "history.jsonl").read_text().splitlines()]


def as_written_by_older_code(out: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in the run's config.toml (which lists every key) and in its
    manifest checksum, as code that did not refuse the value wrote it."""
    config = out / "config.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["config.toml"] = hashlib.sha256(config.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_an_extension_of_a_run_with_an_unread_max_samples_equals_the_straight_run(tmp_path):
    run_experiment(load_config(overrides=[*RIDGE, "stop.max_steps=3"]), out=tmp_path / "a",
                   log=quiet, progress=False)
    run_experiment(load_config(overrides=[*RIDGE, "stop.max_steps=2"]), out=tmp_path / "b",
                   log=quiet, progress=False)
    as_written_by_older_code(tmp_path / "b", "max_samples = 16", "max_samples = 8")
    run_experiment(None, resume=tmp_path / "b", overrides=("stop.max_steps=3",), log=quiet,
                   progress=False)
    assert history(tmp_path / "a") == history(tmp_path / "b")
    with pytest.raises(hd.HyperdiffError, match="max_samples must be its default 16"):
        build(load_config(overrides=[*RIDGE, "outer.max_samples=8"]))  # a new run: refused


def test_the_builders_pass_unread_stored_keys_at_their_defaults():
    _, loop = build(load_config(overrides=[*RIDGE, "outer.max_samples=8"]), stored=True)
    assert loop.plan.auto is None  # built, not refused: max_samples is unread without auto
    online = load_config(overrides=[*RIDGE, "outer.mode=online", "outer.seed=3"])
    with pytest.raises(hd.HyperdiffError, match="outer.seed must be left at its default"):
        build_online(online)
    _, loop = build_online(online, stored=True)
    assert loop.seed == 3  # read by nothing, as the run that wrote it
    meta = load_config(overrides=["task.name=sinusoid_maml", "stop.max_steps=2"],
                       data={"stop": {"patience": 0}})
    stored_meta = load_config(data={**meta.to_dict(), "stop": {**meta.to_dict()["stop"],
                                                               "patience": 5}}, stored=True)
    with pytest.raises(hd.HyperdiffError, match="patience"):
        build_meta(stored_meta)
    _, loop = build_meta(stored_meta, stored=True)
    assert loop.stopping.patience is None


def test_a_stored_warm_start_run_with_explore_options_builds():
    """Written before warm starts had no global phase: its checkpoint says whether a phase
    ran (OfflinePlan.load_state_dict refuses one that did); the options are not refused."""
    settings = [*RIDGE, "inner.warm_start=true", "outer.explore=4"]
    with pytest.raises(hd.HyperdiffError, match="explore must be 0 or its default 8"):
        build(load_config(overrides=settings))
    _, loop = build(load_config(overrides=settings), stored=True)
    assert loop.plan.warm_start


def test_an_online_window_at_an_invalid_coefficient_fails_and_is_recorded_once(tmp_path):
    """An outer step that moves a weight decay tuned in (-1, 1) below 0: the window fails (the
    guard's), no record is repeated (s41: the run ended 'diverged' at once, step 0 twice)."""
    task = tmp_path / "wdtask.py"
    task.write_text(
        "import torch, torch.nn.functional as F, hyperdiff as hd\n"
        "def build(steps: int = 20):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(200, 5, generator=g)\n"
        "    y = x @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(200, 1, generator=g)\n"
        "    torch.manual_seed(0)\n"
        "    net = hd.functional(torch.nn.Linear(5, 1))\n"
        "    def loss(p, h, b):\n"
        "        return F.mse_loss(net(p, b[0]), b[1])\n"
        "    return hd.task('wd_free', model=net, train_loss=loss, val_loss=loss,\n"
        "                   hparams=hd.HyperParameters(lr=hd.scalar(0.05),\n"
        "                                              wd=hd.scalar(0.0, (-1, 1))),\n"
        "                   optimizer=hd.sgd('lr', weight_decay='wd'), data=(x, y),\n"
        "                   steps=steps, batch_size=32)\n")
    out = tmp_path / "run"
    config = load_config(overrides=[f"task.name={task}:build", "outer.mode=online",
                                    "outer.lr=2.0", "report.seeds=1", "outer.window=4"])
    with contextlib.suppress(hd.HyperdiffError, hd.NonFiniteError):  # the guard may give up:
        run_experiment(config, out=out, log=quiet, progress=False)  # the records are checked
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(records)))
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and "the sgd weight_decay, must be a finite number >= 0" in failed[0]["message"]
