"""Tune a LightningModule online, inside its own Trainer run.

Needs ``pip install 'hyperdiff[lightning]'``. An MLP on scikit-learn's 8x8 digits, written as
an ordinary ``LightningModule`` with a ``LightningDataModule``. ``HyperdiffCallback`` tunes its
learning-rate schedule (a warmup-cosine curve: its peak, warmup and final fraction) and one
weight decay per parameter tensor while ``trainer.fit`` trains it: after every window of 4
optimizer steps, hyperdiff's online plan replays the window from the Trainer's batches, takes
its hypergradient and sets the next values into the optimizer. The Trainer run that tuned is
compared with a plain Trainer run at the initial values (test accuracy), and the tuned values
are exported as ``configure_optimizers`` output and retrained in a plain Trainer.

    python examples/lightning_task.py             # about 45 s on a busy 2-core machine

Logs and checkpoints are off; the Trainers' root directory is a temporary directory.
"""

from __future__ import annotations

import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd
from hyperdiff.app.lightning import HyperdiffCallback, lightning_optimizers

EPOCHS = 4
BATCH_SIZE = 64


class DigitsMLP(pl.LightningModule):
    """64 -> 64 (ReLU) -> 10, trained by SGD with momentum; ``tuned`` replaces the optimizer."""

    def __init__(self, tuned=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 10))
        self.tuned = tuned

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_accuracy", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        if self.tuned is not None:
            return self.tuned(self)
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


class Digits(pl.LightningDataModule):
    """Standardized digits: 1000 train, 400 validation, the rest (397) test rows."""

    def __init__(self):
        super().__init__()
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
        mean, std = x[:1000].mean(0), x[:1000].std(0) + 1e-3  # fitted on train rows only
        x = (x - mean) / std
        self.sets = {"train": TensorDataset(x[:1000], y[:1000]),
                     "val": TensorDataset(x[1000:1400], y[1000:1400]),
                     "test": TensorDataset(x[1400:], y[1400:])}

    def train_dataloader(self):  # shuffled from a seeded generator: replayable
        return DataLoader(self.sets["train"], batch_size=BATCH_SIZE, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.sets["val"], batch_size=400)

    def test_dataloader(self):
        return DataLoader(self.sets["test"], batch_size=400)


def trainer(root: str, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=EPOCHS, default_root_dir=root, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=list(callbacks))


def test_accuracy(root: str, module: pl.LightningModule, data: Digits) -> float:
    return float(trainer(root).test(module, datamodule=data, verbose=False)[0]["test_accuracy"])


def main(epochs: int = EPOCHS) -> dict[str, float]:
    global EPOCHS
    EPOCHS = epochs
    data = Digits()
    steps = EPOCHS * -(-1000 // BATCH_SIZE)  # optimizer steps of the run
    module = DigitsMLP()
    lr = hd.schedule("warmup_cosine", steps)  # its peak, warmup and final are tuned
    hparams = hd.HyperParameters(
        **lr.hyperparameters(peak=0.01, warmup=0.05, final=0.05),
        weight_decay=hd.per_tensor(dict(module.named_parameters()), 1e-4))
    callback = HyperdiffCallback(hparams, schedules={"lr": lr}, window=4, lr=0.1,
                                 val_batch_size=200)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        trainer(root, [callback]).fit(module, datamodule=data)
        out["tuned_s"] = time.perf_counter() - start
        out["tuned_accuracy"] = test_accuracy(root, module, data)
        initial = DigitsMLP(tuned=lambda m: lightning_optimizers(callback.optimizer, hparams, m))
        start = time.perf_counter()
        trainer(root).fit(initial, datamodule=data)
        out["plain_s"] = time.perf_counter() - start
        out["initial_accuracy"] = test_accuracy(root, initial, data)
        retrained = DigitsMLP(tuned=callback.configure_optimizers)
        trainer(root).fit(retrained, datamodule=data)
        out["retrained_accuracy"] = test_accuracy(root, retrained, data)
    tuned = callback.tuned.natural()
    print(f"{steps} optimizer steps, {len(callback.result.history)} windows of 4")
    print(f"test accuracy  initial values {out['initial_accuracy']:.4f}  "
          f"tuned online {out['tuned_accuracy']:.4f}  "
          f"retrained at the tuned values {out['retrained_accuracy']:.4f}")
    print(f"tuned lr schedule: peak {float(tuned['lr_peak']):.4g} (from 0.01), warmup "
          f"{float(tuned['lr_warmup']):.3g}, final {float(tuned['lr_final']):.3g}; fit "
          f"{out['plain_s']:.2f} s plain, {out['tuned_s']:.2f} s with the callback")
    return out


if __name__ == "__main__":
    main()
