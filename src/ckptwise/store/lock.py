"""The run's write lock: one writing process per run, and a check that it is still ours.

On a local folder (and fsspec's ``local://``) the lock is an ``fcntl.flock`` on
``RUN/ckptwise.lock``, which the kernel drops when the holder dies, so a killed writer's
lock is taken over without guessing. The file, opened without following links, records
the holder's pid and host so the error can name them.

On an object store the lock is the record itself, created only if absent: S3's
conditional put (``If-None-Match: *``, through s3fs), or the in-memory filesystem's
exclusive create. Of writers starting together exactly one creates it. A filesystem
without such a primitive cannot be locked, so writing to it is refused. A record naming
this host and a pid that is no longer alive is stale and taken over.

If the lock file is deleted under a live writer, a second writer can take the run.
:meth:`RunLock.check` (called before every commit and deletion) notices: locally the path
no longer leads to the locked file, remotely the record no longer carries this writer's
token. The first writer then raises :class:`RunLockedError` instead of writing.

A run written through a local cache (:class:`~ckptwise.store.tiered.TieredBackend`) is
locked on its remote store, as if it were written directly, so two machines never both
write one remote run. Taking the lock starts the cache's uploads (nothing is uploaded
without the lock) with this lock's remote check as their fence: the uploader checks before
each manifest upload and each remote deletion, so a writer whose lock was taken over
publishes nothing remotely; :meth:`RunLock.check` then reports what the uploader found,
without a network call on the save's path. Releasing the lock first finishes (for up to the
backend's ``exit_timeout``) and stops the uploads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import threading
import time
import uuid
from typing import Any

from ckptwise.errors import RunLockedError, StorageError
from ckptwise.store.backend import Backend, Vouch
from ckptwise.store.fsspec_backend import FsspecBackend
from ckptwise.store.layout import LOCK_FILE
from ckptwise.store.local import LocalBackend
from ckptwise.store.runfile import read_fresh

__all__ = ["LOCK_FILE", "RunLock"]


_LOCAL_PROTOCOLS = {"file", "local"}
_CREATE_PROTOCOLS = {"s3", "s3a", "memory"}
# the in-memory filesystem's exclusive create is a check then a write: serialise it
_memory_create = threading.Lock()


def _locked(backend: Backend) -> Backend:
    """The backend whose store holds the lock: a cached run's remote one."""
    return backend.lock_backend()


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


def _protocols(backend: FsspecBackend) -> set[str]:
    protocol = backend.fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _parse(data: bytes) -> dict[str, Any] | None:
    """A lock record, or ``None`` when the bytes are not one."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _read_only_error(folder: str, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot write to the run folder {folder} ({exc.strerror or exc}): a CheckpointManager "
        "writes checkpoints and its lock file there. Give a writable folder, or only read "
        "the run with cw.open_run(root)"
    )


class RunLock:
    """Exclusive write access to one run; :meth:`acquire` raises :class:`RunLockedError`."""

    def __init__(self, backend: Backend, *, vouch: Vouch | None = None) -> None:
        self.backend = backend
        #: what a cached run's uploader checks each object with (see ``start_uploads``)
        self._vouch = vouch
        self._token = uuid.uuid4().hex
        self._fd: int | None = None
        self._path = ""
        self._identity: tuple[int, int] | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this process took the lock (and has not released it)."""
        return self._held

    def _record(self) -> bytes:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "token": self._token,
        }
        return json.dumps(info).encode()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming its holder.

        Raises:
            RunLockedError: another live writer holds the run.
            StorageError: the folder is not writable, the lock file is a link or not a
                file, or the filesystem cannot be locked.
        """
        if self._held:
            return
        backend = _locked(self.backend)
        if isinstance(backend, LocalBackend | FsspecBackend) and (
            isinstance(backend, LocalBackend) or _protocols(backend) & _LOCAL_PROTOCOLS
        ):
            self._acquire_local(backend.root, backend.url)
        elif isinstance(backend, FsspecBackend) and _protocols(backend) & _CREATE_PROTOCOLS:
            self._acquire_remote(backend)
        else:
            name = type(getattr(backend, "fs", backend)).__name__
            raise StorageError(
                f"cannot lock {backend.url} for writing: {name} offers no atomic "
                "create-if-absent, so two writers could both take the run. Write to a local "
                "folder, s3:// or memory://, or only read this run with cw.open_run()"
            )
        self._held = True
        try:
            self.backend.start_uploads(fence=self._verify, vouch=self._vouch)
        except BaseException:
            self.release()
            raise

    # -- local: flock ----------------------------------------------------------------------

    def _open_local(self, root: str) -> int:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise _read_only_error(root, exc) from exc
        path = os.path.join(root, LOCK_FILE)
        # O_NOFOLLOW: a link planted at the lock's name must not make us truncate its
        # target; O_NONBLOCK: a FIFO there must not hang the open
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StorageError(
                    f"the lock file {path} is a symbolic link; ckptwise never writes through "
                    f"one (it would overwrite the link's target). Remove it: rm {path}"
                ) from exc
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _read_only_error(root, exc) from exc
            raise StorageError(f"could not open the lock file {path}: {exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(
                f"the lock file {path} is not a regular file; remove it and start again"
            )
        return fd

    def _acquire_local(self, root: str, url: str) -> None:
        import fcntl

        path = os.path.join(root, LOCK_FILE)
        for _ in range(100):
            fd = self._open_local(root)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 65536, 0))
                os.close(fd)
                who = _holder_text(holder) if holder else "a process whose record is unreadable"
                raise RunLockedError(
                    f"run {url} is locked by {who}: another CheckpointManager is writing to "
                    "it. Stop that process or close() its manager, or use another run "
                    "folder; read it with cw.open_run(root), which takes no lock"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise StorageError(f"could not lock {path}: {exc}") from exc
            identity = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (identity.st_dev, identity.st_ino):
                os.close(fd)  # deleted or replaced between our open and flock: try again
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._record(), 0)
            except OSError as exc:
                os.close(fd)
                raise _read_only_error(root, exc) from exc
            self._fd, self._path = fd, path
            self._identity = (identity.st_dev, identity.st_ino)
            return
        raise StorageError(
            f"the lock file {path} keeps being replaced; is another tool removing it?"
        )

    # -- remote: create if absent ----------------------------------------------------------

    def _create(self, backend: FsspecBackend) -> bool:
        """Create the lock record if absent; whether this call created it."""
        path = f"{backend.root}/{LOCK_FILE}"
        try:
            if "memory" in _protocols(backend):
                with _memory_create:
                    backend.fs.pipe_file(path, self._record(), mode="create")
            else:
                backend.fs.pipe_file(path, self._record(), mode="create")
        except FileExistsError:
            return False
        except PermissionError as exc:
            raise StorageError(
                f"cannot write the lock record {backend.url}/{LOCK_FILE}: {exc}. A manager with "
                "save= or keep= writes there; check the credentials, or only read the run "
                "with cw.open_run()"
            ) from exc
        except Exception as exc:
            raise StorageError(
                f"could not create the lock record {backend.url}/{LOCK_FILE}: {exc}. Creating "
                "it only if absent (S3's If-None-Match) needs botocore > 1.35.20 and a server "
                "that supports conditional writes"
            ) from exc
        return True

    def _read_holder(self, backend: FsspecBackend) -> bytes | None:
        return read_fresh(backend, LOCK_FILE)

    def _acquire_remote(self, backend: FsspecBackend) -> None:
        where = f"{backend.url}/{LOCK_FILE}"
        for _ in range(3):
            if self._create(backend):
                # a server that ignored the condition would let another writer overwrite us
                if self._owns(backend):
                    return
                raise RunLockedError(
                    f"run {backend.url}: another writer replaced the lock record {where} just "
                    "after this one created it (does the server honour If-None-Match?). "
                    "Stop the other writer and try again"
                )
            data = self._read_holder(backend)
            if data is None:
                continue  # released between our create and read: try again
            holder = _parse(data)
            if holder is None:
                raise RunLockedError(
                    f"run {backend.url} is locked, but its lock record {where} is unreadable "
                    f"({data[:60]!r}). If no writer is running, delete {where}"
                )
            pid = holder.get("pid")
            stale = (
                holder.get("host") == socket.gethostname()
                and isinstance(pid, int)
                and not _pid_alive(pid)
            )
            if not stale:
                since = holder.get("since")
                when = time.ctime(since) if isinstance(since, int | float) else "?"
                raise RunLockedError(
                    f"run {backend.url} is locked by {_holder_text(holder)} (since {when}). "
                    f"Stop that process, or if it is gone, delete {where}"
                )
            # the holder died on this host: remove its record if it is still that record
            if self._read_holder(backend) == data:
                backend.delete(LOCK_FILE)
        raise RunLockedError(f"run {backend.url}: could not take the lock {where}; try again")

    def _owns(self, backend: FsspecBackend) -> bool:
        data = self._read_holder(backend)
        holder = _parse(data) if data is not None else None
        return holder is not None and holder.get("token") == self._token

    # -- fencing ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`RunLockedError` if this writer no longer holds the lock it took.

        Does nothing when this process never took the lock (a reader, or a rank other than
        0). Called before each commit and deletion, so a writer whose lock file was deleted
        (and perhaps taken by another writer) stops instead of writing next to it. A run
        written through a cache is checked by its uploader before each manifest upload and
        remote deletion; here, without a network call, this raises what the uploader found.
        """
        if not self._held:
            return
        if self.backend.check_fence():
            return
        self._verify()

    def _verify(self) -> None:
        """:meth:`check`, asking the lock's store itself."""
        backend = _locked(self.backend)
        if self._fd is not None:
            try:
                now = os.stat(self._path, follow_symlinks=False)
                ours = (now.st_dev, now.st_ino) == self._identity
            except FileNotFoundError:
                ours = False
            except OSError as exc:
                raise StorageError(f"could not check the lock file {self._path}: {exc}") from exc
            where = self._path
        else:
            assert isinstance(backend, FsspecBackend)
            ours = self._owns(backend)
            where = f"{backend.url}/{LOCK_FILE}"
        if not ours:
            raise RunLockedError(
                f"this writer's lock file {where} was deleted or replaced while it held "
                f"the run {backend.url}, so another writer may be writing to it now; this "
                "manager writes and deletes nothing more. Find what removed the lock, stop "
                "the other writer, and open a new CheckpointManager"
            )

    def release(self) -> None:
        """Give the lock up; safe to call twice."""
        if not self._held:
            return
        self.backend.detach()  # nothing may be sent once another writer can take the run
        self._held = False
        backend = _locked(self.backend)
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif isinstance(backend, FsspecBackend):
            with contextlib.suppress(StorageError):
                if self._owns(backend):
                    backend.delete(LOCK_FILE)
