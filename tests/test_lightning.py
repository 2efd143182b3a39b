"""Lightning integration (hyperdiff.app.lightning): a LightningModule with its DataModule tuned
offline (lightning_task) and online in a Trainer (HyperdiffCallback), against hyperdiff's own
runs of the same problem written by hand (an explicit two-layer MLP loss over the batches a
Trainer reads, collected by iterating the loader), in float64."""

from __future__ import annotations

import itertools
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd
from hyperdiff.engine.training import train

pl = pytest.importorskip("lightning.pytorch")
lightning_hd = pytest.importorskip("hyperdiff.app.lightning")

STEPS = 14  # > one epoch of 5 batches: the second and third epochs reshuffle
TOL = 1e-10


class MLP(pl.LightningModule):
    """A two-layer tanh MLP; ``kind`` picks configure_optimizers' optimizer."""

    def __init__(self, kind: str = "sgd", optimizers=None, val: str = "dict"):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3)).double()
        self.kind, self.optimizers_fn, self.val = kind, optimizers, val

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        if self.val == "none":
            return None
        return {"val_loss": loss} if self.val == "dict" else loss

    def configure_optimizers(self):
        if self.optimizers_fn is not None:
            return self.optimizers_fn(self)
        if self.kind == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        if self.kind == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=1e-2)
        if self.kind == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=0.01)
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 5)]


class Data(pl.LightningDataModule):
    """160 / 40 / 40 rows of a linear 3-class problem; train shuffled from a seeded generator."""

    def __init__(self, seeded: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(240, 5, generator=gen, dtype=torch.float64)
        y = (x @ torch.randn(5, 3, generator=gen, dtype=torch.float64)).argmax(-1)
        self.sets = {"train": TensorDataset(x[:160], y[:160]),
                     "val": TensorDataset(x[160:200], y[160:200]),
                     "test": TensorDataset(x[200:], y[200:])}
        self.seeded = seeded

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0) if self.seeded else None
        return DataLoader(self.sets["train"], batch_size=32, shuffle=True, generator=gen)

    def val_dataloader(self):
        return DataLoader(self.sets["val"], batch_size=40)

    def test_dataloader(self):
        return DataLoader(self.sets["test"], batch_size=40)


def trainer_batches(data: Data, steps: int) -> list:
    """The batches a Trainer trains on: len(loader) batches of iter(loader) once per epoch,
    one loader for the fit (reading a 6th batch of 5 would draw the next permutation)."""
    loader, batches = data.train_dataloader(), []
    while len(batches) < steps:
        batches.extend(itertools.islice(iter(loader), len(loader)))
    return batches[:steps]


def mlp_loss(params, hparams, batch):
    """The MLP's cross-entropy written out (the reference for training_step)."""
    x, y = batch
    hidden = torch.tanh(x @ params["net.0.weight"].T + params["net.0.bias"])
    return F.cross_entropy(hidden @ params["net.2.weight"].T + params["net.2.bias"], y)


def hand_problem(module, hparams, optimizer, steps=STEPS):
    """The same training as hyperdiff losses over the Trainer's batches."""
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    val = list(Data().val_dataloader())
    return hd.make_problem(mlp_loss, mlp_loss, hparams, params, optimizer=optimizer,
                           train_data=trainer_batches(Data(), steps), val_data=val, steps=steps)


def hparams_for(module):
    return hd.HyperParameters(lr=hd.per_step(STEPS, 0.1),
                              weight_decay=hd.per_tensor(dict(module.named_parameters()), 1e-3))


def quiet_trainer(root, **kw):
    return pl.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, **kw)


def close(a, b) -> float:
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def test_online_per_step_schedule_equals_hyperdiffs_own_online_run():
    module, reference = MLP(), MLP()
    callback = lightning_hd.HyperdiffCallback(hparams_for(module), window=5, lr=0.1)
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=STEPS, callbacks=[callback]).fit(module, datamodule=Data())
    problem = hand_problem(reference, hparams_for(reference),
                           hd.sgd("lr", 0.9, weight_decay="weight_decay"))
    own = hd.HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=5), lr=0.1).run()
    assert close(dict(module.named_parameters()), own.params) <= TOL
    assert close(callback.tuned.natural(), own.final_hparams.natural()) <= TOL


@pytest.mark.parametrize(("kind", "optimizer"), [
    ("sgd", hd.sgd("lr", 0.9, weight_decay="weight_decay")),
    ("adamw", hd.adamw("lr", weight_decay="weight_decay")),
])
def test_offline_task_equals_hand_written_losses(kind, optimizer):
    module = MLP(kind)
    spec = lightning_hd.lightning_task(module, Data(), hparams_for(module), steps=STEPS)
    built = spec.build(selection_fraction=0.0)
    ours = hd.HyperOptimizer(built.problems, lr=0.1,
                             stopping=hd.Stopping(max_steps=3)).run()
    theirs = hd.HyperOptimizer(hand_problem(module, hparams_for(module), optimizer), lr=0.1,
                               stopping=hd.Stopping(max_steps=3)).run()
    assert len(ours.history) == len(theirs.history) == 3
    for a, b in zip(ours.history, theirs.history, strict=True):
        assert abs(a.val_loss - b.val_loss) <= TOL
        for name in a.grad:
            assert torch.allclose(torch.as_tensor(a.grad[name]), torch.as_tensor(b.grad[name]),
                                  rtol=0, atol=TOL)
    assert close(ours.best_hparams.natural(), theirs.best_hparams.natural()) <= TOL


def test_train_loader_is_read_in_the_trainers_order():
    order = lightning_hd.loaders.TrainerOrder(Data().train_dataloader(), "t")
    expected = trainer_batches(Data(), 12)
    for step in [0, 1, 7, 11, 3, 10, 0]:  # forwards, back within an epoch, back two epochs
        got = order(step)
        assert all(torch.equal(a, b) for a, b in zip(got, expected[step], strict=True))


LR = hd.schedule("warmup_cosine", STEPS)


def scheduled_hparams(module):
    """A warmup-cosine lr (its peak, warmup, final tuned) and per-tensor weight decay."""
    return hd.HyperParameters(**LR.hyperparameters(peak=0.1, warmup=0.1, final=0.1),
                              weight_decay=hd.per_tensor(dict(module.named_parameters()), 1e-3))


def online_run(window=4, kind="sgd"):
    module = MLP(kind)
    callback = lightning_hd.HyperdiffCallback(scheduled_hparams(module), schedules={"lr": LR},
                                              window=window, lr=0.1)
    reference = MLP(kind)
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=STEPS, callbacks=[callback]).fit(module, datamodule=Data())
    return module, callback, reference


@pytest.mark.parametrize(("kind", "optimizer"), [
    ("sgd", hd.sgd(LR, 0.9, weight_decay="weight_decay")),
    ("adamw", hd.adamw(LR, weight_decay="weight_decay")),
])
def test_online_callback_equals_hyperdiffs_own_online_run(kind, optimizer):
    module, callback, reference = online_run(window=4, kind=kind)
    problem = hand_problem(reference, scheduled_hparams(reference), optimizer)
    own = hd.HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=4), lr=0.1).run()
    assert len(callback.result.history) == len(own.history) == 4  # windows 4+4+4+2
    assert close(dict(module.named_parameters()), own.params) <= TOL
    assert close(callback.tuned.natural(), own.final_hparams.natural()) <= TOL
    assert close(callback.tuned.natural(), scheduled_hparams(reference).natural()) > 1e-3


def test_exported_optimizers_retrain_in_a_plain_trainer_as_hyperdiff_trains():
    _, callback, reference = online_run(window=7)
    tuned = callback.tuned
    fresh = MLP(optimizers=callback.configure_optimizers)
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=STEPS).fit(fresh, datamodule=Data())
    problem = hand_problem(reference, tuned, hd.sgd(LR, 0.9, weight_decay="weight_decay"))
    state, _ = train(problem)
    assert close(dict(fresh.named_parameters()), state.params) <= TOL


def test_offline_values_exported_retrain_in_a_plain_trainer():
    module = MLP()
    spec = lightning_hd.lightning_task(module, Data(), hparams_for(module), steps=STEPS)
    best = hd.HyperOptimizer(spec.build(selection_fraction=0.0).problems, lr=0.1,
                             stopping=hd.Stopping(max_steps=2)).run().best_hparams
    fresh = MLP(optimizers=lambda m: lightning_hd.lightning_optimizers(spec.optimizer, best, m))
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=STEPS).fit(fresh, datamodule=Data())
    state, _ = train(hand_problem(MLP(), best, hd.sgd("lr", 0.9, weight_decay="weight_decay")))
    assert close(dict(fresh.named_parameters()), state.params) <= TOL


def test_validation_step_without_a_loss_is_refused():
    module = MLP(val="none")
    spec = lightning_hd.lightning_task(module, Data(), hparams_for(module), steps=STEPS)
    with pytest.raises(hd.HyperdiffError, match="validation_step must return the loss.*"
                                                "val_loss=fn"):
        spec.build()
    given = lightning_hd.lightning_task(
        module, Data(), hparams_for(module), steps=STEPS,
        val_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert given.build().problems[0].steps == STEPS


def test_unseeded_shuffle_is_refused():
    module = MLP()
    with pytest.raises(hd.HyperdiffError, match="shuffle from a seeded generator"):
        lightning_hd.lightning_task(module, Data(seeded=False), hparams_for(module),
                                    steps=STEPS)


@pytest.mark.parametrize(("kind", "message"), [
    ("rmsprop", "must return torch.optim.SGD, Adam or AdamW .got RMSprop"),
    ("scheduled", "without an lr scheduler"),
])
def test_unsupported_optimizers_are_refused(kind, message):
    module = MLP(kind)
    with pytest.raises(hd.HyperdiffError, match=message):
        lightning_hd.lightning_task(module, Data(), hparams_for(module), steps=STEPS)


def test_hparams_must_name_optimizer_coefficients():
    module = MLP()
    with pytest.raises(hd.HyperdiffError, match="hparams must name coefficients of SGD.*'beta1'"):
        lightning_hd.lightning_task(module, Data(), hd.HyperParameters(beta1=hd.scalar(0.5)),
                                    steps=STEPS)


def test_callback_refuses_gradient_clipping():
    module = MLP()
    callback = lightning_hd.HyperdiffCallback(hparams_for(module))
    with tempfile.TemporaryDirectory() as root, pytest.raises(
            hd.HyperdiffError, match=r"gradient_clip_val must be None or 0 \(got 1.0\)"):
        quiet_trainer(root, max_steps=STEPS, callbacks=[callback],
                      gradient_clip_val=1.0).fit(module, datamodule=Data())


def test_a_lightning_task_runs_through_the_cli(tmp_path, capsys):
    from hyperdiff.app.cli import main

    factory = tmp_path / "lit_task.py"
    factory.write_text(
        "from test_lightning import STEPS, MLP, Data, hparams_for\n"
        "from hyperdiff.app.lightning import lightning_task\n\n\n"
        "def build(steps: int = STEPS, data_seed: int = 0):\n"
        "    module = MLP()\n"
        "    return lightning_task(module, Data(), hparams_for(module), steps=steps,\n"
        "                          defaults={'stop.max_steps': 2})\n")
    out = tmp_path / "run"
    assert main(["run", "--task", f"{factory}:build", "--set", "report.seeds=1", "--quiet",
                 "--out", str(out)]) == 0
    assert "MLP" in capsys.readouterr().out
    assert len((out / "history.jsonl").read_text().splitlines()) == 2


def test_the_example_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "lightning_task.py"
    spec = importlib.util.spec_from_file_location("lightning_task_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(epochs=2)  # 32 optimizer steps (the script runs 4 epochs)
    # 0.6071 at the initial values, 0.7003 tuned online, 0.7204 retrained at the tuned values
    assert out["tuned_accuracy"] > out["initial_accuracy"] + 0.05
    assert out["retrained_accuracy"] > out["initial_accuracy"] + 0.05
    assert "windows of 4" in capsys.readouterr().out


class Normed(MLP):
    """The MLP with a BatchNorm after its first layer (running statistics carried as buffers)
    or a dropout layer (masks the replay does not draw as the Trainer did)."""

    def __init__(self, layer: str):
        super().__init__()
        torch.manual_seed(1)
        extra = torch.nn.BatchNorm1d(8) if layer == "batchnorm" else torch.nn.Dropout(0.5)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), extra.double(), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3)).double()


def test_online_batchnorm_statistics_follow_the_trainer():
    module = Normed("batchnorm")
    callback = lightning_hd.HyperdiffCallback(hparams_for(module), window=7, lr=0.1)
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=STEPS, callbacks=[callback]).fit(module, datamodule=Data())
    replayed = callback.result  # torch's BatchNorm in the Trainer, hyperdiff's in the replay
    running = {n: b for n, b in module.named_buffers() if n.startswith("net.1.running")}
    assert sorted(running) == sorted(replayed.buffers)
    assert close(running, replayed.buffers) <= TOL
    assert close(dict(module.named_parameters()), replayed.params) <= TOL


def test_online_dropout_fails_the_state_check():
    module = Normed("dropout")
    callback = lightning_hd.HyperdiffCallback(hparams_for(module), window=7, lr=0.1)
    with tempfile.TemporaryDirectory() as root, pytest.raises(
            hd.HyperdiffError, match=r"replayed 'net.0.weight' must equal the Trainer's after "
                                     r"steps 0..6.*dropout"):
        quiet_trainer(root, max_steps=STEPS, callbacks=[callback]).fit(module, datamodule=Data())


def test_a_callback_tunes_one_fit():
    module = MLP()
    callback = lightning_hd.HyperdiffCallback(hparams_for(module), window=7, lr=0.1)
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=STEPS, callbacks=[callback]).fit(module, datamodule=Data())
        with pytest.raises(hd.HyperdiffError, match="a callback must tune one fit"):
            quiet_trainer(root, max_steps=STEPS, callbacks=[callback]).fit(MLP(), datamodule=Data())
