"""``[stop]`` keys that a mode does not read are refused, not ignored: every key online (one
training of ``inner.steps`` steps), ``stop.travel`` in meta runs. Defaults, a task's own
defaults and stored run directories still load; the library's ``HyperOptimizer`` refuses a
``Stopping`` other than the default with an ``OnlinePlan``."""

from __future__ import annotations

import pytest
from test_online import recipe

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import StopConfig, load_config

ONLINE = ["task.name=ridge_diabetes", "outer.mode=online"]


@pytest.mark.parametrize("key, value", [("max_steps", "12"), ("max_time_s", "60.0"),
                                        ("patience", "3"), ("min_delta", "0.01"),
                                        ("grad_tol", "0.001"), ("step_tol", "0.0001"),
                                        ("travel", "0")])
def test_an_online_config_refuses_every_stop_key_moved_off_its_default(key, value):
    with pytest.raises(hd.HyperdiffError, match=(
            rf"config: stop\.{key} must be left at its default .* with outer\.mode = "
            rf"'online' \(an online run is one training of inner\.steps steps.*got "
            rf"{value}\)")):
        load_config(overrides=[*ONLINE, f"stop.{key}={value}"])


def test_an_online_config_takes_stop_keys_at_their_defaults_and_a_tasks_own():
    """``stop.max_steps = 30`` is the default; ``logistic_cancer``'s own default is 40 (an
    offline setting of the task, which the online run does not read and the user did not
    set); a TOML file may repeat it."""
    assert load_config(overrides=[*ONLINE, "stop.max_steps=30", "stop.patience=10"]).stop \
        == StopConfig()
    cancer = ["task.name=logistic_cancer", "outer.mode=online"]
    assert load_config(overrides=cancer).stop.max_steps == 40
    assert load_config(overrides=[*cancer, "stop.max_steps=40"]).stop.max_steps == 40
    with pytest.raises(hd.HyperdiffError, match=r"stop\.max_steps must be left at its "
                       r"default 40 .*got 30\)"):
        load_config(overrides=[*cancer, "stop.max_steps=30"])


def test_a_meta_config_refuses_stop_travel_only():
    meta = ["task.name=sinusoid_maml", "outer.mode=meta"]
    with pytest.raises(hd.HyperdiffError, match=r"config: stop\.travel must be left at its "
                       r"default 3 with outer\.mode = 'meta' \(stop\.travel and stop\.extend "
                       r"are the offline plan's rules; meta runs do not read them; got 5\)"):
        load_config(overrides=[*meta, "stop.travel=5"])
    # patience is read with validation tasks (s41: refused without them, where nothing reads it)
    config = load_config(overrides=[*meta, "stop.max_steps=4", "stop.patience=2",
                                    "outer.meta_val_tasks=2"])
    assert (config.stop.max_steps, config.stop.patience) == (4, 2)


def test_an_offline_config_takes_every_stop_key():
    config = load_config(overrides=["task.name=ridge_diabetes", "stop.travel=5",
                                    "stop.patience=3", "stop.max_time_s=60"])
    assert (config.stop.travel, config.stop.patience, config.stop.max_time_s) == (5, 3, 60.0)


def test_a_stored_online_config_with_a_stop_key_still_loads(tmp_path):
    """A run directory written before the refusal ran with what it holds (the key unread):
    resuming it must not be refused."""
    stored = tmp_path / "config.toml"
    stored.write_text('[task]\nname = "ridge_diabetes"\n[outer]\nmode = "online"\n'
                      "[stop]\npatience = 3\ntravel = 3\n", encoding="utf-8")
    assert load_config(stored, stored=True).stop.patience == 3
    with pytest.raises(hd.HyperdiffError, match=r"stop\.patience must be left"):
        load_config(stored)


def test_the_cli_refuses_it_with_the_message_and_no_traceback(tmp_path, capsys):
    code = main(["run", "--task", "ridge_diabetes", "--set", "outer.mode=online", "--set",
                 "stop.patience=3", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "stop.patience must be left at its default 10" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_the_library_refuses_a_stopping_rule_an_online_plan_does_not_read():
    with pytest.raises(hd.HyperdiffError, match=(
            r"HyperOptimizer: stopping must be None or Stopping\(\) with a plan that ranks no "
            r"steps \(OnlinePlan: one training.*\(got Stopping\(max_steps=50, .*patience=3")):
        hd.HyperOptimizer(recipe(6), plan=hd.plans.OnlinePlan(window=3),
                          stopping=hd.Stopping(patience=3))
    for stopping in (None, hd.Stopping()):
        loop = hd.HyperOptimizer(recipe(6), plan=hd.plans.OnlinePlan(window=3),
                                 stopping=stopping)
        assert loop.run().hyper_steps == 2  # the one run of 6 steps: two windows
