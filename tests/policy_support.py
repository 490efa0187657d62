"""What the policy and config tests share: a fixed clock, builders for the values policies
read, and ``|`` / ``&`` over lists of policies."""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from ckptwise.policy import MetricStats, Request, RetentionPolicy, SaveMark, TrainingState, Trigger

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def state(
    step: int,
    metrics: Mapping[str, float] | None = None,
    history: Mapping[str, MetricStats] | None = None,
    *,
    final: bool = False,
    marks: Mapping[str, SaveMark] | None = None,
    requests: Iterable[Request] = (),
) -> TrainingState:
    """The state at ``step``, at :data:`NOW`, with nothing else known unless given."""
    return TrainingState(
        step=step,
        now=NOW,
        metrics=dict(metrics or {}),
        history=dict(history or {}),
        marks=dict(marks or {}),
        requests=frozenset(requests),
        final=final,
    )


def stats(*observations: tuple[int, float]) -> MetricStats:
    """History of one metric from ``(step, value)`` pairs, built the way the manager does."""
    first_step, first_value = observations[0]
    result = MetricStats.first(first_step, first_value)
    for step, value in observations[1:]:
        result = result.updated(step, value)
    return result


def reported(*values: float) -> MetricStats:
    """History of one metric reported at steps 1, 2, ... (``count == len(values)``)."""
    return stats(*enumerate(values, start=1))


def any_of(*triggers: Trigger) -> Trigger:
    """``a | b | ...`` (the Protocol ``Trigger`` does not declare the operators)."""
    result: Trigger = functools.reduce(operator.or_, triggers)
    return result


def all_of(*triggers: Trigger) -> Trigger:
    """``a & b & ...``."""
    result: Trigger = functools.reduce(operator.and_, triggers)
    return result


def keep_any(*policies: RetentionPolicy) -> RetentionPolicy:
    """``a | b | ...`` for retention policies."""
    result: RetentionPolicy = functools.reduce(operator.or_, policies)
    return result
