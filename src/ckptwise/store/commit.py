"""The write path: dedup, codec choice, deltas, parallel object writes, atomic commit.

A commit writes and fsyncs every new object, then the manifest under a temporary name, then
renames it into place and syncs ``checkpoints/``: until that rename the checkpoint does not
exist, and anything else left by a crash is debris that :meth:`Index.clean` removes.

Whatever fails, a commit leaves its step in one of two states: committed (manifest in place,
every object durable, the index knowing it) or absent. When the rename may have happened but
the folder sync failed, the manifest is removed again and the folder synced; if even that
fails, the manifest stays, the index keeps it (so its objects stay referenced) and the error
says so. Garbage collection never deletes an object a manifest on disk names (see
:mod:`~ckptwise.store.index`), so no outcome leaves a manifest whose objects can vanish.

Dedup does not trust a stored object forever. A reused object's size is checked at every
save where the run keeps it for good, in one batch for all the save's reused objects (see
:meth:`Backend.sizes <ckptwise.store.backend.Backend.sizes>`: a stat each on a local disk, one
listing of ``objects/`` on a remote store, or a request each when there are a few; through a
cache the remote for every object already uploaded, the cache for the others). The first
time this store reuses an object it did not write itself, and whenever its last check is
older than ``recheck``, it is also read back and hashed (through a cache, from the cache's
copy while it has one). An object that fails is written again from the live tensor, whose
bytes hash to the same id, which repairs every older checkpoint that shares it too (a delta
object is rewritten whole, as its own keyframe). A delta whose base cannot be read back is
stored whole instead: a save never depends on damaged history.

It is long because dedup, the reuse checks, codec and delta choice and the atomic commit are
one sequence with one failure rule (committed or absent); the codec choice itself lives in
:mod:`~ckptwise.store.planner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time as _time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from ckptwise.store.backend import Backend, Sizes
from ckptwise.store.codecs import DELTA, LOSSLESS, Q8, Q8_CODEC, RAW, XOR_CODEC, get_codec
from ckptwise.store.index import Index
from ckptwise.store.layout import (
    CHECKPOINTS,
    OBJECTS,
    byte_view,
    manifest_path,
    object_dir,
    object_id,
    object_path,
    tensor_bytes,
)
from ckptwise.store.manifest import Manifest, TensorEntry, dtype_name, encode_manifest
from ckptwise.store.planner import ENCODING_BYTES, CodecPlanner
from ckptwise.store.reader import Reader

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "FILE_OVERHEAD",
    "MARGIN_SHARE",
    "MIN_MARGIN",
    "RECHECK",
    "WRITERS",
    "CommitPlan",
    "Committer",
    "Encoded",
    "NewObject",
    "ObjectUse",
    "space_margin",
]

log = logging.getLogger("ckptwise")

#: Threads encoding and writing the new objects of one commit.
WRITERS = 4
#: The space margin's share of a save's bytes, and its floor (see :func:`space_margin`).
MARGIN_SHARE = 0.02
MIN_MARGIN = 2**20
#: What one new file may take on disk beyond its bytes: one filesystem block.
FILE_OVERHEAD = 4096
#: How long a reused object, once read back and hashed by a store, is trusted without
#: another full read (its size is still checked at every save).
RECHECK = timedelta(hours=1)
#: A delta is kept only when it is this much smaller than the whole object.
DELTA_GAIN = 0.9

#: How a tensor of a checkpoint uses an object: (object id, dtype name, shape).
ObjectUse = tuple[str, str, tuple[int, ...]]


def space_margin(needed: int, files: int = 0) -> int:
    """Room a save of ``needed`` bytes in ``files`` new objects leaves free on the disk.

    ``needed`` counts raw bytes, which no lossless codec exceeds by more than a header, so
    the margin only has to hold what the save adds beyond them: a block of slack per file,
    the manifest (a few hundred bytes per tensor), ``run.json``, and the headers. 2 % of the
    save covers those with room to spare for any save of more than a few files, and at
    least 1 MiB keeps a small save from filling the disk to the last byte. It grows with the
    save instead of being flat (it was 64 MiB), so a volume with little free space still
    takes saves that fit.
    """
    return max(MIN_MARGIN, int(needed * MARGIN_SHARE)) + files * FILE_OVERHEAD


def _check_key(entry: TensorEntry) -> tuple[str, int, tuple[tuple[str, str, int], ...]]:
    """What must not change for a past check of an object to still hold."""
    return entry.codec, entry.stored_bytes, entry.bases


@dataclass(frozen=True)
class Encoded:
    """How one new object is stored: its bytes and what its manifest entry says of them."""

    data: bytes | memoryview
    codec: str
    note: str = ""
    #: for a delta, the entry of the object it is against
    base: TensorEntry | None = None

    @property
    def bases(self) -> tuple[tuple[str, str, int], ...]:
        """The manifest's ``bases`` for this object: the base and the base's own chain."""
        if self.base is None:
            return ()
        return ((self.base.object, self.base.codec, self.base.stored_bytes), *self.base.bases)


@dataclass(frozen=True)
class NewObject:
    """An object this commit writes: its content and how the planner wants it stored."""

    raw: memoryview
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    codec: str
    note: str
    #: the previous checkpoint's entry for the same tensor, to try a delta against
    base: TensorEntry | None = None
    #: the stored form when it was made while planning (lossy objects)
    encoded: Encoded | None = None


class _Budget:
    """At most ``cap`` units held at once by all threads together; one holder may exceed it
    alone (an object larger than the cap encodes by itself, never waits forever)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._held = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        if amount <= 0:
            yield
            return
        with self._free:
            self._free.wait_for(lambda: self._held == 0 or self._held + amount <= self._cap)
            self._held += amount
        try:
            yield
        finally:
            with self._free:
                self._held -= amount
                self._free.notify_all()


@dataclass(frozen=True)
class CommitPlan:
    """What one process's tensors need: how each name uses an object (id, dtype, shape),
    the entries of objects a committed checkpoint already holds, and the objects to write."""

    names: dict[str, ObjectUse]
    reused: dict[str, TensorEntry]
    new: dict[str, NewObject]

    @property
    def new_bytes(self) -> int:
        """Raw bytes of the objects to write (an upper bound of what they take on disk)."""
        return sum(len(job.raw) for job in self.new.values())

    def entries(self, written: Mapping[str, TensorEntry]) -> dict[str, TensorEntry]:
        """Each name's manifest entry, given the entries of the objects written for it."""
        return {
            name: dataclasses.replace(
                written.get(oid) or self.reused[oid], dtype=dtype, shape=shape
            )
            for name, (oid, dtype, shape) in self.names.items()
        }


class Committer:
    """Writes the checkpoints of one run (see the module docstring for the protocol)."""

    def __init__(
        self,
        backend: Backend,
        index: Index,
        reader: Reader,
        planner: CodecPlanner,
        *,
        deltas: int | None,
        recheck: timedelta = RECHECK,
    ) -> None:
        self.backend = backend
        self.index = index
        self.reader = reader
        self.planner = planner
        self.deltas = deltas
        self.recheck = recheck
        #: when this store last read back and hashed an object (or wrote it), and the
        #: entry it checked it as
        self._checked: dict[str, tuple[float, tuple[Any, ...]]] = {}
        #: the entries of objects written but not yet named by a published manifest, for
        #: :meth:`vouch` (an object may be uploaded before its manifest is committed)
        self._writing: dict[str, TensorEntry] = {}

    def vouch(self, path: str, file: str) -> None:
        """Check that the local ``file`` holds the object ``path`` names, as the entry this
        store wrote it with or a committed checkpoint names it with records: what a cache's
        uploader asks before the object leaves the machine (see
        :meth:`Backend.start_uploads <ckptwise.store.backend.Backend.start_uploads>`). An
        object no checkpoint names and this store did not write (debris of a writer killed
        before its commit) has nothing to be checked against, and passes.

        Raises:
            CorruptCheckpointError: it does not.
            StorageError: ``file``, or a delta's base, cannot be read.
        """
        oid = path.rpartition("/")[2]
        entry = self._writing.get(oid) or self.index.known(oid)
        if entry is not None:
            self.reader.check_file(entry, file)

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
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Write a checkpoint: new objects first, then the manifest, atomically.

        Float tensors named in ``lossy`` are stored quantized (codec ``q8``); their entries
        then hold what they decode to, and the error in ``note``. ``progress`` is told the
        raw bytes done as they are done (see :meth:`plan` and :meth:`write_objects`).
        """
        plan = self.plan(tensors, lossy=lossy, progress=progress)
        self.check_space(plan.new_bytes, files=len(plan.new))
        written = self.write_objects(plan.new, progress=progress)
        return self.publish(
            Manifest(
                step=step,
                time=_time.time() if time is None else time,
                tensors=plan.entries(written),
                tree=tree,
                metrics=dict(metrics or {}),
                reasons=tuple(reasons),
                extra=dict(extra or {}),
                written_bytes=sum(e.stored_bytes for e in written.values()),
            )
        )

    def publish(self, manifest: Manifest) -> Manifest:
        """Commit ``manifest`` (whose objects are durable): write it under a temporary name,
        sync, rename it into place, sync ``checkpoints/``, and add it to the index.

        Raises:
            StorageError: the step was not committed, or (the message says which) its
                manifest is in place but could not be made durable nor removed; it is then
                kept, with its objects.
        """
        path = manifest_path(manifest.step)
        data = encode_manifest(manifest)
        try:
            self.backend.write_atomic(path, [data])
            self.backend.sync_dirs([CHECKPOINTS])
        except CheckpointError as exc:
            self._settle(manifest, path, data, exc)
        self.index.publish(manifest)
        for entry in manifest.entries():
            self._writing.pop(entry.object, None)  # the index knows it now
        return manifest

    def _settle(self, manifest: Manifest, path: str, data: bytes, error: Exception) -> NoReturn:
        """After a failed publish, leave ``manifest.step`` committed or absent, then raise."""
        step = manifest.step
        replacing = step in self.index.steps()
        try:
            in_place: bool | None = self.backend.read_bytes(path) == data
        except CheckpointNotFoundError:
            in_place = False
        except CheckpointError:
            in_place = None  # cannot tell
        if in_place is False:
            raise StorageError(
                f"could not save step {step}: {error}. Its manifest {path} was not committed "
                "and the run is as before; free space or fix the disk, then save again"
            ) from error
        if in_place is None and replacing:
            # removing the file could remove the step's earlier checkpoint: keep both sets
            # of objects instead, whichever manifest is there
            self.index.hold(manifest)
            raise StorageError(
                f"could not save step {step} again: {error}. Whether {path} holds the new or "
                "the earlier checkpoint of that step cannot be read back; the objects of both "
                "are kept. Check the disk, then run `ckptwise verify`"
            ) from error
        try:
            self.backend.delete(path)
            self.backend.sync_dirs([CHECKPOINTS])
        except CheckpointError as undo:
            self.index.publish(manifest)  # it may be there: its objects must stay
            raise StorageError(
                f"step {step}'s manifest {path} is in place but could not be made durable "
                f"({error}) nor removed ({undo}). The checkpoint is kept, with all its "
                "objects, but may not survive a crash: check the disk, then run "
                "`ckptwise verify`"
            ) from error
        if replacing:
            self.index.forget(step)  # the rename had replaced the earlier manifest
            log.warning("step %d's earlier checkpoint was replaced, then removed", step)
        raise StorageError(
            f"could not make step {step}'s manifest {path} durable: {error}. It was removed "
            "again, so the step was not saved; free space or fix the disk, then save again"
        ) from error

    def plan(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        lossy: Iterable[str] = (),
        rank: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> CommitPlan:
        """Hash every tensor and find which objects are new (see :class:`CommitPlan`).

        Float tensors named in ``lossy`` are planned quantized (codec ``q8``). Deltas are
        tried against rank ``rank``'s tensors of the previous checkpoint. ``progress`` is
        told the raw bytes that need no writing (reused objects and repeats).
        """
        quantize = set(lossy)
        latest = self.index.latest()
        previous = None if latest is None else latest.view(rank if rank < latest.world_size else 0)
        names: dict[str, ObjectUse] = {}
        reused: dict[str, TensorEntry] = {}
        new: dict[str, NewObject] = {}
        # first every tensor's id, so that the objects to reuse are checked in one batch
        hashed: list[tuple[str, torch.Tensor, str, memoryview | None, Encoded | None]] = []
        for name, tensor in tensors.items():
            oid, raw, encoded = self._address(tensor, quantize=name in quantize)
            names[name] = (oid, dtype_name(tensor.dtype), tuple(tensor.shape))
            # a reused object's bytes are not kept meanwhile (a GPU tensor's are a copy)
            stored = self.index.known(oid) is not None
            hashed.append((name, tensor, oid, None if stored else raw, encoded))
        sizes = self._sizes({oid for _, _, oid, raw, _ in hashed if raw is None})
        for name, tensor, oid, kept, encoded in hashed:
            if oid in reused or oid in new:
                continue
            dtype, shape = names[name][1:]
            itemsize = tensor.dtype.itemsize
            known = self.index.known(oid)
            if (
                known is not None
                and kept is None
                and self._still_good(known, name, sizes[object_path(oid)])
            ):
                reused[oid] = known
                continue
            if kept is None:  # a damaged object: its bytes again, to write it anew
                _, raw, encoded = self._address(tensor, quantize=name in quantize)
            else:
                raw = kept
            if encoded is not None:
                new[oid] = NewObject(raw, dtype, shape, itemsize, Q8, encoded.note, encoded=encoded)
            elif known is not None:
                # a damaged object, rewritten whole: in its own codec unless that was a delta
                if known.codec in LOSSLESS:
                    codec, note = known.codec, known.note
                else:
                    codec, note = self.planner.choose(tensor.dtype, len(raw))
                new[oid] = NewObject(raw, dtype, shape, itemsize, codec, note)
            else:
                codec, note = self.planner.choose(tensor.dtype, len(raw))
                base = None
                if previous is not None and self.planner.tries_delta(tensor.dtype, len(raw)):
                    base = self._delta_base(previous.get(name), dtype, shape)
                new[oid] = NewObject(raw, dtype, shape, itemsize, codec, note, base)
        # what needs no writing is done as far as the progress of the save goes (writes
        # count the rest)
        if progress is not None:
            progress(
                sum(t.nbytes for t in tensors.values()) - sum(len(j.raw) for j in new.values())
            )
        return CommitPlan(names, reused, new)

    @staticmethod
    def _address(tensor: torch.Tensor, *, quantize: bool) -> tuple[str, memoryview, Encoded | None]:
        """A tensor's object id, raw bytes, and stored form when planning makes it (a float
        tensor stored quantized, ``quantize``)."""
        if quantize and tensor.is_floating_point() and tensor.numel():
            quantized = Q8_CODEC.quantize(tensor)
            raw = quantized.decoded
            return object_id(raw), raw, Encoded(quantized.stored, Q8, quantized.note)
        raw = tensor_bytes(tensor)
        return object_id(raw), raw, None

    def _sizes(self, oids: Iterable[str]) -> Sizes:
        """The stored size of each object of ``oids`` (or why it is unknown), by path, in
        one batch (see :meth:`Backend.sizes <ckptwise.store.backend.Backend.sizes>`)."""
        paths = [object_path(oid) for oid in oids]
        if not paths:
            return {}
        try:
            return self.backend.sizes(paths)
        except StorageError as exc:
            failed: Sizes = {}
            for path in paths:
                failed[path] = exc
            return failed

    def _still_good(self, known: TensorEntry, name: str, size: int | CheckpointError) -> bool:
        """Whether a stored object may be reused as it is (see the module docstring), given
        its stored ``size`` (or the error asking for it raised).

        Logs a warning naming the object and ``name`` when it may not.
        """
        oid = known.object
        now = _time.monotonic()
        last = self._checked.get(oid)
        due = (
            last is None
            or last[1] != _check_key(known)
            or now - last[0] >= self.recheck.total_seconds()
        )
        try:
            if isinstance(size, CheckpointError):
                raise size
            if size != known.stored_bytes:
                raise CorruptCheckpointError(f"holds {size} bytes, not {known.stored_bytes}")
            if due:
                self.reader.read_raw(known)
                self._checked[oid] = (now, _check_key(known))
            return True
        except CheckpointNotFoundError:
            problem = "is missing"
        except CorruptCheckpointError as exc:
            problem = f"is damaged ({exc})"
        except StorageError as exc:
            if known.codec == DELTA:
                # rewriting it whole would break the checkpoints that read it as a delta,
                # and an unreadable disk is not proof of damage
                log.warning(
                    "object %s of tensor %r could not be checked (%s); reusing it unchecked",
                    oid,
                    name,
                    exc,
                )
                return True
            problem = f"could not be checked ({exc})"
        log.warning(
            "object %s of tensor %r %s; writing it again from the live tensor, which repairs "
            "every checkpoint that shares it",
            oid,
            name,
            problem,
        )
        self._checked.pop(oid, None)
        return False

    def _delta_base(
        self, prior: TensorEntry | None, dtype: str, shape: tuple[int, ...]
    ) -> TensorEntry | None:
        """The entry a new object may be stored as a delta against, if deltas are on."""
        if (
            self.deltas is None
            or prior is None
            or prior.dtype != dtype
            or prior.shape != shape
            or len(prior.bases) + 1 >= self.deltas  # the chain would outgrow K: keyframe
        ):
            return None
        return prior

    def check_space(self, needed: int, *, files: int = 0) -> None:
        """Raise :class:`StorageError` unless ``needed`` bytes in ``files`` new objects, and
        the :func:`space_margin`, fit."""
        free = self.backend.free_bytes()
        margin = space_margin(needed, files)
        if free is not None and needed + margin > free:
            raise StorageError(
                f"not enough free space in {self.backend.url}: this save needs up to "
                f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free, keeping "
                f"{margin / 2**20:.1f} MiB spare ({MARGIN_SHARE:.0%} of the save, at least "
                f"{MIN_MARGIN / 2**20:.0f} MiB, plus {FILE_OVERHEAD // 1024} KiB per new "
                "file). Nothing was written; free space, or keep fewer checkpoints (e.g. "
                "keep=cw.keep_last(2) or cw.keep_budget(...))"
            )

    def write_objects(
        self, new: Mapping[str, NewObject], *, progress: Callable[[int], None] | None = None
    ) -> dict[str, TensorEntry]:
        """Encode and write new objects, then sync; returns the entry of each, by id.

        ``progress`` is told each object's raw bytes once written, from the writing threads.
        """
        written: dict[str, TensorEntry] = {}
        if not new:
            return written
        started = _time.perf_counter()
        encode_seconds = 0.0

        budget = _Budget(ENCODING_BYTES)

        def write(oid: str, job: NewObject) -> None:
            nonlocal encode_seconds
            held = 0 if job.codec == RAW and job.base is None else len(job.raw)
            with budget.hold(held):
                t0 = _time.perf_counter()
                encoded = self._encode(oid, job)
                encode_seconds += _time.perf_counter() - t0
                self._write_encoded(oid, job, encoded, progress, written)

        if len(new) == 1:
            for oid, job in new.items():
                write(oid, job)
        else:
            try:
                with ThreadPoolExecutor(WRITERS, thread_name_prefix="ckptwise-io") as pool:
                    list(pool.map(write, new.keys(), new.values()))
            except RuntimeError:
                # the interpreter is shutting down and refuses new threads: finish the
                # save in flight on this thread (only objects not yet written are redone)
                for oid, job in new.items():
                    if oid not in written:
                        write(oid, job)
        self.backend.sync_dirs({object_dir(oid) for oid in new} | {OBJECTS})
        elapsed = _time.perf_counter() - started - encode_seconds / WRITERS
        self.planner.observed_write(sum(e.stored_bytes for e in written.values()), elapsed)
        return written

    def _write_encoded(
        self,
        oid: str,
        job: NewObject,
        encoded: Encoded,
        progress: Callable[[int], None] | None,
        written: dict[str, TensorEntry],
    ) -> None:
        """Write one encoded object and record its entry (see :meth:`write_objects`)."""
        self._writing[oid] = TensorEntry(
            object=oid,
            dtype=job.dtype,
            shape=job.shape,
            nbytes=len(job.raw),
            codec=encoded.codec,
            stored_bytes=memoryview(encoded.data).nbytes,
            note=encoded.note,
            bases=encoded.bases,
        )
        stored = self.backend.write_atomic(object_path(oid), [encoded.data])
        if progress is not None:
            progress(len(job.raw))
        entry = TensorEntry(
            object=oid,
            dtype=job.dtype,
            shape=job.shape,
            nbytes=len(job.raw),
            codec=encoded.codec,
            stored_bytes=stored,
            note=encoded.note,
            bases=encoded.bases,
        )
        written[oid] = entry
        # written from bytes that hash to its id: as good as a check
        self._checked[oid] = (_time.monotonic(), _check_key(entry))

    def _encode(self, oid: str, job: NewObject) -> Encoded:
        """The stored form of a new object: a delta when it beats the whole object by 10 %."""
        if job.encoded is not None:
            return job.encoded
        t0 = _time.perf_counter()
        whole = get_codec(job.codec).encode(job.raw, itemsize=job.itemsize)
        if job.codec != RAW:
            spent = _time.perf_counter() - t0
            self.planner.observed_encode(job.itemsize, len(job.raw), len(whole), spent)
        if job.base is None:
            return Encoded(whole, job.codec, job.note)
        try:
            base = byte_view(self.reader.read_raw(job.base))
        except CheckpointError as exc:
            log.warning(
                "object %s, the base for a delta, cannot be read back (%s); storing the new "
                "object %s whole instead",
                job.base.object,
                exc,
                oid,
            )
            return Encoded(whole, job.codec, job.note)
        delta = XOR_CODEC.encode(job.raw, base=base, itemsize=job.itemsize)
        if len(delta) >= DELTA_GAIN * len(whole):
            return Encoded(whole, job.codec, job.note)
        note = (
            f"delta against the previous checkpoint: {len(job.raw) / len(delta):.2f}x, "
            f"whole {len(job.raw) / len(whole):.2f}x"
        )
        return Encoded(delta, DELTA, note, job.base)
