"""The offline plan's options as config keys (``outer.confirm``, ``outer.revert``,
``outer.common_seed``): read from overrides and from a stored config, refused by an online run
unless at their defaults, and read as their defaults from a run directory written before them."""

from __future__ import annotations

import pytest

import hyperdiff as hd
from hyperdiff.app.config import legacy_values, load_config
from hyperdiff.app.plans import build_online

KEYS = [("confirm", "2", 2, 0, "the confirmations are"),
        ("revert", "3", 3, 0, "the return to the best values is"),
        ("common_seed", "true", True, False, "the steps' common seeds are")]


@pytest.mark.parametrize(("key", "text", "value", "default", "what"), KEYS)
def test_the_key_is_read_refused_online_and_off_in_old_runs(tmp_path, key, text, value, default,
                                                           what):
    offline = load_config(overrides=["task.name=mlp_digits", f"outer.{key}={text}"])
    assert getattr(offline.outer, key) == value
    online = load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                    f"outer.{key}={text}"])
    with pytest.raises(hd.HyperdiffError, match=rf"config: outer.{key} must be {default} with "
                       rf"outer.mode = 'online' \({what} offline only; got {value}\)"):
        build_online(online)
    assert legacy_values({"outer": {"mode": "offline"}})["outer"][key] == default
    path = tmp_path / "config.toml"
    path.write_text(f'[task]\nname = "mlp_digits"\n[outer]\n{key} = {text}\n')
    assert getattr(load_config(path, stored=True).outer, key) == value
