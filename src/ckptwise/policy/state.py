"""What policies see and answer, as plain immutable values.

The manager builds a :class:`TrainingState` at every step (injecting the clock, the metrics
reported so far and any external save :class:`Request`); triggers only read it and answer
with a :class:`Decision`. Retention policies read a :class:`RetentionContext`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from ckptwise.errors import ConfigError
from ckptwise.records import CheckpointInfo

__all__ = [
    "Decision",
    "MetricStats",
    "Request",
    "RequestKind",
    "RetentionContext",
    "SaveMark",
    "TrainingState",
]

RequestKind = Literal["signal", "file"]


@dataclass(frozen=True, order=True)
class Request:
    """A save asked for from outside the training loop.

    ``Request("signal", "SIGTERM")``: the process received that signal;
    ``Request("file", "SAVE_NOW")``: someone created that file in the run folder. The manager's
    monitor produces them; ``on_signal`` and ``on_file`` answer them.
    """

    kind: RequestKind
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("signal", "file"):
            raise ConfigError(f"a request's kind is 'signal' or 'file', got {self.kind!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(
                f"a request names a signal (e.g. 'SIGTERM') or a file (e.g. 'SAVE_NOW'), "
                f"got {self.name!r}"
            )

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, kw_only=True)
class MetricStats:
    """Running summary of one metric over every step that reported it.

    NaN values are counted in ``count`` and ``last`` but never become the minimum or maximum,
    so a diverged evaluation cannot displace the best checkpoint.
    """

    count: int
    last: float
    last_step: int
    min: float = math.inf
    min_step: int | None = None
    max: float = -math.inf
    max_step: int | None = None

    @classmethod
    def first(cls, step: int, value: float) -> MetricStats:
        """The summary after a single observation."""
        return cls(count=0, last=value, last_step=step).updated(step, value)

    def updated(self, step: int, value: float) -> MetricStats:
        """Return the summary with one more observation (``self`` is unchanged)."""
        new = replace(self, count=self.count + 1, last=value, last_step=step)
        if math.isnan(value):
            return new
        if value < self.min:
            new = replace(new, min=value, min_step=step)
        if value > self.max:
            new = replace(new, max=value, max_step=step)
        return new

    def best(self, mode: str) -> float:
        """The best value so far for ``mode`` (``"min"`` or ``"max"``)."""
        return self.min if mode == "min" else self.max

    def to_json(self) -> dict[str, float | int | None]:
        """A JSON-safe form (infinities as ``None``) for storing in a checkpoint."""
        return {
            "count": self.count,
            "last": None if not math.isfinite(self.last) else self.last,
            "last_step": self.last_step,
            "min": None if math.isinf(self.min) else self.min,
            "min_step": self.min_step,
            "max": None if math.isinf(self.max) else self.max,
            "max_step": self.max_step,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> MetricStats:
        """Inverse of :meth:`to_json`."""

        def num(key: str, default: float) -> float:
            value = data.get(key)
            return default if value is None else float(value)  # type: ignore[arg-type]

        def opt_int(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)  # type: ignore[call-overload]

        return cls(
            count=int(data["count"]),  # type: ignore[call-overload]
            last=num("last", math.nan),
            last_step=int(data["last_step"]),  # type: ignore[call-overload]
            min=num("min", math.inf),
            min_step=opt_int("min_step"),
            max=num("max", -math.inf),
            max_step=opt_int("max_step"),
        )


@dataclass(frozen=True, kw_only=True)
class SaveMark:
    """When a trigger last caused a save: its step, time and each metric's report count then.

    Lets a trigger reason about "since I last fired" (e.g. ``on_improvement(patience=)``)
    without holding state of its own.
    """

    step: int
    time: datetime
    counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """Everything a trigger may base its decision on.

    Attributes:
        step: the step that just finished.
        now: the manager's clock at this step (timezone-aware).
        metrics: the values reported at this step only.
        history: summaries of every metric reported *before* this step.
        last_save_step: step of the newest checkpoint this run saved (or restored), if any.
        last_save_time: when that save started (for a restored one: when it was restored,
            so downtime between jobs does not count as training time).
        run_start: when the manager started (the reference before the first save).
        save_costs: the durations of recent saves, oldest first (as measured by the manager
            with the same clock as ``now``).
        marks: for each save reason, when it last caused a save.
        requests: external save requests pending at this step (signals received, request
            files present).
        final: the caller marked this step as the last one of the run.
    """

    step: int
    now: datetime
    metrics: Mapping[str, float] = field(default_factory=dict)
    history: Mapping[str, MetricStats] = field(default_factory=dict)
    last_save_step: int | None = None
    last_save_time: datetime | None = None
    run_start: datetime | None = None
    save_costs: tuple[timedelta, ...] = ()
    marks: Mapping[str, SaveMark] = field(default_factory=dict)
    requests: frozenset[Request] = frozenset()
    final: bool = False

    def since_last_save(self) -> timedelta | None:
        """Time since the last save started, else since the run started, else ``None``."""
        ref = self.last_save_time if self.last_save_time is not None else self.run_start
        return None if ref is None else self.now - ref


@dataclass(frozen=True)
class Decision:
    """A trigger's answer: whether to save, the reasons of every trigger that fired, and the
    external requests that this save answers (so the manager can forget them once it has
    committed)."""

    save: bool
    reasons: tuple[str, ...] = ()
    requests: frozenset[Request] = frozenset()

    def __bool__(self) -> bool:
        """Whether it says to save, so ``if manager.step(...):`` reads as it should."""
        return self.save

    @classmethod
    def no(cls) -> Decision:
        """The decision not to save."""
        return cls(False)

    @classmethod
    def yes(cls, reason: str, *, requests: Iterable[Request] = ()) -> Decision:
        """The decision to save, for one reason (answering ``requests``, if any)."""
        return cls(True, (reason,), frozenset(requests))


@dataclass(frozen=True, kw_only=True)
class RetentionContext:
    """What a retention policy sees: the committed checkpoints (any order), the time, and
    the stored size of every object they reference (for byte budgets)."""

    checkpoints: Sequence[CheckpointInfo]
    now: datetime
    object_bytes: Mapping[str, int] = field(default_factory=dict)
