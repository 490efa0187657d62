"""Reading policy files: YAML, TOML and JSON, each refusing a key given twice.

A mapping that names a key twice (``save: {every: 1000, every: 500}``) is a mistake whose
result a reader cannot see: PyYAML and ``json`` keep the last value without a word, so the
run would save ``every(500)``. Here a repeated key is an error naming the key and its lines;
TOML refuses it by itself, and its error is given the text of the line it points at.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from ckptwise.errors import ConfigError

__all__ = ["load_policy_file"]

_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)")
_FIX = "each key may appear once in a mapping: keep the one you mean"


def load_policy_file(path: Path) -> Any:
    """The document in the YAML, TOML or JSON file ``path`` (by its suffix)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _toml(text, path)
    if suffix == ".json":
        return _json(text, path)
    if suffix in (".yaml", ".yml"):
        return _yaml(text, path)
    raise ConfigError(f"{path}: policy files end in .yaml, .yml, .toml or .json")


def _toml(text: str, path: Path) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_AT.search(message)
        lines = text.splitlines()
        if at is not None and ("twice" in message or "overwrite" in message.lower()):
            number = int(at.group(1))
            if 0 < number <= len(lines):
                message += (
                    f": line {number} is `{lines[number - 1].strip()}`; is a key or table "
                    f"given twice? {_FIX}"
                )
        raise ConfigError(f"{path} does not parse: {message}") from exc


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} does not parse: {exc}") from exc
    except _RepeatedKey as exc:
        # the hook sees no positions: list every line where the key is written as a key
        written = re.compile(re.escape(json.dumps(exc.key)) + r"\s*:")
        lines = sorted({text.count("\n", 0, m.start()) + 1 for m in written.finditer(text)})
        where = (
            f" (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})" if lines else ""
        )
        raise ConfigError(
            f"{path}: the key {exc.key!r} appears twice in one object{where}; {_FIX}"
        ) from None


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ConfigError(
            f"{path} is YAML, which needs PyYAML: pip install 'ckptwise[config]'"
        ) from exc

    try:
        _refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} does not parse: {exc}") from exc


def _refuse_repeated_keys(root: Any, path: Path) -> None:
    """Walk the YAML node graph: a mapping may not repeat a key. Keys are compared as
    written, after tag resolution (``every`` and ``"every"`` are one key); a merge ``<<:``
    may still be overridden, as that is what it is for."""
    import yaml

    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:  # an alias shares its anchor's node
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                todo.extend((key, value))
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    raise ConfigError(
                        f"{path}, line {line}: the key {key.value!r} appears twice in one "
                        f"mapping (first on line {first[key.tag, key.value]}); {_FIX}"
                    )
                first[key.tag, key.value] = line
