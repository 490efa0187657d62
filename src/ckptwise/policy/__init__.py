"""Pure policies: triggers decide when to save, retention decides what to keep."""

from ckptwise.policy.content import (
    ContentPolicy,
    Variant,
    full,
    full_every,
    trainable_only,
    weights_only,
)
from ckptwise.policy.requests import on_file, on_signal
from ckptwise.policy.retention import (
    RetentionContext,
    RetentionPlan,
    RetentionPolicy,
    keep_all,
    keep_best,
    keep_budget,
    keep_every,
    keep_last,
    keep_within,
    plan_retention,
)
from ckptwise.policy.state import Decision, MetricStats, SaveMark, TrainingState
from ckptwise.policy.timing import daly_interval, every_duration, optimal_interval, overhead_budget
from ckptwise.policy.triggers import (
    Trigger,
    at_steps,
    every,
    geometric,
    never,
    on_final,
    on_improvement,
    schedule,
    walk,
)

__all__ = [
    "ContentPolicy",
    "Decision",
    "MetricStats",
    "RetentionContext",
    "RetentionPlan",
    "RetentionPolicy",
    "SaveMark",
    "TrainingState",
    "Trigger",
    "Variant",
    "at_steps",
    "daly_interval",
    "every",
    "every_duration",
    "full",
    "full_every",
    "geometric",
    "keep_all",
    "keep_best",
    "keep_budget",
    "keep_every",
    "keep_last",
    "keep_within",
    "never",
    "on_file",
    "on_final",
    "on_improvement",
    "on_signal",
    "optimal_interval",
    "overhead_budget",
    "plan_retention",
    "schedule",
    "trainable_only",
    "walk",
    "weights_only",
]
