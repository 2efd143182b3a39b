"""The built-in sinusoid_maml task's iMAML form: ``task.params.proximal = s`` adds
``(s/2) ||theta - theta_0||^2`` to the training loss (written out here), and refuses a negative
strength in our error format."""

from __future__ import annotations

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.tasks import build_task
from hyperdiff.app.tasks.sinusoid_maml import forward


def test_proximal_adds_the_written_out_term_to_the_training_loss_only():
    plain = build_task("sinusoid_maml", params={}).problems[0]
    prox = build_task("sinusoid_maml", params={"proximal": 2.0}).problems[0]
    raw = prox.hparams.raw
    hview = prox.hparams.view(raw)
    g = torch.Generator().manual_seed(0)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in prox.params.items()}
    x, y = prox.train_data.batch(0, prox.seed)
    theta0 = hd.hparams.initialization.initial_values(prox.hparams, "theta0")
    written = (((forward(theta, x) - y) ** 2).mean()
               + 1.0 * sum(((theta[k] - theta0[k]) ** 2).sum() for k in theta))
    assert torch.allclose(prox.train_loss(theta, hview, (x, y)), written, rtol=1e-6, atol=0)
    assert torch.equal(prox.val_loss(theta, hview, (x, y)), plain.val_loss(theta, hview, (x, y)))
    assert not torch.allclose(plain.train_loss(theta, hview, (x, y)), written)


def test_a_negative_proximal_strength_is_refused_with_our_message():
    with pytest.raises(hd.HyperdiffError, match=r"sinusoid_maml: proximal must be a finite number >= 0 \(got -1.0\)$"):
        build_task("sinusoid_maml", params={"proximal": -1.0})
