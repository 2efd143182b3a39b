"""Issue 18, class 2: a resume whose task code or data changed is refused, naming what changed.

The issue's six cases (one sample edited, rows permuted, 10 rows dropped; data held in memory
and streamed through a DataLoader; offline and online runs) each stop a run after its second
step, change ``data.pt`` next to the task file, and resume: one clear error naming the split,
the run directory untouched; ``--accept-changed-inputs`` continues and records the change. A
task file is loaded from its recorded absolute path, whatever the working directory, and an
edited one is refused before it runs."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import MANIFEST
from hyperdiff.app.tasks import loader
from hyperdiff.engine.data.fingerprint import fingerprint_changes, sample_indices, split_fingerprint

ROWS = 60
TASK = '''
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd

STREAMED = {streamed}


def build(steps=6, data_seed=0):
    x, y = torch.load(Path(__file__).with_name("data.pt"))
    mse = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
    if STREAMED:  # train: a shuffled DataLoader; val and test: the last 20 rows in memory
        n = len(y)
        train = DataLoader(TensorDataset(x[: n - 20], y[: n - 20]), batch_size=8, shuffle=True,
                           generator=torch.Generator().manual_seed(3))
        data = hd.given_splits(train=train, val=(x[n - 20 : n - 10], y[n - 20 : n - 10]),
                               test=(x[n - 10 :], y[n - 10 :]))
    else:
        data = (x, y)
    return hd.task(
        "fingerprinted", model={{"w": torch.zeros(3, dtype=torch.float64)}},
        train_loss=lambda p, h, b: mse(p, h, b) + h["wd"] * p["w"].square().sum(),
        val_loss=mse, hparams=hd.HyperParameters(wd=hd.scalar(0.1)),
        optimizer=hd.sgd(0.1), data=data, steps=steps, stratify=False)
'''
SETTINGS = {"offline": ["stop.max_steps=4", "inner.steps=5", "output.checkpoint_seconds=0"],
            "online": ["output.checkpoint_seconds=0", "outer.mode='online'", "method.name='reverse'", "inner.steps=12",
                       "outer.window=3", "outer.val_batch=0"]}
CHANGES = {
    "edit": lambda x, y: (x.index_put((torch.tensor([5]),), x[5] + 1.0), y),
    "permute": lambda x, y: (x[torch.randperm(len(y), generator=torch.Generator()
                                              .manual_seed(1))],
                             y[torch.randperm(len(y), generator=torch.Generator()
                                              .manual_seed(1))]),
    "drop": lambda x, y: (x[:-10], y[:-10]),
}
SAID = {  # (split named, what the message says) per storage and change
    ("memory", "edit"): ("'data'", "its content changed"),
    ("memory", "permute"): ("'data'", "its content changed"),
    ("memory", "drop"): ("'data'", f"length {ROWS} at the start, {ROWS - 10} now"),
    ("streamed", "edit"): ("'train'", "its content changed"),
    ("streamed", "permute"): ("'train'", "its content changed"),
    ("streamed", "drop"): ("'train'", f"length {ROWS - 20} at the start, {ROWS - 30} now"),
}


def write_task(folder: Path, *, streamed: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 3, generator=gen, dtype=torch.float64)
    torch.save((x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)),
               folder / "data.pt")
    path = folder / "task.py"
    path.write_text(TASK.format(streamed=streamed))
    return path


def interrupted(run_dir: Path, task: str, mode: str) -> None:
    """Start a run of ``task`` in ``run_dir`` and stop it after its second step."""

    def stop(opt, record):
        if record.step == 1:
            raise KeyboardInterrupt

    config = load_config(overrides=[f"task.name={task}", "report.seeds=1", *SETTINGS[mode]])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out=run_dir, progress=False, log=lambda m: None,
                       callbacks=[stop])


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()
            and p.name != "run.lock"}


def change_data(folder: Path, change: str) -> None:
    x, y = torch.load(folder / "data.pt")
    torch.save(CHANGES[change](x, y), folder / "data.pt")


@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("storage", ["memory", "streamed"])
@pytest.mark.parametrize("change", ["edit", "permute", "drop"])
def test_a_resume_with_changed_data_is_refused_naming_the_split(tmp_path, capsys, mode,
                                                                 storage, change):
    task = write_task(tmp_path / "task", streamed=storage == "streamed")
    run_dir = tmp_path / "run"
    interrupted(run_dir, f"{task}:build", mode)
    before = snapshot(run_dir)
    change_data(tmp_path / "task", change)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    split, what = SAID[storage, change]
    assert f"split {split}: {what}" in err and "--accept-changed-inputs" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(run_dir) == before  # a refusal changes nothing


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_accept_changed_inputs_continues_and_records_the_change(tmp_path, capsys, mode):
    task = write_task(tmp_path / "task", streamed=mode == "online")
    run_dir = tmp_path / "run"
    interrupted(run_dir, f"{task}:build", mode)
    change_data(tmp_path / "task", "drop")
    assert main(["run", "--resume", str(run_dir), "--quiet", "--accept-changed-inputs"]) == 0
    manifest = json.loads((run_dir / MANIFEST).read_text())
    [accepted] = manifest["input_changes"]
    assert accepted["step"] == 2 and "length" in accepted["changes"][0]
    split = "train" if mode == "online" else "data"
    assert manifest["inputs"]["data"][split]["length"] == (ROWS - 30 if mode == "online"
                                                            else ROWS - 10)
    result = json.loads((run_dir / "result.json").read_text())
    assert any("resumed at step 2 with changed inputs" in w for w in result["warnings"])
    assert "resumed at step 2 with changed inputs" in capsys.readouterr().out  # the table


def test_accept_changed_inputs_is_refused_for_a_new_run(tmp_path, capsys):
    task = write_task(tmp_path / "task", streamed=False)
    assert main(["run", "--task", f"{task}:build", "--out", str(tmp_path / "run"),
                 "--accept-changed-inputs", "--quiet"]) == 2
    assert "--accept-changed-inputs must be given with --resume only" in capsys.readouterr().err


def test_unchanged_inputs_resume_to_the_uninterrupted_history(tmp_path):
    task = write_task(tmp_path / "task", streamed=True)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["run", "--task", f"{task}:build", "--out", str(whole), "--quiet",
                 *(a for s in ["report.seeds=1", *SETTINGS["offline"]] for a in ("--set", s))
                 ]) == 0
    interrupted(cut, f"{task}:build", "offline")
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0

    def history(run_dir):
        return [{k: v for k, v in json.loads(line).items() if "time" not in k}
                for line in (run_dir / "history.jsonl").read_text().splitlines()]

    assert history(cut) == history(whole) and len(history(whole)) == 4


WRONG = "raise RuntimeError('the task file of the working directory ran')\n"


def test_a_task_file_resumed_from_another_directory_is_the_recorded_one(tmp_path, capsys,
                                                                        monkeypatch):
    write_task(tmp_path / "a", streamed=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "task.py").write_text(WRONG)  # same name, another directory
    monkeypatch.chdir(tmp_path / "a")
    interrupted(tmp_path / "run", "task.py:build", "offline")
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.setattr(loader, "_SPECS", {})  # as in a new process
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 0, (
        capsys.readouterr().err)
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 4
    config = (tmp_path / "run" / "config.toml").read_text()
    assert f"{tmp_path / 'a' / 'task.py'}:build" in config  # stored with its absolute path


def test_an_edited_task_file_is_refused_before_it_runs(tmp_path, capsys):
    task = write_task(tmp_path / "task", streamed=False)
    interrupted(tmp_path / "run", f"{task}:build", "online")
    before = snapshot(tmp_path / "run")
    text = task.read_text()
    task.write_text(WRONG + text)
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the task's code: {task} was edited (its sha256 differs)" in err, err
    assert "working directory ran" not in err and snapshot(tmp_path / "run") == before
    task.write_text(text + "# a comment\n")  # accepted: resumes and records it
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet",
                 "--accept-changed-inputs"]) == 0
    [accepted] = json.loads((tmp_path / "run" / MANIFEST).read_text())["input_changes"]
    assert accepted["changes"] == [f"the task's code: {task} was edited (its sha256 differs)"]


def test_a_run_without_recorded_inputs_resumes_with_a_warning(tmp_path, caplog):
    task = write_task(tmp_path / "task", streamed=False)
    run_dir = tmp_path / "run"
    interrupted(run_dir, f"{task}:build", "offline")
    manifest = json.loads((run_dir / MANIFEST).read_text())
    del manifest["inputs"]  # as written before hyperdiff recorded them
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert "cannot verify them; they are recorded now" in caplog.text
    assert "data" in json.loads((run_dir / MANIFEST).read_text())["inputs"]


def test_a_built_in_task_records_its_name_and_the_hyperdiff_version(tmp_path):
    run_dir = tmp_path / "run"
    interrupted(run_dir, "ridge_diabetes", "offline")
    inputs = json.loads((run_dir / MANIFEST).read_text())["inputs"]
    model = inputs["task"].pop("model")  # the initial model's digest (since s39)
    assert inputs["task"] == {"kind": "builtin", "name": "ridge_diabetes", "version": "0.1.0"}
    assert isinstance(model, str) and len(model) == 32
    assert inputs["data"]["data"]["length"] == 442  # the diabetes data set's rows


# ---------------------------------------------------------------------- the fingerprints
class Augmented(Dataset):
    """Items with noise from torch's, Python's and NumPy's global random states."""

    def __init__(self, n):
        self.x = torch.arange(float(n))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + torch.rand(()) + random.random() + float(np.random.rand())


def test_augmentation_neither_changes_the_hash_nor_the_random_states():
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    first, second = split_fingerprint(Augmented(100)), split_fingerprint(Augmented(100))
    assert first == second and first["sampled"] == 64 and first["fields"] == "float32[]"
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_a_large_batch_is_sampled_by_index(monkeypatch):
    monkeypatch.setattr("hyperdiff.engine.data.fingerprint.WHOLE_BYTES", 1000)
    x = torch.randn(500, 4, dtype=torch.float64)
    base = split_fingerprint((x, x[:, 0]))
    assert base["sampled"] == 64 and base["fields"] == "(float64[4], float64[])"
    sampled = set(sample_indices(500))
    inside, outside = min(sampled - {0}), min(set(range(500)) - sampled)
    for row, seen in ((inside, True), (outside, False)):  # only sampled rows are hashed
        edited = x.clone()
        edited[row, 1] += 1.0
        assert (split_fingerprint((edited, edited[:, 0])) != base) is seen
    swapped = x[torch.tensor([1, 0, *range(2, 500)])]  # rows 0 and 1 swapped: row 0 is hashed
    assert fingerprint_changes("data", base, split_fingerprint((swapped, swapped[:, 0])))


def test_an_iterable_split_records_its_type_only_and_types_are_compared():
    def batches():
        yield torch.zeros(2, 3)

    assert split_fingerprint(batches) == {"kind": "iterable", "type": batches.__qualname__}
    listed = split_fingerprint([torch.zeros(2, 3), torch.ones(2, 3)])
    assert listed["kind"] == "items" and listed["length"] == 2
    assert fingerprint_changes("val", listed, split_fingerprint(torch.zeros(4, 3))) == [
        "split 'val': type list at the start, Tensor now",
        "split 'val': length 2 at the start, 4 now",
        "split 'val': fields float32[2, 3] at the start, float32[3] now",
    ]
    assert fingerprint_changes("selection", {}, listed) == [
        "split 'selection': absent at the start, list of length 2 now"]


def test_a_batch_with_other_entries_is_hashed_whole():
    ids = ["a", "b"]
    batch = (torch.zeros(2, 3), ids)
    base = split_fingerprint(batch)
    assert base["kind"] == "value" and base["fields"] == "(float32[2, 3], (str, str))"
    assert split_fingerprint((torch.zeros(2, 3), ["a", "c"]))["sha256"] != base["sha256"]
    assert split_fingerprint((torch.ones(2, 3), ids))["sha256"] != base["sha256"]


def test_an_edited_task_module_is_refused(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "pkg_dir"
    task = write_task(folder, streamed=False)
    module = task.rename(folder / "fingerprint_task_mod.py")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "fingerprint_task_mod", raising=False)
    interrupted(tmp_path / "run", "fingerprint_task_mod:build", "offline")
    code = json.loads((tmp_path / "run" / MANIFEST).read_text())["inputs"]["task"]
    assert code["kind"] == "module" and code["path"] == str(module)
    module.write_text(module.read_text() + "# edited\n")
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    assert f"the task's code: {module} was edited" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "fingerprint_task_mod")


WEIGHTS_TASK = TASK.replace('model={{"w": torch.zeros(3, dtype=torch.float64)}}',
                            'model={{"w": torch.load(Path(__file__).with_name("init.pt"))}}')


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_resume_whose_initial_model_changed_is_refused(tmp_path, capsys, mode):
    """The task file is the same, the weights it loads are not (or a model defined in a module
    it imports): until s39 the resume trained the other model."""
    task = write_task(tmp_path / "task", streamed=False)
    task.write_text(WEIGHTS_TASK.format(streamed=False))
    torch.save(torch.zeros(3, dtype=torch.float64), task.with_name("init.pt"))
    interrupted(tmp_path / "run", f"{task}:build", mode)
    torch.save(torch.full((3,), 0.5, dtype=torch.float64), task.with_name("init.pt"))
    loader._SPECS.clear()  # as in a new process
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the task's model: its initial parameters or buffers differ from the start's" in err
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet",
                 "--accept-changed-inputs"]) == 0
    [accepted] = json.loads((tmp_path / "run" / MANIFEST).read_text())["input_changes"]
    assert accepted["changes"][0].startswith("the task's model")
