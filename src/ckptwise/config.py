"""Policies as data: YAML/TOML/JSON files, plain dicts and a one-line form for flags.

Every trigger and retention policy has a config name and named parameters (the same as
its Python function's). A mapping with several keys means "any of them" (``|``); ``any:``
and ``all:`` take lists for explicit ``|`` / ``&``. For example::

    save:
      every: 1000
      start: 200                       # belongs to `every`
      on_improvement: {metric: eval_loss, mode: min}
      on_signal: true
    keep:
      last: 3
      best: {n: 1, metric: eval_loss}

The one-line form writes the same with calls: ``every(1000, start=200) |
on_improvement(eval_loss, mode=min)`` and ``last(3) | best(1, eval_loss)``; the grammar is
in the README. :func:`to_config` turns policy objects back into a dict that
:func:`policy_from_config` rebuilds equal. Errors name the key path, the value and what is
allowed.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.policy.requests import OnFile, OnSignal, on_file, on_signal
from ckptwise.policy.retention import (
    KeepAll,
    KeepAny,
    KeepBest,
    KeepBudget,
    KeepEvery,
    KeepLast,
    KeepWithin,
    RetentionPolicy,
    keep_all,
    keep_best,
    keep_budget,
    keep_every,
    keep_last,
    keep_within,
)
from ckptwise.policy.timing import (
    EveryDuration,
    OptimalInterval,
    OverheadBudget,
    every_duration,
    optimal_interval,
    overhead_budget,
)
from ckptwise.policy.triggers import (
    AllOf,
    AnyOf,
    AtSteps,
    Every,
    Geometric,
    Never,
    OnFinal,
    OnImprovement,
    Schedule,
    Trigger,
    at_steps,
    every,
    geometric,
    never,
    on_final,
    on_improvement,
    schedule,
)

__all__ = [
    "Policy",
    "format_duration",
    "parse_bytes",
    "parse_duration",
    "parse_keep",
    "parse_save",
    "policy_from_config",
    "to_config",
]


@dataclass(frozen=True)
class Policy:
    """A save trigger and a retention policy, either of which may be absent."""

    save: Trigger | None = None
    keep: RetentionPolicy | None = None


# -- values ----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)


def parse_duration(value: object, *, where: str = "duration") -> timedelta:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"2d"``, a number of seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
        try:
            return timedelta(seconds=float(text))
        except ValueError:
            pass
    raise ConfigError(
        f"{where}: {value!r} is not a duration; write e.g. '90s', '30m', '1h30m', '2d' or a "
        "number of seconds"
    )


def format_duration(delta: timedelta) -> str:
    """The shortest exact text :func:`parse_duration` reads back as ``delta``."""
    total = delta.total_seconds()
    if not total:
        return "0s"
    if total < 0:
        raise ConfigError(f"durations in policies are positive, got {delta!r}")
    if total == int(total):
        seconds = int(total)
        out = ""
        for unit in ("d", "h", "m", "s"):
            size = int(_UNITS[unit])
            if seconds >= size:
                out += f"{seconds // size}{unit}"
                seconds %= size
        return out
    micro = delta // timedelta(microseconds=1)
    return f"{micro // 10**6}.{micro % 10**6:06d}".rstrip("0") + "s"


def parse_bytes(value: object, *, where: str = "size") -> int:
    """``"22GB"`` (powers of 1000), ``"1.5GiB"`` (powers of 1024), or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _BYTES.match(value)
        if match:
            number, unit = Decimal(match.group(1)), match.group(2).lower()
            prefix = unit[:1] if unit[:1] in "kmgtp" else ""
            power = "kmgtp".index(prefix) + 1 if prefix else 0
            base = 1024 if "i" in unit else 1000
            size = number * base**power
            if size == size.to_integral_value():
                return int(size)
    raise ConfigError(
        f"{where}: {value!r} is not a size; write e.g. '22GB', '1.5GiB', '500MB' or a number "
        "of bytes"
    )


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: {value!r} is not an integer")
    return value


def _float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a number") from None


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not a string")
    return value


def _int_list(value: object, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: {value!r} is not a list of steps")
    return [_int(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _schedule_map(value: object, where: str) -> dict[int, int]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {value!r} is not a mapping of step -> interval")
    return {_int(k, f"{where} key"): _int(v, f"{where}.{k}") for k, v in value.items()}


def _signals(value: object, where: str) -> list[str]:
    if value is True:
        return ["SIGTERM", "SIGUSR1"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [_str(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where}: {value!r} is not a signal name or a list of them")


# -- the table of policies ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    name: str
    convert: Callable[[object, str], Any]
    required: bool = False


@dataclass(frozen=True)
class _Spec:
    """One config name: its factory, its parameters in positional order, and how to read
    a bare (non-mapping) value such as ``every: 1000`` or ``on_signal: true``."""

    factory: Callable[..., Any]
    params: tuple[_Param, ...]
    bare: str | None = None  # the parameter a bare value fills; "" for flags (true)
    variadic: bool = False  # positional args of the one-line form form a list
    takes_mapping: bool = False  # a bare value may itself be a mapping (schedule's)


def _dur(v: object, where: str) -> timedelta:
    return parse_duration(v, where=where)


def _size(v: object, where: str) -> int:
    return parse_bytes(v, where=where)


SAVE_SPECS: dict[str, _Spec] = {
    "every": _Spec(every, (_Param("interval", _int, True), _Param("start", _int)), "interval"),
    "at_steps": _Spec(at_steps, (_Param("steps", _int_list, True),), "steps", variadic=True),
    "schedule": _Spec(
        schedule, (_Param("intervals", _schedule_map, True),), "intervals", takes_mapping=True
    ),
    "geometric": _Spec(
        geometric,
        (_Param("first", _int), _Param("factor", _float), _Param("max_interval", _int)),
    ),
    "every_duration": _Spec(every_duration, (_Param("interval", _dur, True),), "interval"),
    "overhead_budget": _Spec(
        overhead_budget, (_Param("fraction", _float, True), _Param("first_after", _dur)), "fraction"
    ),
    "optimal_interval": _Spec(
        optimal_interval, (_Param("mtbf", _dur, True), _Param("first_after", _dur)), "mtbf"
    ),
    "on_improvement": _Spec(
        on_improvement,
        (
            _Param("metric", _str, True),
            _Param("mode", _str),
            _Param("min_delta", _float),
            _Param("patience", _int),
        ),
        "metric",
    ),
    "on_signal": _Spec(
        on_signal, (_Param("signals", _signals), _Param("then", _str)), "signals", variadic=True
    ),
    "on_file": _Spec(on_file, (_Param("name", _str),), "name"),
    "final": _Spec(on_final, (), ""),
    "never": _Spec(never, (), ""),
}
SAVE_ALIASES = {"on_final": "final", "every_steps": "every"}

KEEP_SPECS: dict[str, _Spec] = {
    "last": _Spec(keep_last, (_Param("n", _int, True),), "n"),
    "best": _Spec(
        keep_best,
        (_Param("n", _int, True), _Param("metric", _str, True), _Param("mode", _str)),
    ),
    "every": _Spec(keep_every, (_Param("interval", _int, True),), "interval"),
    "within": _Spec(keep_within, (_Param("age", _dur, True),), "age"),
    "budget": _Spec(keep_budget, (_Param("max_bytes", _size, True),), "max_bytes"),
    "all": _Spec(keep_all, (), ""),
}
KEEP_ALIASES = {f"keep_{k}": k for k in KEEP_SPECS}


def _build(spec: _Spec, name: str, value: object, where: str) -> Any:
    known = {p.name: p for p in spec.params}
    if isinstance(value, Mapping) and not (
        spec.takes_mapping and not any(str(k) in known for k in value)
    ):
        params = {str(k): v for k, v in value.items()}
    elif spec.bare == "":
        if value is not True:
            raise ConfigError(f"{where}: write `{name}: true` (got {value!r})")
        params = {}
    elif spec.bare is not None:
        params = {spec.bare: value}
    else:
        allowed = ", ".join(p.name for p in spec.params)
        raise ConfigError(f"{where}: {value!r} is not a mapping; give {{{allowed}}}")
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown parameter; {name} takes "
            f"{', '.join(known) or 'no parameters'}"
        )
    kwargs = {}
    for param in spec.params:
        if param.name in params:
            kwargs[param.name] = param.convert(params[param.name], f"{where}.{param.name}")
        elif param.required:
            raise ConfigError(f"{where}: {name} needs {param.name!r}")
    try:
        if name == "on_signal" and "signals" in kwargs:
            return spec.factory(kwargs.pop("signals"), **kwargs)
        return spec.factory(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _save_node(node: object, where: str) -> Trigger:
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(
            f"{where}: expected a mapping of triggers such as {{every: 1000}}, got {node!r}"
        )
    items = dict(node)
    start = items.pop("start", None)
    triggers: list[Trigger] = []
    for key, value in items.items():
        key = str(key)
        path = f"{where}.{key}"
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of trigger mappings")
            parts = [_save_node(v, f"{path}[{i}]") for i, v in enumerate(value)]
            combined: Trigger = parts[0]
            for part in parts[1:]:
                combined = combined | part if key == "any" else combined & part  # type: ignore[operator]
            triggers.append(combined)
            continue
        name = SAVE_ALIASES.get(key, key)
        spec = SAVE_SPECS.get(name)
        if spec is None:
            raise ConfigError(
                f"{path}: unknown trigger; allowed: {', '.join([*SAVE_SPECS, 'any', 'all'])}"
            )
        if name == "every" and start is not None and not isinstance(value, Mapping):
            value = {"interval": value, "start": start}
            start = None
        triggers.append(_build(spec, name, value, path))
    if start is not None:
        raise ConfigError(f"{where}.start: 'start' only goes with 'every' (e.g. every: 1000)")
    result = triggers[0]
    for trigger in triggers[1:]:
        result = result | trigger  # type: ignore[operator]
    return result


def _keep_node(node: object, where: str) -> RetentionPolicy:
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(f"{where}: expected a mapping such as {{last: 3}}, got {node!r}")
    policies: list[RetentionPolicy] = []
    for key, value in node.items():
        key = str(key)
        path = f"{where}.{key}"
        if key == "any":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of retention mappings")
            policies.extend(_keep_node(v, f"{path}[{i}]") for i, v in enumerate(value))
            continue
        name = KEEP_ALIASES.get(key, key)
        spec = KEEP_SPECS.get(name)
        if spec is None:
            raise ConfigError(f"{path}: unknown retention policy; allowed: {', '.join(KEEP_SPECS)}")
        if name == "best" and isinstance(value, str):
            value = {"n": 1, "metric": value}
        policies.append(_build(spec, name, value, path))
    result = policies[0]
    for policy in policies[1:]:
        result = result | policy  # type: ignore[operator]
    return result


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
        save=None if save is None else _save_node(save, "save"),
        keep=None if keep is None else _keep_node(keep, "keep"),
    )


# -- back to data --------------------------------------------------------------------------


def _trigger_item(trigger: Trigger) -> dict[str, Any]:
    if isinstance(trigger, AnyOf):
        return {"any": [_trigger_item(t) for t in trigger.triggers]}
    if isinstance(trigger, AllOf):
        return {"all": [_trigger_item(t) for t in trigger.triggers]}
    if isinstance(trigger, Every):
        return {"every": {"interval": trigger.interval, "start": trigger.start}}
    if isinstance(trigger, AtSteps):
        return {"at_steps": sorted(trigger.steps)}
    if isinstance(trigger, Schedule):
        return {"schedule": dict(trigger.intervals)}
    if isinstance(trigger, Geometric):
        return {
            "geometric": {
                "first": trigger.first,
                "factor": trigger.factor,
                "max_interval": trigger.max_interval,
            }
        }
    if isinstance(trigger, EveryDuration):
        return {"every_duration": format_duration(trigger.interval)}
    if isinstance(trigger, OverheadBudget):
        return {
            "overhead_budget": {
                "fraction": trigger.fraction,
                "first_after": format_duration(trigger.first_after),
            }
        }
    if isinstance(trigger, OptimalInterval):
        return {
            "optimal_interval": {
                "mtbf": format_duration(trigger.mtbf),
                "first_after": format_duration(trigger.first_after),
            }
        }
    if isinstance(trigger, OnImprovement):
        return {
            "on_improvement": {
                "metric": trigger.metric,
                "mode": trigger.mode,
                "min_delta": trigger.min_delta,
                "patience": trigger.patience,
            }
        }
    if isinstance(trigger, OnSignal):
        return {"on_signal": {"signals": list(trigger.signals), "then": trigger.then}}
    if isinstance(trigger, OnFile):
        return {"on_file": trigger.name}
    if isinstance(trigger, OnFinal):
        return {"final": True}
    if isinstance(trigger, Never):
        return {"never": True}
    raise CheckpointError(f"{trigger!r} has no config form (it is not a built-in trigger)")


def _keep_item(policy: RetentionPolicy) -> list[dict[str, Any]]:
    if isinstance(policy, KeepAny):
        return [item for p in policy.policies for item in _keep_item(p)]
    if isinstance(policy, KeepLast):
        return [{"last": policy.n}]
    if isinstance(policy, KeepBest):
        return [{"best": {"n": policy.n, "metric": policy.metric, "mode": policy.mode}}]
    if isinstance(policy, KeepEvery):
        return [{"every": policy.interval}]
    if isinstance(policy, KeepWithin):
        return [{"within": format_duration(policy.age)}]
    if isinstance(policy, KeepBudget):
        return [{"budget": policy.max_bytes}]
    if isinstance(policy, KeepAll):
        return [{"all": True}]
    raise CheckpointError(f"{policy!r} has no config form (it is not a built-in policy)")


def _merge_items(items: Sequence[dict[str, Any]], combinator: str) -> dict[str, Any]:
    keys = [k for item in items for k in item]
    if len(set(keys)) == len(keys) and combinator not in keys:
        return {k: v for item in items for k, v in item.items()}
    return {combinator: list(items)}


def to_config(save: Trigger | None = None, keep: RetentionPolicy | None = None) -> dict[str, Any]:
    """The config dict of built-in policies; :func:`policy_from_config` rebuilds them equal."""
    out: dict[str, Any] = {}
    if save is not None:
        item = _trigger_item(save)
        out["save"] = _merge_items(item["any"], "any") if list(item) == ["any"] else item
    if keep is not None:
        out["keep"] = _merge_items(_keep_item(keep), "any")
    return out


# -- the one-line form ---------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"[^"]*"|'[^']*')|(?P<word>[A-Za-z0-9_.+\-]+)|(?P<punct>[()\[\]{},=|&:]))"""
)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ConfigError(f"cannot read {text!r} at position {pos}: {text[pos : pos + 10]!r}")
        out.append(match.group(match.lastgroup or "word"))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str, specs: Mapping[str, _Spec], aliases: Mapping[str, str]) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.specs = specs
        self.aliases = aliases

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"in {self.text!r}: {message}")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise self.error(f"expected {expected or 'more'}, found {token or 'the end'}")
        self.pos += 1
        return token

    def parse(self) -> dict[str, Any]:
        node = self.expr()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> dict[str, Any]:
        parts = [self.term()]
        while self.peek() == "|":
            self.take()
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else {"any": parts}

    def term(self) -> dict[str, Any]:
        parts = [self.factor()]
        while self.peek() == "&":
            self.take()
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else {"all": parts}

    def factor(self) -> dict[str, Any]:
        if self.peek() == "(":
            self.take("(")
            node = self.expr()
            self.take(")")
            return node
        word = self.take()
        name = self.aliases.get(word, word)
        spec = self.specs.get(name)
        if spec is None:
            raise self.error(f"unknown policy {word!r}; allowed: {', '.join(self.specs)}")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if self.peek() == "(":
            self.take("(")
            while self.peek() != ")":
                if self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1] == "=":
                    key = self.take()
                    self.take("=")
                    kwargs[key] = self.value()
                else:
                    args.append(self.value())
                if self.peek() == ",":
                    self.take()
                elif self.peek() != ")":
                    raise self.error(f"expected ',' or ')', found {self.peek()!r}")
            self.take(")")
        params: dict[str, Any] = {}
        if spec.variadic and len(args) == 1 and isinstance(args[0], list):
            params[spec.params[0].name] = args[0]
        elif spec.variadic and args:
            params[spec.params[0].name] = args
        else:
            if len(args) > len(spec.params):
                raise self.error(f"{word} takes at most {len(spec.params)} positional values")
            params.update({p.name: a for p, a in zip(spec.params, args, strict=False)})
        params.update(kwargs)
        return {name: params if params or spec.bare != "" else True}

    def value(self) -> Any:
        token = self.take()
        if token == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value())
                if self.peek() == ",":
                    self.take()
            self.take("]")
            return items
        if token == "{":
            mapping = {}
            while self.peek() != "}":
                key = self.value()
                self.take(":")
                mapping[key] = self.value()
                if self.peek() == ",":
                    self.take()
            self.take("}")
            return mapping
        if token[0] in "\"'":
            return token[1:-1]
        for convert in (int, float):
            try:
                return convert(token)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(token.lower(), token)


def parse_save(text: str) -> Trigger:
    """Parse the one-line save form, e.g. ``every(1000, start=200) | on_signal``."""
    parser = _Parser(text, SAVE_SPECS, SAVE_ALIASES)
    node = parser.parse()
    try:
        return _save_node(node, "save")
    except ConfigError as exc:
        raise parser.error(str(exc)) from exc


def parse_keep(text: str) -> RetentionPolicy:
    """Parse the one-line keep form, e.g. ``last(3) | best(1, eval_loss)``."""
    parser = _Parser(text, KEEP_SPECS, KEEP_ALIASES)
    node = parser.parse()

    def has_and(item: Any) -> bool:
        if isinstance(item, dict):
            return any((k == "all" and isinstance(v, list)) or has_and(v) for k, v in item.items())
        return isinstance(item, list) and any(has_and(v) for v in item)

    if has_and(node):
        raise parser.error("retention policies combine with '|' only, not '&'")
    try:
        return _keep_node(node, "keep")
    except ConfigError as exc:
        raise parser.error(str(exc)) from exc
