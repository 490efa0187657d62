"""The manager's memory of a run, from which it builds each step's ``TrainingState``.

It holds what triggers may look back on -- metric summaries, the last save, when each
reason last saved, recent save costs -- and travels inside every checkpoint (as JSON in the
manifest's ``extra``) so a resumed run decides exactly as an uninterrupted one would.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ckptwise.policy.state import MetricStats, Request, SaveMark, TrainingState

__all__ = ["Progress"]

#: How many recent save costs triggers get to see.
COST_WINDOW = 8


class Progress:
    """Mutable bookkeeping; every value it hands out is an immutable snapshot."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.history: dict[str, MetricStats] = {}
        self.last_save: tuple[int, datetime] | None = None
        self.marks: dict[str, SaveMark] = {}
        self.costs: deque[timedelta] = deque(maxlen=COST_WINDOW)

    def state(
        self,
        step: int,
        now: datetime,
        *,
        metrics: Mapping[str, float],
        requests: frozenset[Request],
        final: bool,
    ) -> TrainingState:
        """The state a trigger sees at ``step`` (history as it was *before* this step)."""
        return TrainingState(
            step=step,
            now=now,
            metrics=dict(metrics),
            history=dict(self.history),
            last_save_step=None if self.last_save is None else self.last_save[0],
            last_save_time=None if self.last_save is None else self.last_save[1],
            run_start=self.start,
            save_costs=tuple(self.costs),
            marks=dict(self.marks),
            requests=requests,
            final=final,
        )

    def observe(self, step: int, metrics: Mapping[str, float]) -> None:
        """Fold this step's metrics into the history (after the decision was taken)."""
        for key, value in metrics.items():
            old = self.history.get(key)
            self.history[key] = (
                MetricStats.first(step, value) if old is None else old.updated(step, value)
            )

    def started_save(self, step: int, now: datetime, reasons: Iterable[str]) -> None:
        """Record a save of ``step`` begun at ``now`` for ``reasons``."""
        self.last_save = (step, now)
        counts = {k: v.count for k, v in self.history.items()}
        for reason in reasons:
            self.marks[reason] = SaveMark(step=step, time=now, counts=counts)

    def finished_save(self, cost: timedelta) -> None:
        """Record how long the save took (as the training loop felt it)."""
        self.costs.append(cost)

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint stores so that :meth:`restore_json` can continue the run."""
        return {
            "metric_history": {k: v.to_json() for k, v in self.history.items()},
            "marks": {
                reason: {"step": m.step, "time": m.time.timestamp(), "counts": dict(m.counts)}
                for reason, m in self.marks.items()
            },
            "save_costs": [c.total_seconds() for c in self.costs],
        }

    def restore_json(self, data: Mapping[str, Any], *, step: int, now: datetime) -> None:
        """Continue from a checkpoint of ``step``, restored at ``now``.

        The last save counts as taken at ``now``: time spent down between two jobs is not
        training time, so wall-clock triggers restart their count.
        """
        history = data.get("metric_history", {})
        self.history = {k: MetricStats.from_json(v) for k, v in history.items()}
        self.marks = {
            reason: SaveMark(
                step=int(m["step"]),
                time=datetime.fromtimestamp(float(m["time"]), UTC),
                counts={k: int(v) for k, v in m.get("counts", {}).items()},
            )
            for reason, m in data.get("marks", {}).items()
        }
        self.costs = deque(
            (timedelta(seconds=float(c)) for c in data.get("save_costs", [])), maxlen=COST_WINDOW
        )
        self.last_save = (step, now)
