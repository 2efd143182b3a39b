"""Plain choices: fix a task's discrete hyperparameters to single choices before a training.

Any :class:`~hyperdiff.hparams.hyperparams.HyperParameters` with a discrete kind (``categorical``,
``integer``, ``boolean``) is evaluated as the plain model a user deploys: each discrete
hyperparameter fixed to one choice (``sample`` set: one-hot weights, only that option run).
:func:`discretise` takes the argmax of the logits, :func:`fix_choices` given choices (or their
labels), :func:`fixed_hparams` a black-box trial's values. Without discrete hyperparameters
each returns the continuous values unchanged, so every task goes through the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from hyperdiff.errors import fail
from hyperdiff.hparams.discrete import DiscreteParameter, discrete_names, label, with_states
from hyperdiff.hparams.hyperparams import HyperParameters


def discretise(hparams: HyperParameters, raw: Mapping[str, Tensor] | None = None
               ) -> HyperParameters:
    """``hparams`` at ``raw`` with every discrete hyperparameter fixed to its argmax choice
    (a plain choice: one-hot weights, only that option evaluated); ``hparams`` itself when
    none is discrete."""
    names = discrete_names(hparams)
    if not names:
        return hparams
    hp = hparams if raw is None else hparams.with_raw(dict(raw))
    current = hp.raw
    return with_states(hp, {n: {"sample": int(current[n].argmax())} for n in names})


def fix_choices(hparams: HyperParameters, choices: Mapping[str, Any]) -> HyperParameters:
    """``hparams`` with the named discrete hyperparameters fixed to the given choices (or their
    labels, as :func:`~hyperdiff.hparams.discrete.label` writes them); logits set to put
    probability ~1 on them."""
    states, raw = {}, hparams.raw
    for name, choice in choices.items():
        spec = cast(DiscreteParameter, hparams[name])
        labels = [label(c) for c in spec.choices]
        if choice in spec.choices:
            index = spec.choices.index(choice)
        elif choice in labels:
            index = labels.index(choice)
        else:
            raise fail("fix_choices", f"choice of {name!r}", f"one of {labels}", choice)
        states[name] = {"sample": index}
        raw[name] = torch.full_like(raw[name], -20.0)
        raw[name][index] = 20.0
    return with_states(hparams.with_raw(raw), states)


def fixed_hparams(hparams: HyperParameters, values: Mapping[str, Any]) -> HyperParameters:
    """``hparams`` at natural continuous ``values`` (numbers, tensors, or lists per
    coordinate) and plain discrete choices (choices or their labels) among ``values``; names
    not in ``values`` keep their current value."""
    names = set(discrete_names(hparams))
    continuous = {n: v for n, v in values.items() if n not in names}  # checked by with_natural
    plain = hparams.with_natural(**continuous)
    if not names:
        return plain
    return fix_choices(plain, {n: v for n, v in values.items() if n in names})


__all__ = ["discretise", "fix_choices", "fixed_hparams"]
