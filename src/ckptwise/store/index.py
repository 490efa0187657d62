"""The in-memory index of a run's committed manifests, and garbage collection.

The index is read from the manifests once (:meth:`Index.refresh`) and then kept current by
the store's own commits and deletions, so dedup and garbage collection need no listing of
objects on the hot path. An object counts as referenced by every checkpoint whose entries
name it, directly or as a base of a delta.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

from ckptwise.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatError
from ckptwise.records import CheckpointInfo
from ckptwise.store.backend import TMP_MARK, Backend
from ckptwise.store.codecs import readable
from ckptwise.store.layout import CHECKPOINTS, OBJECTS, manifest_path, manifest_step
from ckptwise.store.manifest import Manifest, TensorEntry, decode_manifest

__all__ = ["Index", "read_manifest"]

log = logging.getLogger("ckptwise")


def read_manifest(backend: Backend, path: str) -> Manifest:
    """Read and validate one manifest; :class:`FormatError` says what is wrong with it."""
    return decode_manifest(backend.read_bytes(path), where=path, codecs=readable())


def _objects_of(entry: TensorEntry) -> Iterable[tuple[str, TensorEntry]]:
    """The object of ``entry`` and every object its delta chain needs."""
    yield entry.object, entry
    for i, (oid, _, _) in enumerate(entry.bases):
        yield oid, entry.ancestor(i)


class Index:
    """The committed checkpoints of one run and the objects they reference.

    The training thread reads it while a background writer updates it: every method takes
    :attr:`lock`, which callers also hold to make several calls one step.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.lock = threading.RLock()
        self._manifests: dict[int, Manifest] = {}
        self._refs: dict[str, set[int]] = {}
        self._entries: dict[str, TensorEntry] = {}
        #: manifest paths that exist but could not be read, with the reason
        self.broken: dict[str, str] = {}

    def refresh(self) -> None:
        """Reload from the committed manifests."""
        with self.lock:
            self._manifests.clear()
            self._refs.clear()
            self._entries.clear()
            self.broken.clear()
            for path in self.backend.list_files(CHECKPOINTS):
                step = manifest_step(path)
                if step is None:
                    continue
                try:
                    manifest = read_manifest(self.backend, path)
                    if manifest.step != step:
                        raise FormatError(f"manifest {path} says step {manifest.step}")
                except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                    self.broken[path] = str(exc)
                    continue
                self._add(manifest)

    # -- queries ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        with self.lock:
            return sorted(self._manifests)

    def manifest(self, step: int) -> Manifest:
        """The manifest of a committed step."""
        with self.lock:
            try:
                return self._manifests[step]
            except KeyError:
                have = ", ".join(map(str, self.steps())) or "none"
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at step {step} in {self.backend.url} (have: {have})"
                ) from None

    def manifests(self) -> list[Manifest]:
        """Every committed manifest, oldest first."""
        with self.lock:
            return [self._manifests[s] for s in sorted(self._manifests)]

    def latest(self) -> Manifest | None:
        """The manifest of the newest committed step, if any."""
        with self.lock:
            return self._manifests[max(self._manifests)] if self._manifests else None

    def known(self, oid: str) -> TensorEntry | None:
        """An entry describing object ``oid`` if a committed checkpoint references it."""
        with self.lock:
            return self._entries.get(oid)

    def info(self, step: int) -> CheckpointInfo:
        """The summary of a committed step that policies and listings use."""
        m = self.manifest(step)
        return CheckpointInfo(
            step=m.step,
            time=datetime.fromtimestamp(m.time, UTC),
            metrics=dict(m.metrics),
            reasons=m.reasons,
            logical_bytes=m.logical_bytes,
            new_bytes=m.written_bytes,
            objects=frozenset(e.object for e in m.entries()),
        )

    def object_bytes(self) -> dict[str, int]:
        """Stored size of every referenced object."""
        with self.lock:
            return {oid: self._entries[oid].stored_bytes for oid in self._refs}

    # -- changes ---------------------------------------------------------------------------

    def _add(self, manifest: Manifest) -> None:
        self._manifests[manifest.step] = manifest
        for entry in manifest.entries():
            for oid, described in _objects_of(entry):
                self._refs.setdefault(oid, set()).add(manifest.step)
                self._entries.setdefault(oid, described)

    def _remove(self, step: int) -> Manifest | None:
        manifest = self._manifests.pop(step, None)
        if manifest is None:
            return None
        for entry in manifest.entries():
            for oid, _ in _objects_of(entry):
                refs = self._refs.get(oid)
                if refs is not None:
                    refs.discard(step)
                    if not refs:
                        del self._refs[oid]
                        self._entries.pop(oid, None)
        return manifest

    def publish(self, manifest: Manifest) -> None:
        """Add a manifest that has just been committed; it replaces one of the same step."""
        with self.lock:
            replaced = self._remove(manifest.step)
            if replaced is not None:
                log.warning(
                    "step %d was saved again; the new checkpoint replaces the old one",
                    manifest.step,
                )
            self._add(manifest)
            if replaced is not None:
                self.collect_garbage()

    def delete(self, steps: Iterable[int]) -> None:
        """Delete committed checkpoints: manifests first, then objects no one references."""
        with self.lock:
            doomed = [s for s in steps if s in self._manifests]
            if not doomed:
                return
            for step in doomed:
                self.backend.delete(manifest_path(step))
            self.backend.sync_dirs([CHECKPOINTS])
            for step in doomed:
                self._remove(step)
            self.collect_garbage()

    def collect_garbage(self) -> int:
        """Delete objects no committed manifest references; returns how many.

        Skipped (with a warning) while some manifest cannot be read, since its objects are
        unknown and a person may still want to rescue them.
        """
        with self.lock:
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
