"""The checkpoint store: content-addressed tensor objects plus one manifest per checkpoint.

:class:`CheckpointStore` is the one object the rest of ckptwise talks to; it composes the
store's parts, each in its own module:

- :mod:`~ckptwise.store.layout`: where files live, how tensors are viewed and addressed;
- :mod:`~ckptwise.store.index`: the committed manifests in memory, branches, garbage
  collection;
- :mod:`~ckptwise.store.reader`: objects back into tensors, verified;
- :mod:`~ckptwise.store.commit`: dedup, codecs, deltas and the atomic commit;
- :mod:`~ckptwise.store.runfile`: the run record (``run.json``), pin files, and the
  handshake between pinning and pruning;
- :mod:`~ckptwise.store.lock`: the writer's lock;
- the :class:`~ckptwise.store.backend.Backend` it is built on, whose upload calls it
  forwards (a run written through a cache uploads in the background).

Code outside the store reaches all of this through this class (open one with
:func:`open_store`) and the names ``ckptwise.store`` exports, never a submodule.

It is long because it is the store's whole door: each method is a few lines handing a call
to the part that owns it, with the docstring that callers outside the store read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ckptwise.errors import ConfigError
from ckptwise.records import CheckpointInfo
from ckptwise.store import runfile
from ckptwise.store.backend import Backend, UploadState
from ckptwise.store.branch import BranchBackend
from ckptwise.store.codecs import BYTEGROUP
from ckptwise.store.commit import RECHECK, CommitPlan, Committer, NewObject
from ckptwise.store.index import Index
from ckptwise.store.layout import CACHE_FILE, manifest_path
from ckptwise.store.local import LocalBackend
from ckptwise.store.lock import RunLock
from ckptwise.store.manifest import MAX_CHAIN, Manifest, TensorEntry
from ckptwise.store.open import open_backend
from ckptwise.store.planner import AUTO, DELTA_MODES, MODES, CodecPlanner
from ckptwise.store.reader import Problem, Reader

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["CheckpointStore", "RequestFiles", "is_cache_folder", "open_store"]

#: What is told how many bytes a save or restore has moved so far (from any thread).
Progress = Callable[[int], None]


class RequestFiles:
    """Request files (such as ``SAVE_NOW``) in the run folder of ``backend``: files a person
    creates to ask the writer for something, which the writer removes once answered."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        #: whether asking costs a network call (the monitor then asks less often)
        self.remote = not isinstance(backend, LocalBackend)

    def request_exists(self, name: str) -> bool:
        """Whether the request file ``name`` is there; raises :class:`StorageError`."""
        return self._backend.exists(name)

    def remove_request(self, name: str) -> None:
        """Remove the request file ``name`` (a missing one is no error)."""
        self._backend.delete(name)


def is_cache_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a cache folder a writer of a remote run was given as ``cache=``
    (it holds the cache's record)."""
    return os.path.isfile(os.path.join(os.fspath(path), CACHE_FILE))


def open_store(
    root: str | os.PathLike[str],
    *,
    cache: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    codec: str = "raw",
    deltas: int | None = None,
) -> CheckpointStore:
    """The store of the run at ``root`` (a folder or an fsspec URL); see
    :func:`~ckptwise.store.open.open_backend` for ``cache``, ``cache_bytes`` and
    ``storage_options``, and :class:`CheckpointStore` for ``codec`` and ``deltas``.

    Opening writes nothing; a writer takes :meth:`CheckpointStore.lock` before writing.

    Raises:
        ConfigError: a bad ``cache``, ``cache_bytes``, ``codec`` or ``deltas``.
        StorageError: the URL's filesystem cannot be opened.

    >>> store = open_store("runs/exp1")  # doctest: +SKIP
    """
    backend = open_backend(
        root, cache=cache, cache_bytes=cache_bytes, **dict(storage_options or {})
    )
    return CheckpointStore(backend, codec=codec, deltas=deltas)


class CheckpointStore:
    """Reads and writes the checkpoints of one run through a :class:`Backend`.

    ``codec`` is how new objects are stored: ``"auto"`` (compress where it makes saves
    faster, see :mod:`~ckptwise.store.planner`) or a lossless codec name. ``deltas=K``
    stores a tensor as the XOR against its value in the previous checkpoint when that is 10 %
    smaller, starting a whole keyframe before a chain would reach K objects; it needs
    ``codec="bytegroup"`` (every object is tried) or ``"auto"`` (float tensors of 64 KiB or
    more are tried, whatever codec their keyframe gets).

    ``recheck`` is how long an object this store has read back and hashed is reused without
    another full read (see :mod:`~ckptwise.store.commit`); a damaged one is written again
    from the live tensor.

    Raises:
        ConfigError: an unknown or lossy ``codec``, ``deltas`` it cannot store, or a
            negative ``recheck``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        codec: str = "raw",
        deltas: int | None = None,
        recheck: timedelta = RECHECK,
    ) -> None:
        if codec not in MODES:
            raise ConfigError(
                f"codec={codec!r} is unknown; choose {AUTO!r} (compress where it makes saves "
                f"faster) or one of {', '.join(sorted(MODES - {AUTO}))}"
            )
        if deltas is not None and (
            isinstance(deltas, bool) or not isinstance(deltas, int) or not 2 <= deltas <= MAX_CHAIN
        ):
            raise ConfigError(
                f"deltas={deltas!r}: give the keyframe interval K (2 to {MAX_CHAIN}): a restore "
                "then reads at most K objects per tensor; None stores every object whole"
            )
        if deltas is not None and codec not in DELTA_MODES:
            raise ConfigError(
                f"deltas={deltas} needs codec={BYTEGROUP!r} or {AUTO!r}, not {codec!r}: a delta "
                f"is stored byte-grouped; pass codec={BYTEGROUP!r}, or deltas=None"
            )
        if not isinstance(recheck, timedelta) or recheck < timedelta(0):
            raise ConfigError(
                f"recheck={recheck!r}: give a non-negative timedelta, e.g. "
                "timedelta(hours=1) (timedelta(0) reads every reused object on every save)"
            )
        self.backend = backend
        #: keyframe interval of delta chains, or None when deltas are off
        self.deltas = deltas
        self._codec = codec
        self._requests = RequestFiles(backend)
        self.planner = CodecPlanner(mode=codec, remote=self._requests.remote)
        self._index = Index(backend)
        self._reader = Reader(backend, self._index)
        self._committer = Committer(
            backend, self._index, self._reader, self.planner, deltas=deltas, recheck=recheck
        )
        self.refresh()

    @property
    def reads(self) -> int:
        """Object reads made through this store (restores read at most K per tensor)."""
        return self._reader.reads

    @property
    def broken(self) -> dict[str, str]:
        """Manifest paths that exist but could not be read, with the reason."""
        return self._index.broken

    @property
    def url(self) -> str:
        """Where the run lives: a local path or the URL it was opened with."""
        return self.backend.url

    @property
    def remote(self) -> bool:
        """Whether the run is reached through anything but a plain local folder (every
        look at it may then cost a network call)."""
        return self._requests.remote

    @property
    def local_root(self) -> str | None:
        """The run's folder when it is a plain local folder, else ``None``."""
        return self.backend.root if isinstance(self.backend, LocalBackend) else None

    def has_files(self) -> bool:
        """Whether the run's root holds any file at all (an empty or missing folder holds
        no run)."""
        return bool(self.backend.list_files(""))

    def manifest_path(self, step: int) -> str:
        """Where the manifest of ``step`` lives, relative to the run's root (whether or not
        it is committed)."""
        return manifest_path(step)

    def lock(self) -> RunLock:
        """A new :class:`~ckptwise.store.lock.RunLock` on this run, not yet taken: a writer
        calls its ``acquire()`` before writing (which starts a cached run's uploads, each
        object checked against its address before it leaves the machine)."""
        return RunLock(self.backend, vouch=self._committer.vouch)

    def branch(self, name: str) -> CheckpointStore:
        """A read-only store over the checkpoints of branch ``name`` (see
        :meth:`branches`), read as if they were a run's own; every write is refused.

        Raises:
            ConfigError: ``name`` cannot name a branch.
        """
        return CheckpointStore(BranchBackend(self.backend, name), codec=self._codec)

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the index from the committed manifests, and the branches."""
        self._index.refresh()
        self._index.branches()

    def follow(self, manifest: Manifest, kept: Iterable[int]) -> None:
        """Take in a checkpoint rank 0 committed and the steps it kept after pruning (see
        :meth:`Index.follow <ckptwise.store.index.Index.follow>`): how the other ranks of a
        job keep their view of the run current without listing it again."""
        self._index.follow(manifest, kept)

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return self._index.steps()

    def manifest(self, step: int) -> Manifest:
        """The manifest of a committed step; :class:`CheckpointNotFoundError` if none."""
        return self._index.manifest(step)

    def iter_manifests(self) -> Iterator[Manifest]:
        """Every committed manifest, oldest first, as of the call."""
        return iter(self._index.manifests())

    def info(self, step: int) -> CheckpointInfo:
        """The summary of a committed step that policies and listings use."""
        return self._index.info(step)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        with self._index.lock:
            return [self._index.info(s) for s in self._index.steps()]

    def read_tensor(
        self,
        entry: TensorEntry,
        *,
        step: int,
        name: str,
        into: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Load one tensor, verified: every byte read (and every delta base's) is checked
        against its content address, and a damaged object raises
        :class:`~ckptwise.errors.CorruptCheckpointError` naming ``step`` and ``name``; see
        :meth:`Reader.read_tensor <ckptwise.store.reader.Reader.read_tensor>` for ``into``.
        ``progress`` is told the tensor's bytes once checked."""
        return self._reader.read_tensor(entry, step=step, name=name, into=into, progress=progress)

    def load_tensors(
        self,
        step: int,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        entries: Mapping[str, TensorEntry] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor of a committed step (or ``entries`` of it), verified; see
        :meth:`Reader.load_tensors <ckptwise.store.reader.Reader.load_tensors>`."""
        return self._reader.load_tensors(step, into=into, entries=entries, progress=progress)

    def object_nbytes(self, entry: TensorEntry) -> int:
        """How many raw bytes the object of ``entry`` holds, without decoding or hashing
        it (a raw object is only sized, an encoded one's header read): a cheap check that
        the object can hold what its entry says, before a full read.

        Raises:
            CheckpointError: the object cannot be read, or its header is damaged.
        """
        return self._reader.object_nbytes(entry)

    def verify(self, steps: Iterable[int] | None = None) -> list[Problem]:
        """Check every object of the given steps (all by default); empty when all is well."""
        return self._reader.verify(steps)

    def object_bytes(self) -> dict[str, int]:
        """Stored size of every object a committed checkpoint references."""
        return self._index.object_bytes()

    def physical_bytes(self) -> int:
        """Bytes of all objects referenced by committed checkpoints (each counted once)."""
        return sum(self._index.object_bytes().values())

    # -- writing ---------------------------------------------------------------------------

    def commit(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        *,
        tree: Any = None,
        metrics: Mapping[str, float] | None = None,
        reasons: Iterable[str] = (),
        extra: Mapping[str, Any] | None = None,
        time: float | None = None,
        lossy: Iterable[str] = (),
        progress: Progress | None = None,
    ) -> CheckpointInfo:
        """Write a checkpoint: new objects first, then the manifest, atomically.

        Objects whose content is already referenced by a committed checkpoint are not
        written again. Replacing an existing step is allowed (the new manifest wins).
        Float tensors named in ``lossy`` are stored quantized (codec ``q8``); their entries
        then hold what they decode to, and the error in ``note``. ``progress`` (such as
        :meth:`Transfer.advance <ckptwise.report.Transfer.advance>`) is told the raw bytes
        done, reused ones included, from the writing threads.
        """
        manifest = self._committer.commit(
            step,
            tensors,
            tree=tree,
            metrics=metrics,
            reasons=reasons,
            extra=extra,
            time=time,
            lossy=lossy,
            progress=progress,
        )
        return self._index.info(manifest.step)

    # the same commit in phases, for several processes writing one checkpoint together

    def plan(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        rank: int = 0,
        progress: Progress | None = None,
    ) -> CommitPlan:
        """Hash ``tensors`` (rank ``rank``'s) and find the objects no committed checkpoint
        holds yet; ``progress`` is told the bytes that need no writing."""
        return self._committer.plan(tensors, rank=rank, progress=progress)

    def check_space(self, needed: int, *, files: int = 0) -> None:
        """Raise :class:`~ckptwise.errors.StorageError` unless ``needed`` bytes in ``files``
        new objects fit, with the margin of :func:`~ckptwise.store.commit.space_margin`."""
        self._committer.check_space(needed, files=files)

    def write_objects(
        self, new: Mapping[str, NewObject], *, progress: Progress | None = None
    ) -> dict[str, TensorEntry]:
        """Encode, write and sync new objects; returns each one's entry, by object id.
        ``progress`` is told each object's raw bytes once written."""
        return self._committer.write_objects(new, progress=progress)

    def publish(self, manifest: Manifest) -> CheckpointInfo:
        """Commit ``manifest``, whose objects must all be durable already."""
        self._committer.publish(manifest)
        return self._index.info(manifest.step)

    def known(self, oid: str) -> TensorEntry | None:
        """An entry of object ``oid`` if a committed checkpoint references it."""
        return self._index.known(oid)

    def delete(self, steps: Iterable[int]) -> None:
        """Delete committed checkpoints: manifests first, then objects no one references.

        Each step is either deleted or left whole, whatever fails; see :meth:`Index.delete`.
        """
        self._index.delete(steps)

    def unreferenced_bytes(self) -> tuple[int, int]:
        """How many objects no committed checkpoint or branch names, and their bytes on
        disk: debris of a save that failed or was interrupted (or one in progress), which
        the next writer's garbage collection removes. Changes nothing."""
        paths = self._index.unreferenced()
        sizes = self.backend.sizes(paths) if paths else {}
        return len(paths), sum(s for s in sizes.values() if isinstance(s, int))

    def collect_garbage(self) -> int:
        """Delete objects no manifest on disk references (branches' included); returns how
        many.

        Skipped (with a warning) while some manifest cannot be read, since its objects are
        unknown and a person may still want to rescue them; storage errors are logged, not
        raised.
        """
        return self._index.collect_garbage()

    # -- branches --------------------------------------------------------------------------

    def branches(self) -> dict[str, list[Manifest]]:
        """Checkpoints a rollback set aside (``branches/NAME/``), by branch name, oldest
        first; read from disk on each call."""
        return self._index.branches()

    def move_to_branch(self, steps: Iterable[int], name: str) -> None:
        """Move committed checkpoints off the main line into branch ``name``, keeping their
        objects; crash-safe (a crash leaves a step in both places, never in neither).

        Raises:
            ConfigError: ``name`` cannot name a folder.
            CheckpointNotFoundError: a step is not committed.
        """
        self._index.move_to_branch(steps, name)

    def delete_branch(self, name: str) -> None:
        """Delete branch ``name``, then the objects nothing else references.

        Raises:
            CheckpointNotFoundError: the run has no such branch.
        """
        self._index.delete_branch(name)

    def clean(self) -> int:
        """Remove debris a crash can leave: temporary files and unreferenced objects."""
        return self._index.clean()

    # -- run record ------------------------------------------------------------------------

    def kept(self) -> dict[int, list[str]]:
        """Why each step was kept by the writer's last retention decision (advisory: empty
        when ``run.json`` is absent or unreadable)."""
        return runfile.read_kept(self.backend)

    def record_kept(self, keep: Mapping[int, Sequence[str]]) -> None:
        """Record the writer's retention decision (why each step is kept) in ``run.json``;
        never raises (a record that cannot be written costs a warning)."""
        runfile.record_kept(self.backend, keep)

    # -- pins and the prune handshake (see :mod:`~ckptwise.store.runfile`) -----------------

    def pins(self) -> set[int]:
        """The pinned steps (kept whatever the retention policy says), read afresh."""
        return runfile.read_pins(self.backend)

    def pin(self, step: int) -> None:
        """Pin ``step`` until :meth:`unpin`; safe while a writer prunes: once this returns,
        the step is never deleted.

        Raises:
            CheckpointNotFoundError: ``step`` has no checkpoint, or the writer's retention
                is deleting it right now (the pin is taken back; pin a newer step).
        """
        runfile.pin(self.backend, step)

    def unpin(self, step: int) -> None:
        """Let the retention policy decide about ``step`` again (at the writer's next
        prune); unpinning a step that is not pinned does nothing."""
        runfile.unpin(self.backend, step)

    def unpin_moved(self, steps: Iterable[int]) -> list[int]:
        """Unpin those of ``steps`` that are pinned; returns them, in order.

        For checkpoints just moved to a branch: a pin belongs to the checkpoint, which the
        branch keeps, and must not pin the step number of the line trained from then on.
        """
        moved = sorted(self.pins() & set(steps))
        for step in moved:
            self.unpin(step)
        return moved

    def delete_unpinned(self, steps: Sequence[int]) -> set[int]:
        """The writer's side of the handshake with :meth:`pin`: delete those of ``steps``
        no one has pinned (as :meth:`delete` does); returns the steps kept because they
        were pinned meanwhile.

        Only the run's one writer calls this, holding :meth:`lock`.

        Raises:
            StorageError: a tombstone could not be written (then nothing is deleted).
        """
        return runfile.delete_unpinned(self.backend, steps, self.delete)

    def clear_tombstones(self) -> None:
        """Remove the tombstones a crashed writer left, which would make pinning those
        steps fail; the run's new writer calls this before its first prune. Never raises
        (a failure costs a warning)."""
        runfile.clear_tombstones(self.backend)

    # -- uploads (a run written through a local cache; nothing to do for others) -----------

    def upload_states(self) -> dict[int, UploadState] | None:
        """For a run written through a ``cache``: each checkpoint's upload state
        (``"local"``, ``"uploading"`` or ``"remote"``), by step; ``None`` for other runs."""
        return self.backend.upload_states()

    def flush_uploads(self, timeout: timedelta | None = None) -> None:
        """Block until every checkpoint committed so far is durable where the run is kept
        for good (returns at once for a run without a cache).

        Raises:
            StorageError: an upload failed after its retries, or ``timeout`` passed.
            RunLockedError: the lock was taken over; nothing more is uploaded.
        """
        self.backend.flush(timeout)

    def start_uploads(self) -> None:
        """Start a cached run's uploads without taking the run's lock: for a rank of a job
        whose rank 0 holds it (each object checked against its address before it leaves the
        machine, as under the lock). Nothing for a run without a cache."""
        self.backend.start_uploads(vouch=self._committer.vouch)

    def close(self) -> None:
        """Wait for every upload, then stop uploading (a no-op for a run without a cache);
        reads keep working. Call it before releasing the lock. Safe to call twice.

        Raises:
            StorageError: an upload failed; the files not uploaded stay in the cache for
                the next writer.
        """
        self.backend.close()

    # -- request files ---------------------------------------------------------------------

    def request_exists(self, name: str) -> bool:
        """Whether the request file ``name`` (such as ``SAVE_NOW``) is in the run folder."""
        return self._requests.request_exists(name)

    def remove_request(self, name: str) -> None:
        """Remove the request file ``name`` from the run folder, once answered."""
        self._requests.remove_request(name)
