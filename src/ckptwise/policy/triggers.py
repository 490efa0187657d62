"""Save triggers: pure decisions of *when* to save, composed with ``|`` (any) and ``&`` (all).

Every trigger is a frozen dataclass with one method, :meth:`Trigger.decide`, that reads a
:class:`~ckptwise.policy.state.TrainingState` and returns a
:class:`~ckptwise.policy.state.Decision`. Triggers never read a clock, touch a file or talk to
other ranks: the manager passes all of that in, so a trigger's test is a plain table.

>>> from ckptwise.policy import TrainingState, after, every, on_improvement
>>> policy = after(200, every(1000) | on_improvement("eval_loss"))
>>> from datetime import UTC, datetime
>>> policy.decide(TrainingState(step=1000, now=datetime.now(UTC))).reasons
('every(1000)',)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ckptwise.errors import ConfigError
from ckptwise.policy.base import (
    AllOf,
    AnyOf,
    Mode,
    Trigger,
    TriggerOps,
    check_mode,
    non_negative_int,
    positive_int,
    walk,
)
from ckptwise.policy.state import Decision, TrainingState

__all__ = [
    "AllOf",
    "AnyOf",
    "AtSteps",
    "Every",
    "Geometric",
    "Mode",
    "Never",
    "OnFinal",
    "OnImprovement",
    "Schedule",
    "Trigger",
    "at_steps",
    "every",
    "geometric",
    "never",
    "on_final",
    "on_improvement",
    "schedule",
    "step_only",
    "walk",
]


@dataclass(frozen=True)
class Every(TriggerOps):
    """Fires at every multiple of ``interval``, from ``start`` on; never at step 0."""

    interval: int
    start: int = 0

    def __post_init__(self) -> None:
        positive_int(
            "every(interval)", self.interval, "use cw.every(1000) to save every 1000 steps"
        )
        non_negative_int("every(start=)", self.start)

    def decide(self, state: TrainingState) -> Decision:
        step = state.step
        if step > 0 and step >= self.start and step % self.interval == 0:
            return Decision.yes(f"every({self.interval})")
        return Decision.no()


def every(interval: int, *, start: int = 0) -> Every:
    """Save at multiples of ``interval`` (as ``save_steps`` does), none before ``start``.

    ``every(1000, start=2000)`` first saves at 2000. ``start`` holds back this trigger only;
    to hold back every trigger of the run, wrap them: ``after(2000, every(1000) | ...)``.
    """
    return Every(interval, start)


@dataclass(frozen=True)
class AtSteps(TriggerOps):
    """Fires exactly at the listed steps."""

    steps: frozenset[int]

    def decide(self, state: TrainingState) -> Decision:
        if state.step in self.steps:
            return Decision.yes("at_steps")
        return Decision.no()


def at_steps(steps: Iterable[int]) -> AtSteps:
    """Save at exactly these steps (``at_steps([0])`` saves the untrained model)."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ConfigError(f"at_steps expects a list of step numbers, got {steps!r}")
    checked = frozenset(non_negative_int("at_steps(steps)", s) for s in steps)
    if not checked:
        raise ConfigError("at_steps got an empty list; give at least one step, e.g. [500, 1000]")
    return AtSteps(checked)


@dataclass(frozen=True)
class Schedule(TriggerOps):
    """Fires every ``interval`` steps counted from the threshold where that interval starts.

    ``intervals`` pairs each threshold with the interval in force from it on, sorted by
    threshold. Thresholds themselves are save points (except step 0); no save happens
    before the first threshold.
    """

    intervals: tuple[tuple[int, int], ...]

    def decide(self, state: TrainingState) -> Decision:
        step = state.step
        current: tuple[int, int] | None = None
        for threshold, interval in self.intervals:
            if threshold > step:
                break
            current = (threshold, interval)
        if current is None or step == 0:
            return Decision.no()
        threshold, interval = current
        if (step - threshold) % interval == 0:
            return Decision.yes(f"schedule({interval})")
        return Decision.no()


def schedule(intervals: Mapping[int, int]) -> Schedule:
    """Save with an interval that changes at step thresholds.

    ``schedule({0: 2000, 10_000: 1000, 50_000: 500})`` saves every 2000 steps, then every
    1000 from step 10 000, then every 500 from 50 000. Intervals may grow or shrink.
    """
    if not isinstance(intervals, Mapping) or not intervals:
        raise ConfigError(
            "schedule expects a mapping of step threshold -> interval such as "
            f"{{0: 2000, 10000: 1000}}, got {intervals!r}"
        )
    pairs = sorted(
        (
            non_negative_int("schedule threshold", k),
            positive_int(f"schedule interval at step {k}", v, "e.g. {0: 2000, 10000: 1000}"),
        )
        for k, v in intervals.items()
    )
    return Schedule(tuple(pairs))


@dataclass(frozen=True)
class Geometric(TriggerOps):
    """Fires at log-spaced steps: ``first``, then each next step ``factor`` times the last,
    until the gap reaches ``max_interval``, then every ``max_interval`` steps."""

    first: int
    factor: float
    max_interval: int
    _ramp: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        positive_int("geometric(first)", self.first, "e.g. geometric(first=100, factor=2.0)")
        if (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, (int, float))
            or not (math.isfinite(self.factor) and self.factor > 1)
        ):
            raise ConfigError(f"geometric(factor) must be a number > 1, got {self.factor!r}")
        positive_int("geometric(max_interval)", self.max_interval, "e.g. max_interval=5000")
        ramp = [self.first]
        while True:
            last = ramp[-1]
            nxt = min(max(last + 1, round(last * self.factor)), last + self.max_interval)
            if nxt - last >= self.max_interval:
                break
            ramp.append(nxt)
        object.__setattr__(self, "_ramp", tuple(ramp))

    def decide(self, state: TrainingState) -> Decision:
        step, ramp = state.step, self._ramp
        tail = ramp[-1]
        if step >= tail:
            hit = (step - tail) % self.max_interval == 0
        else:
            hit = ramp[bisect.bisect_left(ramp, step)] == step
        return Decision.yes(f"geometric({self.first})") if hit else Decision.no()


def geometric(first: int = 100, factor: float = 2.0, max_interval: int = 5000) -> Geometric:
    """Save densely early and sparsely later: ``first``, ``first*factor``, ... capped gaps.

    ``geometric(100, 2.0, 5000)`` saves at 100, 200, 400, ..., 6400, then every 5000.
    """
    return Geometric(first, factor, max_interval)


@dataclass(frozen=True)
class OnImprovement(TriggerOps):
    """Fires when ``metric`` is reported at this step and beats every earlier value.

    Ignores steps where the metric is not reported. The first value ever seen counts as an
    improvement; NaN never does. "Beats" means by more than ``min_delta``: for ``mode="min"``,
    ``value < best - min_delta``, where ``best`` is the best value ever reported (the
    reference of the Hugging Face ``Trainer``'s ``save_strategy="best"`` with
    ``early_stopping_threshold``; Lightning's ``EarlyStopping`` instead compares with the last
    value that improved by more than ``min_delta``). With ``min_delta=0`` it saves exactly
    where ``save_strategy="best"`` and Lightning's ``ModelCheckpoint(monitor=..., save_top_k=1)``
    would.

    ``patience`` caps what a noisy, fast-improving metric costs: after this trigger saved,
    the next improvement saves only once ``patience`` reports of the metric (the current one
    included) have come in. ``patience=0`` or ``1`` saves every improvement; with more, an
    improvement inside the window is not saved, so the kept "best" may trail the true best.
    """

    metric: str
    mode: Mode = "min"
    min_delta: float = 0.0
    patience: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(
                f"on_improvement needs a metric name such as 'eval_loss', got {self.metric!r}"
            )
        check_mode(self.mode)
        if (
            isinstance(self.min_delta, bool)
            or not isinstance(self.min_delta, (int, float))
            or not math.isfinite(self.min_delta)
            or self.min_delta < 0
        ):
            raise ConfigError(
                f"on_improvement(min_delta=) must be a finite number >= 0, got {self.min_delta!r}"
            )
        non_negative_int("on_improvement(patience=)", self.patience)

    @property
    def reason(self) -> str:
        """The reason this trigger records when it fires."""
        return f"on_improvement({self.metric})"

    def decide(self, state: TrainingState) -> Decision:
        value = state.metrics.get(self.metric)
        if value is None or math.isnan(value):
            return Decision.no()
        stats = state.history.get(self.metric)
        best_step = None
        if stats is not None:
            best_step = stats.min_step if self.mode == "min" else stats.max_step
        if stats is not None and best_step is not None:  # else nothing (or only NaN) before
            best = stats.best(self.mode)
            improved = (
                value < best - self.min_delta
                if self.mode == "min"
                else value > best + self.min_delta
            )
            if not improved:
                return Decision.no()
        mark = state.marks.get(self.reason)
        if self.patience > 1 and mark is not None:
            seen = 0 if stats is None else stats.count
            if seen - mark.counts.get(self.metric, 0) + 1 < self.patience:
                return Decision.no()
        return Decision.yes(self.reason)


def on_improvement(
    metric: str, mode: Mode = "min", *, min_delta: float = 0.0, patience: int = 0
) -> OnImprovement:
    """Save when a validation metric improves on its best value so far.

    Metrics arrive through ``manager.step(step, state, metrics={...})``.
    """
    return OnImprovement(metric, mode, min_delta, patience)


@dataclass(frozen=True)
class OnFinal(TriggerOps):
    """Fires on the step the caller marks as final (``manager.step(..., final=True)``)."""

    def decide(self, state: TrainingState) -> Decision:
        return Decision.yes("final") if state.final else Decision.no()


def on_final() -> OnFinal:
    """Save the last step of the run, whatever the other triggers say."""
    return OnFinal()


@dataclass(frozen=True)
class Never(TriggerOps):
    """Never fires: the save policy of a manager that only reads."""

    def decide(self, state: TrainingState) -> Decision:
        return Decision.no()


def never() -> Never:
    """A trigger that never saves."""
    return Never()


#: the triggers whose decision is a function of ``step`` and ``final`` alone
_STEP_ONLY = (Every, AtSteps, Schedule, Geometric, OnFinal, Never)


def step_only(trigger: Trigger) -> bool:
    """Whether ``trigger`` decides from ``step`` and ``final`` alone (no clock, metrics or
    outside requests), so every process of a job reaches the same decision by itself."""
    return all(isinstance(t, _STEP_ONLY) for t in walk(trigger))
