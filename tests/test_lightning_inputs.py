"""Lightning integration inputs (hyperdiff.app.lightning): the Lightning features hyperdiff
cannot replay are refused with a message naming them, and the ones it follows (validation batch
hooks and 64-bit precision online, torchmetrics in the steps, frozen tensors, the optimizer
forms Lightning accepts) train as a Trainer does, against references written out here."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler

import hyperdiff as hd
from hyperdiff.engine.training import train

pl = pytest.importorskip("lightning.pytorch")
lightning_hd = pytest.importorskip("hyperdiff.app.lightning")
from test_lightning import MLP, STEPS, Data, quiet_trainer  # noqa: E402

LR = hd.HyperParameters(lr=hd.per_step(STEPS, 0.1))


def fit(module, data=None, steps=STEPS, **kw):
    with tempfile.TemporaryDirectory() as root:
        quiet_trainer(root, max_steps=steps, **kw).fit(module, datamodule=data or Data())


def task_of(module, data=None, hparams=LR, **kw):
    return lightning_hd.lightning_task(module, data or Data(), hparams, steps=STEPS, **kw)


def trained(spec):
    state, _ = train(spec.build(selection_fraction=0.0).problems[0])
    return state.params


# ------------------------------------------------------------------ batch hooks (1)
class Scaled(Data):
    """Validation and train inputs times 10 in on_after_batch_transfer."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch[0] * 10.0, batch[1]


class Moved(MLP):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch[0] + 1.0, batch[1]


@pytest.mark.parametrize(("module", "data", "message"), [
    (MLP, Scaled, "datamodule must not override on_after_batch_transfer .got an override in "
                  "Scaled.: .*collate_fn"),
    (Moved, Data, "module must not override on_before_batch_transfer .got an override in Moved"),
])
def test_batch_hooks_are_refused_offline(module, data, message):
    with pytest.raises(hd.HyperdiffError, match="lightning_task: " + message):
        task_of(module(), data())


def test_online_validation_batches_pass_the_batch_hooks():
    callback = lightning_hd.HyperdiffCallback(LR, window=7, lr=0.1)
    fit(MLP(), Scaled(), callbacks=[callback])
    x, y = Data().sets["val"].tensors
    (vx, vy), = callback.val_batches
    assert torch.equal(vx, x * 10.0) and torch.equal(vy, y)


# ------------------------------------------------------------------ torchmetrics (2)
class Counting(MLP):
    """Counts the rows training_step and validation_step see in torchmetrics sums."""

    def __init__(self):
        super().__init__()
        torchmetrics = pytest.importorskip("torchmetrics")
        self.train_rows, self.val_rows = torchmetrics.SumMetric(), torchmetrics.SumMetric()

    def training_step(self, batch, batch_idx):
        self.train_rows.update(torch.tensor(float(len(batch[1]))))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_rows.update(torch.tensor(float(len(batch[1]))))
        return super().validation_step(batch, batch_idx)


def test_replays_leave_torchmetrics_states_as_the_trainer_left_them():
    module = Counting()
    hparams = hd.HyperParameters(lr=hd.per_step(4, 0.1))
    fit(module, steps=4, callbacks=[lightning_hd.HyperdiffCallback(hparams, window=2, lr=0.1)])
    assert float(module.train_rows.compute()) == 4 * 32  # 4 Trainer steps of 32 rows, no more
    assert module.val_rows.update_count == 0             # limit_val_batches=0: no validation
    offline = Counting()
    trained(task_of(offline))
    assert offline.train_rows.update_count == offline.val_rows.update_count == 0


# ------------------------------------------------------------------ step-dependent reads (3)
class Annealed(MLP):
    """A loss weight read from the Trainer's progress (``read``: which attribute)."""

    def __init__(self, read):
        super().__init__()
        self.read = read

    def training_step(self, batch, batch_idx):
        value = getattr(self, self.read)
        weight = 1.0 if self.read == "trainer" else 1.0 + value
        return weight * F.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("read", ["global_step", "current_epoch", "trainer"])
def test_step_reading_the_trainers_progress_is_refused_offline(read):
    with pytest.raises(hd.HyperdiffError, match=f"lightning_task: the module's steps must not "
                                                f"read self.{read} .*out of the Trainer's order"):
        trained(task_of(Annealed(read)))


def test_step_reading_the_global_step_is_refused_online():
    callback = lightning_hd.HyperdiffCallback(LR, window=4, lr=0.1)
    with pytest.raises(hd.HyperdiffError, match="HyperdiffCallback: the module's steps must not "
                                                "read self.global_step"):
        fit(Annealed("global_step"), callbacks=[callback])


# ------------------------------------------------------------------ gradient hooks (4)
def _clip(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
    self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="norm")


def _scale(self, optimizer):
    for p in self.parameters():
        p.grad.mul_(0.1)


@pytest.mark.parametrize(("hook", "body"), [
    ("configure_gradient_clipping", _clip), ("on_before_optimizer_step", _scale),
    ("on_after_backward", lambda self: None), ("optimizer_zero_grad", lambda self, *a: None),
])
def test_gradient_hooks_are_refused_offline(hook, body):
    module = type("Hooked", (MLP,), {hook: body})()
    with pytest.raises(hd.HyperdiffError, match=f"lightning_task: module must not override "
                                                f"{hook} .got an override in Hooked."):
        task_of(module)


# ------------------------------------------------------------------ SWA, schedulers (5)
def test_stochastic_weight_averaging_is_refused():
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.5, swa_epoch_start=1,
                                                 annealing_epochs=1)
    callback = lightning_hd.HyperdiffCallback(hd.HyperParameters(lr=hd.per_step(15, 0.1)))
    with pytest.raises(hd.HyperdiffError, match="trainer.callbacks must be free of "
                                                "StochasticWeightAveraging"):
        fit(MLP(), steps=-1, max_epochs=3, callbacks=[callback, swa])


class AddsScheduler(pl.Callback):
    """Adds an lr scheduler at step 2 (as StochasticWeightAveraging does when it starts)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            from lightning.pytorch.utilities.types import LRSchedulerConfig

            opt = trainer.optimizers[0]
            trainer.strategy.lr_scheduler_configs.append(
                LRSchedulerConfig(torch.optim.lr_scheduler.StepLR(opt, 5)))


def test_an_lr_scheduler_added_during_the_fit_is_refused():
    with pytest.raises(hd.HyperdiffError, match="lr schedulers must be none .got 1 at step 2"):
        fit(MLP(), callbacks=[AddsScheduler(), lightning_hd.HyperdiffCallback(LR, window=7)])


# ------------------------------------------------------------------ 64-bit precision (6)
def test_double_precision_converts_the_validation_batches():
    module = MLP()
    module.net.float()
    data = Data()
    data.sets = {k: torch.utils.data.TensorDataset(s.tensors[0].float(), s.tensors[1])
                 for k, s in data.sets.items()}
    callback = lightning_hd.HyperdiffCallback(LR, window=7, lr=0.1)
    fit(module, data, callbacks=[callback], precision="64-true")
    (vx, _), = callback.val_batches
    assert vx.dtype == torch.float64 and torch.equal(vx, Data().sets["val"].tensors[0].float()
                                                     .double())
    assert len(callback.result.history) == 2


# ------------------------------------------------------------------ export settings (7)
@pytest.mark.parametrize(("setting", "message"), [
    ({"gradient_clip_val": 0.5}, r"gradient_clip_val must be None or 0 \(got 0.5\)"),
    ({"accumulate_grad_batches": 2}, r"accumulate_grad_batches must be 1 \(got 2\)"),
])
def test_exported_optimizers_refuse_trainer_settings_that_train_otherwise(setting, message):
    spec = task_of(MLP())
    fresh = MLP(optimizers=lambda m: lightning_hd.lightning_optimizers(spec.optimizer, LR, m))
    with pytest.raises(hd.HyperdiffError, match="lightning_optimizers: " + message):
        fit(fresh, **setting)


# ------------------------------------------------------------------ optimizer forms (8)
def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("form", [lambda m: ([_sgd(m)], []),
                                  lambda m: {"optimizer": _sgd(m), "monitor": "val_loss"}])
def test_one_optimizer_forms_lightning_accepts_train_as_the_plain_optimizer(form):
    ours = trained(task_of(MLP(optimizers=form)))
    plain = trained(task_of(MLP(optimizers=_sgd)))
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


# ------------------------------------------------------------------ frozen tensors (9)
class Frozen(MLP):
    """The first layer's bias frozen, still given to the optimizer (torch skips it)."""

    def __init__(self, filtered=False):
        def optimizer(m):
            params = [p for p in m.parameters() if p.requires_grad or not filtered]
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)

        super().__init__(optimizers=optimizer)
        self.net[0].bias.requires_grad_(False)


def test_frozen_tensors_in_the_optimizer_train_as_torch_skips_them():
    ours = trained(task_of(Frozen()))
    filtered = trained(task_of(Frozen(filtered=True)))
    assert "net.0.bias" not in ours
    assert all(torch.equal(ours[k], filtered[k]) for k in filtered)
    module = Frozen()
    bias = module.net[0].bias.detach().clone()
    callback = lightning_hd.HyperdiffCallback(LR, window=7, lr=0.1)
    fit(module, callbacks=[callback])
    assert torch.equal(module.net[0].bias, bias) and len(callback.result.history) == 2


# ------------------------------------------------------------------ samplers (10)
class Sampled(Data):
    def __init__(self, kind, seeded):
        super().__init__()
        self.kind, self.gen = kind, torch.Generator().manual_seed(0) if seeded else None

    def train_dataloader(self):
        train = self.sets["train"]
        sampler = (SubsetRandomSampler(range(160), generator=self.gen) if self.kind == "subset"
                   else WeightedRandomSampler([1.0] * 160, 160, generator=self.gen))
        return DataLoader(train, batch_size=32, sampler=sampler)


@pytest.mark.parametrize(("kind", "name"), [("subset", "SubsetRandomSampler"),
                                            ("weighted", "WeightedRandomSampler")])
def test_samplers_without_a_generator_are_refused(kind, name):
    with pytest.raises(hd.HyperdiffError, match=f"sampler must draw from a seeded generator.*"
                                                f"got a {name} without generator="):
        task_of(MLP(), Sampled(kind, seeded=False))
    assert task_of(MLP(), Sampled(kind, seeded=True)).build().problems[0].steps == STEPS


# ------------------------------------------------------------------ several val loaders (11)
class TwoVal(Data):
    def val_dataloader(self):
        return [DataLoader(self.sets["val"], batch_size=40),
                DataLoader(self.sets["test"], batch_size=40)]


def test_several_validation_loaders_are_refused():
    with pytest.raises(hd.HyperdiffError, match=r"val_dataloader\(\) must return one DataLoader "
                                                r"\(got 2 DataLoaders\)"):
        task_of(MLP(), TwoVal())
    callback = lightning_hd.HyperdiffCallback(LR, window=7)
    with pytest.raises(hd.HyperdiffError, match="got 2 DataLoaders.*pass val_data="):
        fit(MLP(), TwoVal(), callbacks=[callback])


# ------------------------------------------------------------------ misuse (12)
def test_configure_optimizers_before_a_fit_is_refused():
    callback = lightning_hd.HyperdiffCallback(LR)
    with pytest.raises(hd.HyperdiffError, match="must be read after trainer.fit"):
        callback.configure_optimizers(MLP())


def test_unknown_task_options_are_refused():
    with pytest.raises(hd.HyperdiffError, match=r"options must be keywords of hd.task, some of "
                                                r"\[.*'defaults'.*\] \(got 'bogus'\)"):
        task_of(MLP(), bogus=1)
