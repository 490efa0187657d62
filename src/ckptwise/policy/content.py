"""Content policies: *what* a save holds -- the whole state, or a slim variant of it.

A variant is chosen per save from the same :class:`~ckptwise.policy.state.TrainingState`
the triggers saw, plus their decision. Slim variants (weights only, trainable weights only,
optionally cast to a smaller dtype) cost a fraction of a full save but cannot resume
training: :meth:`CheckpointManager.restore` skips them and resumes from the newest full one.

>>> import ckptwise as cw
>>> content = cw.full_every(5000, otherwise=cw.weights_only(cast="bfloat16"))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from ckptwise.errors import ConfigError
from ckptwise.policy.base import positive_int
from ckptwise.policy.state import Decision, TrainingState

__all__ = [
    "ContentPolicy",
    "FullEvery",
    "Variant",
    "full",
    "full_every",
    "trainable_only",
    "weights_only",
]

Kind = Literal["full", "weights", "trainable"]
_CASTS = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Variant:
    """What one save holds.

    ``full``: every entry of the state and the RNG states. ``weights``: only the entry
    ``key`` (the model). ``trainable``: only the parameters of ``key`` that require grad.
    ``cast`` stores floating-point weights in that dtype (e.g. fp32 master weights as bf16).
    """

    kind: Kind = "full"
    key: str = "model"
    cast: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("full", "weights", "trainable"):
            raise ConfigError(f"variant kind must be full, weights or trainable, got {self.kind!r}")
        if self.cast is not None and self.cast not in _CASTS:
            raise ConfigError(f"cast must be one of {', '.join(_CASTS)}, got {self.cast!r}")
        if self.kind == "full" and self.cast is not None:
            raise ConfigError("a full checkpoint is never cast: it must resume training exactly")
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError(f"key must name the model's entry in the state, got {self.key!r}")

    @property
    def label(self) -> str:
        """Short text for listings: ``full``, ``weights``, ``trainable/bfloat16``."""
        return self.kind if self.cast is None else f"{self.kind}/{self.cast}"

    def to_json(self) -> dict[str, str | None]:
        """The JSON form a checkpoint's manifest stores (``extra["variant"]``)."""
        return {"kind": self.kind, "key": self.key, "cast": self.cast}

    @classmethod
    def from_json(cls, obj: object) -> Variant:
        """Inverse of :meth:`to_json`, lenient with what older or foreign manifests hold.

        No variant, or one of an unknown kind, reads as :func:`full` (checkpoints written
        before slim saves existed are full). A known slim kind stays slim whatever else is
        wrong with it -- a key or cast this version does not accept is dropped -- so a slim
        checkpoint is never taken for one that can resume training.
        """
        if not isinstance(obj, Mapping) or obj.get("kind") not in ("full", "weights", "trainable"):
            return full()
        kind, key, cast = obj["kind"], obj.get("key"), obj.get("cast")
        return cls(
            kind,
            key if isinstance(key, str) and key else "model",
            cast if kind != "full" and cast in _CASTS else None,
        )

    def choose(self, state: TrainingState, decision: Decision) -> Variant:
        """A variant used as a policy always chooses itself."""
        return self


@runtime_checkable
class ContentPolicy(Protocol):
    """Anything that picks the variant of a save the triggers decided on."""

    def choose(self, state: TrainingState, decision: Decision) -> Variant:
        """The variant for this save."""
        ...


def full() -> Variant:
    """Every save holds the whole state (the default)."""
    return Variant("full")


def weights_only(key: str = "model", *, cast: str | None = None) -> Variant:
    """Saves hold only the model's tensors (``state[key]``), optionally cast."""
    return Variant("weights", key, cast)


def trainable_only(key: str = "model", *, cast: str | None = None) -> Variant:
    """Saves hold only the model's parameters that require grad (adapters, unfrozen parts)."""
    return Variant("trainable", key, cast)


@dataclass(frozen=True)
class FullEvery:
    """Full saves at multiples of ``interval`` -- and whenever the run may be about to end
    (the final step, a signal or file request) -- the ``otherwise`` variant in between."""

    interval: int
    otherwise: Variant

    def __post_init__(self) -> None:
        positive_int("full_every(interval)", self.interval, "e.g. cw.full_every(5000)")
        if not isinstance(self.otherwise, Variant):
            raise ConfigError(
                f"full_every(otherwise=) takes a variant such as cw.weights_only(), "
                f"got {self.otherwise!r}"
            )

    def choose(self, state: TrainingState, decision: Decision) -> Variant:
        if state.step % self.interval == 0 or state.final or decision.requests:
            return full()
        return self.otherwise


def full_every(interval: int, *, otherwise: Variant | None = None) -> FullEvery:
    """Full checkpoints every ``interval`` steps, slim ones (weights only) in between."""
    return FullEvery(interval, otherwise if otherwise is not None else weights_only())
