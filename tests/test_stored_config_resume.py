"""A run directory written by an earlier hyperdiff resumes and extends although it set a key
that earlier code did not read and today's refuses for new runs (s41: `outer.max_samples`
without `outer.auto_samples`, an online `outer.seed` nothing reads, a meta run's
`stop.patience` without validation tasks, a meta template's `batch_size`): the run ran
without the key, so the resume passes it at its default, and a new run is still refused."""

from __future__ import annotations

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
