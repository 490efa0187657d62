"""The read path: objects back into tensors, every byte checked against its address.

Every read is bounded by what the manifest entry says before anything is allocated: a raw
object's file must hold exactly the tensor's bytes, a compressed one at most its recorded
stored size (plus :data:`SLACK`), and its header must claim exactly the tensor's size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from ckptwise.store.backend import Backend
from ckptwise.store.codecs import RAW, decode, decoded_size
from ckptwise.store.index import Index
from ckptwise.store.layout import byte_view, manifest_path, object_id, object_path
from ckptwise.store.manifest import DTYPES, ITEMSIZES, TensorEntry, load_manifest

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["CHUNK", "READERS", "SLACK", "Problem", "Reader"]

log = logging.getLogger("ckptwise")

#: Threads reading and checking the objects of one checkpoint.
READERS = 4
#: Bytes read at a time when a raw object in a local file is hashed as it is read.
CHUNK = 16 * 2**20
#: How many bytes a compressed object may exceed the stored size its entry records by.
SLACK = 4096


@dataclass(frozen=True)
class Problem:
    """One thing :meth:`Reader.verify` found wrong."""

    step: int | None
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = "run" if self.step is None else f"step {self.step}"
        if self.tensor:
            where += f", tensor {self.tensor!r}"
        return f"{where}: {self.message}"


class Reader:
    """Reads and verifies the objects of a run's committed checkpoints."""

    def __init__(self, backend: Backend, index: Index) -> None:
        self.backend = backend
        self.index = index
        #: object reads made (a restore reads at most K per tensor with deltas=K)
        self.reads = 0

    def read_tensor(
        self,
        entry: TensorEntry,
        *,
        step: int,
        name: str,
        into: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Load one tensor and check its bytes (and every base's) against its address.

        With ``into`` (a contiguous CPU tensor of the entry's dtype and shape) the bytes are
        read straight into its memory, which is then returned; a checksum failure leaves it
        overwritten. ``progress`` is told the tensor's bytes once read and checked.
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
            out = self.read_raw(entry, target)
        except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
            gone = self.gone(step, entry)
            if gone is not None:
                raise CheckpointNotFoundError(
                    f"checkpoint at step {step} {gone} while it was being read (tensor "
                    f"{name!r}); it is not damaged. Read a newer checkpoint (the run lists "
                    "them after refresh()), or pin() a step to keep it while reading"
                ) from exc
            raise CorruptCheckpointError(f"step {step}, tensor {name!r}: {exc}") from exc
        if progress is not None:
            progress(entry.nbytes)
        if target is not None and into is not None:
            return into
        return out.view(dtype).reshape(entry.shape)

    def read_raw(self, entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
        """The verified raw bytes of an object, decoding its delta chain if it has one.

        ``out``, when given, is a flat uint8 CPU tensor of the raw size to read into.
        """
        tensor = out

        def room(nbytes: int) -> memoryview:
            nonlocal tensor
            tensor = _allocate(nbytes) if tensor is None else tensor
            return byte_view(tensor)

        self._read_verified(entry, room)
        assert tensor is not None
        return tensor

    def check(self, entry: TensorEntry) -> None:
        """Read and verify one object (and its delta chain) into plain memory: what
        ``verify`` does, without torch."""
        self._read_verified(entry, lambda nbytes: memoryview(_room(nbytes)))

    def gone(self, step: int, entry: TensorEntry) -> str | None:
        """Why reading ``entry`` of ``step`` failed without damage, or ``None`` when the
        failure is damage: asked once an object read failed (missing, short, wrong bytes).

        A writer deletes a checkpoint's manifest before any of its objects (see
        :meth:`Index.delete <ckptwise.store.index.Index.delete>`), so an object that went
        missing or changed under a reader is damage only while the manifest of ``step`` is
        still there and still names that object. The manifest is looked up again on the
        store itself, not in the index, which a reader in another process has not updated.
        Returns ``"was removed by the writer's retention"`` when the manifest is gone,
        ``"was replaced by a new save of the same step"`` when it names other objects now.
        A manifest that is there but cannot be read counts as damage (it is reported too).
        """
        try:
            now = load_manifest(self.backend, manifest_path(step))
        except CheckpointNotFoundError:
            return "was removed by the writer's retention"
        except CheckpointError:
            return None
        named = {e.object for e in now.entries()}
        if entry.object not in named:
            return "was replaced by a new save of the same step"
        return None

    def _read_verified(self, entry: TensorEntry, room: Callable[[int], memoryview]) -> None:
        """Read an object's raw bytes into ``room(nbytes)`` (asked for once its size is
        checked), decoding its delta chain, and check them against its address.

        A copy in a local cache that fails is dropped and the object read again from where
        it is kept for good (see :meth:`Backend.drop_cached <ckptwise.store.backend.Backend.drop_cached>`).
        """
        try:
            self._read_once(entry, room)
        except CorruptCheckpointError as exc:
            if not self.backend.drop_cached(object_path(entry.object)):
                raise
            log.warning("%s in the local cache; reading it from %s", exc, self.backend.url)
            self._read_once(entry, room)

    def _read_once(self, entry: TensorEntry, room: Callable[[int], memoryview]) -> None:
        path = object_path(entry.object)
        self.reads += 1
        try:
            size = self.backend.size(path)
            if entry.codec == RAW:
                if size != entry.nbytes:
                    raise CorruptCheckpointError(f"holds {size} bytes, expected {entry.nbytes}")
                view = room(entry.nbytes)
                # straight from the file into the tensor: no staging copy
                got = self.backend.read_into(path, view)
                if got != entry.nbytes:
                    raise CorruptCheckpointError(f"holds {got} bytes, expected {entry.nbytes}")
            else:
                if size > entry.stored_bytes + SLACK:
                    raise CorruptCheckpointError(
                        f"holds {size} bytes, its entry says {entry.stored_bytes}"
                    )
                buffer = bytearray(size)
                if self.backend.read_into(path, memoryview(buffer)) != size:
                    raise CorruptCheckpointError("changed while it was read")
                view = self._decode(entry, bytes(buffer), room)
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(f"object {entry.object} is missing") from exc
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"object {entry.object}: {exc}") from exc
        _check_digest(entry, object_id(view))

    def _decode(
        self, entry: TensorEntry, stored: bytes, room: Callable[[int], memoryview]
    ) -> memoryview:
        """Decode the encoded object ``stored`` of ``entry`` into ``room(nbytes)`` (reading
        its delta base, verified, through the backend); returns that room."""
        claimed = decoded_size(entry.codec, stored)
        if claimed != entry.nbytes:
            raise CorruptCheckpointError(
                f"decodes to {claimed} bytes, the tensor has {entry.nbytes}"
            )
        base = None
        if entry.bases:  # the base into plain memory: it is only read from
            base = memoryview(_room(entry.nbytes))
            self._read_verified(entry.ancestor(0), _given(base))
        view = room(entry.nbytes)
        decode(entry.codec, stored, view, itemsize=ITEMSIZES[entry.dtype], base=base)
        return view

    def check_file(self, entry: TensorEntry, file: str) -> None:
        """Check that the local ``file`` holds the object of ``entry``: its size, then its
        decoded bytes against the object's address (a raw object is hashed as it is read,
        never held whole; a delta's bases are read through the backend). What the uploader
        of a cache asks before an object leaves the machine.

        Raises:
            CorruptCheckpointError: it does not (the message says how).
            StorageError: ``file`` cannot be read.
        """
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if entry.codec == RAW:
                    if size != entry.nbytes:
                        raise CorruptCheckpointError(f"holds {size} bytes, expected {entry.nbytes}")
                    hasher = blake3.blake3()
                    while chunk := f.read(CHUNK):
                        hasher.update(chunk)
                    digest = str(hasher.hexdigest())
                else:
                    if size > entry.stored_bytes + SLACK:
                        raise CorruptCheckpointError(
                            f"holds {size} bytes, its entry says {entry.stored_bytes}"
                        )
                    stored = f.read(size + 1)
                    if len(stored) != size:
                        raise CorruptCheckpointError("changed while it was read")
                    digest = object_id(self._decode(entry, stored, lambda n: memoryview(_room(n))))
        except OSError as exc:
            raise StorageError(f"could not read {file} to check it: {exc}") from exc
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"object {entry.object}: {exc}") from exc
        _check_digest(entry, digest)

    def object_nbytes(self, entry: TensorEntry) -> int:
        """How many raw bytes the object of ``entry`` holds, found without decoding or
        hashing it: a raw object is only sized; an encoded one no larger than its entry
        allows is read for the size its header records (a larger one answers its file size,
        which then contradicts the entry).

        Raises:
            CheckpointError: the object cannot be read, or its header is damaged.
        """
        path = object_path(entry.object)
        size = self.backend.size(path)
        if entry.codec != RAW and size <= entry.stored_bytes + SLACK:
            size = decoded_size(entry.codec, self.backend.read_bytes(path))
        return size

    def load_tensors(
        self,
        step: int,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        entries: Mapping[str, TensorEntry] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor of a committed step, verified (reads and checksums run in parallel);
        ``progress`` is told each tensor's bytes once read and checked, from the reading
        threads.

        ``into`` maps tensor names to tensors to read straight into where they fit (see
        :meth:`read_tensor`): a restore into live, already-allocated memory skips a copy
        and the page faults of fresh memory. ``entries`` reads those entries of the step
        instead of rank 0's tensors (e.g. another rank's view).
        """
        chosen = self.index.manifest(step).tensors if entries is None else entries
        items = list(chosen.items())
        targets = into or {}

        def read(item: tuple[str, TensorEntry]) -> torch.Tensor:
            return self.read_tensor(
                item[1], step=step, name=item[0], into=targets.get(item[0]), progress=progress
            )

        if len(items) < 2:
            return {name: read((name, entry)) for name, entry in items}
        with ThreadPoolExecutor(READERS, thread_name_prefix="ckptwise-read") as pool:
            return dict(zip((name for name, _ in items), pool.map(read, items), strict=True))

    def verify(self, steps: Iterable[int] | None = None) -> list[Problem]:
        """Check every object of the given steps (all by default); empty when all is well.

        A run may be verified while a writer commits and prunes it: a checkpoint whose
        manifest is gone (or replaced) by the time one of its objects fails to read was
        pruned (or saved again) meanwhile, which is no problem; it is logged and skipped.
        """
        problems = [Problem(None, None, f"{p}: {why}") for p, why in self.index.broken.items()]
        for step in self.index.steps() if steps is None else steps:
            manifest = self.index.manifest(step)
            views = [("", manifest.tensors)]
            views += [(f" (rank {r})", v.tensors) for r, v in enumerate(manifest.ranks, 1)]
            checked: set[str] = set()  # ranks share most objects: check each once per step
            found: list[Problem] = []
            for suffix, name, entry in (
                (suffix, name, entry)
                for suffix, tensors in views
                for name, entry in tensors.items()
            ):
                if entry.object in checked:
                    continue
                checked.add(entry.object)
                try:
                    try:
                        self.check(entry)
                    except CorruptCheckpointError as exc:
                        raise CorruptCheckpointError(
                            f"step {step}, tensor {name!r}: {exc}"
                        ) from exc
                except CorruptCheckpointError as exc:
                    if self.gone(step, entry) is not None or self._pruned(step):
                        log.info("step %d was pruned while it was being verified; skipped", step)
                        found = []
                        break
                    message = str(exc).split(": ", 2)[-1]
                    found.append(Problem(step, name + suffix, message))
            problems.extend(found)
        return problems

    def _pruned(self, step: int) -> bool:
        """Whether the manifest of ``step`` is gone, or no longer the one the index holds
        (the step was saved again)."""
        try:
            now = load_manifest(self.backend, manifest_path(step))
        except CheckpointNotFoundError:
            return True
        except CheckpointError:
            return False
        try:
            held = self.index.manifest(step)
        except CheckpointNotFoundError:  # this process's writer deleted or replaced it
            return True
        objects = {e.object for e in now.entries()}
        return now.time != held.time or objects != {e.object for e in held.entries()}


def _check_digest(entry: TensorEntry, digest: str) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``digest`` is ``entry``'s object id."""
    if digest != entry.object:
        raise CorruptCheckpointError(
            f"object {entry.object} fails its checksum (its bytes changed on disk)"
        )


def _given(view: memoryview) -> Callable[[int], memoryview]:
    """A ``room`` for :meth:`Reader._read_verified` that is ``view``, already allocated."""
    return lambda nbytes: view


def _room(nbytes: int) -> bytearray:
    """Plain memory for an object's raw bytes; a size no memory holds is a clear error."""
    try:
        return bytearray(nbytes)
    except MemoryError as exc:
        raise CheckpointError(
            f"cannot allocate {nbytes} bytes to read a tensor into: {exc}; check the run on a "
            "machine with more memory"
        ) from exc


def _allocate(nbytes: int) -> torch.Tensor:
    """Room for an object's raw bytes; a size no memory holds is a clear error."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8)
    except (RuntimeError, MemoryError) as exc:
        raise CheckpointError(
            f"cannot allocate {nbytes} bytes to read a tensor into: {exc}. Restore on a "
            "machine with more memory, or into live tensors (restore(state) reads into them)"
        ) from exc
