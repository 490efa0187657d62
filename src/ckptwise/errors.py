"""The one exception hierarchy of ckptwise, and the rules every module keeps.

Every error ckptwise raises derives from :class:`CheckpointError`; each subclass also derives
from the built-in exception a caller would naturally catch, so ``except ValueError`` keeps
working around a bad argument. The class says who is at fault:

- the caller: :class:`ConfigError` (a bad argument, policy or config value) and
  :class:`SnapshotError` (a state holding something that cannot be saved without pickle,
  or a tensor dtype the format lacks);
- the stored bytes: :class:`CorruptCheckpointError` (an object or manifest that fails
  verification) and its :class:`FormatError` (a malformed or too new manifest);
- the storage: :class:`StorageError` (reading or writing failed), and
  :class:`CheckpointNotFoundError` (what was asked for is not there);
- another process: :class:`RunLockedError`.

Rules: messages name the parameter or file, the value and the fix; backend and library
errors are wrapped where they enter (``raise ... from exc``) so the cause stays visible; a
background save raises the same class a synchronous one would (the writer re-raises it with
the step named, see :func:`ckptwise.save.writer.save_failed`); nothing outside this hierarchy
(``KeyError``, ``json.JSONDecodeError``, ...) escapes a public call.
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
