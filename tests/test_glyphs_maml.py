"""The built-in glyphs_maml task (issue 21, item 4): 5-way few-shot glyph classification.

References are independent of the code under test: the held-out report is compared with an
SGD adaptation written out here (plain autograd, cross-entropy, argmax accuracy) on episodes
drawn directly from the glyph generator's meta-test split; every image of an episode is checked
to be a glyph of its labelled class (closest to that class's clean, unjittered rendering) and
every class to lie in the right split.
"""

from __future__ import annotations

import json

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.tasks import build_task
from hyperdiff.app.tasks.few_shot import glyph_episode, glyph_pool, render, stroke_program
from hyperdiff.app.tasks.glyphs_maml import INNER_LR, build, init_mlp
from hyperdiff.seeds import REPORT_SEED, meta_task, task_seed

SMALL = ["--task", "glyphs_maml", "--set", "outer.meta_batch=2", "--set",
         "outer.meta_test_tasks=4", "--set", "inner.steps=2", "--set", "task.params.queries=3",
         "--set", "report.seeds=1", "--quiet"]


def assert_glyphs_of(pool, episode_data, classes):
    """Each image labelled i is nearest (cosine) to the clean rendering of ``classes[i]``."""
    clean = torch.stack([render(stroke_program(pool, c)).flatten().float() for c in classes])
    clean = clean / clean.norm(dim=1, keepdim=True)
    images, labels = episode_data
    flat = images.flatten(1)
    nearest = (flat / flat.norm(dim=1, keepdim=True) @ clean.T).argmax(1)
    assert torch.equal(nearest, labels)


def test_task_builds_and_trains_on_meta_train_classes_and_reports_on_meta_test_classes():
    spec = build(queries=3)
    task = spec.build()
    assert task.tasks is not None and task.tasks.held_out is not None
    pool, base = glyph_pool(), task.problems[0]
    train_ids, test_ids = set(pool.split("train")), set(pool.split("test"))
    assert not train_ids & test_ids and len(test_ids) == 400
    for step in range(2):  # the episodes meta-training draws at outer steps 0 and 1
        for i in range(2):
            index, seed = meta_task(0, step, 2, i)
            problem = task.tasks.problem(base, index, seed)
            episode = glyph_episode(pool, seed, split="train", shots=1, queries=3)
            assert all(c in train_ids for c in episode.classes)
            support = problem.train_data.batch(0, 0)
            assert torch.equal(support[0], episode.support[0])
            assert torch.equal(problem.val_data[0][0], episode.query[0])
            assert_glyphs_of(pool, support, episode.classes)
            assert_glyphs_of(pool, problem.val_data[0], episode.classes)
    for j in range(3):  # the report's held-out tasks
        seed = task_seed(REPORT_SEED, j, "meta-test")
        problem = task.tasks.problem(base, j, seed, held_out=True)
        episode = glyph_episode(pool, seed, split="test", shots=1, queries=3)
        assert all(c in test_ids for c in episode.classes)
        assert torch.equal(problem.val_data[0][0], episode.query[0])
        assert_glyphs_of(pool, problem.train_data.batch(0, 0), episode.classes)


def test_shots_must_be_1_or_5():
    with pytest.raises(hd.HyperdiffError, match=r"glyphs_maml: shots must be 1 or 5 \(got 3\)"):
        build(shots=3)


def test_a_distribution_passed_to_task_is_kept():
    """Defect: hd.task(..., tasks=hd.tasks.distribution(...)) dropped the distribution."""
    def sample(index, seed):
        x = torch.full((2, 1), float(index))
        return (x, x), (x, x)

    tasks = hd.tasks.distribution(sample, name="mine")
    spec = hd.task("t", model={"w": torch.zeros(1, 1)}, tasks=tasks,
                   train_loss=lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
                   val_loss=lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
                   hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                   data=hd.given_splits(train=sample(0, 0)[0], val=sample(0, 0)[1],
                                        test=sample(0, 0)[1], allow_shared_rows=True), steps=2)
    assert spec.build().tasks is tasks


def written_out(params, support, query, steps):
    """Plain SGD (lr INNER_LR) on the support set's cross-entropy, then the query's loss and
    accuracy, with the 784-64-5 MLP written out."""
    def logits(p, x):
        return torch.relu(x.flatten(1) @ p["W0"] + p["b0"]) @ p["W1"] + p["b1"]

    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(logits(theta, support[0]), support[1])
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {k: (v - INNER_LR * g).detach().requires_grad_()
                 for (k, v), g in zip(theta.items(), grads, strict=True)}
    with torch.no_grad():
        out = logits(theta, query[0])
        return (float(torch.nn.functional.cross_entropy(out, query[1])),
                float((out.argmax(1) == query[1]).double().mean()))


def test_short_meta_run_improves_held_out_query_loss_and_reports_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["run", *SMALL, "--set", "stop.max_steps=8", "--out", str(run_dir)]) == 0
    held_out = json.loads((run_dir / "result.json").read_text())["held_out_tasks"]
    pool, losses, accuracies = glyph_pool(), [], []
    for j in range(4):  # meta-test episodes, drawn here from the generator directly
        episode = glyph_episode(pool, task_seed(REPORT_SEED, j, "meta-test"), split="test",
                                shots=1, queries=3)
        loss, accuracy = written_out(init_mlp(0), episode.support, episode.query, 2)
        losses.append(loss)
        accuracies.append(accuracy)
    initial = held_out["initial"]
    assert initial["query_loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert initial["query_accuracy"] == pytest.approx(sum(accuracies) / 4, abs=1e-12)
    assert held_out["tuned"]["query_loss"] < initial["query_loss"]
    assert 0.0 <= held_out["pretrained"]["query_accuracy"] <= 1.0


def test_meta_run_extended_by_resume_equals_one_longer_run(tmp_path):
    def records(run_dir):
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "time" not in k}
                for line in lines]

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", *SMALL, "--set", "stop.max_steps=3", "--out", str(whole)]) == 0
    assert main(["run", *SMALL, "--set", "stop.max_steps=1", "--out", str(part)]) == 0
    assert main(["run", "--resume", str(part), "--set", "stop.max_steps=3", "--quiet"]) == 0
    assert records(part) == records(whole)
    assert (json.loads((part / "result.json").read_text())["held_out_tasks"]
            == json.loads((whole / "result.json").read_text())["held_out_tasks"])


def test_registered_as_a_built_in_task():
    assert build_task("glyphs_maml", params={"shots": 5}).tasks is not None


def test_held_out_sampler_must_be_callable():
    with pytest.raises(hd.HyperdiffError, match=r"task_distribution: held_out must be None or "
                       r"a function held_out\(index, seed\) -> \(support, query\) \(got "):
        hd.tasks.distribution(lambda i, s: ((), ()), held_out=3)
