"""Policies to and from plain data: dicts, and YAML, TOML or JSON files holding them.

A ``save`` mapping with several keys means "any of them" (``|``); ``any:`` and ``all:`` take
lists for explicit ``|`` and ``&``; ``after: N`` beside triggers holds all of them back until
step ``N`` (:func:`~ckptwise.policy.after`). A ``keep`` mapping is a union; ``any:`` takes a
list. Names and parameters come from :mod:`~ckptwise.config.registry`; the other manager
options a file may set (``content``, ``codec``, ...) from :mod:`~ckptwise.config.options`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from ckptwise.config.files import load_policy_file
from ckptwise.config.options import OPTIONS, dump_options, read_options
from ckptwise.config.registry import KEEP, SAVE, Registry, Spelling
from ckptwise.config.values import closest, read_int
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.policy.base import After, AllOf, AnyOf, KeepAny, RetentionPolicy, Trigger
from ckptwise.policy.content import ContentPolicy

__all__ = [
    "Policy",
    "keep_from_data",
    "policy_from_config",
    "save_from_data",
    "to_config",
    "unknown_policy",
]

#: the sections of a policy config
SECTIONS = ("save", "keep", *OPTIONS)


@dataclass(frozen=True)
class Policy:
    """Everything a policy file sets: the save trigger, the retention policy and the
    manager options (``None``: not set, the manager's default applies).

    ``CheckpointManager(root, **policy.manager_options())`` builds the manager it describes.
    """

    save: Trigger | None = None
    keep: RetentionPolicy | None = None
    content: ContentPolicy | None = None
    codec: str | None = None
    deltas: int | None = None
    async_save: bool | None = None
    defer_copy: bool | None = None
    on_busy: str | None = None
    rng: bool | None = None

    def options(self) -> dict[str, Any]:
        """The manager options this policy sets, besides ``save`` and ``keep``."""
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) is not None}

    def manager_options(self) -> dict[str, Any]:
        """The :class:`~ckptwise.CheckpointManager` keyword arguments it describes."""
        return {"save": self.save, "keep": self.keep, **self.options()}


def save_from_data(node: object, where: str, *, spelling: Spelling = "file") -> Trigger:
    """The trigger that the ``save`` mapping ``node`` (found at ``where``) describes;
    ``spelling`` says how examples in errors are written (the one-line form passes
    ``"line"``)."""
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(
            f"{where}: expected a mapping of triggers such as {{every: 1000}}, got {node!r}"
        )
    items = {str(k): v for k, v in node.items()}
    if "after" in items:
        start = read_int(items.pop("after"), f"{where}.after")
        if not items:
            raise ConfigError(
                f"{where}.after: give the triggers it holds back beside it, e.g. "
                "{after: 2000, every: 1000}"
            )
        try:
            return After(start, save_from_data(items, where, spelling=spelling))
        except ConfigError as exc:
            if str(exc).startswith(where):
                raise
            raise ConfigError(f"{where}.after: {exc}") from exc
    owners = {sibling: spec for spec in SAVE.specs.values() for sibling in spec.siblings}
    loose = {k: items.pop(k) for k in list(items) if k in owners}
    triggers: list[Trigger] = []
    for key, value in items.items():
        path = f"{where}.{key}"
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of trigger mappings")
            parts = [
                save_from_data(v, f"{path}[{i}]", spelling=spelling) for i, v in enumerate(value)
            ]
            if len(parts) == 1:
                triggers.append(parts[0])
            else:
                triggers.append(AnyOf.of(*parts) if key == "any" else AllOf.of(*parts))
            continue
        spec = SAVE.get(key)
        if spec is None:
            raise ConfigError(f"{path}: {unknown_policy(key, SAVE, KEEP)}")
        beside = {s: loose.pop(s) for s in spec.siblings if s in loose}
        if beside and spec.bare and not isinstance(value, Mapping):
            value = {spec.bare: value, **beside}
        else:
            loose.update(beside)  # a mapping names its parameters inside: these are misplaced
        triggers.append(spec.build(value, path, spelling))
    for key in loose:
        owner = owners[key].name
        raise ConfigError(f"{where}.{key}: '{key}' only goes with '{owner}' (e.g. {owner}: 1000)")
    return triggers[0] if len(triggers) == 1 else AnyOf.of(*triggers)


def keep_from_data(node: object, where: str, *, spelling: Spelling = "file") -> RetentionPolicy:
    """The retention policy that the ``keep`` mapping ``node`` (found at ``where``) describes;
    ``spelling`` as for :func:`save_from_data`."""
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(f"{where}: expected a mapping such as {{last: 3}}, got {node!r}")
    policies: list[RetentionPolicy] = []
    for raw, value in node.items():
        key = str(raw)
        path = f"{where}.{key}"
        if key == "any":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of retention mappings")
            policies.extend(
                keep_from_data(v, f"{path}[{i}]", spelling=spelling) for i, v in enumerate(value)
            )
            continue
        spec = KEEP.get(key)
        if spec is None:
            raise ConfigError(f"{path}: {unknown_policy(key, KEEP, SAVE)}")
        policies.append(spec.build(value, path, spelling))
    return policies[0] if len(policies) == 1 else KeepAny.of(*policies)


def unknown_policy(name: str, registry: Registry, other: Registry) -> str:
    """Why ``name`` is not a policy of ``registry`` (a retention policy given as a trigger,
    the reverse, or a name neither knows), and what ``registry`` allows."""
    ours, theirs = ("save", "keep") if registry is SAVE else ("keep", "save")
    names = [*registry.names, *(("after", "any", "all") if ours == "save" else ("any",))]
    allowed = ", ".join(names)
    if other.get(name) is not None or (name == "after" and ours == "keep"):
        return (
            f"{name!r} is a {'save trigger' if theirs == 'save' else other.kind}, which goes under {theirs} (the {theirs}= argument, "
            f"--{theirs}, CKPTWISE_{theirs.upper()}), not {ours}; {ours} takes {allowed}"
        )
    near = closest(name, [*names, *registry.aliases])
    return f"unknown {registry.kind}; {near}allowed: {allowed}"


def policy_from_config(source: Mapping[str, Any] | str | os.PathLike[str]) -> Policy:
    """Build the policies a config describes: a mapping with ``save`` and/or ``keep`` and
    any manager options (``content``, ``codec``, ``deltas``, ``async_save``, ``on_busy``,
    ``rng``), or the path of a YAML, TOML or JSON file holding one (optionally under a
    ``ckptwise`` key).
    """
    doc = source if isinstance(source, Mapping) else load_policy_file(Path(source))
    if isinstance(doc, Mapping) and "ckptwise" in doc and isinstance(doc["ckptwise"], Mapping):
        doc = doc["ckptwise"]
    if not isinstance(doc, Mapping):
        where = "" if isinstance(source, Mapping) else f"{source}: "
        raise ConfigError(
            f"{where}a policy config is a mapping with 'save' and/or 'keep', got {doc!r}"
        )
    unknown = [k for k in doc if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown section; {closest(str(unknown[0]), SECTIONS)}a policy "
            f"config has {', '.join(SECTIONS)}"
        )
    save = doc.get("save")
    keep = doc.get("keep")
    return Policy(
        save=None if save is None else save_from_data(save, "save"),
        keep=None if keep is None else keep_from_data(keep, "keep"),
        **read_options(doc),
    )


# -- back to data ------------------------------------------------------------------------------


def _trigger_item(trigger: Trigger) -> dict[str, Any]:
    if isinstance(trigger, After):
        inner = _trigger_mapping(trigger.trigger)
        if "after" in inner:
            inner = {"any": [inner]}
        return {"after": trigger.start, **inner}
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
    """One mapping when every key is distinct (the short form people write), else a list.

    An item of several keys (``after`` beside its triggers) holds them together, so it
    is never merged."""
    keys = [k for item in items for k in item]
    single = all(len(item) == 1 for item in items)
    if single and len(set(keys)) == len(keys) and combinator not in keys:
        return {k: v for item in items for k, v in item.items()}
    return {combinator: list(items)}


def _trigger_mapping(trigger: Trigger) -> dict[str, Any]:
    """The ``save`` mapping of ``trigger``, in the short form where it has one."""
    item = _trigger_item(trigger)
    return _merge_items(item["any"], "any") if list(item) == ["any"] else item


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

    Takes the :class:`Policy` that :func:`policy_from_config` returns (its manager options
    included), or a trigger and a retention policy.

    >>> import ckptwise as cw
    >>> cw.to_config(cw.every(1000), cw.keep_last(3))
    {'save': {'every': {'interval': 1000, 'start': 0}}, 'keep': {'last': 3}}
    """
    options: dict[str, Any] = {}
    if isinstance(save, Policy):
        if keep is not None:
            raise ConfigError("to_config takes a Policy or a trigger and a retention policy")
        policy = save
        save, keep, options = policy.save, policy.keep, policy.options()
    out: dict[str, Any] = {}
    if save is not None:
        out["save"] = _trigger_mapping(save)
    if keep is not None:
        out["keep"] = _merge_items(_keep_items(keep), "any")
    out.update(dump_options(options))
    return out
