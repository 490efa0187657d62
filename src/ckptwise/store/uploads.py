"""The background uploader of a :class:`~ckptwise.store.tiered.TieredBackend`.

:class:`Uploads` is the queue of remote operations (uploads and deletions) in the order the
cache was written, and the threads that carry them out: objects several at a time, every
other file alone, stopping at a failure and checking the run's lock before publishing. A
registry drains the uploads of backends left open when the interpreter exits.

**What a remote reader sees.** A checkpoint exists remotely once its manifest is there (the
format's rule), so the uploader keeps the order the commit wrote in: files go up in write
order, objects several at a time, but every other file (manifests, branch manifests,
``run.json``, deletions) is a *barrier*: it starts only once everything queued before it is
done, and nothing queued after it starts before it is done. A checkpoint's objects are
written before its manifest, so a manifest is uploaded only after every object it names, and
a reader of the remote alone (``cw.open_run("s3://...")`` from another machine) never lists
a checkpoint that is partly uploaded, whenever the uploading process dies.

**Fencing.** Before each manifest upload and each remote deletion the uploader checks the
lock is still this writer's, so a writer whose lock was taken over publishes nothing more.

**Failures.** Each remote call is retried on transient errors (see
:mod:`~ckptwise.store.retry`). A file that still fails stops the uploader (the files behind
it wait, so no manifest goes up before its objects); the failure is logged,
:meth:`~Uploads.flush` and the backend's ``close()`` raise it, and the uploader tries again at
the next write a minute later, or at the next flush. Training goes on meanwhile: saves only
need the cache.

**Damage.** Before an object leaves the machine the uploader has its bytes checked against
its address (``vouch``, the writing store's check: size, decode, hash). An object that fails
is not uploaded: its cached copy is dropped and a warning names it. A checkpoint manifest is
uploaded only once every object it names (delta bases included) is on the remote; one naming
a dropped object is not uploaded but *parked* (its upload state stays ``"local"``, a warning
says why), so the remote never lists a checkpoint whose objects are not whole there. The
writer's next save finds the object missing where it checks it (see
:mod:`~ckptwise.store.commit`) and writes it again from the live tensor (same bytes, same
address); once that copy is uploaded, the parked manifests go up behind it. If the tensor
has changed meanwhile, nothing writes those bytes again: the parked checkpoint stays in the
cache alone, as damaged as it was found, until retention deletes it.

**Exiting.** The backend's ``close()`` waits for every upload. An interpreter that exits
without it still drains the queue (an ``atexit`` hook, for up to ``exit_timeout``); a process
killed outright leaves the remote with whole checkpoints only, and its cache for the next
writer.

It is long because the queue, its threads, its fencing and the exit drain share one lock
and one ordering rule; split, each part would have to re-derive that order.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol

from ckptwise.errors import CheckpointError, CorruptCheckpointError, RunLockedError, StorageError
from ckptwise.priority import lower_thread_priority
from ckptwise.store.backend import Vouch
from ckptwise.store.cache_folder import UPLOADED, CacheEntries, CacheFolder
from ckptwise.store.codecs import readable
from ckptwise.store.fsspec_backend import FsspecBackend
from ckptwise.store.layout import (
    BRANCHES,
    CHECKPOINTS,
    OBJECTS,
    PRUNING,
    manifest_step,
    object_path,
)
from ckptwise.store.manifest import MAX_MANIFEST_BYTES, decode_manifest

__all__ = [
    "RESUME_AFTER",
    "UPLOADERS",
    "Drains",
    "Op",
    "Uploads",
    "barrier",
    "register",
    "unregister",
    "upload_order",
]

log = logging.getLogger("ckptwise")

#: Uploading threads: objects go up this many at a time.
UPLOADERS = 4
#: After a failure stops the uploader, a write tries again once this much time has passed.
RESUME_AFTER = timedelta(minutes=1)
#: How long a lock check before an object deletion stays good for the next deletions.
FENCE_SECONDS = 1.0


def barrier(path: str) -> bool:
    """Whether an operation on ``path`` must run alone, after all before it (everything but
    objects, which are content-addressed and independent of each other)."""
    return not path.startswith(OBJECTS + "/")


def upload_order(path: str) -> tuple[int, str]:
    """Objects first, then manifests (by step), branches, and the run record last."""
    if path.startswith(OBJECTS + "/"):
        return 0, path
    if path.startswith(CHECKPOINTS + "/"):
        return 1, path
    if path.startswith(BRANCHES + "/"):
        return 2, path
    return 3, path


class _Vanished(Exception):
    """The cached file to upload is no longer there."""


class _Damaged(Exception):
    """The cached object to upload fails its check: it is not uploaded."""


class _Parked(Exception):
    """A manifest names objects the remote lacks (dropped as damaged): it waits for them."""

    def __init__(self, missing: set[str]) -> None:
        super().__init__(", ".join(sorted(missing)))
        self.missing = missing


@dataclass
class Op:
    """One remote operation waiting or running."""

    kind: Literal["put", "delete"]
    path: str
    #: the cached file's version when the upload started
    version: int = 0


class Uploads:
    """The remote operations of the cache ``folder`` waiting or under way, sent to
    ``remote`` by uploader threads between :meth:`start` and :meth:`stop`.

    It shares ``cond``, the backend's lock, with the backend and ``entries``: the methods
    marked *holding the lock* expect the caller to hold it, the others take it. ``evict``
    is called holding the lock after each operation that succeeded. The attributes are read
    holding the lock too (but :attr:`threads` tells whether uploads run without it).
    """

    def __init__(
        self,
        cond: threading.Condition,
        folder: CacheFolder,
        entries: CacheEntries,
        remote: FsspecBackend,
        evict: Callable[[], None],
    ) -> None:
        self._cond = cond
        self._folder = folder
        self._entries = entries
        self._remote = remote
        self._evict = evict
        self.url = remote.url
        #: remote operations waiting, in the order they must start
        self.queue: OrderedDict[str, Op] = OrderedDict()
        self.inflight: dict[str, Op] = {}
        self._barrier_busy = False
        #: the remote's files (kept current while uploading; None before)
        self.remote_files: set[str] | None = None
        self.threads: list[threading.Thread] = []
        self._stopping = False
        #: the failure that stopped the uploader, if it is stopped
        self.halted: CheckpointError | None = None
        self._halted_at = 0.0
        self._fatal = False
        self._fence: Callable[[], None] | None = None
        self._fenced_at = -float("inf")
        self._vouch: Vouch | None = None
        #: manifests held back, each with the objects it names that the remote lacks
        self.parked: dict[str, set[str]] = {}
        #: objects dropped as damaged and not written again since
        self.dropped: set[str] = set()
        #: other processes upload objects this uploader's manifests name (rank 0 of a job
        #: of several): a manifest waits, parked without a warning, until :meth:`confirm`
        self.confirming = False

    # -- start, flush, stop ----------------------------------------------------------------

    def start(
        self,
        pending: list[str],
        remote_files: set[str],
        fence: Callable[[], None] | None,
        count: int,
        vouch: Vouch | None = None,
    ) -> None:
        """Queue the uploads of the cached files ``pending`` (in :func:`upload_order`),
        taking ``remote_files`` as the remote's listing to keep current, and start ``count``
        threads (holding the lock). ``fence`` raises :class:`RunLockedError` once the run's
        lock is no longer this writer's; ``vouch`` checks an object before its upload (see
        *Damage* in the module docstring; without it objects go up unchecked)."""
        pending.sort(key=upload_order)
        self.parked.clear()  # each is among the pending files, checked again in its turn
        for path in pending:
            if path not in self.queue:  # queued earlier: keeps its place
                self.queue[path] = Op("put", path)
        if pending:
            log.info(
                "uploading %d file(s) the cache %s holds but %s lacks",
                len(pending),
                self._folder.root,
                self.url,
            )
        self.remote_files = remote_files
        self._fence = fence
        self._vouch = vouch
        self._stopping = False
        self.halted, self._fatal = None, False
        self.threads = [
            threading.Thread(target=self._work, name=f"ckptwise-upload-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def flush(self, timeout: timedelta | None = None) -> None:
        """Wait until every operation queued so far is done (see
        :meth:`TieredBackend.flush <ckptwise.store.tiered.TieredBackend.flush>`, which this
        is)."""
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._cond:
            if not self.threads:
                if self.queue:
                    raise StorageError(
                        f"{self.backlog()} wait in the cache {self._folder.root}, but nothing "
                        f"uploads them to {self.url}: uploading runs while this writer holds "
                        "the run's lock (RunLock.acquire starts it). They stay in the cache; a "
                        "writer opened on it later uploads them"
                    )
                return
            self._resume(force=True)
            while self.queue or self.inflight:
                if self.halted is not None:
                    raise self.stopped_error()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    assert timeout is not None
                    raise StorageError(
                        f"the uploads to {self.url} did not finish within "
                        f"{timeout.total_seconds():g} s: {self.backlog()} still to go (they "
                        f"stay in the cache {self._folder.root}). Call flush() again to wait "
                        "longer; a writer opened later on the same cache uploads them too"
                    )
                self._cond.wait(left)
            if self.halted is not None and self._fatal:
                raise self.stopped_error()

    def backlog(self) -> str:
        """The waiting operations, in words (holding the lock)."""
        ops = list(self.queue.values()) + list(self.inflight.values())
        puts = [op.path for op in ops if op.kind == "put"]
        files = self._entries.files
        size = sum(files[p].size for p in puts if p in files)
        deletes = len(ops) - len(puts)
        return f"{len(puts)} file(s) ({size} bytes) to upload and {deletes} to delete"

    @property
    def fatal(self) -> CheckpointError | None:
        """The failure that stopped the uploader for good (the run's lock was taken over),
        if it did; no later call starts it again."""
        return self.halted if self._fatal else None

    def stopped_error(self) -> CheckpointError:
        """The error to raise for the failure that stopped the uploader (holding the lock)."""
        assert self.halted is not None
        if isinstance(self.halted, RunLockedError):
            return RunLockedError(
                f"{self.halted} The uploader stopped: {self.backlog()} stay in the cache "
                f"{self._folder.root} and were not sent to {self.url}"
            )
        error = StorageError(
            f"uploading to {self.url} stopped: {self.halted} {self.backlog()} wait in the "
            f"cache {self._folder.root}: the checkpoints there are whole locally and the "
            "remote holds only whole checkpoints. Fix the cause, then call flush() again (or "
            "open a writer on the same cache later: it uploads them)"
        )
        error.__cause__ = self.halted
        return error

    def stop(self) -> None:
        """Stop the threads once each has finished its operation, and forget the remote's
        listing and the fence; what is queued stays queued."""
        with self._cond:
            self._stopping = True
            threads, self.threads = self.threads, []
            self._cond.notify_all()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            self.remote_files = None
            self._fence = None
            self._vouch = None

    def _resume(self, *, force: bool) -> None:
        """Start a stopped uploader again (holding the lock)."""
        if self.halted is None or self._fatal:
            return
        waited = time.monotonic() - self._halted_at
        if force or waited >= RESUME_AFTER.total_seconds():
            log.info("uploading to %s again after: %s", self.url, self.halted)
            self.halted = None
            self._cond.notify_all()

    # -- the threads -----------------------------------------------------------------------

    def _take(self) -> Op | None:
        """The next operation that may start now, taken off the queue (holding the lock)."""
        if self._stopping or self.halted is not None or self._barrier_busy or not self.queue:
            return None
        path, op = next(iter(self.queue.items()))
        if barrier(path) and self.inflight:
            return None
        if path in self.inflight:
            return None
        del self.queue[path]
        entry = self._entries.files.get(path)
        op.version = entry.version if entry is not None else 0
        self.inflight[path] = op
        self._barrier_busy = barrier(path)
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
                del self.inflight[op.path]
                if barrier(op.path):
                    self._barrier_busy = False
                if error is None:
                    self._done(op)
                    self._evict()
                elif isinstance(error, _Damaged):
                    self._drop(op, error)
                elif isinstance(error, _Parked):
                    self._park(op, error.missing)
                else:
                    self._failed(op, error)
                self._cond.notify_all()

    def _check_fence(self, *, always: bool) -> None:
        fence = self._fence
        if fence is None:
            return
        now = time.monotonic()
        if always or now - self._fenced_at >= FENCE_SECONDS:
            fence()
            self._fenced_at = now

    def _run(self, op: Op) -> None:
        """Carry out one remote operation (on an uploader thread, without the lock)."""
        if op.kind == "delete":
            self._check_fence(always=barrier(op.path))
            self._remote.delete(op.path)
            return
        if barrier(op.path):
            self._check_fence(always=True)
        staging_dir = self._folder.staging
        os.makedirs(staging_dir, exist_ok=True)
        staged = os.path.join(staging_dir, uuid.uuid4().hex)
        source = self._folder.path(op.path)
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
            self._check(op.path, staged)
            self._remote.put_file(op.path, staged)
            mode = stat.S_IMODE(os.lstat(staged).st_mode)
            os.chmod(staged, mode | UPLOADED)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staged)

    def _check(self, path: str, staged: str) -> None:
        """Raise :class:`_Damaged` for an object that fails ``vouch``, :class:`_Parked` for
        a checkpoint manifest naming objects the remote lacks (on an uploader thread,
        without the lock)."""
        vouch = self._vouch
        if not barrier(path):
            if vouch is not None:
                try:
                    vouch(path, staged)
                except CorruptCheckpointError as exc:
                    raise _Damaged(str(exc)) from exc
            return
        if manifest_step(path) is None:
            return
        try:
            with open(staged, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
            manifest = decode_manifest(data, where=path, codecs=readable())
        except (OSError, CheckpointError):
            return  # not ours to judge: uploaded as it is, and readers report it broken
        named = {object_path(e.object) for e in manifest.entries()}
        named.update(object_path(oid) for e in manifest.entries() for oid, _, _ in e.bases)
        with self._cond:
            assert self.remote_files is not None
            missing = named - self.remote_files
        if missing:
            raise _Parked(missing)

    def _drop(self, op: Op, error: _Damaged) -> None:
        """Drop a cached object that failed its check instead of uploading it (holding the
        lock); a rewrite of the path meanwhile is kept, and uploaded in its turn."""
        entry = self._entries.files.get(op.path)
        if entry is not None and entry.version == op.version:
            with contextlib.suppress(StorageError):
                self._folder.local.delete(op.path)
            self._entries.forget(op.path)
            self.dropped.add(op.path)
        log.warning(
            "%s in the cache %s: not uploaded to %s and dropped from the cache. A checkpoint "
            "naming it is not uploaded until a save writes it again from the live tensor",
            error,
            self._folder.root,
            self.url,
        )

    def _park(self, op: Op, missing: set[str]) -> None:
        """Hold back the manifest ``op`` uploads until the remote has ``missing``
        (holding the lock)."""
        assert self.remote_files is not None
        # the check ran without the lock: an upload or a confirmation may have come since,
        # and nothing would release a manifest parked for objects already there
        missing = missing - self.remote_files
        if not missing:
            if op.path in self._entries.files:
                self.enqueue(Op("put", op.path))
            return
        self.parked[op.path] = missing
        if self.confirming and not missing & self.dropped:
            log.debug("%s waits for the other ranks' uploads of its objects", op.path)
            return
        log.warning(
            "%s is not uploaded to %s: it names %s, which the remote lacks (dropped from the "
            "cache as damaged, or deleted from the remote). It goes up once a save writes %s "
            "again; until then it is "
            "only in the cache %s",
            op.path,
            self.url,
            ", ".join(sorted(missing)),
            "it" if len(missing) == 1 else "them",
            self._folder.root,
        )

    def _done(self, op: Op) -> None:
        """Record a finished operation (holding the lock)."""
        assert self.remote_files is not None
        if op.kind == "delete":
            self.remote_files.discard(op.path)
            return
        self.remote_files.add(op.path)
        self.parked.pop(op.path, None)  # an older version's wait, if one parked meanwhile
        entry = self._entries.files.get(op.path)
        if entry is not None and entry.version == op.version:
            entry.uploaded = True
        for manifest, missing in list(self.parked.items()):
            missing.discard(op.path)
            if not missing:
                del self.parked[manifest]
                if manifest in self._entries.files:
                    self.enqueue(Op("put", manifest))  # behind the object it waited for

    def _failed(self, op: Op, error: BaseException) -> None:
        """Put a failed operation back in its place and stop (holding the lock)."""
        if isinstance(error, _Vanished) and (
            op.path not in self._entries.files or op.path in self.queue
        ):
            return  # deleted or rewritten meanwhile: the queue holds what is to be done
        newer = self.queue.get(op.path)
        if newer is None:
            self.queue[op.path] = op
            self.queue.move_to_end(op.path, last=False)
        elif newer.kind == "put" == op.kind and not barrier(op.path):
            # an object: its upload keeps the early place, before the manifests behind it
            self.queue.move_to_end(op.path, last=False)
        # else the newer operation supersedes this one and stands later: safe as it is
        if isinstance(error, RunLockedError):
            self._fatal = True
            self.halted = error
        elif isinstance(error, _Vanished):
            self.halted = StorageError(
                f"the cached copy of {op.path} was removed before it was uploaded ({error}); "
                "a checkpoint that names it can no longer be uploaded whole. Save again (a "
                "new save writes its objects anew)"
            )
        elif isinstance(error, CheckpointError):
            self.halted = error
        else:
            wrapped = StorageError(f"could not upload {op.path}: {error}")
            wrapped.__cause__ = error
            self.halted = wrapped
        self._halted_at = time.monotonic()
        log.warning(
            "uploading to %s stopped at %s: %s (%s wait in the cache %s; retried at the next "
            "write after %s, or at flush())",
            self.url,
            op.path,
            self.halted,
            self.backlog(),
            self._folder.root,
            RESUME_AFTER,
        )

    # -- queueing --------------------------------------------------------------------------

    def enqueue(self, op: Op) -> None:
        """Queue ``op`` behind what is queued, merged with a queued operation on its path
        (holding the lock)."""
        path = op.path
        self.parked.pop(path, None)  # rewritten or deleted: the new operation decides
        self.dropped.discard(path)
        queued = self.queue.get(path)
        if op.kind == "put":
            if queued is not None and queued.kind == "delete":
                del self.queue[path]
                queued = None
            if queued is None:
                self.queue[path] = op
            elif barrier(path):
                self.queue.move_to_end(path)  # behind the files it may name
            # an object already queued keeps its place: manifests behind it need it first
        else:
            if queued is not None and queued.kind == "delete":
                return
            if queued is not None:
                del self.queue[path]  # never uploaded: a deleted file is not resurrected
            may_exist = (
                self.remote_files is None or path in self.remote_files or path in self.inflight
            )
            if may_exist:
                self.queue[path] = op
        self._resume(force=False)
        self._cond.notify_all()

    def delete_later(self, path: str) -> bool:
        """Queue the remote deletion of the tombstone ``path`` behind the operations queued
        before it, if uploads run and any are waiting; whether it was queued (holding the
        lock)."""
        if path.startswith(PRUNING + "/") and self.threads and (self.queue or self.inflight):
            # behind the manifest deletions queued before it (see the backend's docstring)
            self.queue.pop(path, None)
            self.queue[path] = Op("delete", path)
            self._cond.notify_all()
            return True
        return False

    def unqueue_delete(self, path: str) -> None:
        """Before a tombstone is written again, drop its queued removal (waiting for one
        under way), which would otherwise remove the new tombstone."""
        with self._cond:
            queued = self.queue.get(path)
            if queued is not None and queued.kind == "delete":
                del self.queue[path]
            while path in self.inflight:
                self._cond.wait()

    def confirm(self, paths: set[str]) -> None:
        """Take the objects ``paths`` as on the remote (other processes uploaded them and
        said so) and release the manifests that waited only for them (holding the lock)."""
        if self.remote_files is None:
            return
        # an object this uploader dropped as damaged is not on the remote whatever a
        # manifest that names it says, until a save writes it again
        paths = paths - self.dropped
        self.remote_files.update(paths)
        for manifest, missing in list(self.parked.items()):
            missing.difference_update(paths)
            if not missing:
                del self.parked[manifest]
                if manifest in self._entries.files:
                    self.enqueue(Op("put", manifest))

    def sent(self, paths: set[str]) -> bool | None:
        """Whether every object of ``paths`` is uploaded: ``True``, ``False`` (some still
        wait), or ``None`` when one was dropped as damaged and never will be (holding the
        lock)."""
        if paths & self.dropped:
            return None
        known = self.remote_files or set()
        return all(p in known and not self.busy(p) for p in paths)

    def resume(self) -> None:
        """Start a stopped uploader again if its pause is over (holding the lock)."""
        self._resume(force=False)

    def op(self, path: str) -> Op | None:
        """The operation on ``path`` waiting or under way, if any (holding the lock)."""
        return self.queue.get(path) or self.inflight.get(path)

    def busy(self, path: str) -> bool:
        """Whether an operation on ``path`` waits or is under way (holding the lock)."""
        return path in self.inflight or path in self.queue

    def hidden(self, path: str) -> bool:
        """Whether ``path``'s remote deletion is still to be done (holding the lock)."""
        op = self.op(path)
        return op is not None and op.kind == "delete"


# -- exiting without close() ---------------------------------------------------------------


class Drains(Protocol):
    """What the exit hook needs of a backend: the backend's own names."""

    @property
    def uploading(self) -> bool: ...

    @property
    def url(self) -> str: ...

    @property
    def exit_timeout(self) -> timedelta | None: ...

    def flush(self, timeout: timedelta | None = None) -> None: ...


_live: weakref.WeakSet[Drains] = weakref.WeakSet()
_hooked = False
_hook_lock = threading.Lock()


def register(backend: Drains) -> None:
    """Drain ``backend``'s uploads when the interpreter exits, unless :func:`unregister`\\ ed
    first (it is held weakly)."""
    global _hooked
    _live.add(backend)
    with _hook_lock:
        if not _hooked:
            # registered after the remote filesystem was created, so this runs before the
            # exit hooks that close its sessions (atexit runs last-registered first)
            atexit.register(_drain_at_exit)
            _hooked = True


def unregister(backend: Drains) -> None:
    """Leave ``backend`` out of the drain at exit (it was closed)."""
    _live.discard(backend)


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
