"""Retention: pure decisions of *which* committed checkpoints to keep, composed with ``|``.

A retention policy maps the list of committed checkpoints to the steps it wants kept, each
with a reason. :func:`plan_retention` adds what is always kept (the newest checkpoint, pinned
ones and the one the run resumed from) and returns what may be deleted; the manager only
deletes after a new checkpoint has committed.

>>> import ckptwise as cw
>>> keep = cw.keep_last(3) | cw.keep_best(1, "eval_loss")
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ckptwise.errors import ConfigError
from ckptwise.policy.base import (
    KeepAny,
    Kept,
    Mode,
    RetentionOps,
    RetentionPolicy,
    check_mode,
    merge_kept,
    positive_int,
)
from ckptwise.policy.state import RetentionContext
from ckptwise.records import CheckpointInfo

__all__ = [
    "KeepAll",
    "KeepAny",
    "KeepBest",
    "KeepBudget",
    "KeepEvery",
    "KeepLast",
    "KeepWithin",
    "RetentionContext",
    "RetentionPlan",
    "RetentionPolicy",
    "keep_all",
    "keep_best",
    "keep_budget",
    "keep_every",
    "keep_last",
    "keep_within",
    "plan_retention",
]


@dataclass(frozen=True)
class KeepLast(RetentionOps):
    """Keeps the ``n`` checkpoints with the highest steps."""

    n: int

    def __post_init__(self) -> None:
        positive_int("keep_last(n)", self.n, "use cw.keep_all() to keep every checkpoint")

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        steps = sorted((c.step for c in context.checkpoints), reverse=True)[: self.n]
        return dict.fromkeys(steps, (f"last {self.n}",))


def keep_last(n: int) -> KeepLast:
    """Keep the newest ``n`` checkpoints."""
    return KeepLast(n)


@dataclass(frozen=True)
class KeepBest(RetentionOps):
    """Keeps the ``n`` checkpoints with the best recorded value of ``metric``.

    Checkpoints that did not record the metric (or recorded NaN) are ignored; among equal
    values the earlier step wins, so a plateau does not churn the kept set.
    """

    n: int
    metric: str
    mode: Mode = "min"

    def __post_init__(self) -> None:
        positive_int("keep_best(n)", self.n, "e.g. cw.keep_best(1, 'eval_loss')")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(
                f"keep_best needs a metric name such as 'eval_loss', got {self.metric!r}"
            )
        check_mode(self.mode)

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        scored = [
            (c.metrics[self.metric], c.step)
            for c in context.checkpoints
            if self.metric in c.metrics and not math.isnan(c.metrics[self.metric])
        ]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda vs: (sign * vs[0], vs[1]))
        return {step: (f"best {self.n} {self.metric}",) for _, step in scored[: self.n]}


def keep_best(n: int, metric: str, mode: Mode = "min") -> KeepBest:
    """Keep the ``n`` checkpoints with the best ``metric`` (``mode="min"`` for losses)."""
    return KeepBest(n, metric, mode)


@dataclass(frozen=True)
class KeepEvery(RetentionOps):
    """Keeps one checkpoint per ``interval`` steps: the first at or after each multiple.

    With saves every 3000 steps, ``keep_every(10_000)`` keeps 12000, 21000, 30000, ...; a
    kept checkpoint stays kept, because later saves never come earlier in its window.
    """

    interval: int

    def __post_init__(self) -> None:
        positive_int("keep_every(interval)", self.interval, "e.g. cw.keep_every(10_000)")

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        first_in_window: dict[int, int] = {}
        for c in context.checkpoints:
            window = c.step // self.interval
            if window >= 1 and c.step < first_in_window.get(window, c.step + 1):
                first_in_window[window] = c.step
        return dict.fromkeys(first_in_window.values(), (f"every {self.interval}",))


def keep_every(interval: int) -> KeepEvery:
    """Keep a long-term checkpoint every ``interval`` steps."""
    return KeepEvery(interval)


@dataclass(frozen=True)
class KeepWithin(RetentionOps):
    """Keeps every checkpoint saved less than ``age`` before the context's ``now``."""

    age: timedelta

    def __post_init__(self) -> None:
        if not isinstance(self.age, timedelta) or self.age <= timedelta(0):
            raise ConfigError(
                f"keep_within(age) must be a positive datetime.timedelta, got {self.age!r}"
            )

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        return {
            c.step: (f"within {self.age}",)
            for c in context.checkpoints
            if context.now - c.time < self.age
        }


def keep_within(age: timedelta) -> KeepWithin:
    """Keep everything newer than ``age`` (e.g. ``keep_within(timedelta(hours=6))``)."""
    return KeepWithin(age)


@dataclass(frozen=True)
class KeepBudget(RetentionOps):
    """Keeps the newest checkpoints whose objects together fit in ``max_bytes``.

    Bytes are physical: an object shared by several kept checkpoints counts once, so a
    frozen backbone is paid for once. Walking from the newest, a checkpoint that would
    overflow the budget stops the walk (older ones are not kept to fill the gap). What the
    manager always keeps (the newest, pinned, resumed-from) stays even past the budget.
    """

    max_bytes: int

    def __post_init__(self) -> None:
        positive_int("keep_budget(max_bytes)", self.max_bytes, "e.g. keep_budget(200 * 2**30)")

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        counted: set[str] = set()
        total = 0
        kept: Kept = {}
        for c in sorted(context.checkpoints, key=lambda c: c.step, reverse=True):
            extra = c.objects - counted
            cost = sum(context.object_bytes.get(o, 0) for o in extra)
            if total + cost > self.max_bytes:
                break
            total += cost
            counted |= extra
            kept[c.step] = (f"budget {self.max_bytes}",)
        return kept


def keep_budget(max_bytes: int) -> KeepBudget:
    """Keep the newest checkpoints that fit a byte budget (counted after dedup)."""
    return KeepBudget(max_bytes)


@dataclass(frozen=True)
class KeepAll(RetentionOps):
    """Keeps every checkpoint."""

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        return {c.step: ("all",) for c in context.checkpoints}


def keep_all() -> KeepAll:
    """Keep every checkpoint (the default)."""
    return KeepAll()


@dataclass(frozen=True, kw_only=True)
class RetentionPlan:
    """The outcome of applying a policy: reasons for every kept step, and steps to delete."""

    keep: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    delete: tuple[int, ...] = ()


def plan_retention(
    policy: RetentionPolicy,
    checkpoints: Sequence[CheckpointInfo],
    *,
    now: datetime,
    pinned: Iterable[int] = (),
    resumed_from: int | None = None,
    object_bytes: Mapping[str, int] | None = None,
) -> RetentionPlan:
    """Apply ``policy`` and the rules that always hold.

    Always kept, whatever the policy says: the newest checkpoint (by step), every pinned
    step and ``resumed_from``. Steps a policy names that are not committed are ignored.
    """
    committed = {c.step for c in checkpoints}
    kept: Kept = {}
    merge_kept(
        kept,
        {
            s: r
            for s, r in policy.select(
                RetentionContext(checkpoints=checkpoints, now=now, object_bytes=object_bytes or {})
            ).items()
            if s in committed
        },
    )
    if committed:
        merge_kept(kept, {max(committed): ("newest",)})
    merge_kept(kept, {s: ("pinned",) for s in pinned if s in committed})
    if resumed_from is not None and resumed_from in committed:
        merge_kept(kept, {resumed_from: ("resumed from",)})
    delete = tuple(sorted(committed - kept.keys()))
    return RetentionPlan(keep=dict(sorted(kept.items())), delete=delete)
