"""Pure policies: triggers decide when to save, retention decides what to keep."""

from ckptwise.policy.retention import (
    RetentionContext,
    RetentionPlan,
    RetentionPolicy,
    keep_all,
    keep_best,
    keep_every,
    keep_last,
    plan_retention,
)
from ckptwise.policy.state import Decision, MetricStats, TrainingState
from ckptwise.policy.triggers import (
    Trigger,
    at_steps,
    every,
    never,
    on_final,
    on_improvement,
)

__all__ = [
    "Decision",
    "MetricStats",
    "RetentionContext",
    "RetentionPlan",
    "RetentionPolicy",
    "TrainingState",
    "Trigger",
    "at_steps",
    "every",
    "keep_all",
    "keep_best",
    "keep_every",
    "keep_last",
    "never",
    "on_final",
    "on_improvement",
    "plan_retention",
]
