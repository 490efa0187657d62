"""The run's write lock: one writing process per run folder.

Locally the lock is an ``fcntl.flock`` on ``RUN/ckptwise.lock``, which the kernel drops when
the holder dies, so a stale lock from a killed process is taken over without any guessing.
The file also records the holder's pid and host so the error can name them. On fsspec
stores, where no such primitive exists, the lock is the same JSON record; it counts as stale
when it names this host and a pid that is no longer alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import IO, Any

from ckptwise.errors import CheckpointNotFoundError, RunLockedError, StorageError
from ckptwise.store.backend import Backend, LocalBackend

__all__ = ["LOCK_FILE", "RunLock"]

LOCK_FILE = "ckptwise.lock"


def _holder_text(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive write access to one run; :meth:`acquire` raises :class:`RunLockedError`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._file: IO[str] | None = None
        self._held = False

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}

    def acquire(self) -> None:
        if self._held:
            return
        if isinstance(self.backend, LocalBackend):
            self._acquire_local(self.backend)
        else:
            self._acquire_remote()
        self._held = True

    def _acquire_local(self, backend: LocalBackend) -> None:
        import fcntl

        os.makedirs(backend.root, exist_ok=True)
        path = os.path.join(backend.root, LOCK_FILE)
        f = open(path, "a+")  # noqa: SIM115 - held open for the manager's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            f.close()
            raise RunLockedError(
                f"run {backend.root} is locked by {_holder_text(holder)}: another "
                "CheckpointManager is writing to it. Stop that process or close() its manager, "
                "or use another run folder; open CheckpointManager(root) without policies to "
                "only read"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self._info()))
        f.flush()
        self._file = f

    def _acquire_remote(self) -> None:
        with contextlib.suppress(CheckpointNotFoundError):
            holder = json.loads(self.backend.read_bytes(LOCK_FILE) or b"{}")
            same_host = holder.get("host") == socket.gethostname()
            pid = holder.get("pid")
            stale = same_host and isinstance(pid, int) and not _pid_alive(pid)
            if holder and not stale:
                raise RunLockedError(
                    f"run {self.backend.url} is locked by {_holder_text(holder)} (since "
                    f"{time.ctime(holder.get('since', 0))}). Stop that process, or if it is "
                    f"gone, delete {self.backend.url}/{LOCK_FILE}"
                )
        self.backend.write_atomic(LOCK_FILE, [json.dumps(self._info()).encode()])

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            import fcntl

            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
                self._file.flush()
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        else:
            with contextlib.suppress(StorageError):
                self.backend.delete(LOCK_FILE)
