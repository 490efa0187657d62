"""Persistence of snapshots: runs write jobs, at most one in flight, and never hides an error.

The manager hands the writer a job (a callable that commits one checkpoint and returns its
:class:`~ckptwise.records.CheckpointInfo`). :class:`SyncWriter` runs it on the caller's
thread; :class:`AsyncWriter` on a background thread (hashing, compression and file writes
release the GIL). A ckptwise error keeps its class on both paths (a full disk stays a
:class:`~ckptwise.errors.StorageError`); anything else becomes a
:class:`~ckptwise.errors.CheckpointError`, the cause always chained (:func:`save_failed`).
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Protocol

from ckptwise.errors import CheckpointError
from ckptwise.priority import lower_thread_priority
from ckptwise.records import CheckpointInfo

__all__ = ["AsyncWriter", "SyncWriter", "WriteJob", "Writer", "save_failed"]

log = logging.getLogger("ckptwise")


WriteJob = Callable[[], CheckpointInfo]


def save_failed(what: str, exc: Exception) -> CheckpointError:
    """The error to raise (``from exc``) for a save, named by ``what``, that failed.

    A ckptwise error keeps its class, so ``except StorageError`` works whether saves are
    async or not; anything else becomes a :class:`CheckpointError`.
    """
    kind = type(exc) if isinstance(exc, CheckpointError) else CheckpointError
    try:
        return kind(f"{what} failed: {exc}")
    except TypeError:  # a subclass with a constructor of its own: keep the root class
        return CheckpointError(f"{what} failed: {exc}")


class Writer(Protocol):
    """Runs write jobs one at a time."""

    @property
    def busy(self) -> bool:
        """Whether a job is still running."""
        ...

    def write(self, job: WriteJob, *, step: int) -> CheckpointInfo | None:
        """Run or schedule ``job``; returns its result when it already finished."""
        ...

    def poll(self) -> CheckpointInfo | None:
        """The result of a job that finished since the last call, raising its failure."""
        ...

    def wait(self) -> CheckpointInfo | None:
        """Block until no job is in flight; re-raise the failure of the last one."""
        ...

    def close(self) -> None:
        """Wait, then release any resources."""
        ...


class SyncWriter:
    """Writes on the calling thread: simple, and the state may change right after."""

    busy = False

    def __init__(self) -> None:
        self.last: CheckpointInfo | None = None

    def poll(self) -> CheckpointInfo | None:
        return None

    def write(self, job: WriteJob, *, step: int) -> CheckpointInfo:
        try:
            self.last = job()
        except CheckpointError:
            raise  # raised on the caller's thread: its own message and traceback say it all
        except Exception as exc:
            raise save_failed(f"saving step {step}", exc) from exc
        return self.last

    def wait(self) -> CheckpointInfo | None:
        return self.last

    def close(self) -> None:
        return None


class AsyncWriter:
    """Writes on one background thread; at most one job in flight.

    The job's tensors must already be private copies (the manager's snapshot copier makes
    them), so training may change its own tensors as soon as :meth:`write` returns. A
    failure is kept and raised (see :func:`save_failed`) by the next :meth:`poll`,
    :meth:`write`, :meth:`wait` or :meth:`close`. The worker thread is not a daemon: an
    interpreter that exits without ``close()`` still finishes the write in flight.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ckptwise-writer", initializer=lower_thread_priority
        )
        self._future: Future[CheckpointInfo] | None = None
        self._step: int | None = None
        self.last: CheckpointInfo | None = None
        # by the time atexit handlers run, the worker has been joined; report its failure
        atexit.register(_report_at_exit, weakref.ref(self))

    @property
    def busy(self) -> bool:
        """Whether a job is still running."""
        return self._future is not None and not self._future.done()

    def poll(self) -> CheckpointInfo | None:
        """The result of a job that finished since the last call (raising its failure)."""
        if self._future is None or not self._future.done():
            return None
        future, step = self._future, self._step
        self._future = self._step = None
        try:
            self.last = future.result()
        except Exception as exc:
            raise save_failed(f"the background save of step {step}", exc) from exc
        return self.last

    def write(self, job: WriteJob, *, step: int) -> None:
        self.wait()
        self._future = self._pool.submit(job)
        self._step = step

    def wait(self) -> CheckpointInfo | None:
        if self._future is not None:
            wait_futures([self._future])
            return self.poll()
        return None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _report_at_exit(ref: weakref.ReferenceType[AsyncWriter]) -> None:
    writer = ref()
    if writer is None:
        return
    try:
        writer.poll()
    except CheckpointError as exc:
        log.error("%s (the process exited without close())", exc)
