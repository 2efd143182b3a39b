"""tools/compare_results.py: numbers and timings of two benchmark result JSONs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_results.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_results", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESULT = {"command": "python benchmarks/x.py", "repeats": 3,
          "rows": [{"method": "reverse", "test_loss": 0.25, "iterations": 40, "time_s": 1.5,
                    "vs_plain": 2.0, "ok": True},
                   {"method": "forward", "test_loss": 0.5, "iterations": 12, "time_s": 3.0,
                    "vs_plain": 4.0, "ok": True}],
          "seconds": {"exact": 0.8}, "loadavg": [1.0, 1.5, 2.0]}


def write(tmp_path: Path, name: str, value: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(value))
    return path


def changed(**rows1) -> dict:
    value = json.loads(json.dumps(RESULT))
    value["rows"][1].update(rows1)
    return value


def test_identical_files_report_no_difference(tool, tmp_path, capsys):
    old, new = write(tmp_path, "old.json", RESULT), write(tmp_path, "new.json", RESULT)
    assert tool.main([str(old), str(new)]) == 0
    report = tool.compare(RESULT, json.loads(json.dumps(RESULT)))
    # numbers: repeats, 2 x test_loss, 2 x iterations; timings: 2 x time_s, 2 x vs_plain,
    # seconds.exact and the 3 load averages
    assert len(report["numbers"]) == 5 and len(report["timings"]) == 8
    assert all(row[3] == 0.0 for row in report["numbers"])
    assert all(row[3] == 1.0 for row in report["timings"])
    assert not report["other"] and not report["only_old"] and not report["only_new"]
    assert "numbers: 5, 5 identical, 0 differ" in capsys.readouterr().out


def test_a_changed_loss_is_reported_with_its_relative_difference(tool, tmp_path, capsys):
    new = changed(test_loss=0.55)
    report = tool.compare(RESULT, new)
    (path, before, after, rel), = [row for row in report["numbers"] if row[3] > 0]
    assert path == ("rows", 1, "test_loss") and (before, after) == (0.5, 0.55)
    assert rel == pytest.approx(0.05 / 0.55, rel=1e-12)
    assert tool.main([str(write(tmp_path, "a.json", RESULT)),
                      str(write(tmp_path, "b.json", new))]) == 1
    assert "rows[1].test_loss: 0.5 -> 0.55" in capsys.readouterr().out
    # within --rtol it counts as identical
    assert tool.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--rtol", "0.1"]) == 0


def test_a_changed_timing_is_reported_as_a_timing_not_a_number(tool, tmp_path, capsys):
    new = changed(time_s=4.5)
    report = tool.compare(RESULT, new)
    assert all(row[3] == 0.0 for row in report["numbers"])
    ratios = {row[0]: row[3] for row in report["timings"]}
    assert ratios[("rows", 1, "time_s")] == 1.5
    assert tool.main([str(write(tmp_path, "a.json", RESULT)),
                      str(write(tmp_path, "b.json", new))]) == 0
    out = capsys.readouterr().out
    assert "0 differ" in out and "range 1 .. 1.5" in out


def test_extra_timing_keys_and_structure_changes(tool):
    new = changed(iterations=13, method="forward-mode")
    del new["seconds"]
    report = tool.compare(RESULT, new, timing_keys=frozenset({"iterations"}))
    assert all(row[3] == 0.0 for row in report["numbers"])
    assert {row[0]: row[3] for row in report["timings"]}[("rows", 1, "iterations")] == 13 / 12
    assert report["other"] == [(("rows", 1, "method"), "forward", "forward-mode")]
    assert report["only_old"] == [("seconds", "exact")] and not report["only_new"]


def test_relative_difference_edge_cases(tool):
    assert tool.relative_difference(0.0, 0.0) == 0.0
    assert tool.relative_difference(math.nan, math.nan) == 0.0
    assert tool.relative_difference(0.0, 1e-9) == 1.0
    assert tool.relative_difference(1.0, math.inf) == math.inf
    assert tool.relative_difference(-2.0, 2.0) == 2.0
