"""ckptwise: decide when a PyTorch run saves, what it keeps, and how it stores it.

>>> import ckptwise as cw
>>> save = cw.every(1000, start=200) | cw.on_improvement("eval_loss", mode="min")
>>> keep = cw.keep_last(3) | cw.keep_best(1, "eval_loss")
"""

from ckptwise.config import Policy, parse_keep, parse_save, policy_from_config, to_config
from ckptwise.data import ResumableSampler
from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatError,
    RunLockedError,
    SnapshotError,
    StorageError,
)
from ckptwise.manager import CheckpointManager, RestoreWarning
from ckptwise.policy import (
    Decision,
    MetricStats,
    RetentionContext,
    RetentionPlan,
    RetentionPolicy,
    SaveMark,
    TrainingState,
    Trigger,
    at_steps,
    daly_interval,
    every,
    every_duration,
    geometric,
    keep_all,
    keep_best,
    keep_budget,
    keep_every,
    keep_last,
    keep_within,
    never,
    on_file,
    on_final,
    on_improvement,
    on_signal,
    optimal_interval,
    overhead_budget,
    plan_retention,
    schedule,
)
from ckptwise.records import CheckpointInfo

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "Decision",
    "FormatError",
    "MetricStats",
    "Policy",
    "RestoreWarning",
    "ResumableSampler",
    "RetentionContext",
    "RetentionPlan",
    "RetentionPolicy",
    "RunLockedError",
    "SaveMark",
    "SnapshotError",
    "StorageError",
    "TrainingState",
    "Trigger",
    "__version__",
    "at_steps",
    "daly_interval",
    "every",
    "every_duration",
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
    "parse_keep",
    "parse_save",
    "plan_retention",
    "policy_from_config",
    "schedule",
    "to_config",
]
