"""The manager's memory of a run, from which it builds each step's ``TrainingState``.

It holds what triggers may look back on -- metric summaries, the last save, when each
reason last saved, recent save costs -- and travels inside every checkpoint (as JSON in the
manifest's ``extra``) so a resumed run decides exactly as an uninterrupted one would.

Metrics reported as tensors join the history unread (reading one waits for the GPU): a
metric's pending values are read, all in one transfer, when a trigger looks at that
metric's history, when a checkpoint stores the history, or when :data:`PENDING_LIMIT`
values have piled up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ckptwise.decide.metrics import Metrics, resolve_all
from ckptwise.policy.state import MetricStats, Request, SaveMark, TrainingState

__all__ = ["PENDING_LIMIT", "Progress"]

#: How many recent save costs triggers get to see.
COST_WINDOW = 8
#: A metric's unread tensor values are read (with one transfer) once this many pile up.
PENDING_LIMIT = 256

#: one reported value not yet folded into the history: ``[step, float or tensor]`` (a list,
#: so reading the tensor once serves every snapshot that shares the entry)
_Entry = list[Any]


def _fold(stats: MetricStats | None, entries: Iterable[_Entry]) -> MetricStats | None:
    """``stats`` with ``entries`` observed in order, reading their tensors in one go."""
    entries = list(entries)
    unread = [e for e in entries if not isinstance(e[1], float)]
    for entry, value in zip(unread, resolve_all(e[1] for e in unread), strict=True):
        entry[1] = value
    for step, value in entries:
        stats = MetricStats.first(step, value) if stats is None else stats.updated(step, value)
    return stats


class _History(Mapping[str, MetricStats]):
    """The history a trigger sees: fixed at the step it was taken, read lazily per metric."""

    def __init__(
        self, stats: dict[str, MetricStats], pending: dict[str, tuple[_Entry, ...]]
    ) -> None:
        self._stats = stats
        self._pending = pending
        self._names = tuple(dict.fromkeys([*stats, *pending]))

    def __getitem__(self, key: str) -> MetricStats:
        entries = self._pending.pop(key, ())
        if entries:
            folded = _fold(self._stats.get(key), entries)
            assert folded is not None
            self._stats[key] = folded
        return self._stats[key]

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Progress:
    """Mutable bookkeeping; every value it hands out is an immutable snapshot."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self._stats: dict[str, MetricStats] = {}
        self._pending: dict[str, list[_Entry]] = {}
        self.last_save: tuple[int, datetime] | None = None
        self.marks: dict[str, SaveMark] = {}
        self.costs: deque[timedelta] = deque(maxlen=COST_WINDOW)

    @property
    def history(self) -> dict[str, MetricStats]:
        """Every metric's summary, up to date (reads any pending tensors)."""
        for key in list(self._pending):
            self._fold(key)
        return dict(self._stats)

    def _fold(self, key: str) -> None:
        folded = _fold(self._stats.get(key), self._pending.pop(key, ()))
        if folded is not None:
            self._stats[key] = folded

    def counts(self) -> dict[str, int]:
        """How many values of each metric were reported (reads nothing)."""
        names = dict.fromkeys([*self._stats, *self._pending])
        return {
            k: (self._stats[k].count if k in self._stats else 0) + len(self._pending.get(k, ()))
            for k in names
        }

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
            metrics=metrics if isinstance(metrics, Metrics) else dict(metrics),
            history=_History(
                dict(self._stats), {k: tuple(v) for k, v in self._pending.items() if v}
            ),
            last_save_step=None if self.last_save is None else self.last_save[0],
            last_save_time=None if self.last_save is None else self.last_save[1],
            run_start=self.start,
            save_costs=tuple(self.costs),
            marks=dict(self.marks),
            requests=requests,
            final=final,
        )

    def observe(self, step: int, metrics: Mapping[str, float]) -> None:
        """Fold this step's metrics into the history (after the decision was taken); tensors
        nobody read yet join it unread."""
        for key in metrics:
            unread = metrics.unread(key) if isinstance(metrics, Metrics) else None
            pending = self._pending.get(key)
            if unread is None and not pending:
                old = self._stats.get(key)
                value = metrics[key]
                self._stats[key] = (
                    MetricStats.first(step, value) if old is None else old.updated(step, value)
                )
                continue
            entry: _Entry = [step, metrics[key] if unread is None else unread]
            self._pending.setdefault(key, []).append(entry)
            if len(self._pending[key]) >= PENDING_LIMIT:
                self._fold(key)

    def started_save(self, step: int, now: datetime, reasons: Iterable[str]) -> None:
        """Record a save of ``step`` begun at ``now`` for ``reasons``."""
        self.last_save = (step, now)
        counts = self.counts()
        for reason in reasons:
            self.marks[reason] = SaveMark(step=step, time=now, counts=counts)

    def finished_save(self, cost: timedelta) -> None:
        """Record how long the save took (as the training loop felt it)."""
        self.costs.append(cost)

    def add_cost(self, extra: timedelta) -> None:
        """Add to the last save's cost what training waited for it afterwards (an
        optimizer step waiting for the end of a background copy)."""
        if self.costs:
            self.costs[-1] += extra

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
        self._stats = {k: MetricStats.from_json(v) for k, v in history.items()}
        self._pending = {}
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
