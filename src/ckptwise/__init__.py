"""ckptwise: decide when a PyTorch run saves, what it keeps, and how it stores it.

>>> import ckptwise as cw
>>> save = cw.every(1000, start=200) | cw.on_improvement("eval_loss", mode="min")
>>> keep = cw.keep_last(3) | cw.keep_best(1, "eval_loss")

Two objects stand on top: :class:`CheckpointManager` writes (decide, snapshot, write,
prune) and :class:`Run` (from :func:`open_run`) reads (list, resolve best/latest, load,
restore with fallback, verify, export).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from ckptwise.manager import CheckpointManager
    from ckptwise.policy import (
        ContentPolicy,
        Decision,
        MetricStats,
        Request,
        RetentionContext,
        RetentionPlan,
        RetentionPolicy,
        SaveMark,
        TrainingState,
        Trigger,
        Variant,
        after,
        at_steps,
        daly_interval,
        every,
        every_duration,
        full,
        full_every,
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
        trainable_only,
        weights_only,
    )
    from ckptwise.records import CheckpointInfo
    from ckptwise.run import RestoreWarning, Run, open_run

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigError",
    "ContentPolicy",
    "CorruptCheckpointError",
    "Decision",
    "FormatError",
    "MetricStats",
    "Policy",
    "Request",
    "RestoreWarning",
    "ResumableSampler",
    "RetentionContext",
    "RetentionPlan",
    "RetentionPolicy",
    "Run",
    "RunLockedError",
    "SaveMark",
    "SnapshotError",
    "StorageError",
    "TrainingState",
    "Trigger",
    "Variant",
    "__version__",
    "after",
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
    "open_run",
    "optimal_interval",
    "overhead_budget",
    "parse_keep",
    "parse_save",
    "plan_retention",
    "policy_from_config",
    "schedule",
    "to_config",
    "trainable_only",
    "weights_only",
]


#: where each public name lives: ``import ckptwise`` imports none of them (torch takes
#: seconds to import, and ``ckptwise --help`` or ``ckptwise ls`` need none of it)
_WHERE = {
    "CheckpointError": "ckptwise.errors",
    "CheckpointInfo": "ckptwise.records",
    "CheckpointManager": "ckptwise.manager",
    "CheckpointNotFoundError": "ckptwise.errors",
    "ConfigError": "ckptwise.errors",
    "ContentPolicy": "ckptwise.policy",
    "CorruptCheckpointError": "ckptwise.errors",
    "Decision": "ckptwise.policy",
    "FormatError": "ckptwise.errors",
    "MetricStats": "ckptwise.policy",
    "Policy": "ckptwise.config",
    "Request": "ckptwise.policy",
    "RestoreWarning": "ckptwise.run",
    "ResumableSampler": "ckptwise.data",
    "RetentionContext": "ckptwise.policy",
    "RetentionPlan": "ckptwise.policy",
    "RetentionPolicy": "ckptwise.policy",
    "Run": "ckptwise.run",
    "RunLockedError": "ckptwise.errors",
    "SaveMark": "ckptwise.policy",
    "SnapshotError": "ckptwise.errors",
    "StorageError": "ckptwise.errors",
    "TrainingState": "ckptwise.policy",
    "Trigger": "ckptwise.policy",
    "Variant": "ckptwise.policy",
    "after": "ckptwise.policy",
    "at_steps": "ckptwise.policy",
    "daly_interval": "ckptwise.policy",
    "every": "ckptwise.policy",
    "every_duration": "ckptwise.policy",
    "full": "ckptwise.policy",
    "full_every": "ckptwise.policy",
    "geometric": "ckptwise.policy",
    "keep_all": "ckptwise.policy",
    "keep_best": "ckptwise.policy",
    "keep_budget": "ckptwise.policy",
    "keep_every": "ckptwise.policy",
    "keep_last": "ckptwise.policy",
    "keep_within": "ckptwise.policy",
    "never": "ckptwise.policy",
    "on_file": "ckptwise.policy",
    "on_final": "ckptwise.policy",
    "on_improvement": "ckptwise.policy",
    "on_signal": "ckptwise.policy",
    "open_run": "ckptwise.run",
    "optimal_interval": "ckptwise.policy",
    "overhead_budget": "ckptwise.policy",
    "parse_keep": "ckptwise.config",
    "parse_save": "ckptwise.config",
    "plan_retention": "ckptwise.policy",
    "policy_from_config": "ckptwise.config",
    "schedule": "ckptwise.policy",
    "to_config": "ckptwise.config",
    "trainable_only": "ckptwise.policy",
    "weights_only": "ckptwise.policy",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptwise' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
