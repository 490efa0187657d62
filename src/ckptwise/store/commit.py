"""The write path: dedup, codec choice, deltas, parallel object writes, atomic commit.

A commit writes and fsyncs every new object, then the manifest under a temporary name, then
renames it into place: until that rename the checkpoint does not exist, and anything else
left by a crash is debris that :meth:`Index.clean` removes. An object already referenced by
a committed checkpoint is never written again.
"""

from __future__ import annotations

import dataclasses
import time as _time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckptwise.errors import StorageError
from ckptwise.store.backend import Backend
from ckptwise.store.codecs import DELTA, Q8, Q8_CODEC, RAW, XOR_CODEC, get_codec
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
from ckptwise.store.planner import CodecPlanner
from ckptwise.store.reader import Reader

__all__ = [
    "SPACE_MARGIN",
    "WRITERS",
    "CommitPlan",
    "Committer",
    "Encoded",
    "NewObject",
    "ObjectUse",
]

#: Threads encoding and writing the new objects of one commit.
WRITERS = 4
#: Room left free on the disk after a save, for the manifest and everything else.
SPACE_MARGIN = 64 * 2**20
#: A delta is kept only when it is this much smaller than the whole object.
DELTA_GAIN = 0.9

#: How a tensor of a checkpoint uses an object: (object id, dtype name, shape).
ObjectUse = tuple[str, str, tuple[int, ...]]


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
    ) -> None:
        self.backend = backend
        self.index = index
        self.reader = reader
        self.planner = planner
        self.deltas = deltas

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
    ) -> Manifest:
        """Write a checkpoint: new objects first, then the manifest, atomically.

        Float tensors named in ``lossy`` are stored quantized (codec ``q8``); their entries
        then hold what they decode to, and the error in ``note``.
        """
        plan = self.plan(tensors, lossy=lossy)
        self.check_space(plan.new_bytes)
        written = self.write_objects(plan.new)
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
        sync, rename it into place, and add it to the index."""
        self.backend.write_atomic(manifest_path(manifest.step), [encode_manifest(manifest)])
        self.backend.sync_dirs([CHECKPOINTS])
        self.index.publish(manifest)
        return manifest

    def plan(
        self, tensors: Mapping[str, torch.Tensor], *, lossy: Iterable[str] = (), rank: int = 0
    ) -> CommitPlan:
        """Hash every tensor and find which objects are new (see :class:`CommitPlan`).

        Float tensors named in ``lossy`` are planned quantized (codec ``q8``). Deltas are
        tried against rank ``rank``'s tensors of the previous checkpoint.
        """
        quantize = set(lossy)
        latest = self.index.latest()
        previous = None if latest is None else latest.view(rank if rank < latest.world_size else 0)
        names: dict[str, ObjectUse] = {}
        reused: dict[str, TensorEntry] = {}
        new: dict[str, NewObject] = {}
        for name, tensor in tensors.items():
            dtype, shape = dtype_name(tensor.dtype), tuple(tensor.shape)
            itemsize = tensor.dtype.itemsize
            if name in quantize and tensor.is_floating_point() and tensor.numel():
                quantized = Q8_CODEC.quantize(tensor)
                raw = quantized.decoded
                encoded: Encoded | None = Encoded(quantized.stored, Q8, quantized.note)
            else:
                raw, encoded = tensor_bytes(tensor), None
            oid = object_id(raw)
            names[name] = (oid, dtype, shape)
            if oid in reused or oid in new:
                continue
            known = self.index.known(oid)
            if known is not None:
                reused[oid] = known
            elif encoded is not None:
                new[oid] = NewObject(raw, dtype, shape, itemsize, Q8, encoded.note, encoded=encoded)
            else:
                codec, note = self.planner.choose(tensor.dtype, len(raw))
                base = None
                if previous is not None and self.planner.tries_delta(tensor.dtype, len(raw)):
                    base = self._delta_base(previous.get(name), dtype, shape)
                new[oid] = NewObject(raw, dtype, shape, itemsize, codec, note, base)
        return CommitPlan(names, reused, new)

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

    def check_space(self, needed: int) -> None:
        """Raise :class:`StorageError` unless ``needed`` bytes (and a margin) fit."""
        free = self.backend.free_bytes()
        if free is not None and needed + SPACE_MARGIN > free:
            raise StorageError(
                f"not enough free space in {self.backend.url}: this save needs up to "
                f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free (keeping "
                f"{SPACE_MARGIN / 2**20:.0f} MiB spare). Nothing was written; free space, or "
                "keep fewer checkpoints (e.g. keep=cw.keep_last(2) or cw.keep_budget(...))"
            )

    def write_objects(self, new: Mapping[str, NewObject]) -> dict[str, TensorEntry]:
        """Encode and write new objects, then sync; returns the entry of each, by id."""
        written: dict[str, TensorEntry] = {}
        if not new:
            return written
        started = _time.perf_counter()
        encode_seconds = 0.0

        def write(oid: str, job: NewObject) -> None:
            nonlocal encode_seconds
            t0 = _time.perf_counter()
            encoded = self._encode(job)
            encode_seconds += _time.perf_counter() - t0
            stored = self.backend.write_atomic(object_path(oid), [encoded.data])
            written[oid] = TensorEntry(
                object=oid,
                dtype=job.dtype,
                shape=job.shape,
                nbytes=len(job.raw),
                codec=encoded.codec,
                stored_bytes=stored,
                note=encoded.note,
                bases=encoded.bases,
            )

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

    def _encode(self, job: NewObject) -> Encoded:
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
        base = byte_view(self.reader.read_raw(job.base))
        delta = XOR_CODEC.encode(job.raw, base=base, itemsize=job.itemsize)
        if len(delta) >= DELTA_GAIN * len(whole):
            return Encoded(whole, job.codec, job.note)
        note = (
            f"delta against the previous checkpoint: {len(job.raw) / len(delta):.2f}x, "
            f"whole {len(job.raw) / len(whole):.2f}x"
        )
        return Encoded(delta, DELTA, note, job.base)
