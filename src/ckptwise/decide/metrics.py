"""Turning reported metrics into the plain floats that policies and manifests hold.

The manager, the ``Trainer`` adapter and the Lightning adapter all receive metrics in the
shapes their frameworks use (Python numbers, numpy scalars, one-element tensors); this is
the one place that converts them.

A tensor is converted only when something reads it: reading a GPU tensor's value waits for
the GPU to finish its queued work, which a training loop that reports ``loss`` every step
must not pay on every step. :class:`Metrics` (what the manager's ``step()`` takes in) checks
each value at once -- a name that is not a string, a tensor of more than one element -- but
keeps a private copy of each tensor and converts it on the first read. Policies read only
the metrics they use (``on_improvement("eval_loss")`` reads ``eval_loss``, on the steps
that report it), the run's history folds tensors in batches (:mod:`ckptwise.decide.progress`), and
a save converts them all, once.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, overload

from ckptwise.errors import ConfigError

__all__ = ["Metrics", "coerce_metrics", "is_tensor", "resolve_all"]


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch: if it is not yet
    imported, nothing can be a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _tensor_problem(value: Any) -> str | None:
    """Why a tensor is not one number (checked from its metadata: no GPU sync)."""
    if value.numel() != 1:
        return f"a tensor of {value.numel()} elements"
    if value.dtype.is_complex or str(value.dtype) == "torch.bool":
        return f"a {value.dtype} tensor"
    return None


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


def resolve_all(tensors: Iterable[Any]) -> list[float]:
    """The values of one-element tensors, reading each device's values with one transfer
    (one GPU sync per device and dtype, not one per tensor)."""
    items = list(tensors)
    out: list[float] = [0.0] * len(items)
    groups: dict[tuple[Any, Any], list[int]] = {}
    for index, tensor in enumerate(items):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    torch = sys.modules["torch"] if groups else None
    for indices in groups.values():
        assert torch is not None
        stacked = torch.stack([items[i].reshape(()) for i in indices])
        for index, value in zip(indices, stacked.tolist(), strict=True):
            out[index] = float(value)
    return out


class Metrics(Mapping[str, float]):
    """One step's metrics: numbers as floats, tensors as private copies read on first use.

    Built by :func:`coerce_metrics`; reading an entry (``metrics["loss"]``, ``.get``,
    ``.items()``) converts that entry once; ``in``, ``len`` and iterating over the names
    convert nothing. Pickles as a plain ``dict`` of floats.
    """

    __slots__ = ("_floats", "_names", "_tensors")

    def __init__(
        self, floats: dict[str, float], tensors: dict[str, Any], names: Iterable[str] = ()
    ) -> None:
        self._floats = floats
        self._tensors = tensors
        self._names = tuple(names) or (*floats, *tensors)

    def __getitem__(self, key: str) -> float:
        if key in self._floats:
            return self._floats[key]
        tensor = self._tensors.pop(key)  # KeyError for a name never reported
        value = float(tensor.item())
        self._floats[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._floats or key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def unread(self, key: str) -> Any | None:
        """The tensor reported as ``key`` if it has not been converted yet, else ``None``."""
        return self._tensors.get(key)

    def resolve(self) -> dict[str, float]:
        """Every value as a float (tensors read with one transfer per device)."""
        if self._tensors:
            names = list(self._tensors)
            values = resolve_all(self._tensors[n] for n in names)
            self._floats.update(zip(names, values, strict=True))
            self._tensors.clear()
        return {name: self._floats[name] for name in self._names}

    def __reduce__(self) -> tuple[type[dict[str, float]], tuple[dict[str, float]]]:
        return dict, (self.resolve(),)

    def __repr__(self) -> str:
        shown = {**self._floats, **dict.fromkeys(self._tensors, "<tensor>")}
        return f"Metrics({shown!r})"


@overload
def coerce_metrics(
    values: Mapping[Any, Any] | None, *, strict: Literal[True] = True
) -> Metrics: ...


@overload
def coerce_metrics(
    values: Mapping[Any, Any] | None, *, strict: Literal[False]
) -> dict[str, float]: ...


def coerce_metrics(
    values: Mapping[Any, Any] | None, *, strict: bool = True
) -> Metrics | dict[str, float]:
    """Plain ``{name: float}`` from ``values``.

    With ``strict`` (the manager: the user passed these values on purpose) a name that is
    not a string or a value that is not one number raises :class:`ConfigError`, and the
    result is a :class:`Metrics` whose tensors are read only when used; without it
    (framework adapters, whose logs also carry strings and lists) such entries are skipped
    and every value is converted now.
    """
    if strict and isinstance(values, Metrics):
        return values
    floats: dict[str, float] = {}
    tensors: dict[str, Any] = {}
    names: list[str] = []
    for key, value in (values or {}).items():
        if not isinstance(key, str):
            if strict:
                raise ConfigError(f"metric names must be strings, got {key!r}")
            continue
        if strict and is_tensor(value):
            problem = _tensor_problem(value)
            if problem is None:
                # a copy: the caller may keep accumulating into its tensor in place
                tensors[key] = value.detach().clone()
                names.append(key)
                continue
        number = _scalar(value)
        if number is None:
            if strict:
                raise ConfigError(
                    f"metric {key!r} has value {value!r} of type {type(value).__name__}; "
                    "pass plain numbers or one-element tensors (e.g. loss or loss.item())"
                )
            continue
        floats[key] = number
        names.append(key)
    return Metrics(floats, tensors, names) if strict else floats
