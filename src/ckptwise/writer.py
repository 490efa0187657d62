"""Persistence of snapshots: runs write jobs, at most one in flight, and never hides an error.

The manager hands the writer a job (a callable that commits one checkpoint and returns its
:class:`~ckptwise.records.CheckpointInfo`). :class:`SyncWriter` runs it on the caller's
thread. A job's failure is raised as a :class:`~ckptwise.errors.CheckpointError` with the
original cause chained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ckptwise.errors import CheckpointError
from ckptwise.records import CheckpointInfo

__all__ = ["SyncWriter", "WriteJob", "Writer"]

WriteJob = Callable[[], CheckpointInfo]


class Writer(Protocol):
    """Runs write jobs one at a time."""

    def write(self, job: WriteJob, *, step: int) -> CheckpointInfo | None:
        """Run or schedule ``job``; returns its result when it already finished."""
        ...

    def wait(self) -> CheckpointInfo | None:
        """Block until no job is in flight; re-raise the failure of the last one."""
        ...

    def close(self) -> None:
        """Wait, then release any resources."""
        ...


class SyncWriter:
    """Writes on the calling thread: simple, and the state may change right after."""

    def __init__(self) -> None:
        self.last: CheckpointInfo | None = None

    def write(self, job: WriteJob, *, step: int) -> CheckpointInfo:
        try:
            self.last = job()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"saving step {step} failed: {exc}") from exc
        return self.last

    def wait(self) -> CheckpointInfo | None:
        return self.last

    def close(self) -> None:
        return None
