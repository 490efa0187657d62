"""Policies to and from plain data: dicts, and YAML, TOML or JSON files holding them.

A ``save`` mapping with several keys means "any of them" (``|``); ``any:`` and ``all:`` take
lists for explicit ``|`` and ``&``. A ``keep`` mapping is a union; ``any:`` takes a list.
Names and parameters come from :mod:`~ckptwise.config.registry`.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from ckptwise.config.registry import KEEP, SAVE
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.policy.base import AllOf, AnyOf, KeepAny, RetentionPolicy, Trigger

__all__ = ["Policy", "keep_from_data", "policy_from_config", "save_from_data", "to_config"]


@dataclass(frozen=True)
class Policy:
    """A save trigger and a retention policy, either of which may be absent."""

    save: Trigger | None = None
    keep: RetentionPolicy | None = None


def save_from_data(node: object, where: str) -> Trigger:
    """The trigger that the ``save`` mapping ``node`` (found at ``where``) describes."""
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(
            f"{where}: expected a mapping of triggers such as {{every: 1000}}, got {node!r}"
        )
    owners = {sibling: spec for spec in SAVE.specs.values() for sibling in spec.siblings}
    items = {str(k): v for k, v in node.items()}
    loose = {k: items.pop(k) for k in list(items) if k in owners}
    triggers: list[Trigger] = []
    for key, value in items.items():
        path = f"{where}.{key}"
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of trigger mappings")
            parts = [save_from_data(v, f"{path}[{i}]") for i, v in enumerate(value)]
            if len(parts) == 1:
                triggers.append(parts[0])
            else:
                triggers.append(AnyOf.of(*parts) if key == "any" else AllOf.of(*parts))
            continue
        spec = SAVE.get(key)
        if spec is None:
            raise ConfigError(
                f"{path}: unknown trigger; allowed: {', '.join([*SAVE.names, 'any', 'all'])}"
            )
        beside = {s: loose.pop(s) for s in spec.siblings if s in loose}
        if beside and spec.bare and not isinstance(value, Mapping):
            value = {spec.bare: value, **beside}
        else:
            loose.update(beside)  # a mapping names its parameters inside: these are misplaced
        triggers.append(spec.build(value, path))
    for key in loose:
        owner = owners[key].name
        raise ConfigError(f"{where}.{key}: '{key}' only goes with '{owner}' (e.g. {owner}: 1000)")
    return triggers[0] if len(triggers) == 1 else AnyOf.of(*triggers)


def keep_from_data(node: object, where: str) -> RetentionPolicy:
    """The retention policy that the ``keep`` mapping ``node`` (found at ``where``) describes."""
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(f"{where}: expected a mapping such as {{last: 3}}, got {node!r}")
    policies: list[RetentionPolicy] = []
    for raw, value in node.items():
        key = str(raw)
        path = f"{where}.{key}"
        if key == "any":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of retention mappings")
            policies.extend(keep_from_data(v, f"{path}[{i}]") for i, v in enumerate(value))
            continue
        spec = KEEP.get(key)
        if spec is None:
            raise ConfigError(f"{path}: unknown retention policy; allowed: {', '.join(KEEP.names)}")
        policies.append(spec.build(value, path))
    return policies[0] if len(policies) == 1 else KeepAny.of(*policies)


def _load(source: str | os.PathLike[str]) -> Any:
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ConfigError(
                    f"{path} is YAML, which needs PyYAML: pip install 'ckptwise[config]'"
                ) from exc
            return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} does not parse: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path} does not parse: {exc}") from exc
        raise
    raise ConfigError(f"{path}: policy files end in .yaml, .yml, .toml or .json")


def policy_from_config(source: Mapping[str, Any] | str | os.PathLike[str]) -> Policy:
    """Build the policies a config describes: a mapping with ``save`` and/or ``keep``, or
    the path of a YAML, TOML or JSON file holding one (optionally under a ``ckptwise`` key).
    """
    doc = source if isinstance(source, Mapping) else _load(source)
    if isinstance(doc, Mapping) and "ckptwise" in doc and isinstance(doc["ckptwise"], Mapping):
        doc = doc["ckptwise"]
    if not isinstance(doc, Mapping):
        where = "" if isinstance(source, Mapping) else f"{source}: "
        raise ConfigError(
            f"{where}a policy config is a mapping with 'save' and/or 'keep', got {doc!r}"
        )
    unknown = [k for k in doc if k not in ("save", "keep")]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; a policy config has 'save' and 'keep'")
    save = doc.get("save")
    keep = doc.get("keep")
    return Policy(
        save=None if save is None else save_from_data(save, "save"),
        keep=None if keep is None else keep_from_data(keep, "keep"),
    )


# -- back to data ------------------------------------------------------------------------------


def _trigger_item(trigger: Trigger) -> dict[str, Any]:
    if isinstance(trigger, AnyOf):
        return {"any": [_trigger_item(t) for t in trigger.triggers]}
    if isinstance(trigger, AllOf):
        return {"all": [_trigger_item(t) for t in trigger.triggers]}
    spec = SAVE.of(trigger)
    if spec is None:
        raise CheckpointError(f"{trigger!r} has no config form (it is not a built-in trigger)")
    return {spec.name: spec.dump(trigger)}


def _keep_items(policy: RetentionPolicy) -> list[dict[str, Any]]:
    if isinstance(policy, KeepAny):
        return [item for p in policy.policies for item in _keep_items(p)]
    spec = KEEP.of(policy)
    if spec is None:
        raise CheckpointError(f"{policy!r} has no config form (it is not a built-in policy)")
    return [{spec.name: spec.dump(policy)}]


def _merge_items(items: Sequence[dict[str, Any]], combinator: str) -> dict[str, Any]:
    """One mapping when every key is distinct (the short form people write), else a list."""
    keys = [k for item in items for k in item]
    if len(set(keys)) == len(keys) and combinator not in keys:
        return {k: v for item in items for k, v in item.items()}
    return {combinator: list(items)}


@overload
def to_config(policy: Policy, /) -> dict[str, Any]: ...


@overload
def to_config(
    save: Trigger | None = None, keep: RetentionPolicy | None = None
) -> dict[str, Any]: ...


def to_config(
    save: Trigger | Policy | None = None, keep: RetentionPolicy | None = None
) -> dict[str, Any]:
    """The config dict of built-in policies; :func:`policy_from_config` rebuilds them equal.

    Takes the :class:`Policy` that :func:`policy_from_config` returns, or a trigger and a
    retention policy.

    >>> import ckptwise as cw
    >>> cw.to_config(cw.every(1000), cw.keep_last(3))
    {'save': {'every': {'interval': 1000, 'start': 0}}, 'keep': {'last': 3}}
    """
    if isinstance(save, Policy):
        if keep is not None:
            raise ConfigError("to_config takes a Policy or a trigger and a retention policy")
        policy = save
        save, keep = policy.save, policy.keep
    out: dict[str, Any] = {}
    if save is not None:
        item = _trigger_item(save)
        out["save"] = _merge_items(item["any"], "any") if list(item) == ["any"] else item
    if keep is not None:
        out["keep"] = _merge_items(_keep_items(keep), "any")
    return out
