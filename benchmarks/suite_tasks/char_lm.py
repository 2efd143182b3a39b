"""A character-level transformer language model on text that ships with Python: the source of
ten standard-library modules (read with ``inspect.getsource``; about 300k characters, so the
exact text depends on the Python version). Characters outside printable ASCII map to one
unknown symbol (97 symbols). The text is cut into windows of 33 characters (32 inputs, 32
next-character targets); blocks of 16 consecutive windows go to train / val / test (60/20/20,
seeded by ``data_seed``), and a validation or test window whose text occurs in an earlier split
is dropped, so no split shares a window with another; validation keeps 256 windows and test
512. One pre-norm transformer block (width 48, 2 causal attention heads, MLP 96), AdamW in
minibatches of 32 windows.

Tunes the warmup-cosine learning-rate schedule (peak, warmup, final) and the weight decay.
Metrics: next-character cross-entropy (nats) and accuracy.

    hyperdiff run --task benchmarks/suite_tasks/char_lm.py:build
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from suite_common import Splits, lr_schedule, schedule_space, seeded_module, split_three, starts
from torch import Tensor

import hyperdiff as hd

NAME = "char_lm"
DEFAULT_STEPS = 100
BATCH_SIZE = 32
LR = 3e-3
LR_NAME = "lr_peak"
CONTEXT, WIDTH, HEADS, BLOCK = 32, 48, 2, 16
MODULES = ("textwrap", "string", "heapq", "bisect", "fnmatch", "shlex", "calendar", "difflib",
           "argparse", "functools")
VOCAB = 97  # "\n", chr(32)..chr(126), unknown


def corpus() -> str:
    """The source text of :data:`MODULES`, concatenated."""
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


def encode(text: str) -> Tensor:
    """Symbol ids (len(text),) int64: 0 for a newline, 1..95 for printable ASCII, 96 else."""
    codes = torch.tensor([ord(c) for c in text])
    ids = torch.where((codes >= 32) & (codes <= 126), codes - 31, torch.full_like(codes, 96))
    return torch.where(codes == 10, torch.zeros_like(ids), ids)


def data(data_seed: int = 0, n_val: int = 256, n_test: int = 512) -> Splits:
    """(inputs, targets) windows (n, 32) int64 per split; whole blocks of 16 windows per split."""
    ids = encode(corpus())
    n_windows = (len(ids) - 1) // (CONTEXT + 1)
    n_blocks = n_windows // BLOCK
    windows = ids[: n_blocks * BLOCK * (CONTEXT + 1)].reshape(n_blocks, BLOCK, CONTEXT + 1)
    out, seen = {}, set()
    for name, blocks, cap in zip(("train", "val", "test"), split_three(n_blocks, data_seed),
                                 (None, n_val, n_test), strict=True):
        chosen = windows[blocks].reshape(-1, CONTEXT + 1)
        text = [bytes(w.to(torch.uint8).tolist()) for w in chosen]
        fresh = torch.tensor([t not in seen for t in text])  # source code repeats itself
        seen.update(text)
        chosen = chosen[fresh][:cap]
        out[name] = (chosen[:, :-1], chosen[:, 1:])
    return out


class TinyTransformer(torch.nn.Module):
    """Token + position embedding, one pre-norm block (causal self-attention, GELU MLP), final
    norm and a linear read-out: ids (B, L) -> logits (B, L, 97)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.position = torch.nn.Parameter(0.02 * torch.randn(CONTEXT, WIDTH))
        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(WIDTH) for _ in range(3))
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                       torch.nn.Linear(2 * WIDTH, WIDTH))
        self.out = torch.nn.Linear(WIDTH, VOCAB)

    def attention(self, x: Tensor) -> Tensor:
        """Causal multi-head attention written out (softmax(q k^T / sqrt(d)) v), so that it is
        twice differentiable on every backend."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS)
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, WIDTH))

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.out(self.norm3(x))


def make_model(seed: int) -> torch.nn.Module:
    return seeded_module(seed, TinyTransformer)


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial peak lr is ``lr_scale`` x 3e-3."""
    steps = DEFAULT_STEPS if steps is None else steps
    net = hd.functional(make_model(data_seed))
    splits = data(data_seed)
    lr, lr_hparams = lr_schedule(steps, LR * lr_scale)

    def loss(params, h, batch):
        x, y = batch
        return F.cross_entropy(net(params, x).reshape(-1, VOCAB), y.reshape(-1))

    def metrics(params, h, batch):
        x, y = batch
        logits = net(params, x).reshape(-1, VOCAB)
        return {"loss": float(F.cross_entropy(logits, y.reshape(-1))),
                "accuracy": float((logits.argmax(-1) == y.reshape(-1)).double().mean())}

    return hd.task(
        NAME, model=net, train_loss=loss, val_loss=loss, metrics=metrics,
        hparams=hd.HyperParameters({**lr_hparams, "wd": hd.scalar(1e-2)}),
        optimizer=hd.adamw(lr, weight_decay="wd"),
        data=hd.given_splits(train=splits["train"], val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=BATCH_SIZE,
        search_space=schedule_space(lr=(1e-4, 1.0), wd=(1e-5, 1.0)),
        description="character-level transformer LM on Python standard-library source",
    )


globals().update(starts(build))
