"""The one exception hierarchy of ckptwise.

Every error ckptwise raises derives from :class:`CheckpointError`; each subclass also derives
from the built-in exception a caller would naturally catch, so ``except ValueError`` keeps
working around a bad argument. Backend errors are wrapped at the storage boundary with
``raise ... from exc`` so the original cause stays visible.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "FormatError",
    "RunLockedError",
    "SnapshotError",
    "StorageError",
]


class CheckpointError(Exception):
    """Root of every error raised by ckptwise."""


class ConfigError(CheckpointError, ValueError):
    """A policy, manager argument or configuration value is invalid.

    The message names the parameter, the value given and what is allowed.
    """


class SnapshotError(CheckpointError, TypeError):
    """A training state holds something ckptwise cannot save without pickling."""


class StorageError(CheckpointError, OSError):
    """Reading from or writing to the checkpoint store failed."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested checkpoint (or run) does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's manifest or one of its objects fails verification."""


class FormatError(CorruptCheckpointError):
    """A manifest is malformed or written by a newer, unknown format version."""


class RunLockedError(CheckpointError, RuntimeError):
    """Another live process holds the run's write lock."""
