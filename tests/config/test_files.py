"""Tests for :mod:`ckptwise.config.files`: policy files that give a key twice are refused,
naming the key and where it is, in YAML, JSON and TOML alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ckptwise as cw
from ckptwise.config import policy_from_config
from ckptwise.errors import ConfigError


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_refuses_a_repeated_key_naming_it_and_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "policy.yaml", "save:\n  every: 1000\n  every: 500\n")
    message = (
        f"{path}, line 3: the key 'every' appears twice in one mapping (first on line 2); "
        "each key may appear once in a mapping: keep the one you mean"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        policy_from_config(path)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("save: {every: 1000}\nkeep: {last: 2}\nsave: {every: 5}\n", 3, "save"),
        ("content:\n  full_every: 5000\n  full_every: 10\n", 3, "full_every"),
        ("save:\n  any:\n    - {every: 10, every: 20}\n", 3, "every"),
        ("ckptwise:\n  keep: {last: 2, last: 3}\n", 2, "last"),
    ],
)
def test_yaml_refuses_a_repeated_key_at_any_depth(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    path = _write(tmp_path, "policy.yml", text)
    with pytest.raises(ConfigError, match=rf", line {line}: the key '{key}' appears twice"):
        policy_from_config(path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    text = "base: &base {every: 1000, start: 200}\nckptwise:\n  save: {<<: *base, every: 500}\n"
    path = _write(tmp_path, "policy.yaml", text)
    assert policy_from_config(path).save == cw.every(500, start=200)


def test_json_refuses_a_repeated_key_naming_it_and_its_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "policy.json", '{"save": {\n  "every": 1000,\n  "every": 500\n}}\n')
    message = (
        f"{path}: the key 'every' appears twice in one object (lines 2, 3); each key may "
        "appear once in a mapping: keep the one you mean"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        policy_from_config(path)


def test_toml_errors_for_a_repeated_key_quote_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "policy.toml", "[save]\nevery = 1000\nevery = 500\n")
    with pytest.raises(
        ConfigError,
        match=re.escape("line 3 is `every = 500`; is a key or table given twice? each key"),
    ):
        policy_from_config(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("policy.yaml", "save:\n  every: 1000\nkeep:\n  every: 5000\n"),
        ("policy.json", '{"save": {"every": 1000}, "keep": {"every": 5000}}'),
        ("policy.toml", "[save]\nevery = 1000\n[keep]\nevery = 5000\n"),
    ],
)
def test_the_same_key_in_two_mappings_is_no_repeat(tmp_path: Path, name: str, text: str) -> None:
    policy = policy_from_config(_write(tmp_path, name, text))
    assert (policy.save, policy.keep) == (cw.every(1000), cw.keep_every(5000))
