"""Pure policies: triggers decide when to save, retention decides what to keep.

:mod:`~ckptwise.policy.base` holds the protocols, the ``|``/``&`` combinators and the checks
every policy module shares; :mod:`~ckptwise.policy.state` the values policies read and return.
"""

from ckptwise.policy.base import (
    After,
    AllOf,
    AnyOf,
    KeepAny,
    RetentionPolicy,
    Trigger,
    after,
    check_retention,
    check_trigger,
    walk,
)
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
    KeepBest,
    RetentionPlan,
    keep_all,
    keep_best,
    keep_budget,
    keep_every,
    keep_last,
    keep_within,
    plan_retention,
)
from ckptwise.policy.state import (
    Decision,
    MetricStats,
    Request,
    RetentionContext,
    SaveMark,
    TrainingState,
)
from ckptwise.policy.timing import daly_interval, every_duration, optimal_interval, overhead_budget
from ckptwise.policy.triggers import (
    OnImprovement,
    at_steps,
    every,
    geometric,
    never,
    on_final,
    on_improvement,
    schedule,
    step_only,
)

__all__ = [
    "After",
    "AllOf",
    "AnyOf",
    "ContentPolicy",
    "Decision",
    "KeepAny",
    "KeepBest",
    "MetricStats",
    "OnImprovement",
    "Request",
    "RetentionContext",
    "RetentionPlan",
    "RetentionPolicy",
    "SaveMark",
    "TrainingState",
    "Trigger",
    "Variant",
    "after",
    "at_steps",
    "check_retention",
    "check_trigger",
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
    "step_only",
    "trainable_only",
    "walk",
    "weights_only",
]
