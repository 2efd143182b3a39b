"""Tune your own model: a small CNN with BatchNorm on scikit-learn's 8x8 digits.

The task is written with the public API only (``hd.task``): hyperdiff draws the train /
validation / selection / test splits (stratified by label) and tunes a learning-rate schedule
(one value per inner step) and one weight decay per parameter tensor by hypergradient descent.
Then the tuned values go back into plain PyTorch: ``hd.torch_optimizer`` turns them into a
``torch.optim.SGD`` with one param group per tensor and an LR scheduler that replays the
schedule, the CNN is retrained with an ordinary torch loop, and its test accuracy is printed.

    python examples/own_task.py                              # tune, export, retrain (~20 s)
    hyperdiff run --task examples/own_task.py:build          # the same task through the CLI

(``--task FILE.py:build`` imports and runs that file: name only code you trust.)
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hyperdiff as hd

STEPS = 40
BATCH_SIZE = 64


def make_cnn(seed: int = 0) -> torch.nn.Module:
    """conv 3x3 (8 channels) -> BatchNorm -> ReLU -> 2x2 max-pool -> linear (10 classes)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10),
    )


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (1797, 1, 8, 8) scaled to [0, 1] and labels (1797,)."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return images, torch.tensor(y)


def build(steps: int = STEPS, data_seed: int = 0) -> hd.tasks.TaskSpec:
    """The task factory (``hyperdiff run --task examples/own_task.py:build`` calls it)."""
    net = hd.functional(make_cnn(data_seed))

    def loss(params, h, batch, ctx):
        x, y = batch
        return F.cross_entropy(net(params, x, ctx), y)

    def metrics(params, h, batch, ctx):  # ctx.train is False: BatchNorm's running statistics
        x, y = batch
        logits = net(params, x, ctx)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).double().mean())}

    return hd.task(
        "cnn_digits", model=net, train_loss=loss, val_loss=loss,
        hparams=hd.HyperParameters(lr=hd.per_step(steps, 0.01),
                                   weight_decay=hd.per_tensor(net.params, 1e-3)),
        optimizer=hd.sgd("lr", 0.9, weight_decay="weight_decay"),
        data=digits(), steps=steps, batch_size=BATCH_SIZE, metrics=metrics,
        description="CNN with BatchNorm on 8x8 digits",
        defaults={"stop.max_steps": 20},
    )


def accuracy(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    module.eval()
    with torch.no_grad():
        x, y = batch
        return float((module(x).argmax(-1) == y).double().mean())


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    spec = build()
    task = spec.build(selection_fraction=0.5)  # hyperdiff draws the splits (data_seed 0)
    tuner = hd.HyperOptimizer(list(task.problems), schedule="cosine",
                              selection=task.selection, stopping=hd.Stopping(max_steps=20))
    result = tuner.run()
    seeds = (1000, 1001, 1002)  # fresh minibatch orders (hyperdiff run's report draws its
    #                             own: hyperdiff.seeds.report_seeds(3))
    before = task.evaluate(seeds=seeds)["test"]
    after = task.evaluate(result.best_raw, seeds=seeds)["test"]
    decay = result.best_hparams.natural()["weight_decay"]
    lr = result.best_hparams.natural()["lr"]
    print(f"tuned in {time.perf_counter() - started:.1f} s: best outer step {result.best_step} "
          f"of {result.steps} (by {result.criterion.replace('_', ' ')})")
    print(f"lr schedule: {float(lr[0]):.3f} at step 0 -> {float(lr[-1]):.3f} at step "
          f"{len(lr) - 1} (mean {float(lr.mean()):.3f})")
    for name, value in zip(spec.hparams["weight_decay"].param_names, decay.tolist(),
                           strict=True):
        print(f"  weight decay {name:<10} {value:.2e}")
    print(f"test loss / accuracy over {len(seeds)} fresh trainings: initial "
          f"{before['loss']:.4f} / {before['accuracy']:.4f}, tuned {after['loss']:.4f} / "
          f"{after['accuracy']:.4f}")

    # retrain with plain torch.optim at the tuned values, the same T steps and batches
    module = make_cnn(0)
    optimizer, scheduler = hd.torch_optimizer(spec.optimizer, result.best_hparams, module,
                                           steps=STEPS)
    train_data = task.final_problem.train_data  # seeded minibatches of the train split
    module.train()
    for step in range(STEPS):
        x, y = train_data.batch(step, seeds[0])
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        scheduler.step()
    test = task.splits["test"][0]
    print(f"torch.optim retrain (exported param groups + LR scheduler, seed {seeds[0]}): "
          f"test accuracy {accuracy(module, test):.4f}")
    state, _ = hd.testing.train(replace(task.final_problem, seed=seeds[0]), result.best_raw)
    trained = hd.load_into(make_cnn(0), state.params, state.buffers)
    theirs = trained.state_dict()
    gap = max(float((value - theirs[name]).abs().max())
              for name, value in module.state_dict().items() if value.is_floating_point())
    print(f"hd.testing.train's model loaded with load_into: test accuracy "
          f"{accuracy(trained, test):.4f}; largest difference from the torch.optim weights "
          f"{gap:.1e}")
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
