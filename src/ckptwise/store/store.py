"""The checkpoint store: content-addressed tensor objects plus one manifest per checkpoint.

Layout of a run folder (see ``docs/FORMAT.md``)::

    RUN/ckptwise.lock                   the writer's lock
    RUN/run.json                        pins and the last retention decision
    RUN/checkpoints/000000001000.json   a committed checkpoint's manifest
    RUN/objects/ab/ab12...ef            a tensor's bytes, named by their BLAKE3 digest

A commit writes and fsyncs every new object, then the manifest under a temporary name, then
renames it into place: until that rename the checkpoint does not exist, and anything else
left by a crash is debris that :meth:`CheckpointStore.clean` removes. An object already
referenced by a committed checkpoint is never written again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import threading
import time as _time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import blake3
import numpy as np
import torch

from ckptwise.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatError,
    StorageError,
)
from ckptwise.records import CheckpointInfo
from ckptwise.store.backend import TMP_MARK, Backend, LocalBackend
from ckptwise.store.codecs import CODECS, ByteGroupedCodec, get_codec
from ckptwise.store.manifest import (
    DELTA_CODEC,
    DTYPES,
    MAX_CHAIN,
    Manifest,
    TensorEntry,
    decode_manifest,
    dtype_name,
    encode_manifest,
)
from ckptwise.store.planner import CodecPlanner

__all__ = ["CheckpointStore", "Problem", "object_id", "tensor_bytes"]

log = logging.getLogger("ckptwise")

CHECKPOINTS = "checkpoints"
OBJECTS = "objects"
RUN_FILE = "run.json"
_MANIFEST_NAME = re.compile(r"^checkpoints/(\d+)\.json$")
_WRITERS = 4
#: Room left free on the disk after a save, for the manifest and everything else.
SPACE_MARGIN = 64 * 2**20

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("ckptwise's on-disk format is little-endian; this machine is big-endian")


def manifest_path(step: int) -> str:
    return f"{CHECKPOINTS}/{step:012d}.json"


def object_path(oid: str) -> str:
    return f"{OBJECTS}/{oid[:2]}/{oid}"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of ``tensor``'s values in C order, copying only when needed."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous().reshape(-1)
    return _byte_view(t.view(torch.uint8))


def _byte_view(flat_u8: torch.Tensor) -> memoryview:
    """A writable byte view sharing memory with a flat uint8 CPU tensor."""
    array: Any = flat_u8.numpy()
    return memoryview(array).cast("B")


def object_id(raw: memoryview) -> str:
    """The content address (BLAKE3 hex digest) of raw tensor bytes."""
    # fan out over all cores only on the caller's (training) thread: a background save
    # hashing with every core would take them from training
    wide = len(raw) > 1 << 24 and threading.current_thread() is threading.main_thread()
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if wide else blake3.blake3()
    hasher.update(raw)
    return str(hasher.hexdigest())


@dataclass(frozen=True)
class Problem:
    """One thing :meth:`CheckpointStore.verify` found wrong."""

    step: int | None
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = "run" if self.step is None else f"step {self.step}"
        if self.tensor:
            where += f", tensor {self.tensor!r}"
        return f"{where}: {self.message}"


class CheckpointStore:
    """Reads and writes the checkpoints of one run through a :class:`Backend`.

    The store keeps an index of committed manifests (refreshed by :meth:`refresh`) so that
    dedup and garbage collection need no listing of objects on the hot path.
    """

    def __init__(self, backend: Backend, *, codec: str = "raw", deltas: int | None = None) -> None:
        if not CodecPlanner.known(codec):
            raise ConfigError(
                f"codec={codec!r} is unknown; choose 'auto' (compress where it makes saves "
                f"faster) or one of {', '.join(sorted(c for c in CODECS if CodecPlanner.known(c)))}"
            )
        if deltas is not None and (
            isinstance(deltas, bool) or not isinstance(deltas, int) or not 2 <= deltas <= MAX_CHAIN
        ):
            raise ConfigError(
                f"deltas={deltas!r}: give the keyframe interval K (2 to {MAX_CHAIN}): a restore "
                "then reads at most K objects per tensor; None stores every object whole"
            )
        self.backend = backend
        #: keyframe interval of delta chains, or None when deltas are off
        self.deltas = deltas
        #: object reads made through this store (restores read at most K per tensor)
        self.reads = 0
        self.planner = CodecPlanner(mode=codec, remote=not isinstance(backend, LocalBackend))
        # the index is read by the training thread while a background writer updates it
        self._lock = threading.RLock()
        self._manifests: dict[int, Manifest] = {}
        self._refs: dict[str, set[int]] = {}
        self._entries: dict[str, TensorEntry] = {}
        #: manifest paths that exist but could not be read, with the reason
        self.broken: dict[str, str] = {}
        self.refresh()

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the index from the committed manifests."""
        with self._lock:
            self._manifests.clear()
            self._refs.clear()
            self._entries.clear()
            self.broken.clear()
            for path in self.backend.list_files(CHECKPOINTS):
                match = _MANIFEST_NAME.match(path)
                if not match:
                    continue
                try:
                    manifest = self._read_manifest(path)
                    if manifest.step != int(match.group(1)):
                        raise FormatError(f"manifest {path} says step {manifest.step}")
                except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                    self.broken[path] = str(exc)
                    continue
                self._index(manifest)

    def _read_manifest(self, path: str) -> Manifest:
        return decode_manifest(
            self.backend.read_bytes(path), where=path, codecs=frozenset(CODECS) | {DELTA_CODEC}
        )

    @staticmethod
    def _objects_of(entry: TensorEntry) -> Iterable[tuple[str, TensorEntry]]:
        """The object of ``entry`` and every object its delta chain needs."""
        yield entry.object, entry
        for i, (oid, _, _) in enumerate(entry.bases):
            yield oid, entry.ancestor(i)

    def _index(self, manifest: Manifest) -> None:
        self._manifests[manifest.step] = manifest
        for entry in manifest.tensors.values():
            for oid, described in self._objects_of(entry):
                self._refs.setdefault(oid, set()).add(manifest.step)
                self._entries.setdefault(oid, described)

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        with self._lock:
            return sorted(self._manifests)

    def manifest(self, step: int) -> Manifest:
        """The manifest of a committed step."""
        with self._lock:
            try:
                return self._manifests[step]
            except KeyError:
                have = ", ".join(map(str, self.steps())) or "none"
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at step {step} in {self.backend.url} (have: {have})"
                ) from None

    def info(self, step: int) -> CheckpointInfo:
        """The summary of a committed step that policies and listings use."""
        with self._lock:
            m = self.manifest(step)
            return CheckpointInfo(
                step=m.step,
                time=datetime.fromtimestamp(m.time, UTC),
                metrics=dict(m.metrics),
                reasons=m.reasons,
                logical_bytes=m.logical_bytes,
                new_bytes=m.written_bytes,
                objects=frozenset(e.object for e in m.tensors.values()),
            )

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        with self._lock:
            return [self.info(s) for s in self.steps()]

    def read_tensor(
        self,
        entry: TensorEntry,
        *,
        step: int,
        name: str,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Load one tensor and check its bytes (and every base's) against its address.

        With ``into`` (a contiguous CPU tensor of the entry's dtype and shape) the bytes are
        read straight into its memory, which is then returned; a checksum failure leaves it
        overwritten.
        """
        dtype = DTYPES[entry.dtype]
        target = None
        if (
            into is not None
            and into.device.type == "cpu"
            and into.dtype == dtype
            and tuple(into.shape) == entry.shape
            and into.is_contiguous()
            and not into.requires_grad
        ):
            target = into.reshape(-1).view(torch.uint8)
        try:
            out = self._read_raw(entry, target)
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(f"step {step}, tensor {name!r}: {exc}") from exc
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"step {step}, tensor {name!r}: {exc}") from exc
        if target is not None and into is not None:
            return into
        return out.view(dtype).reshape(entry.shape)

    def _read_raw(self, entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
        """The verified raw bytes of an object (into ``out`` when given, a flat uint8
        tensor of the right size), decoding its delta chain if it has one."""
        if out is None:
            out = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = _byte_view(out)
        path = object_path(entry.object)
        itemsize = DTYPES[entry.dtype].itemsize
        self.reads += 1
        try:
            if entry.codec == "raw":
                got = self.backend.read_into(path, view)
                if got != entry.nbytes or self.backend.size(path) != entry.nbytes:
                    raise CorruptCheckpointError(
                        f"object {entry.object} holds {self.backend.size(path)} bytes, "
                        f"expected {entry.nbytes}"
                    )
            elif entry.codec in (DELTA_CODEC, "bytegroup"):
                # the same bytes may be listed under another dtype than they were grouped
                # by (dedup is by content): the object's own header says how it was grouped
                stored = self.backend.read_bytes(path)
                width = ByteGroupedCodec.stored_itemsize(stored) or itemsize
                get_codec("bytegroup").decode(stored, view, itemsize=width)
                if entry.codec == DELTA_CODEC:
                    base = self._read_raw(entry.ancestor(0))
                    torch.bitwise_xor(out, base, out=out)
            else:
                get_codec(entry.codec).decode(
                    self.backend.read_bytes(path), view, itemsize=itemsize
                )
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(f"object {entry.object} is missing") from exc
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"object {entry.object}: {exc}") from exc
        if object_id(view) != entry.object:
            raise CorruptCheckpointError(
                f"object {entry.object} fails its checksum (its bytes changed on disk)"
            )
        return out

    def load_tensors(
        self, step: int, *, into: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every tensor of a committed step, verified (reads and checksums run in parallel).

        ``into`` maps tensor names to tensors to read straight into where they fit (see
        :meth:`read_tensor`): a restore into live, already-allocated memory skips a copy
        and the page faults of fresh memory.
        """
        manifest = self.manifest(step)
        items = list(manifest.tensors.items())
        targets = into or {}

        def read(item: tuple[str, TensorEntry]) -> torch.Tensor:
            return self.read_tensor(item[1], step=step, name=item[0], into=targets.get(item[0]))

        if len(items) < 2:
            return {name: read((name, entry)) for name, entry in items}
        with ThreadPoolExecutor(_WRITERS, thread_name_prefix="ckptwise-read") as pool:
            return dict(zip((name for name, _ in items), pool.map(read, items), strict=True))

    def verify(self, steps: Iterable[int] | None = None) -> list[Problem]:
        """Check every object of the given steps (all by default); empty when all is well."""
        problems = [Problem(None, None, f"{p}: {why}") for p, why in self.broken.items()]
        for step in self.steps() if steps is None else steps:
            for name, entry in self.manifest(step).tensors.items():
                try:
                    self.read_tensor(entry, step=step, name=name)
                except CorruptCheckpointError as exc:
                    problems.append(Problem(step, name, str(exc).split(": ", 2)[-1]))
        return problems

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
    ) -> CheckpointInfo:
        """Write a checkpoint: new objects first, then the manifest, atomically.

        Objects whose content is already referenced by a committed checkpoint are not
        written again. Replacing an existing step is allowed (the new manifest wins).
        Float tensors named in ``lossy`` are stored quantized (codec ``q8``); their entries
        then hold what they decode to, and the error in ``note``.
        """
        lossy = set(lossy)
        with self._lock:
            previous = self._manifests[max(self._manifests)] if self._manifests else None
        named: dict[str, tuple[str, str, tuple[int, ...], int]] = {}
        pending: dict[str, _Pending] = {}
        for name, tensor in tensors.items():
            if name in lossy and tensor.is_floating_point() and tensor.numel():
                job = _quantized(tensor)
                oid = object_id(job.raw)
                named[name] = (oid, dtype_name(tensor.dtype), tuple(tensor.shape), len(job.raw))
                if oid not in self._entries:
                    pending.setdefault(oid, job)
                continue
            raw = tensor_bytes(tensor)
            oid = object_id(raw)
            named[name] = (oid, dtype_name(tensor.dtype), tuple(tensor.shape), len(raw))
            if oid in self._entries or oid in pending:
                continue
            codec, note = self.planner.choose(tensor.dtype, len(raw))
            job = pending[oid] = _Pending(raw, codec, tensor.dtype.itemsize, note)
            if previous is not None and codec == "bytegroup":
                job.base = self._delta_base(previous.tensors.get(name), tensor)
        self._check_space(sum(len(p.raw) for p in pending.values()))
        self._write_objects(pending)
        entries: dict[str, TensorEntry] = {}
        for name, (oid, dtype, shape, nbytes) in named.items():
            done = pending.get(oid)
            if done is None:
                known = self._entries[oid]
                entries[name] = dataclasses.replace(known, dtype=dtype, shape=shape)
                continue
            bases: tuple[tuple[str, str, int], ...] = ()
            if done.codec == DELTA_CODEC and done.base is not None:
                base = done.base
                bases = ((base.object, base.codec, base.stored_bytes), *base.bases)
            entries[name] = TensorEntry(
                object=oid,
                dtype=dtype,
                shape=shape,
                nbytes=nbytes,
                codec=done.codec,
                stored_bytes=done.stored_bytes,
                note=done.note,
                bases=bases,
            )
        manifest = Manifest(
            step=step,
            time=_time.time() if time is None else time,
            tensors=entries,
            tree=tree,
            metrics=dict(metrics or {}),
            reasons=tuple(reasons),
            extra=dict(extra or {}),
            written_bytes=sum(p.stored_bytes for p in pending.values()),
        )
        self.backend.write_atomic(manifest_path(step), [encode_manifest(manifest)])
        self.backend.sync_dirs([CHECKPOINTS])
        with self._lock:
            self._publish(step, manifest)
        return self.info(step)

    def _publish(self, step: int, manifest: Manifest) -> None:
        old = self._manifests.pop(step, None)
        if old is not None:
            self._unindex(old)
            log.warning("step %d was saved again; the new checkpoint replaces the old one", step)
        self._index(manifest)
        if old is not None:
            self.collect_garbage()

    def _delta_base(self, prior: TensorEntry | None, tensor: torch.Tensor) -> TensorEntry | None:
        """The entry a new object may be stored as a delta against, if deltas are on."""
        if (
            self.deltas is None
            or prior is None
            or prior.dtype != dtype_name(tensor.dtype)
            or prior.shape != tuple(tensor.shape)
            or len(prior.bases) + 1 >= self.deltas  # the chain would outgrow K: keyframe
        ):
            return None
        return prior

    def _check_space(self, needed: int) -> None:
        free = self.backend.free_bytes()
        if free is not None and needed + SPACE_MARGIN > free:
            raise StorageError(
                f"not enough free space in {self.backend.url}: this save needs up to "
                f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free (keeping "
                f"{SPACE_MARGIN / 2**20:.0f} MiB spare). Nothing was written; free space, or "
                "keep fewer checkpoints (e.g. keep=cw.keep_last(2) or cw.keep_budget(...))"
            )

    def _write_objects(self, pending: Mapping[str, _Pending]) -> None:
        """Encode and write new objects (filling in each job's stored size), then sync."""
        if not pending:
            return
        started = _time.perf_counter()
        encode_seconds = 0.0

        def write(item: tuple[str, _Pending]) -> None:
            nonlocal encode_seconds
            oid, job = item
            t0 = _time.perf_counter()
            data = self._encode(job)
            if job.codec != "raw":
                spent = _time.perf_counter() - t0
                encode_seconds += spent
                self.planner.observed_encode(job.itemsize, len(job.raw), len(data), spent)
            job.stored_bytes = self.backend.write_atomic(object_path(oid), [data])

        if len(pending) == 1:
            for item in pending.items():
                write(item)
        else:
            try:
                with ThreadPoolExecutor(_WRITERS, thread_name_prefix="ckptwise-io") as pool:
                    list(pool.map(write, pending.items()))
            except RuntimeError:
                # the interpreter is shutting down and refuses new threads: finish the
                # save in flight on this thread (only objects not yet written are redone)
                for item in pending.items():
                    if not item[1].stored_bytes:
                        write(item)
        self.backend.sync_dirs({object_path(oid).rsplit("/", 1)[0] for oid in pending} | {OBJECTS})
        elapsed = _time.perf_counter() - started - encode_seconds / _WRITERS
        self.planner.observed_write(sum(p.stored_bytes for p in pending.values()), elapsed)

    def _encode(self, job: _Pending) -> bytes | memoryview:
        """The stored bytes of a job; a delta when it beats the whole object by 10 %."""
        if job.data is not None:
            return job.data
        whole = get_codec(job.codec).encode(job.raw, itemsize=job.itemsize)
        if job.base is None:
            return whole
        base = self._read_raw(job.base).numpy()
        xor = np.bitwise_xor(np.frombuffer(job.raw, dtype=np.uint8), base)
        delta = get_codec("bytegroup").encode(memoryview(xor), itemsize=job.itemsize)
        if len(delta) < 0.9 * len(whole):
            job.note = (
                f"delta against the previous checkpoint: {len(job.raw) / len(delta):.2f}x, "
                f"whole {len(job.raw) / len(whole):.2f}x"
            )
            job.codec = DELTA_CODEC
            return delta
        job.base = None
        return whole

    def _unindex(self, manifest: Manifest) -> None:
        for entry in manifest.tensors.values():
            for oid, _ in self._objects_of(entry):
                refs = self._refs.get(oid)
                if refs is not None:
                    refs.discard(manifest.step)
                    if not refs:
                        del self._refs[oid]
                        self._entries.pop(oid, None)

    def delete(self, steps: Iterable[int]) -> None:
        """Delete committed checkpoints: manifests first, then objects no one references."""
        with self._lock:
            doomed = [s for s in steps if s in self._manifests]
            if not doomed:
                return
            for step in doomed:
                self.backend.delete(manifest_path(step))
            self.backend.sync_dirs([CHECKPOINTS])
            for step in doomed:
                self._unindex(self._manifests.pop(step))
            self.collect_garbage()

    def collect_garbage(self) -> int:
        """Delete objects no committed manifest references; returns how many.

        Skipped (with a warning) while some manifest cannot be read, since its objects are
        unknown and a person may still want to rescue them.
        """
        with self._lock:
            if self.broken:
                log.warning(
                    "not collecting unreferenced objects: %d manifest(s) cannot be read (%s)",
                    len(self.broken),
                    ", ".join(self.broken),
                )
                return 0
            removed = 0
            for path in self.backend.list_files(OBJECTS):
                oid = path.rsplit("/", 1)[-1]
                if TMP_MARK not in oid and oid not in self._refs:
                    self.backend.delete(path)
                    removed += 1
            return removed

    def clean(self) -> int:
        """Remove debris a crash can leave: temporary files and unreferenced objects."""
        removed = 0
        for path in self.backend.list_files(""):
            if TMP_MARK in path.rsplit("/", 1)[-1]:
                self.backend.delete(path)
                removed += 1
        return removed + self.collect_garbage()

    def object_bytes(self) -> dict[str, int]:
        """Stored size of every object a committed checkpoint references."""
        with self._lock:
            return {oid: self._entries[oid].stored_bytes for oid in self._refs}

    def physical_bytes(self) -> int:
        """Bytes of all objects referenced by committed checkpoints (each counted once)."""
        with self._lock:
            return sum(self._entries[oid].stored_bytes for oid in self._refs)

        # -- run state -------------------------------------------------------------------------

    def read_run_state(self) -> dict[str, Any]:
        """The mutable run record (pins, last retention reasons); empty when absent."""
        try:
            data = json.loads(self.backend.read_bytes(RUN_FILE))
        except CheckpointNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            log.warning("ignoring unreadable %s: %s", RUN_FILE, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def write_run_state(self, state: Mapping[str, Any]) -> None:
        """Atomically replace the run record."""
        doc = {"format": "ckptwise.run", "version": 1, **state}
        self.backend.write_atomic(RUN_FILE, [json.dumps(doc, indent=1).encode()])


@dataclass
class _Pending:
    """A new object of this commit: its raw bytes and how it will be stored."""

    raw: memoryview
    codec: str
    itemsize: int
    note: str
    stored_bytes: int = 0
    base: TensorEntry | None = None
    data: bytes | None = None  # already encoded (lossy objects)


def _quantized(tensor: torch.Tensor) -> _Pending:
    """A q8 job for a float tensor: the stored bytes, what they decode to, and the error."""
    codec = CODECS["q8"]
    original = tensor.detach().cpu().contiguous()
    stored = codec.quantize(original)  # type: ignore[attr-defined]
    decoded = torch.empty(original.numel() * original.element_size(), dtype=torch.uint8)
    codec.decode(stored, _byte_view(decoded), itemsize=original.element_size())
    values = decoded.view(original.dtype).reshape(original.shape)
    error = (values.double() - original.double()).reshape(-1)
    scale = original.double().norm().item()
    rms = error.norm().item() / scale if scale else 0.0
    note = f"lossy q8: max abs error {error.abs().max().item():.3g}, relative error {rms:.3g}"
    return _Pending(_byte_view(decoded), "q8", original.element_size(), note, data=stored)
