"""The config keys' docs table is generated from app/config.py's declarations and kept in
docs/driver.md between marker comments; `hyperdiff run --print-config --markdown` prints it."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import SECTIONS, Config, config_table, load_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "driver.md"
START, END = "<!-- config-table:", "<!-- /config-table -->"


def docs_table() -> str:
    text = DOCS.read_text(encoding="utf-8")
    start = text.index("\n", text.index(START)) + 1
    return text[start:text.index(END)]


def rows() -> dict[str, list[str]]:
    """``key -> [default, valid, meaning]`` of the generated table (``\\|`` kept escaped)."""
    out = {}
    for line in config_table().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        out[cells[0].strip("`")] = cells[1:]
    return out


def test_the_docs_table_is_the_generated_one():
    assert docs_table() == config_table(), (
        "docs/driver.md's config table is stale: replace the lines between its marker comments "
        "with the output of `hyperdiff run --print-config --markdown`")


def test_every_declared_key_has_one_row_and_the_online_keys_are_there():
    declared = [f"{section}.{f.name}" for section, cls in SECTIONS.items()
                for f in fields(cls) if f.name != "options"]
    assert list(rows()) == declared
    assert {"outer.normalize", "outer.hot_start", "outer.window"} <= set(rows())


def test_each_default_read_as_toml_is_the_dataclass_default():
    defaults = Config().to_dict()
    for key, (default, _valid, _meaning) in rows().items():
        section, name = key.split(".")
        assert tomllib.loads(f"v = {default.strip('`')}")["v"] == defaults[section][name], key


NUMERIC = [key for key, (_d, valid, _m) in rows().items() if valid.startswith(("int", "number"))]


@pytest.mark.parametrize("key", NUMERIC)
def test_the_valid_range_is_the_one_the_checker_enforces(key):
    noun, _, bounds = rows()[key][1].partition(" ")
    expected = f"config: {key} must be {'an int' if noun == 'int' else 'a number'} {bounds} (got"
    with pytest.raises(hd.HyperdiffError) as err:
        load_config(overrides=[f"{key}=[1]"])  # a list: wrong for every numeric key
    assert expected in str(err.value)


def test_the_table_names_the_choices_the_checker_accepts():
    with pytest.raises(hd.HyperdiffError, match=r"outer.hot_start must be one of 'auto', "
                       r"'restart', 'warn', 'ignore' \(got 'x'\)"):
        load_config(overrides=["outer.hot_start=x"])
    assert rows()["outer.hot_start"][1] == "`auto`, `restart`, `warn`, `ignore`"


def test_the_cli_prints_the_table(capsys):
    assert main(["run", "--print-config", "--markdown"]) == 0
    assert capsys.readouterr().out == config_table()


def test_markdown_without_print_config_is_refused(capsys):
    assert main(["run", "--markdown"]) == 2
    assert "run: --markdown must be given with --print-config (got it alone)" in \
        capsys.readouterr().err
