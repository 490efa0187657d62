"""Turning reported metrics into the plain floats that policies and manifests hold.

The manager, the ``Trainer`` adapter and the Lightning adapter all receive metrics in the
shapes their frameworks use (Python numbers, numpy scalars, one-element tensors); this is
the one place that converts them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from ckptwise.errors import ConfigError

__all__ = ["coerce_metrics"]


def _scalar(value: Any) -> float | None:
    """The float a metric value stands for, or ``None`` when it is not one number."""
    if not isinstance(value, numbers.Number) and callable(getattr(value, "item", None)):
        # a tensor or numpy array: only a single element is one number
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else getattr(value, "size", None)
        if size != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def coerce_metrics(values: Mapping[Any, Any] | None, *, strict: bool = True) -> dict[str, float]:
    """Plain ``{name: float}`` from ``values``.

    With ``strict`` (the manager: the user passed these values on purpose) a name that is
    not a string or a value that is not one number raises :class:`ConfigError`; without it
    (framework adapters, whose logs also carry strings and lists) such entries are skipped.
    """
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        if not isinstance(key, str):
            if strict:
                raise ConfigError(f"metric names must be strings, got {key!r}")
            continue
        number = _scalar(value)
        if number is None:
            if strict:
                raise ConfigError(
                    f"metric {key!r} has value {value!r} of type {type(value).__name__}; "
                    "pass plain numbers (e.g. loss.item())"
                )
            continue
        out[key] = number
    return out
