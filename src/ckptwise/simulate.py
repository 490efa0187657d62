"""Replay a run without training: which steps a policy saves, what it keeps, what it costs.

:func:`simulate` drives the real policy objects and retention planner with a simulated
clock (each step takes ``step_time``, each save ``save_cost``), so what it reports is what
the manager would do, before anyone spends GPU hours. ``ckptwise simulate`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ckptwise.decide.progress import Progress
from ckptwise.errors import ConfigError
from ckptwise.policy import RetentionPolicy, Trigger, keep_all, plan_retention
from ckptwise.records import CheckpointInfo

__all__ = ["SimulationResult", "simulate"]

Varying = Callable[[int], Any]


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """What a simulated run did. Times are wall-clock seconds of the simulated run."""

    steps: int
    saves: list[tuple[int, tuple[str, ...]]]
    deletions: list[tuple[int, int]]  # (step at which it was deleted, deleted step)
    kept: dict[int, tuple[str, ...]]
    bytes_written: int
    peak_bytes: int
    save_seconds: float
    wall_seconds: float
    expected_loss_seconds: float
    #: mean step time (``wall_seconds`` also counts the saves)
    step_seconds: float
    #: expected training steps lost by one failure at a uniformly random moment: those done
    #: since the step of the newest committed checkpoint (never more than ``steps``)
    expected_loss_steps: float = 0.0
    #: (step, bytes on disk) after each commit and again after each prune
    timeline: list[tuple[int, int]] = field(default_factory=list)
    save_windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end)

    @property
    def overhead(self) -> float:
        """Fraction of wall time spent saving."""
        return self.save_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def overhead_between(self, start: float, end: float) -> float:
        """Fraction of the wall-time window ``[start, end)`` spent saving."""
        busy = sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.save_windows)
        return busy / (end - start) if end > start else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "saves": [{"step": s, "reasons": list(r)} for s, r in self.saves],
            "deletions": [{"at_step": a, "step": s} for a, s in self.deletions],
            "kept": {str(s): list(r) for s, r in self.kept.items()},
            "bytes_written": self.bytes_written,
            "peak_bytes_on_disk": self.peak_bytes,
            "save_seconds": self.save_seconds,
            "wall_seconds": self.wall_seconds,
            "overhead": self.overhead,
            "expected_loss_per_failure_seconds": self.expected_loss_seconds,
            "expected_loss_per_failure_steps": self.expected_loss_steps,
        }


def _varying(value: Any) -> Varying:
    return value if callable(value) else (lambda step: value)


def simulate(
    save: Trigger,
    keep: RetentionPolicy | None = None,
    *,
    steps: int,
    step_time: timedelta | Callable[[int], timedelta] = timedelta(seconds=1),
    save_cost: timedelta | Callable[[int], timedelta] = timedelta(seconds=30),
    checkpoint_bytes: int | Callable[[int], int] = 0,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
) -> SimulationResult:
    """Run ``save`` and ``keep`` over ``steps`` simulated steps.

    ``step_time``, ``save_cost`` and ``checkpoint_bytes`` may be functions of the step
    (e.g. saves that get slower halfway). ``metrics`` maps steps to the values reported
    there. The last step is passed as final. Each checkpoint is counted as
    ``checkpoint_bytes`` written, and as on disk until retention deletes it.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    keep = keep if keep is not None else keep_all()
    step_time_of, cost_of, bytes_of = (
        _varying(step_time),
        _varying(save_cost),
        _varying(checkpoint_bytes),
    )
    metrics = metrics or {}
    progress = Progress(start)
    elapsed = 0.0
    infos: dict[int, CheckpointInfo] = {}
    sizes: dict[str, int] = {}
    saves: list[tuple[int, tuple[str, ...]]] = []
    deletions: list[tuple[int, int]] = []
    timeline: list[tuple[int, int]] = [(0, 0)]
    windows: list[tuple[float, float]] = []
    commits: list[tuple[float, float]] = []  # (commit time, time of the state it holds)
    committed: list[tuple[float, int]] = []  # (commit time, step it holds)
    done_area = 0.0  # integral over time of the steps done (a step counts as it progresses)
    written = peak = on_disk = 0
    kept: dict[int, tuple[str, ...]] = {}
    total_step_seconds = 0.0
    for step in range(1, steps + 1):
        seconds = step_time_of(step).total_seconds()
        elapsed += seconds
        total_step_seconds += seconds
        done_area += seconds * (step - 0.5)
        now = start + timedelta(seconds=elapsed)
        values = dict(metrics.get(step, {}))
        state = progress.state(step, now, metrics=values, requests=frozenset(), final=step == steps)
        decision = save.decide(state)
        progress.observe(step, values)
        if not decision.save:
            continue
        cost = cost_of(step).total_seconds()
        size = int(bytes_of(step))
        progress.started_save(step, now, decision.reasons)
        windows.append((elapsed, elapsed + cost))
        commits.append((elapsed + cost, elapsed))
        committed.append((elapsed + cost, step))
        done_area += cost * step
        elapsed += cost
        progress.finished_save(timedelta(seconds=cost))
        oid = f"step-{step}"
        sizes[oid] = size
        infos[step] = CheckpointInfo(
            step=step,
            time=now,
            metrics=values,
            reasons=decision.reasons,
            logical_bytes=size,
            new_bytes=size,
            objects=frozenset({oid}),
        )
        saves.append((step, decision.reasons))
        written += size
        on_disk += size
        peak = max(peak, on_disk)
        timeline.append((step, on_disk))  # the new checkpoint committed, nothing pruned yet
        plan = plan_retention(
            keep,
            list(infos.values()),
            now=start + timedelta(seconds=elapsed),
            object_bytes=sizes,
        )
        for gone in plan.delete:
            on_disk -= sizes.pop(f"step-{gone}")
            del infos[gone]
            deletions.append((step, gone))
        kept = dict(plan.keep)
        timeline.append((step, on_disk))
    return SimulationResult(
        steps=steps,
        saves=saves,
        deletions=deletions,
        kept=kept,
        bytes_written=written,
        peak_bytes=peak,
        save_seconds=sum(e - s for s, e in windows),
        wall_seconds=elapsed,
        expected_loss_seconds=_expected_loss(commits, elapsed),
        step_seconds=total_step_seconds / steps,
        expected_loss_steps=_expected_lost_steps(done_area, committed, elapsed),
        timeline=timeline,
        save_windows=windows,
    )


def _expected_loss(commits: list[tuple[float, float]], total: float) -> float:
    """Mean over a uniformly random failure time of the time since the newest committed
    checkpoint's state (all time so far, before the first commit)."""
    if total <= 0:
        return 0.0
    area = 0.0
    ref, since = 0.0, 0.0
    for commit, state_time in commits:
        area += ((commit - ref) ** 2 - (since - ref) ** 2) / 2
        ref, since = state_time, commit
    area += ((total - ref) ** 2 - (since - ref) ** 2) / 2
    return area / total


def _expected_lost_steps(
    done_area: float, committed: list[tuple[float, int]], total: float
) -> float:
    """Mean over a uniformly random failure time of the steps done since the step of the
    newest committed checkpoint (0 before the first commit). Saves take time but no steps,
    so this is not the lost time over the step time.

    ``done_area`` is the integral over the run of the steps done so far; the newest
    committed step is a step function of time, changing at each commit.
    """
    if total <= 0:
        return 0.0
    kept_area = 0.0
    for (at, step), (until, _) in zip(committed, [*committed[1:], (total, 0)], strict=False):
        kept_area += step * (until - at)
    return (done_area - kept_area) / total
