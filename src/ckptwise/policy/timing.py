"""Wall-clock triggers: a fixed cadence, an overhead budget, and the Young/Daly optimum.

All three read only ``TrainingState.now``, ``last_save_time``/``run_start`` and the measured
``save_costs`` that the manager passes in; none reads a clock.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import timedelta

from ckptwise.errors import ConfigError
from ckptwise.policy.base import TriggerOps
from ckptwise.policy.state import Decision, TrainingState

__all__ = [
    "EveryDuration",
    "OptimalInterval",
    "OverheadBudget",
    "daly_interval",
    "every_duration",
    "optimal_interval",
    "overhead_budget",
]


def _positive_duration(name: str, value: object) -> timedelta:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ConfigError(
            f"{name} must be a positive datetime.timedelta (e.g. timedelta(minutes=30)), "
            f"got {value!r}"
        )
    return value


def _duration_or_zero(name: str, value: object) -> timedelta:
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise ConfigError(f"{name} must be a datetime.timedelta >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class EveryDuration(TriggerOps):
    """Fires once ``interval`` has passed since the last save started (or the run started)."""

    interval: timedelta

    def __post_init__(self) -> None:
        _positive_duration("every_duration(interval)", self.interval)

    def decide(self, state: TrainingState) -> Decision:
        elapsed = state.since_last_save()
        if elapsed is not None and elapsed >= self.interval:
            return Decision.yes(f"every_duration({_fmt(self.interval)})")
        return Decision.no()


def every_duration(interval: timedelta) -> EveryDuration:
    """Save on a wall-clock cadence, e.g. ``every_duration(timedelta(minutes=30))``."""
    return EveryDuration(interval)


def _typical_cost(state: TrainingState, window: int = 3) -> timedelta | None:
    """The median of the last few measured save costs: robust to one slow save, quick to
    follow a lasting change."""
    if not state.save_costs:
        return None
    recent = [c.total_seconds() for c in state.save_costs[-window:]]
    return timedelta(seconds=statistics.median(recent))


class _CostInterval(TriggerOps):
    """Fires when the time since the last save reaches an interval derived from its cost.

    Before any save was measured it fires once ``first_after`` has passed since the run
    started, so the first measurement does not land on a useless early step.
    """

    first_after: timedelta

    def interval(self, cost: timedelta) -> timedelta:
        """Time from the start of one save to the start of the next, for a save of ``cost``."""
        raise NotImplementedError

    def _label(self) -> str:
        raise NotImplementedError

    def decide(self, state: TrainingState) -> Decision:
        elapsed = state.since_last_save()
        if elapsed is None:
            return Decision.no()
        cost = _typical_cost(state)
        due = self.first_after if cost is None else self.interval(cost)
        return Decision.yes(self._label()) if elapsed >= due else Decision.no()


@dataclass(frozen=True)
class OverheadBudget(_CostInterval):
    """Keeps the time spent saving near ``fraction`` of wall time.

    A save that costs ``C`` is followed by the next one ``C / fraction`` after it started,
    so each cycle spends ``C`` of ``C / fraction`` saving. Costs are the median of the last
    three measured saves, so the interval follows saves that get slower or faster.
    """

    fraction: float
    first_after: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        if (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, (int, float))
            or not 0 < self.fraction < 1
        ):
            raise ConfigError(
                f"overhead_budget(fraction) must be a number between 0 and 1 (0.02 = 2% of "
                f"wall time), got {self.fraction!r}"
            )
        _duration_or_zero("overhead_budget(first_after=)", self.first_after)

    def interval(self, cost: timedelta) -> timedelta:
        return cost / self.fraction

    def _label(self) -> str:
        return f"overhead_budget({self.fraction:g})"


def overhead_budget(
    fraction: float, *, first_after: timedelta = timedelta(minutes=10)
) -> OverheadBudget:
    """Save as often as a budget of ``fraction`` of wall time allows (e.g. ``0.02``)."""
    return OverheadBudget(fraction, first_after)


def daly_interval(cost: timedelta, mtbf: timedelta) -> timedelta:
    """Daly's higher-order optimum compute time between checkpoints.

    ``W = sqrt(2CM) * (1 + sqrt(C/2M)/3 + (C/2M)/9) - C`` for ``C < 2M``, else ``M``
    (J. T. Daly, 2006), which refines Young's ``sqrt(2CM)``. For ``M`` = 24 h and ``C`` =
    5 min it gives about 117 minutes.
    """
    c, m = cost.total_seconds(), mtbf.total_seconds()
    if c >= 2 * m:
        return mtbf
    r = c / (2 * m)
    w = math.sqrt(2 * c * m) * (1 + math.sqrt(r) / 3 + r / 9) - c
    return timedelta(seconds=max(w, 0.0))


@dataclass(frozen=True)
class OptimalInterval(_CostInterval):
    """Saves at the Young/Daly optimum for the measured save cost and a mean time between
    failures: the interval that minimises expected time lost to saves plus rework."""

    mtbf: timedelta
    first_after: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        _positive_duration("optimal_interval(mtbf=)", self.mtbf)
        _duration_or_zero("optimal_interval(first_after=)", self.first_after)

    def interval(self, cost: timedelta) -> timedelta:
        return daly_interval(cost, self.mtbf) + cost

    def _label(self) -> str:
        return f"optimal_interval({_fmt(self.mtbf)})"


def optimal_interval(
    mtbf: timedelta, *, first_after: timedelta = timedelta(minutes=10)
) -> OptimalInterval:
    """Save at the interval that minimises expected lost time for failures every ``mtbf``."""
    return OptimalInterval(mtbf, first_after)


def _fmt(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds and seconds == delta.total_seconds():
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"
    return f"{delta.total_seconds():g}s"
