"""Config values: durations and sizes as people write them, and the readers that turn one
parameter's config value into the argument its policy factory takes.

Every reader takes ``(value, where)`` and raises a :class:`~ckptwise.errors.ConfigError` that
starts with ``where`` (the key path, e.g. ``save.every.interval``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from decimal import Decimal

from ckptwise.errors import ConfigError

__all__ = [
    "closest",
    "format_duration",
    "parse_bytes",
    "parse_duration",
    "read_duration",
    "read_float",
    "read_int",
    "read_int_list",
    "read_mode",
    "read_positive_duration",
    "read_positive_int",
    "read_positive_size",
    "read_schedule",
    "read_signals",
    "read_size",
    "read_str",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)


def closest(name: str, allowed: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the allowed name closest to a misspelt ``name``, or ``""``
    when none is close."""
    match = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.7)
    return f"did you mean {match[0]!r}? " if match else ""


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


def read_int(value: object, where: str) -> int:
    """An integer, also from text (``"250"``) or a whole float (TOML and YAML may give one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: {value!r} is not an integer")
    return value


def read_positive_int(value: object, where: str) -> int:
    """:func:`read_int` of a count or an interval: 1 or more.

    The policy factories check the same, but their messages show the Python spelling
    (``cw.every(1000)``); this one leaves the example to the config form reading it."""
    number = read_int(value, where)
    if number < 1:
        raise ConfigError(f"{where}: {value!r} is not a positive integer")
    return number


def read_float(value: object, where: str) -> float:
    """A number, also from text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a number") from None


def read_str(value: object, where: str) -> str:
    """A string, as it is."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not a string")
    return value


def read_mode(value: object, where: str) -> str:
    """A ranking direction: ``"min"`` or ``"max"``."""
    if value not in ("min", "max"):
        raise ConfigError(
            f"{where}: must be 'min' (lower is better, e.g. a loss) or 'max' (e.g. "
            f"accuracy), got {value!r}"
        )
    return str(value)


def read_int_list(value: object, where: str) -> list[int]:
    """A list of step numbers."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: {value!r} is not a list of steps")
    return [read_int(v, f"{where}[{i}]") for i, v in enumerate(value)]


def read_schedule(value: object, where: str) -> dict[int, int]:
    """A mapping of step threshold to interval (keys may be text, as TOML keys are)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {value!r} is not a mapping of step -> interval")
    return {read_int(k, f"{where} key"): read_int(v, f"{where}.{k}") for k, v in value.items()}


def read_signals(value: object, where: str) -> list[str]:
    """One signal name, a list of them, or ``true`` for the default pair."""
    if value is True:
        return ["SIGTERM", "SIGUSR1"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        return [read_str(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: give at least one signal name")
    raise ConfigError(f"{where}: {value!r} is not a signal name or a list of them")


def read_duration(value: object, where: str) -> timedelta:
    """:func:`parse_duration` as a reader; a policy's durations are never negative."""
    delta = parse_duration(value, where=where)
    if delta < timedelta(0):
        raise ConfigError(f"{where}: {value!r} is a negative duration")
    return delta


def read_positive_duration(value: object, where: str) -> timedelta:
    """:func:`read_duration` of an interval or an age: longer than zero."""
    delta = read_duration(value, where)
    if not delta:
        raise ConfigError(f"{where}: {value!r} is not a positive duration")
    return delta


def read_size(value: object, where: str) -> int:
    """:func:`parse_bytes` as a reader."""
    return parse_bytes(value, where=where)


def read_positive_size(value: object, where: str) -> int:
    """:func:`read_size` of a budget: at least one byte."""
    size = read_size(value, where)
    if size < 1:
        raise ConfigError(f"{where}: {value!r} is not a positive size")
    return size
