"""A record's JSON line (issue 20 item 3, the online run's fixed costs): the same text as
``json.dumps(asdict(record))``, written once per record although the run directory's history
and every online checkpoint (all records so far) hold it."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.tuner import history
from hyperdiff.tuner.history import StepRecord


def record(**changes) -> StepRecord:
    fields = dict(step=3, hparams={"lr": 0.1, "l2": [1e-4, 2.5e-3, None]}, status="ok",
                  train_loss=0.25, val_loss=0.5, val_loss_std=0.0, selection_loss=None,
                  grad_norm=1.5, grad_std=None, grad={"lr": -0.2, "l2": [1.0, -3e-9, 0.0]},
                  lr=0.01, best=True, trainings=4, message="", time_s=1.25, step_time_s=0.5,
                  grad_snr=None, samples=1,
                  discrete={"act": {"temperature": 0.5, "probs": [0.25, 0.75]}})
    return StepRecord(**{**fields, **changes})


def test_the_line_is_json_dumps_of_asdict_and_round_trips():
    for r in (record(), record(discrete=None, status="failed", message="a \"quoted\" note",
                                hparams={"lr": 1 / 3}, grad=None, samples=None)):
        assert r.to_json() == json.dumps(asdict(r), allow_nan=False)
        assert StepRecord.from_json(r.to_json()) == r


def test_the_line_is_written_once_and_not_a_field():
    r = record()
    assert r.to_json() is r.to_json()
    assert "_json_line" not in asdict(r) and r == record()  # equality reads the fields only
    assert StepRecord.from_json(r.to_json()).to_json() == r.to_json()


def test_an_online_run_serializes_each_record_once(tmp_path, monkeypatch):
    """Every checkpoint of an online run holds all records so far; with W windows and a
    checkpoint after each, the records were serialized W (W + 3) / 2 times (W (W + 1) / 2 for
    the checkpoints, W for history.jsonl); now W times, and the checkpoint's lines are still
    the history file's."""
    dumps = []

    def counting(obj, **kwargs):
        dumps.append(obj)
        return json.dumps(obj, **kwargs)

    monkeypatch.setattr(history, "json", SimpleNamespace(dumps=counting, loads=json.loads))
    config = load_config(overrides=["task.name=ridge_diabetes", "outer.mode=online",
                                    "inner.steps=20", "outer.window=5", "outer.window_growth=0"])
    result = run_experiment(config, out=tmp_path / "run", progress=False, log=lambda _m: None)
    windows = result["steps"]
    assert windows == 4
    assert len(dumps) == windows  # 14 before
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["history"] == lines and len(lines) == windows
    assert [StepRecord.from_json(line).step for line in lines] == list(range(windows))
