"""A remote run written through a local cache: the network leaves the save's critical path.

:class:`TieredBackend` puts a folder on a fast local disk (the *cache*,
:mod:`~ckptwise.store.cache_folder`) in front of a remote store (an
:class:`~ckptwise.store.backend.FsspecBackend`, e.g. ``s3://``). A save writes and fsyncs its
objects and manifest into the cache, as on a local run, and returns; uploader threads
(:mod:`~ckptwise.store.uploads`, which says in what order and what happens on failure) copy
the files to the remote store in the background. The store, its index, garbage collection
and the reader see only the :class:`~ckptwise.store.backend.Backend` protocol and work
unchanged on top of it.

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
handshake needs), while a save makes one when it reuses uploaded objects: the check that
they are still on the remote (one listing of ``objects/``, or a ``HEAD`` each for a few; see
:meth:`TieredBackend.sizes`), since a lifecycle rule or a person may have deleted them.

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
them is uploaded again, in case a checkpoint in the cache still names it). The uploader then
checks the lock before each manifest upload and each remote deletion.

**One process per cache folder.** A cache serves one writing process. In a job of several
ranks each rank writes through a folder of its own and uploads only its objects; rank 0's
manifests wait (parked, without a warning: :meth:`TieredBackend.expect_confirmations`)
until the other ranks confirm their objects are up (:meth:`TieredBackend.confirm_step`,
driven by :mod:`ckptwise.distributed.confirm`).

>>> backend = TieredBackend("/scratch/exp1", FsspecBackend("s3://bucket/exp1"))  # doctest: +SKIP

It is long because each :class:`~ckptwise.store.backend.Backend` call needs its own rule
for cache, remote and queue together (read from which, list what, delete when); the folder
and the uploader it relies on live in their own modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from datetime import timedelta
from typing import TypeVar

from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RunLockedError,
    StorageError,
)
from ckptwise.store.backend import (
    LOCAL,
    REMOTE,
    UPLOADING,
    Backend,
    Buffer,
    Sizes,
    UploadState,
    Vouch,
    sizes_one_by_one,
)
from ckptwise.store.cache_folder import (
    SET_ASIDE,
    TIERED_DIRS,
    CacheEntries,
    CacheFolder,
    tiered,
)
from ckptwise.store.codecs import readable
from ckptwise.store.fsspec_backend import FsspecBackend
from ckptwise.store.layout import (
    CACHE_FILE,
    CHECKPOINTS,
    OBJECTS,
    PRUNING,
    manifest_path,
    manifest_step,
    object_path,
)
from ckptwise.store.manifest import Manifest, TensorEntry, decode_manifest
from ckptwise.store.uploads import RESUME_AFTER as RESUME_AFTER
from ckptwise.store.uploads import UPLOADERS, Op, Uploads, barrier, register, unregister

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


def _under(path: str, prefix: str) -> bool:
    return not prefix or path.startswith(prefix + "/")


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
        self._folder = CacheFolder(self.cache, self.url)
        self.local = self._folder.local
        #: the one lock of the backend, its cache entries and its uploads
        self._cond = threading.Condition()
        self._entries = CacheEntries(self._cond, self._folder)
        self._uploads = Uploads(self._cond, self._folder, self._entries, remote, self._evict_locked)
        #: paths whose cached copy is not to be read (found damaged)
        self._bypass: set[str] = set()
        self._closed = False
        self._folder.check_identity(create=False)
        self._entries.load(self._folder.scan())
        register(self)

    def __repr__(self) -> str:
        return f"TieredBackend({self.url!r}, cache={self.cache!r})"

    # -- uploading: start, flush, stop ----------------------------------------------------

    @property
    def uploading(self) -> bool:
        """Whether the uploader runs (between :meth:`start_uploads` and :meth:`close`)."""
        return bool(self._uploads.threads)

    def start_uploads(
        self, *, fence: Callable[[], None] | None = None, vouch: Vouch | None = None
    ) -> None:
        """Reconcile the cache with the remote and start uploading (see the module
        docstring); a second call does nothing.

        Call it only while holding the run's lock: :meth:`RunLock.acquire
        <ckptwise.store.lock.RunLock.acquire>` does, with ``fence`` its check that the lock
        is still held, which the uploader calls before each manifest upload and each
        remote deletion, and ``vouch`` the writing store's check of an object's bytes,
        which it calls before each object upload (see *Damage* in
        :mod:`~ckptwise.store.uploads`).

        Raises:
            StorageError: the cache cannot be written or is in use by another process, or
                the remote cannot be listed.
        """
        with self._cond:
            if self._closed:
                raise StorageError(f"{self!r} is closed; open a new one to upload")
            if self._uploads.threads:
                return
        self._folder.check_identity(create=True)
        self._folder.take_lock()
        try:
            self._folder.clear_debris()
            remote = {p for p in self.remote.list_files("") if tiered(p)}
            self._entries.load(self._folder.scan())
            with self._cond:
                for path, entry in list(self._entries.files.items()):
                    if not entry.uploaded or path in remote:
                        continue
                    if path.startswith(OBJECTS + "/"):
                        entry.uploaded = False  # a checkpoint in the cache may name it
                    else:
                        self.local.delete(path)  # deleted remotely since: stale
                        self._entries.forget(path)
                pending = [p for p, e in self._entries.files.items() if not e.uploaded]
                self._uploads.start(pending, remote, fence, self.uploaders, vouch)
        except BaseException:
            self._folder.release_lock()
            raise
        self._evict()

    def flush(self, timeout: timedelta | None = None) -> None:
        """Wait until every file written so far is uploaded and every deletion done.

        A stopped uploader (see *Failures* in :mod:`~ckptwise.store.uploads`) is first
        started again.

        Raises:
            StorageError: an upload failed after its retries (the error says which and why;
                the files stay in the cache for a later flush or writer), ``timeout`` passed
                first, or files wait while the uploader was never started (the run's lock is
                not held).
            RunLockedError: the lock was taken over; nothing more is uploaded.
        """
        self._uploads.flush(timeout)

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
            unregister(self)

    def detach(self) -> None:
        """Finish uploading for up to ``exit_timeout``, then stop, never raising: the run's
        lock is about to be released, after which this process must send nothing more.

        What could not be uploaded stays in the cache (logged); :meth:`start_uploads`
        (taking the lock again) resumes it.
        """
        if not self._uploads.threads:
            return
        try:
            self.flush(self.exit_timeout)
        except CheckpointError as exc:
            log.warning("releasing the run %s with uploads unfinished: %s", self.url, exc)
        finally:
            self._stop()

    def _stop(self) -> None:
        self._uploads.stop()
        self._folder.release_lock()

    def lock_backend(self) -> FsspecBackend:
        """The remote backend: a cached run is locked where it is kept for good."""
        return self.remote

    def check_fence(self) -> bool:
        """:meth:`raise_if_fenced`; always ``True``: the uploader checks the lock itself."""
        self.raise_if_fenced()
        return True

    def raise_if_fenced(self) -> None:
        """Raise the :class:`RunLockedError` the uploader met, if it found the lock taken
        over (what :meth:`RunLock.check <ckptwise.store.lock.RunLock.check>` reports for a
        tiered run, without a network call)."""
        with self._cond:
            if isinstance(self._uploads.halted, RunLockedError):
                raise self._uploads.stopped_error()

    @property
    def error(self) -> CheckpointError | None:
        """The failure that stopped the uploader, if it is stopped."""
        return self._uploads.halted

    @property
    def fatal_error(self) -> CheckpointError | None:
        """The failure that stopped the uploader for good (the run's lock was taken over),
        if any: nothing it holds unsent will be uploaded by this process."""
        with self._cond:
            return self._uploads.fatal

    def _evict(self) -> None:
        """Delete uploaded files from the cache, least recently used first, until it holds
        at most ``cache_bytes``."""
        with self._cond:
            self._evict_locked()

    def _evict_locked(self) -> None:
        """:meth:`_evict`, holding the lock."""
        self._entries.evict(self.cache_bytes, self._uploads.busy)

    def _writable(self) -> None:
        if self._closed:
            raise StorageError(f"{self!r} is closed; it reads, but writing needs a new backend")

    # -- the Backend protocol --------------------------------------------------------------

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        if not tiered(path):
            if path.startswith(PRUNING + "/"):
                self._uploads.unqueue_delete(path)
            return self.remote.write_atomic(path, chunks, sync=sync)
        self._writable()
        self._folder.check_identity(create=True)
        writing = self._entries.writing
        with self._cond:
            writing[path] += 1
        try:
            written = self.local.write_atomic(path, chunks, sync=sync)
        except BaseException:
            with self._cond:
                writing[path] -= 1
                if not writing[path]:
                    del writing[path]  # else drop_cached() would take the path as being written
            raise
        with self._cond:
            writing[path] -= 1
            if not writing[path]:
                del writing[path]
            self._entries.wrote(path, written)
            self._bypass.discard(path)
            self._uploads.enqueue(Op("put", path))
        return written

    def delete(self, path: str) -> None:
        if not tiered(path):
            with self._cond:
                if self._uploads.delete_later(path):
                    return
            self.remote.delete(path)
            return
        self._writable()
        with self._cond:
            self.local.delete(path)
            self._entries.forget(path)
            self._bypass.discard(path)
            if barrier(path):
                # the remote follows a decision the cache has made durable: a crash cannot
                # bring back here a manifest the remote no longer has
                self.local.sync_dirs([path.rpartition("/")[0]])
            self._uploads.enqueue(Op("delete", path))

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        self.local.sync_dirs([d for d in dirs if not d or d.split("/", 1)[0] in TIERED_DIRS])

    def _read(self, path: str, from_cache: Callable[[], T], from_remote: Callable[[], T]) -> T:
        """A read served by the cache when it can, else by the remote."""
        if not tiered(path):
            return from_remote()
        with self._cond:
            if self._uploads.hidden(path):
                raise CheckpointNotFoundError(f"{self.url}/{path} does not exist")
            entry = self._entries.files.get(path)
            writer = bool(self._uploads.threads)
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
                    if path in self._entries.files:
                        self._entries.files.move_to_end(path)
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

    def sizes(self, paths: Collection[str]) -> Sizes:
        """See :meth:`Backend.sizes <ckptwise.store.backend.Backend.sizes>`: a file the
        cache holds and has not uploaded is sized in the cache (it is the only copy); every
        other is asked of the remote in one batch, since the cache's copy of an uploaded file
        says nothing of the remote's (a lifecycle rule or a person may have deleted it). A
        file found missing remotely is no longer taken as uploaded. When the remote cannot
        be asked, the cache answers (logged), as it would without a remote."""
        out: Sizes = {}
        cached: list[str] = []
        remote: list[str] = []
        with self._cond:
            for path in paths:
                entry = self._entries.files.get(path)
                if tiered(path) and self._uploads.hidden(path):
                    out[path] = CheckpointNotFoundError(f"{self.url}/{path} does not exist")
                elif tiered(path) and entry is not None and not entry.uploaded:
                    cached.append(path)
                else:
                    remote.append(path)
        out.update(sizes_one_by_one(self.local, cached))
        if not remote:
            return out
        try:
            asked = self.remote.sizes(remote)
        except StorageError as exc:
            asked = dict.fromkeys(remote, exc)
        unasked = {p for p, size in asked.items() if isinstance(size, StorageError)}
        if unasked:
            # saves only need the cache: a remote out of reach must not make every reused
            # object look damaged (each save would then be a full one)
            log.warning(
                "could not ask %s whether %d reused file(s) are still there (%s); checked "
                "in the cache this time",
                self.url,
                len(unasked),
                next(iter(asked[p] for p in unasked)),
            )
            asked.update(sizes_one_by_one(self.local, unasked))
        with self._cond:
            known = self._uploads.remote_files
            for path, size in asked.items():
                missing = isinstance(size, CheckpointNotFoundError) and path not in unasked
                if missing and known is not None and not self._uploads.busy(path):
                    known.discard(path)
        out.update(asked)
        return out

    def exists(self, path: str) -> bool:
        if not tiered(path):
            return self.remote.exists(path)
        with self._cond:
            if self._uploads.hidden(path):
                return False
            remote_files = self._uploads.remote_files
            if remote_files is not None:
                return path in self._entries.files or path in remote_files
        return self.local.exists(path) or self.remote.exists(path)

    def list_files(self, prefix: str) -> list[str]:
        top = prefix.split("/", 1)[0]
        if prefix and top not in TIERED_DIRS:
            return self.remote.list_files(prefix)
        with self._cond:
            remote_files = self._uploads.remote_files
            writer = remote_files is not None
            if writer:
                assert remote_files is not None
                known = {p for p in remote_files if _under(p, prefix)}
        if not writer:
            # before uploading starts (a reader): the remote now, and what the cache holds
            # that is not uploaded (another process may be uploading it)
            found = set(self.remote.list_files(prefix))
            found.update(p for p in self.local.list_files(prefix) if self._folder.unsent(p))
        else:
            found = known
            if not prefix:
                found.update(p for p in self.remote.list_files("") if not tiered(p))
        with self._cond:
            if writer:  # a reader's view of the cache may be stale: not used
                found.update(p for p in self._entries.files if _under(p, prefix))
            return sorted(p for p in found if not self._uploads.hidden(p))

    def free_bytes(self) -> int | None:
        return self.local.free_bytes()

    def drop_cached(self, path: str) -> bool:
        """Read ``path`` from the remote from now on (its cached copy was found damaged);
        whether the remote has a copy to read. A copy not uploaded yet is the only one:
        it is kept, and ``False`` returned."""
        if not tiered(path):
            return False
        with self._cond:
            entry = self._entries.files.get(path)
            if self._uploads.threads:
                if entry is None or not entry.uploaded or path in self._entries.writing:
                    return False
                with contextlib.suppress(StorageError):
                    self.local.delete(path)
                self._entries.forget(path)
                assert self._uploads.remote_files is not None
                return path in self._uploads.remote_files
            if self._folder.unsent(path) or path in self._bypass:
                return False
            self._bypass.add(path)  # a reader leaves a writer's cache as it is
            return os.path.exists(self._folder.path(path))

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
            if path in self._uploads.parked:
                return LOCAL  # waits for an object dropped as damaged to be written again
            if self._uploads.threads or self._uploads.remote_files is not None:
                op = self._uploads.op(path)
                entry = self._entries.files.get(path)
                pending = (op is not None and op.kind == "put") or (
                    entry is not None and not entry.uploaded
                )
                if not pending:
                    return REMOTE
                return LOCAL if self._uploads.halted is not None else UPLOADING
        if not self._folder.unsent(path):
            return REMOTE
        return UPLOADING if self._folder.in_use() else LOCAL

    def objects_state(self, manifest: Manifest) -> UploadState:
        """Where the objects of ``manifest`` that this cache wrote are durable, as a reader
        sees them: ``"remote"`` unless the cache still holds one unsent (then
        ``"uploading"`` while its writer runs, else ``"local"``)."""
        if not any(self._folder.unsent(p) for p in _named(manifest)):
            return REMOTE
        return UPLOADING if self._folder.in_use() else LOCAL

    def upload_states(self) -> dict[int, UploadState]:
        """:meth:`upload_state` of every listed checkpoint, by step."""
        steps = (manifest_step(p) for p in self.list_files(CHECKPOINTS))
        return {s: self._state(manifest_path(s)) for s in sorted(x for x in steps if x is not None)}

    # -- several processes, one remote run (see ckptwise.distributed.confirm) ---------------

    def expect_confirmations(self) -> None:
        """Let the manifests this backend writes wait, without a warning, for objects other
        processes upload (rank 0 of a job of several, before :meth:`start_uploads`): each
        goes up once :meth:`confirm_step` says the others' objects are on the remote."""
        with self._cond:
            self._uploads.confirming = True

    def unsent_objects(self) -> set[str]:
        """The objects this cache holds that are not uploaded yet (queued, under way, or
        stopped by a failure)."""
        with self._cond:
            unsent = {
                p
                for p, e in self._entries.files.items()
                if p.startswith(OBJECTS + "/") and not e.uploaded
            }
            unsent.update(
                p
                for p, op in [*self._uploads.queue.items(), *self._uploads.inflight.items()]
                if op.kind == "put" and p.startswith(OBJECTS + "/")
            )
            return unsent

    def dropped_of(self, entries: Iterable[TensorEntry]) -> set[str]:
        """The objects ``entries`` need (delta bases included) that this cache dropped as
        damaged and no save wrote again: they will never be uploaded from here."""
        with self._cond:
            if not self._uploads.dropped:
                return set()
            needed = {object_path(e.object) for e in entries}
            needed.update(object_path(oid) for e in entries for oid, _, _ in e.bases)
            return needed & self._uploads.dropped

    def wait_sent(self, paths: set[str], timeout: float) -> bool | None:
        """Wait up to ``timeout`` seconds until every object of ``paths`` is uploaded;
        ``True`` once it is, ``False`` if some still wait, ``None`` if one was dropped as
        damaged (it never will be). A stopped uploader whose pause is over starts again."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._uploads.resume()
            while True:
                sent = self._uploads.sent(paths)
                left = deadline - time.monotonic()
                if sent is not False or left <= 0:
                    return sent
                self._cond.wait(left)

    def confirm_step(self, step: int) -> None:
        """Take every object the cached manifest of ``step`` names as on the remote (the
        processes that wrote them confirmed their uploads), which lets that manifest go up;
        nothing if it is no longer cached (deleted by retention meanwhile)."""
        path = manifest_path(step)
        try:
            manifest = decode_manifest(self.local.read_bytes(path), where=path, codecs=readable())
        except CheckpointError:
            return
        with self._cond:
            self._uploads.confirm(_named(manifest))

    def recheck_parked(self) -> None:
        """Ask the remote for the objects that the manifests not uploaded yet name (after a
        restart: other processes may have uploaded them since the remote was listed, or
        before they died) and take those it holds as there, releasing the manifests now
        whole. Manifests still queued or under way count too: one the uploader has not
        checked yet would otherwise be parked afterwards for objects the remote holds."""
        with self._cond:
            missing = set().union(*self._uploads.parked.values()) if self._uploads.parked else set()
            ops = [*self._uploads.queue.values(), *self._uploads.inflight.values()]
            unchecked = [
                op.path for op in ops if op.kind == "put" and manifest_step(op.path) is not None
            ]
        for path in unchecked:
            try:
                data = self.local.read_bytes(path)
                missing |= _named(decode_manifest(data, where=path, codecs=readable()))
            except (OSError, CheckpointError):
                continue  # rewritten or deleted meanwhile: its upload judges it
        with self._cond:
            missing -= self._uploads.remote_files or set()
        if not missing:
            return
        sizes = self.remote.sizes(missing)
        failed = [e for e in sizes.values() if isinstance(e, CheckpointError)]
        failed = [e for e in failed if not isinstance(e, CheckpointNotFoundError)]
        if failed:
            # "not there" must be known, never guessed: a manifest taken as waiting for
            # objects the bucket holds would be set aside as lost (see set_aside_parked)
            raise StorageError(
                f"could not ask {self.url} which objects of the waiting checkpoints it holds "
                f"({failed[0]}); they stay whole in the cache, for a restart to upload"
            )
        found = {p for p, size in sizes.items() if isinstance(size, int)}
        with self._cond:
            self._uploads.confirm(found)

    def set_aside_parked(self) -> list[int]:
        """Move the manifests still waiting for objects out of the cache's listing (into
        :attr:`set_aside_folder`) and return their steps.

        Rank 0 calls it once every rank's uploads are confirmed and the remote was asked
        (:meth:`recheck_parked`): an object a waiting manifest names is then neither on the
        remote nor unsent in any rank's cache (that rank's cache folder was lost, or the
        object was dropped as damaged), so the checkpoint can never go up, and no other
        rank can read it. Listed, it would be the newest checkpoint to rank 0 alone."""
        steps = []
        with self._cond:
            for path in sorted(p for p in self._uploads.parked if p in self._entries.files):
                del self._uploads.parked[path]
                self._folder.set_aside(path)
                self._entries.forget(path)
                step = manifest_step(path)
                if step is not None:
                    steps.append(step)
        return steps

    @property
    def set_aside_folder(self) -> str:
        """Where :meth:`set_aside_parked` moves manifests that can never be uploaded."""
        return os.path.join(self.cache, SET_ASIDE)

    def relist(self) -> None:
        """List the remote again (a process that does not write manifests, before it reads
        the checkpoints another process uploaded)."""
        listed = {p for p in self.remote.list_files("") if tiered(p)}
        with self._cond:
            if self._uploads.remote_files is not None:
                busy = {p for p in self._uploads.remote_files if self._uploads.busy(p)}
                self._uploads.remote_files = listed | busy

    @property
    def pending(self) -> int:
        """Remote operations waiting or under way."""
        with self._cond:
            return len(self._uploads.queue) + len(self._uploads.inflight)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the files the cache holds."""
        with self._cond:
            return self._entries.bytes


def _named(manifest: Manifest) -> set[str]:
    """The paths of every object ``manifest`` names, delta bases included."""
    named = {object_path(e.object) for e in manifest.entries()}
    named.update(object_path(oid) for e in manifest.entries() for oid, _, _ in e.bases)
    return named


def upload_states(backend: Backend) -> dict[int, UploadState] | None:
    """Each checkpoint's upload state when ``backend`` writes through a cache, else
    ``None`` (a plain local or remote run has nothing to report); the same as
    :meth:`CheckpointStore.upload_states <ckptwise.store.store.CheckpointStore.upload_states>`,
    which callers should prefer."""
    return backend.upload_states()
