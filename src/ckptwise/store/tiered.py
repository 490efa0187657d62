"""A remote run written through a local cache: the network leaves the save's critical path.

:class:`TieredBackend` puts a folder on a fast local disk (the *cache*) in front of a remote
store (an :class:`~ckptwise.store.backend.FsspecBackend`, e.g. ``s3://``). A save writes and
fsyncs its objects and manifest into the cache, as on a local run, and returns; uploader
threads copy the files to the remote store in the background. The store, its index, garbage
collection and the reader see only the :class:`~ckptwise.store.backend.Backend` protocol and
work unchanged on top of it.

**What a remote reader sees.** A checkpoint exists remotely once its manifest is there (the
format's rule), so the uploader keeps the order the commit wrote in: files go up in write
order, objects several at a time, but every other file (manifests, branch manifests,
``run.json``, deletions) is a *barrier*: it starts only once everything queued before it is
done, and nothing queued after it starts before it is done. A checkpoint's objects are
written before its manifest, so a manifest is uploaded only after every object it names, and
a reader of the remote alone (``cw.open_run("s3://...")`` from another machine) never lists
a checkpoint that is partly uploaded, whenever the uploading process dies.

**Reads** come from the cache when the file is there and from the remote otherwise, or when
the cached copy cannot be read (missing, not a file) or fails its checksum (the store's
reader then calls :meth:`TieredBackend.drop_cached` and reads again) -- unless the cached
copy was never uploaded: then it is the only one and its error is raised. Listings are the
union of the remote's files and the cached files not uploaded yet, without files whose
deletion is still to be done remotely.

**Deletions** (retention, garbage collection) apply to the cache at once (a manifest's
durably, its folder synced) and are then queued for the remote behind everything queued
before them; a queued upload of a deleted file is cancelled, so a deleted file is never
uploaded again (a writer saving faster than it uploads may thus never send a checkpoint
that retention deleted meanwhile). The retention handshake with pins
(:mod:`~ckptwise.store.runfile`) stays sound: tombstones are written and pins read on the
remote directly, and a tombstone's removal is queued behind the remote deletion of its
manifest, so a pinner on another machine sees the tombstone until the manifest is gone.
So a prune that deletes still makes a few small remote requests per deleted step (as the
handshake needs), while a save makes none.

**Which files go through the cache**: ``objects/``, ``checkpoints/``, ``branches/`` and the
advisory ``run.json`` (rewritten at every prune; its upload is queued like a manifest's).
Everything else goes straight to the remote: the lock (taken on the remote store by
:class:`~ckptwise.store.lock.RunLock`, so two machines never both write one remote run),
pins and tombstones (another machine pins through the remote), and request files such as
``SAVE_NOW``.

**Uploading starts only under the run's lock.** :meth:`TieredBackend.start_uploads` (called
by :meth:`RunLock.acquire <ckptwise.store.lock.RunLock.acquire>`) lists the remote once,
then keeps that listing current itself (no other process writes a locked run's
checkpoints), so listings and existence checks need no network afterwards. It also
reconciles the cache with the remote: files written into the cache but never uploaded (a
writer killed earlier) are uploaded, objects first and manifests after, so a restart on the
same cache never loses a checkpoint committed into it; if the remote meanwhile holds another
manifest of the same step (another machine wrote the run), the cached one replaces it.
Uploaded files that are gone from the remote are dropped from the cache (an object among
them is uploaded again, in case a checkpoint in the cache still names it). Before each
manifest upload and each remote deletion the uploader checks the lock is still this
writer's, so a writer whose lock was taken over publishes nothing more.

**State on disk.** The cache folder holds ``cache.json`` (the remote URL it belongs to),
``files/`` (the run's files, as on the remote) and ``cache.lock`` (held while uploading). A
file counts as uploaded once its owner-execute bit is set: set on the uploaded inode after
the upload, never present on a freshly written file whatever the umask, and kept with the
file across crashes, so no journal is needed.

**Bounded cache.** With ``cache_bytes`` the uploaded files are evicted, least recently used
first, until the cache holds no more; they are then read from the remote (reads are not
cached back). Files not uploaded yet are never evicted, so a cache whose uploads lag may
exceed the bound (a warning says so once).

**Failures.** Each remote call is retried on transient errors (see
:mod:`~ckptwise.store.retry`). A file that still fails stops the uploader (the files behind
it wait, so no manifest goes up before its objects); the failure is logged, :meth:`flush`
and :meth:`close` raise it, and the uploader tries again at the next write a minute later,
or at the next :meth:`flush`. Training goes on meanwhile: saves only need the cache.

**One process.** A cache serves one writing process: in a multi-process (torchrun) save
every rank's objects would have to be on the remote before rank 0 uploads the manifest,
which this backend does not coordinate.

**Exiting.** :meth:`close` waits for every upload. An interpreter that exits without it
still drains the queue (an ``atexit`` hook, for up to ``exit_timeout``); a process killed
outright leaves the remote with whole checkpoints only, and its cache for the next writer.

>>> backend = TieredBackend("/scratch/exp1", FsspecBackend("s3://bucket/exp1"))  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RunLockedError,
    StorageError,
)
from ckptwise.priority import lower_thread_priority
from ckptwise.store.backend import TMP_MARK, Buffer, FsspecBackend, LocalBackend
from ckptwise.store.branch import BRANCHES
from ckptwise.store.layout import CHECKPOINTS, OBJECTS, manifest_path, manifest_step
from ckptwise.store.runfile import PRUNING, RUN_FILE

__all__ = [
    "CACHE_FILE",
    "LOCAL",
    "REMOTE",
    "UPLOADING",
    "TieredBackend",
    "UploadState",
    "upload_states",
]

log = logging.getLogger("ckptwise")

T = TypeVar("T")

#: A checkpoint's upload state: only in the cache, being uploaded, or durable remotely.
UploadState = Literal["local", "uploading", "remote"]
LOCAL: UploadState = "local"
UPLOADING: UploadState = "uploading"
REMOTE: UploadState = "remote"

#: The cache's record of which remote run it belongs to.
CACHE_FILE = "cache.json"
_CACHE_LOCK = "cache.lock"
_FILES = "files"
_STAGING = "staging"
_FORMAT = {"format": "ckptwise.cache", "version": 1}

#: Top-level folders and files of a run that go through the cache.
_TIERED_DIRS = frozenset({OBJECTS, CHECKPOINTS, BRANCHES})
_TIERED_FILES = frozenset({RUN_FILE})
#: The mark of an uploaded file (see the module docstring).
_UPLOADED = stat.S_IXUSR
#: Uploading threads: objects go up this many at a time.
UPLOADERS = 4
#: After a failure stops the uploader, a write tries again once this much time has passed.
RESUME_AFTER = timedelta(minutes=1)
#: How long a lock check before an object deletion stays good for the next deletions.
_FENCE_SECONDS = 1.0


def _tiered(path: str) -> bool:
    """Whether ``path`` (run-relative) goes through the cache."""
    return path in _TIERED_FILES or path.split("/", 1)[0] in _TIERED_DIRS


def _barrier(path: str) -> bool:
    """Whether an operation on ``path`` must run alone, after all before it (everything but
    objects, which are content-addressed and independent of each other)."""
    return not path.startswith(OBJECTS + "/")


def _under(path: str, prefix: str) -> bool:
    return not prefix or path.startswith(prefix + "/")


class _Vanished(Exception):
    """The cached file to upload is no longer there."""


@dataclass
class _Entry:
    """What the cache holds at one path."""

    size: int
    #: incremented on every write of the path, to tell whether an upload sent the latest
    version: int
    uploaded: bool


@dataclass
class _Op:
    """One remote operation waiting or running."""

    kind: Literal["put", "delete"]
    path: str
    #: the cached file's version when the upload started
    version: int = 0


class TieredBackend:
    """A remote run written through the local folder ``cache`` (see the module docstring).

    ``remote`` is where the run is kept for good; ``cache`` must be used by one run only
    (``cache.json`` records which: another run's cache is refused). ``cache_bytes`` bounds
    the uploaded files kept in the cache (``None``: no bound). ``uploaders`` threads upload
    objects in parallel. ``exit_timeout`` is how long an interpreter exiting without
    :meth:`close` waits for the uploads (``None``: until done or failed).

    Until :meth:`start_uploads` (the run's lock) the backend only reads and queues: a
    reader may open a writer's cache to see what is not uploaded yet.

    Raises:
        ConfigError: the cache belongs to another run, or a bad ``cache_bytes``,
            ``uploaders`` or ``exit_timeout``.
    """

    def __init__(
        self,
        cache: str | os.PathLike[str],
        remote: FsspecBackend,
        *,
        cache_bytes: int | None = None,
        uploaders: int = UPLOADERS,
        exit_timeout: timedelta | None = timedelta(minutes=10),
    ) -> None:
        if cache_bytes is not None and (
            isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0
        ):
            raise ConfigError(
                f"cache_bytes={cache_bytes!r}: give the most bytes of uploaded files the cache "
                "keeps (an int >= 0, e.g. 50 * 2**30), or None for no bound"
            )
        if isinstance(uploaders, bool) or not isinstance(uploaders, int) or uploaders < 1:
            raise ConfigError(f"uploaders={uploaders!r}: give the number of upload threads, >= 1")
        if exit_timeout is not None and (
            not isinstance(exit_timeout, timedelta) or exit_timeout < timedelta(0)
        ):
            raise ConfigError(
                f"exit_timeout={exit_timeout!r}: give a non-negative timedelta, or None to wait "
                "at exit until every upload is done"
            )
        self.remote = remote
        self.url = remote.url
        self.cache = os.path.abspath(os.fspath(cache))
        self.cache_bytes = cache_bytes
        self.uploaders = uploaders
        self.exit_timeout = exit_timeout
        self.local = LocalBackend(os.path.join(self.cache, _FILES))
        self._cond = threading.Condition()
        #: the cached files, least recently used first
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._versions = 0
        #: remote operations waiting, in the order they must start
        self._queue: OrderedDict[str, _Op] = OrderedDict()
        self._inflight: dict[str, _Op] = {}
        self._barrier_busy = False
        #: paths being written into the cache right now: never evicted meanwhile
        self._writing: Counter[str] = Counter()
        #: the remote's files (kept current while uploading; None before)
        self._remote_files: set[str] | None = None
        #: paths whose cached copy is not to be read (found damaged)
        self._bypass: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._closed = False
        self._halted: CheckpointError | None = None
        self._halted_at = 0.0
        self._fatal = False
        self._fence: Callable[[], None] | None = None
        self._fenced_at = -float("inf")
        self._lock_fd: int | None = None
        self._identified = False
        self._warned_full = False
        self._check_identity(create=False)
        self._scan()
        _register(self)

    def __repr__(self) -> str:
        return f"TieredBackend({self.url!r}, cache={self.cache!r})"

    # -- the cache folder ------------------------------------------------------------------

    def _check_identity(self, *, create: bool) -> None:
        """Refuse a cache of another run; with ``create``, make the folder and its record."""
        if self._identified:
            return
        path = os.path.join(self.cache, CACHE_FILE)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 16)
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise StorageError(f"could not read the cache record {path}: {exc}") from exc
        if raw is not None:
            try:
                doc = json.loads(raw)
                owner = doc["remote"] if isinstance(doc, dict) else None
            except (ValueError, KeyError, RecursionError):
                owner = None
            if not isinstance(owner, str):
                raise ConfigError(
                    f"{path} is not a ckptwise cache record; give cache= a folder of its own "
                    "(one per run), or remove that file"
                )
            if owner.rstrip("/") != self.url.rstrip("/"):
                raise ConfigError(
                    f"the cache folder {self.cache} belongs to the run {owner}, not {self.url}: "
                    "give each run its own cache folder"
                )
            self._identified = True
            return
        if not create:
            return
        try:
            os.makedirs(self.cache, exist_ok=True)
            LocalBackend(self.cache).write_atomic(
                CACHE_FILE, [json.dumps({**_FORMAT, "remote": self.url}).encode()]
            )
        except OSError as exc:
            raise StorageError(f"could not create the cache folder {self.cache}: {exc}") from exc
        self._identified = True

    def _path(self, path: str) -> str:
        return os.path.join(self.local.root, *path.split("/"))

    def _scan(self) -> None:
        """Load what the cache holds (sizes, uploaded or not), oldest first."""
        found: list[tuple[int, str, _Entry]] = []
        for path in self.local.list_files(""):
            if TMP_MARK in path or not _tiered(path):
                continue
            try:
                st = os.lstat(self._path(path))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            self._versions += 1
            uploaded = bool(st.st_mode & _UPLOADED)
            found.append((st.st_mtime_ns, path, _Entry(st.st_size, self._versions, uploaded)))
        with self._cond:
            self._entries.clear()
            self._bytes = 0
            for _, path, entry in sorted(found):
                self._entries[path] = entry
                self._bytes += entry.size

    def _take_cache_lock(self) -> None:
        import fcntl

        path = os.path.join(self.cache, _CACHE_LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"could not open the cache's lock {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StorageError(
                f"the cache folder {self.cache} is in use by {holder}, which uploads from it: "
                "give this writer its own cache folder, or stop that process"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"could not lock the cache's lock {path}: {exc}") from exc
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd

    def _cache_in_use(self) -> bool:
        """Whether a process (this one included) holds the cache's lock: it is uploading."""
        import fcntl

        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(os.path.join(self.cache, _CACHE_LOCK), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return False

    # -- uploading: start, flush, stop ----------------------------------------------------

    @property
    def uploading(self) -> bool:
        """Whether the uploader runs (between :meth:`start_uploads` and :meth:`close`)."""
        return bool(self._threads)

    def start_uploads(self, *, fence: Callable[[], None] | None = None) -> None:
        """Reconcile the cache with the remote and start uploading (see the module
        docstring); a second call does nothing.

        Call it only while holding the run's lock: :meth:`RunLock.acquire
        <ckptwise.store.lock.RunLock.acquire>` does, with ``fence`` its check that the lock
        is still held, which the uploader calls before each manifest upload and each
        remote deletion.

        Raises:
            StorageError: the cache cannot be written or is in use by another process, or
                the remote cannot be listed.
        """
        with self._cond:
            if self._closed:
                raise StorageError(f"{self!r} is closed; open a new one to upload")
            if self._threads:
                return
        self._check_identity(create=True)
        self._take_cache_lock()
        try:
            self._clear_debris()
            remote = {p for p in self.remote.list_files("") if _tiered(p)}
            self._scan()
            with self._cond:
                for path, entry in list(self._entries.items()):
                    if not entry.uploaded or path in remote:
                        continue
                    if path.startswith(OBJECTS + "/"):
                        entry.uploaded = False  # a checkpoint in the cache may name it
                    else:
                        self.local.delete(path)  # deleted remotely since: stale
                        del self._entries[path]
                        self._bytes -= entry.size
                pending = [p for p, e in self._entries.items() if not e.uploaded]
                pending.sort(key=_upload_order)
                for path in pending:
                    if path not in self._queue:  # queued earlier: keeps its place
                        self._queue[path] = _Op("put", path)
                if pending:
                    log.info(
                        "uploading %d file(s) the cache %s holds but %s lacks",
                        len(pending),
                        self.cache,
                        self.url,
                    )
                self._remote_files = remote
                self._fence = fence
                self._stopping = False
                self._halted, self._fatal = None, False
                self._threads = [
                    threading.Thread(target=self._work, name=f"ckptwise-upload-{i}", daemon=True)
                    for i in range(self.uploaders)
                ]
                for thread in self._threads:
                    thread.start()
        except BaseException:
            self._release_cache_lock()
            raise
        self._evict()

    def _clear_debris(self) -> None:
        """Remove what a killed process left in the cache: temporary and staged files."""
        for path in self.local.list_files(""):
            if TMP_MARK in path.rsplit("/", 1)[-1]:
                with contextlib.suppress(StorageError):
                    self.local.delete(path)
        staging = LocalBackend(os.path.join(self.cache, _STAGING))
        for path in staging.list_files(""):
            with contextlib.suppress(StorageError):
                staging.delete(path)

    def _release_cache_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def flush(self, timeout: timedelta | None = None) -> None:
        """Wait until every file written so far is uploaded and every deletion done.

        A stopped uploader (see *Failures* in the module docstring) is first started again.

        Raises:
            StorageError: an upload failed after its retries (the error says which and why;
                the files stay in the cache for a later flush or writer), ``timeout`` passed
                first, or files wait while the uploader was never started (the run's lock is
                not held).
            RunLockedError: the lock was taken over; nothing more is uploaded.
        """
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._cond:
            if not self._threads:
                if self._queue:
                    raise StorageError(
                        f"{self._backlog()} wait in the cache {self.cache}, but nothing "
                        f"uploads them to {self.url}: uploading runs while this writer holds "
                        "the run's lock (RunLock.acquire starts it). They stay in the cache; a "
                        "writer opened on it later uploads them"
                    )
                return
            self._resume(force=True)
            while self._queue or self._inflight:
                if self._halted is not None:
                    raise self._stopped_error()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    assert timeout is not None
                    raise StorageError(
                        f"the uploads to {self.url} did not finish within "
                        f"{timeout.total_seconds():g} s: {self._backlog()} still to go (they "
                        f"stay in the cache {self.cache}). Call flush() again to wait longer; "
                        "a writer opened later on the same cache uploads them too"
                    )
                self._cond.wait(left)
            if self._halted is not None and self._fatal:
                raise self._stopped_error()

    def _backlog(self) -> str:
        """The waiting operations, in words (called holding the lock)."""
        ops = list(self._queue.values()) + list(self._inflight.values())
        puts = [op.path for op in ops if op.kind == "put"]
        size = sum(self._entries[p].size for p in puts if p in self._entries)
        deletes = len(ops) - len(puts)
        return f"{len(puts)} file(s) ({size} bytes) to upload and {deletes} to delete"

    def _stopped_error(self) -> CheckpointError:
        assert self._halted is not None
        if isinstance(self._halted, RunLockedError):
            return RunLockedError(
                f"{self._halted} The uploader stopped: {self._backlog()} stay in the cache "
                f"{self.cache} and were not sent to {self.url}"
            )
        error = StorageError(
            f"uploading to {self.url} stopped: {self._halted} {self._backlog()} wait in the "
            f"cache {self.cache}: the checkpoints there are whole locally and the remote holds "
            "only whole checkpoints. Fix the cause, then call flush() again (or open a writer "
            "on the same cache later: it uploads them)"
        )
        error.__cause__ = self._halted
        return error

    def close(self, timeout: timedelta | None = None) -> None:
        """Wait for every upload (:meth:`flush`), then stop the uploader and let the cache
        go. Reads keep working; writes are refused. Safe to call twice.

        Raises:
            StorageError: as :meth:`flush`; the uploader is stopped all the same, and the
                files not uploaded stay in the cache for the next writer.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._stop()
            self._closed = True
            _live.discard(self)

    def detach(self) -> None:
        """Finish uploading for up to ``exit_timeout``, then stop, never raising: the run's
        lock is about to be released, after which this process must send nothing more.

        What could not be uploaded stays in the cache (logged); :meth:`start_uploads`
        (taking the lock again) resumes it.
        """
        if not self._threads:
            return
        try:
            self.flush(self.exit_timeout)
        except CheckpointError as exc:
            log.warning("releasing the run %s with uploads unfinished: %s", self.url, exc)
        finally:
            self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._stopping = True
            threads, self._threads = self._threads, []
            self._cond.notify_all()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            self._remote_files = None
            self._fence = None
        self._release_cache_lock()

    def raise_if_fenced(self) -> None:
        """Raise the :class:`RunLockedError` the uploader met, if it found the lock taken
        over (what :meth:`RunLock.check <ckptwise.store.lock.RunLock.check>` reports for a
        tiered run, without a network call)."""
        with self._cond:
            if isinstance(self._halted, RunLockedError):
                raise self._stopped_error()

    @property
    def error(self) -> CheckpointError | None:
        """The failure that stopped the uploader, if it is stopped."""
        return self._halted

    def _resume(self, *, force: bool) -> None:
        """Start a stopped uploader again (called holding the lock)."""
        if self._halted is None or self._fatal:
            return
        waited = time.monotonic() - self._halted_at
        if force or waited >= RESUME_AFTER.total_seconds():
            log.info("uploading to %s again after: %s", self.url, self._halted)
            self._halted = None
            self._cond.notify_all()

    # -- the uploader ----------------------------------------------------------------------

    def _take(self) -> _Op | None:
        """The next operation that may start now, taken off the queue (holding the lock)."""
        if self._stopping or self._halted is not None or self._barrier_busy or not self._queue:
            return None
        path, op = next(iter(self._queue.items()))
        if _barrier(path) and self._inflight:
            return None
        if path in self._inflight:
            return None
        del self._queue[path]
        entry = self._entries.get(path)
        op.version = entry.version if entry is not None else 0
        self._inflight[path] = op
        self._barrier_busy = _barrier(path)
        return op

    def _work(self) -> None:
        lower_thread_priority()  # uploads give way to training, as the writer does
        while True:
            with self._cond:
                op = self._take()
                while op is None:
                    if self._stopping:
                        return
                    self._cond.wait()
                    op = self._take()
            error: BaseException | None = None
            try:
                self._run(op)
            except Exception as exc:
                error = exc
            with self._cond:
                del self._inflight[op.path]
                if _barrier(op.path):
                    self._barrier_busy = False
                if error is None:
                    self._done(op)
                    self._evict_locked()
                else:
                    self._failed(op, error)
                self._cond.notify_all()

    def _check_fence(self, *, always: bool) -> None:
        fence = self._fence
        if fence is None:
            return
        now = time.monotonic()
        if always or now - self._fenced_at >= _FENCE_SECONDS:
            fence()
            self._fenced_at = now

    def _run(self, op: _Op) -> None:
        """Carry out one remote operation (on an uploader thread, without the lock)."""
        if op.kind == "delete":
            self._check_fence(always=_barrier(op.path))
            self.remote.delete(op.path)
            return
        if _barrier(op.path):
            self._check_fence(always=True)
        staging_dir = os.path.join(self.cache, _STAGING)
        os.makedirs(staging_dir, exist_ok=True)
        staged = os.path.join(staging_dir, uuid.uuid4().hex)
        source = self._path(op.path)
        try:
            # a second name for the inode uploaded: a rewrite of the path meanwhile makes a
            # new inode, so the mark below lands on exactly what was sent
            st = os.lstat(source)
            if not stat.S_ISREG(st.st_mode):
                raise _Vanished(f"{source} is no longer a regular file")
            os.link(source, staged, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise _Vanished(f"{source} is gone") from exc
        except OSError as exc:
            raise StorageError(
                f"could not stage {source} for upload: {exc} (the cache folder's filesystem "
                "must allow hard links)"
            ) from exc
        try:
            self.remote.put_file(op.path, staged)
            mode = stat.S_IMODE(os.lstat(staged).st_mode)
            os.chmod(staged, mode | _UPLOADED)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staged)

    def _done(self, op: _Op) -> None:
        """Record a finished operation (holding the lock)."""
        assert self._remote_files is not None
        if op.kind == "delete":
            self._remote_files.discard(op.path)
            return
        self._remote_files.add(op.path)
        entry = self._entries.get(op.path)
        if entry is not None and entry.version == op.version:
            entry.uploaded = True

    def _failed(self, op: _Op, error: BaseException) -> None:
        """Put a failed operation back in its place and stop (holding the lock)."""
        if isinstance(error, _Vanished) and (
            op.path not in self._entries or op.path in self._queue
        ):
            return  # deleted or rewritten meanwhile: the queue holds what is to be done
        newer = self._queue.get(op.path)
        if newer is None:
            self._queue[op.path] = op
            self._queue.move_to_end(op.path, last=False)
        elif newer.kind == "put" == op.kind and not _barrier(op.path):
            # an object: its upload keeps the early place, before the manifests behind it
            self._queue.move_to_end(op.path, last=False)
        # else the newer operation supersedes this one and stands later: safe as it is
        if isinstance(error, RunLockedError):
            self._fatal = True
            self._halted = error
        elif isinstance(error, _Vanished):
            self._halted = StorageError(
                f"the cached copy of {op.path} was removed before it was uploaded ({error}); "
                "a checkpoint that names it can no longer be uploaded whole. Save again (a "
                "new save writes its objects anew)"
            )
        elif isinstance(error, CheckpointError):
            self._halted = error
        else:
            wrapped = StorageError(f"could not upload {op.path}: {error}")
            wrapped.__cause__ = error
            self._halted = wrapped
        self._halted_at = time.monotonic()
        log.warning(
            "uploading to %s stopped at %s: %s (%s wait in the cache %s; retried at the next "
            "write after %s, or at flush())",
            self.url,
            op.path,
            self._halted,
            self._backlog(),
            self.cache,
            RESUME_AFTER,
        )

    def _evict(self) -> None:
        """Delete uploaded files from the cache, least recently used first, until it holds
        at most ``cache_bytes``."""
        with self._cond:
            self._evict_locked()

    def _evict_locked(self) -> None:
        """:meth:`_evict`, holding the lock."""
        if self.cache_bytes is None or self._bytes <= self.cache_bytes:
            return
        for path, entry in list(self._entries.items()):
            if self._bytes <= self.cache_bytes:
                break
            if (
                not entry.uploaded
                or path in self._inflight
                or path in self._queue
                or self._writing[path]
            ):
                continue
            try:
                self.local.delete(path)
            except StorageError as exc:
                log.warning("could not evict %s from the cache: %s", path, exc)
                continue
            del self._entries[path]
            self._bytes -= entry.size
        if self._bytes > self.cache_bytes and not self._warned_full:
            self._warned_full = True
            log.warning(
                "the cache %s holds %d bytes, more than its bound of %d: the files not "
                "uploaded yet cannot be evicted (uploads lag behind the saves)",
                self.cache,
                self._bytes,
                self.cache_bytes,
            )

    # -- queueing --------------------------------------------------------------------------

    def _enqueue(self, op: _Op) -> None:
        """Queue ``op`` behind what is queued, merged with a queued operation on its path
        (holding the lock)."""
        path = op.path
        queued = self._queue.get(path)
        if op.kind == "put":
            if queued is not None and queued.kind == "delete":
                del self._queue[path]
                queued = None
            if queued is None:
                self._queue[path] = op
            elif _barrier(path):
                self._queue.move_to_end(path)  # behind the files it may name
            # an object already queued keeps its place: manifests behind it need it first
        else:
            if queued is not None and queued.kind == "delete":
                return
            if queued is not None:
                del self._queue[path]  # never uploaded: a deleted file is not resurrected
            may_exist = (
                self._remote_files is None or path in self._remote_files or path in self._inflight
            )
            if may_exist:
                self._queue[path] = op
        self._resume(force=False)
        self._cond.notify_all()

    def _hidden(self, path: str) -> bool:
        """Whether ``path``'s remote deletion is still to be done (holding the lock)."""
        op = self._queue.get(path) or self._inflight.get(path)
        return op is not None and op.kind == "delete"

    def _writable(self) -> None:
        if self._closed:
            raise StorageError(f"{self!r} is closed; it reads, but writing needs a new backend")

    # -- the Backend protocol --------------------------------------------------------------

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        if not _tiered(path):
            if path.startswith(PRUNING + "/"):
                self._unqueue_tombstone(path)
            return self.remote.write_atomic(path, chunks, sync=sync)
        self._writable()
        self._check_identity(create=True)
        with self._cond:
            self._writing[path] += 1
        try:
            written = self.local.write_atomic(path, chunks, sync=sync)
        except BaseException:
            with self._cond:
                self._writing[path] -= 1
            raise
        with self._cond:
            self._writing[path] -= 1
            if not self._writing[path]:
                del self._writing[path]
            old = self._entries.pop(path, None)
            self._bytes += written - (old.size if old is not None else 0)
            self._versions += 1
            self._entries[path] = _Entry(written, self._versions, uploaded=False)
            self._bypass.discard(path)
            self._enqueue(_Op("put", path))
        return written

    def _unqueue_tombstone(self, path: str) -> None:
        """Before a tombstone is written again, drop its queued removal (waiting for one
        under way), which would otherwise remove the new tombstone."""
        with self._cond:
            queued = self._queue.get(path)
            if queued is not None and queued.kind == "delete":
                del self._queue[path]
            while path in self._inflight:
                self._cond.wait()

    def delete(self, path: str) -> None:
        if not _tiered(path):
            with self._cond:
                if (
                    path.startswith(PRUNING + "/")
                    and self._threads
                    and (self._queue or self._inflight)
                ):
                    # behind the manifest deletions queued before it (see the docstring)
                    self._queue.pop(path, None)
                    self._queue[path] = _Op("delete", path)
                    self._cond.notify_all()
                    return
            self.remote.delete(path)
            return
        self._writable()
        with self._cond:
            self.local.delete(path)
            entry = self._entries.pop(path, None)
            if entry is not None:
                self._bytes -= entry.size
            self._bypass.discard(path)
            if _barrier(path):
                # the remote follows a decision the cache has made durable: a crash cannot
                # bring back here a manifest the remote no longer has
                self.local.sync_dirs([path.rpartition("/")[0]])
            self._enqueue(_Op("delete", path))

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        self.local.sync_dirs([d for d in dirs if not d or d.split("/", 1)[0] in _TIERED_DIRS])

    def _read(self, path: str, from_cache: Callable[[], T], from_remote: Callable[[], T]) -> T:
        """A read served by the cache when it can, else by the remote."""
        if not _tiered(path):
            return from_remote()
        with self._cond:
            if self._hidden(path):
                raise CheckpointNotFoundError(f"{self.url}/{path} does not exist")
            entry = self._entries.get(path)
            writer = bool(self._threads)
            cached = path not in self._bypass and (entry is not None or not writer)
            only_copy = writer and entry is not None and not entry.uploaded
        if cached:
            try:
                out = from_cache()
            except (CheckpointNotFoundError, CorruptCheckpointError, StorageError):
                if only_copy:
                    raise
            else:
                with self._cond:
                    if path in self._entries:
                        self._entries.move_to_end(path)
                return out
        return from_remote()

    def read_bytes(self, path: str) -> bytes:
        return self._read(
            path, lambda: self.local.read_bytes(path), lambda: self.remote.read_bytes(path)
        )

    def read_into(self, path: str, buffer: memoryview) -> int:
        return self._read(
            path,
            lambda: self.local.read_into(path, buffer),
            lambda: self.remote.read_into(path, buffer),
        )

    def size(self, path: str) -> int:
        return self._read(path, lambda: self.local.size(path), lambda: self.remote.size(path))

    def exists(self, path: str) -> bool:
        if not _tiered(path):
            return self.remote.exists(path)
        with self._cond:
            if self._hidden(path):
                return False
            if self._remote_files is not None:
                return path in self._entries or path in self._remote_files
        return self.local.exists(path) or self.remote.exists(path)

    def list_files(self, prefix: str) -> list[str]:
        top = prefix.split("/", 1)[0]
        if prefix and top not in _TIERED_DIRS:
            return self.remote.list_files(prefix)
        with self._cond:
            writer = self._remote_files is not None
            if writer:
                assert self._remote_files is not None
                known = {p for p in self._remote_files if _under(p, prefix)}
        if not writer:
            # before uploading starts (a reader): the remote now, and what the cache holds
            # that is not uploaded (another process may be uploading it)
            found = set(self.remote.list_files(prefix))
            found.update(p for p in self.local.list_files(prefix) if self._unsent(p))
        else:
            found = known
            if not prefix:
                found.update(p for p in self.remote.list_files("") if not _tiered(p))
        with self._cond:
            if writer:  # a reader's view of the cache may be stale: not used
                found.update(p for p in self._entries if _under(p, prefix))
            return sorted(p for p in found if not self._hidden(p))

    def _unsent(self, path: str) -> bool:
        """Whether the cache holds ``path`` as a regular file not marked uploaded."""
        if TMP_MARK in path or not _tiered(path):
            return False
        try:
            mode = os.lstat(self._path(path)).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode) and not mode & _UPLOADED

    def free_bytes(self) -> int | None:
        return self.local.free_bytes()

    def drop_cached(self, path: str) -> bool:
        """Read ``path`` from the remote from now on (its cached copy was found damaged);
        whether the remote has a copy to read. A copy not uploaded yet is the only one:
        it is kept, and ``False`` returned."""
        if not _tiered(path):
            return False
        with self._cond:
            entry = self._entries.get(path)
            if self._threads:
                if entry is None or not entry.uploaded or path in self._writing:
                    return False
                with contextlib.suppress(StorageError):
                    self.local.delete(path)
                del self._entries[path]
                self._bytes -= entry.size
                assert self._remote_files is not None
                return path in self._remote_files
            if self._unsent(path) or path in self._bypass:
                return False
            self._bypass.add(path)  # a reader leaves a writer's cache as it is
            return os.path.exists(self._path(path))

    # -- what is uploaded ------------------------------------------------------------------

    def upload_state(self, step: int) -> UploadState:
        """Where the checkpoint of ``step`` is durable: ``"local"`` (only in the cache, and
        no uploader is at work on it), ``"uploading"`` (in the cache, being uploaded) or
        ``"remote"`` (its manifest, hence every object, is on the remote).

        A reader (no :meth:`start_uploads`) answers for the writer using the same cache:
        ``"uploading"`` while a process holds the cache's lock.

        Raises:
            CheckpointNotFoundError: no checkpoint of ``step`` is listed.
        """
        path = manifest_path(step)
        if not self.exists(path):
            raise CheckpointNotFoundError(
                f"no committed checkpoint at step {step} in {self.url} or its cache {self.cache}"
            )
        return self._state(path)

    def _state(self, path: str) -> UploadState:
        with self._cond:
            if self._threads or self._remote_files is not None:
                op = self._queue.get(path) or self._inflight.get(path)
                entry = self._entries.get(path)
                pending = (op is not None and op.kind == "put") or (
                    entry is not None and not entry.uploaded
                )
                if not pending:
                    return REMOTE
                return LOCAL if self._halted is not None else UPLOADING
        if not self._unsent(path):
            return REMOTE
        return UPLOADING if self._cache_in_use() else LOCAL

    def upload_states(self) -> dict[int, UploadState]:
        """:meth:`upload_state` of every listed checkpoint, by step."""
        steps = (manifest_step(p) for p in self.list_files(CHECKPOINTS))
        return {s: self._state(manifest_path(s)) for s in sorted(x for x in steps if x is not None)}

    @property
    def pending(self) -> int:
        """Remote operations waiting or under way."""
        with self._cond:
            return len(self._queue) + len(self._inflight)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the files the cache holds."""
        with self._cond:
            return self._bytes


def upload_states(backend: object) -> dict[int, UploadState] | None:
    """Each checkpoint's upload state when ``backend`` writes through a cache, else
    ``None`` (a plain local or remote run has nothing to report)."""
    return backend.upload_states() if isinstance(backend, TieredBackend) else None


def _upload_order(path: str) -> tuple[int, str]:
    """Objects first, then manifests (by step), branches, and the run record last."""
    if path.startswith(OBJECTS + "/"):
        return 0, path
    if path.startswith(CHECKPOINTS + "/"):
        return 1, path
    if path.startswith(BRANCHES + "/"):
        return 2, path
    return 3, path


# -- exiting without close() ---------------------------------------------------------------

_live: weakref.WeakSet[TieredBackend] = weakref.WeakSet()
_hooked = False
_hook_lock = threading.Lock()


def _register(backend: TieredBackend) -> None:
    global _hooked
    _live.add(backend)
    with _hook_lock:
        if not _hooked:
            # registered after the remote filesystem was created, so this runs before the
            # exit hooks that close its sessions (atexit runs last-registered first)
            atexit.register(_drain_at_exit)
            _hooked = True


def _drain_at_exit() -> None:
    """Finish the uploads of backends the program did not close."""
    for backend in list(_live):
        if not backend.uploading:
            continue
        log.info("finishing the uploads to %s before exiting", backend.url)
        try:
            backend.flush(backend.exit_timeout)
        except CheckpointError as exc:
            log.warning(
                "exiting with uploads unfinished (the remote holds only whole checkpoints): %s", exc
            )
