"""A loop's state as a library user keeps it (s39): a copy that the run going on does not
change, loadable whatever the outer optimizer (AdamW's extra default broke its own resume), and
refused, with one message, where it was saved by a loop of another outer optimizer, seed, run
length or method options (before: a KeyError deep in torch, or a silently different run)."""

from __future__ import annotations

import io

import pytest
import torch

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.plans import OnlinePlan

DT = torch.float64


def problem(steps: int = 12) -> hd.Problem:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=DT)
    y = torch.sin(x.sum(1))
    xv = torch.randn(16, 3, generator=g, dtype=DT)
    yv = torch.sin(xv.sum(1))

    def loss(p, h, b):
        return ((torch.tanh(b[0] @ p["w"]) @ p["v"] - b[1]) ** 2).mean()

    hp = hd.HyperParameters(lr=hd.scalar(0.3), momentum=hd.scalar(0.6, (0.0, 1.0)))
    params = {"w": 0.5 * torch.randn(3, 4, generator=g, dtype=DT),
              "v": 0.5 * torch.randn(4, generator=g, dtype=DT)}
    return hd.make_problem(loss, loss, hp, params, optimizer=hd.sgd("lr", "momentum"),
                           train_data=hd.minibatches(x, y, batch_size=6), val_data=(xv, yv),
                           steps=steps, probe=False)


def online(optimizer: str = "adam", *, steps: int = 12, seed: int = 0,
           method=None) -> HyperOptimizer:
    return HyperOptimizer(problem(steps), plan=OnlinePlan(window=3), method=method or
                          hd.reverse(), optimizer=optimizer, lr=0.05, seed=seed)


def offline(optimizer: str = "adam") -> HyperOptimizer:
    return HyperOptimizer(problem(), method=hd.reverse(), optimizer=optimizer, lr=0.05,
                          stopping=hd.Stopping(max_steps=4))


def saved(loop: HyperOptimizer, steps: int = 2) -> dict:
    for _ in range(steps):
        loop.step()
    buffer = io.BytesIO()
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def same_online(a, b) -> bool:
    return all(torch.equal(a.params[k], b.params[k]) for k in a.params) and all(
        torch.equal(a.final_raw[k], b.final_raw[k]) for k in a.final_raw)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "sgd"])
def test_every_outer_optimizer_resumes_online_bit_for_bit(optimizer):
    whole = online(optimizer).run()
    loop = online(optimizer)
    loop.load_state_dict(saved(online(optimizer)))
    assert same_online(loop.run(), whole)


def test_an_adamw_offline_run_resumes_bit_for_bit():
    whole = offline("adamw")
    whole.run()
    first = offline("adamw")
    state = saved(first)
    loop = offline("adamw")
    loop.load_state_dict(state, history=list(first.history))
    loop.run()
    assert [r.hparams for r in loop.history] == [r.hparams for r in whole.history]


def test_a_kept_state_does_not_change_as_the_run_goes_on():
    whole = online().run()
    kept = {}

    def keep(loop, record):
        if record.step == 0:
            kept["state"] = loop.state_dict()
            kept["exp_avg"] = kept["state"]["outer"]["state"][0]["exp_avg"].clone()

    online().run([keep])
    assert torch.equal(kept["state"]["outer"]["state"][0]["exp_avg"], kept["exp_avg"])
    loop = online()
    loop.load_state_dict(kept["state"])
    assert same_online(loop.run(), whole)


def test_a_state_loaded_twice_gives_the_same_run():
    state = saved(online(), 1)
    first, second = online(), online()
    first.load_state_dict(state)
    first_result = first.run()
    second.load_state_dict(state)
    assert same_online(second.run(), first_result)


@pytest.mark.parametrize(("before", "after"), [("sgd", "adam"), ("adam", "adamw"),
                                               ("adamw", "adam"), ("rmsprop", "sgd")])
def test_a_state_of_another_outer_optimizer_is_refused(before, after):
    state = saved(online(before))
    names = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
    with pytest.raises(hd.HyperdiffError, match=rf"the outer optimizer must be the saved run's "
                       rf"\('{names[before]}'; got '{names[after]}'\)"):
        online(after).load_state_dict(state)


def test_an_older_state_without_the_class_is_refused_by_what_its_settings_lack():
    state = saved(online("sgd"))
    del state["outer"]["class"]
    with pytest.raises(hd.HyperdiffError, match=r"the outer optimizer must be the saved run's: "
                       r"Adam cannot step from its saved state \(KeyError: 'betas'\)"):
        online("adam").load_state_dict(state)


@pytest.mark.parametrize(("change", "key"), [
    ({"seed": 1}, "seed"),
    ({"steps": 30}, "steps"),
    ({"method": hd.truncated(1)}, "method_options"),
])
def test_a_state_of_another_seed_length_or_method_is_refused(change, key):
    state = saved(online())
    with pytest.raises(hd.HyperdiffError, match=rf"load_state_dict: {key} must match the saved "
                       "run"):
        online(**change).load_state_dict(state)


def test_an_older_state_without_those_entries_still_resumes():
    whole = online().run()
    state = saved(online())
    for key in ("seed", "steps", "method_options"):
        del state[key]
    del state["outer"]["class"]
    loop = online()
    loop.load_state_dict(state)
    assert same_online(loop.run(), whole)
