"""ckptwise: decide when a PyTorch run saves, what it keeps, and how it stores it.

>>> import ckptwise as cw
>>> save = cw.every(1000, start=200) | cw.on_improvement("eval_loss", mode="min")
>>> keep = cw.keep_last(3) | cw.keep_best(1, "eval_loss")

Two objects stand on top: :class:`CheckpointManager` writes (decide, snapshot, write,
prune) and :class:`Run` (from :func:`open_run`) reads (list, resolve best/latest, load,
restore with fallback, verify, export).

This namespace is for training scripts: the two objects, the policy factories and the
protocols their values satisfy (:class:`Trigger`, :class:`RetentionPolicy`,
:class:`ContentPolicy`, for type hints), the errors, the sampler and the configuration
entry points. What a policy of your own reads and returns (``TrainingState``,
``RetentionContext``, ``RetentionPlan``, ``Decision``, ``Variant``, ...) lives in
:mod:`ckptwise.policy`, with the concrete classes the factories return.
"""

from typing import TYPE_CHECKING, Any

# Each public name is listed twice: in _EXPORTS for the lazy import, and here for type
# checkers (``name as name`` re-exports it). tests/test_public_api.py checks they agree.
if TYPE_CHECKING:
    from ckptwise.config import Policy as Policy
    from ckptwise.config import parse_keep as parse_keep
    from ckptwise.config import parse_save as parse_save
    from ckptwise.config import policy_from_config as policy_from_config
    from ckptwise.config import to_config as to_config
    from ckptwise.data import ResumableSampler as ResumableSampler
    from ckptwise.errors import CheckpointError as CheckpointError
    from ckptwise.errors import CheckpointNotFoundError as CheckpointNotFoundError
    from ckptwise.errors import ConfigError as ConfigError
    from ckptwise.errors import CorruptCheckpointError as CorruptCheckpointError
    from ckptwise.errors import FormatError as FormatError
    from ckptwise.errors import RunLockedError as RunLockedError
    from ckptwise.errors import SnapshotError as SnapshotError
    from ckptwise.errors import StorageError as StorageError
    from ckptwise.manager import CheckpointManager as CheckpointManager
    from ckptwise.policy import ContentPolicy as ContentPolicy
    from ckptwise.policy import RetentionPolicy as RetentionPolicy
    from ckptwise.policy import Trigger as Trigger
    from ckptwise.policy import after as after
    from ckptwise.policy import at_steps as at_steps
    from ckptwise.policy import every as every
    from ckptwise.policy import every_duration as every_duration
    from ckptwise.policy import full as full
    from ckptwise.policy import full_every as full_every
    from ckptwise.policy import geometric as geometric
    from ckptwise.policy import keep_all as keep_all
    from ckptwise.policy import keep_best as keep_best
    from ckptwise.policy import keep_budget as keep_budget
    from ckptwise.policy import keep_every as keep_every
    from ckptwise.policy import keep_last as keep_last
    from ckptwise.policy import keep_within as keep_within
    from ckptwise.policy import never as never
    from ckptwise.policy import on_file as on_file
    from ckptwise.policy import on_final as on_final
    from ckptwise.policy import on_improvement as on_improvement
    from ckptwise.policy import on_signal as on_signal
    from ckptwise.policy import optimal_interval as optimal_interval
    from ckptwise.policy import overhead_budget as overhead_budget
    from ckptwise.policy import schedule as schedule
    from ckptwise.policy import trainable_only as trainable_only
    from ckptwise.policy import weights_only as weights_only
    from ckptwise.read.run import RestoreWarning as RestoreWarning
    from ckptwise.read.run import Run as Run
    from ckptwise.read.run import open_run as open_run
    from ckptwise.records import CheckpointInfo as CheckpointInfo

__version__ = "0.1.0"

#: the modules that define the public names: ``import ckptwise`` imports none of them (torch
#: takes seconds to import, and ``ckptwise --help`` or ``ckptwise ls`` need none of it)
_EXPORTS = {
    "ckptwise.manager": ("CheckpointManager",),
    "ckptwise.read.run": ("RestoreWarning", "Run", "open_run"),
    "ckptwise.records": ("CheckpointInfo",),
    "ckptwise.policy": (
        # what the factories' values are, for type hints
        "ContentPolicy",
        "RetentionPolicy",
        "Trigger",
        # when to save
        "after",
        "at_steps",
        "every",
        "every_duration",
        "geometric",
        "never",
        "on_file",
        "on_final",
        "on_improvement",
        "on_signal",
        "optimal_interval",
        "overhead_budget",
        "schedule",
        # what to keep
        "keep_all",
        "keep_best",
        "keep_budget",
        "keep_every",
        "keep_last",
        "keep_within",
        # what a checkpoint holds
        "full",
        "full_every",
        "trainable_only",
        "weights_only",
    ),
    "ckptwise.errors": (
        "CheckpointError",
        "CheckpointNotFoundError",
        "ConfigError",
        "CorruptCheckpointError",
        "FormatError",
        "RunLockedError",
        "SnapshotError",
        "StorageError",
    ),
    "ckptwise.data": ("ResumableSampler",),
    "ckptwise.config": ("Policy", "parse_keep", "parse_save", "policy_from_config", "to_config"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*sorted(_WHERE), "__version__"]


# Hidden from type checkers: they see the imports above, so ``cw.no_such_name`` is an error
# for them instead of ``Any``.
if not TYPE_CHECKING:

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
