"""The in-memory index of a run's committed manifests, its branches, and garbage collection.

The index is read from the manifests once (:meth:`Index.refresh`) and then kept current by
the store's own commits and deletions, so dedup needs no listing of objects on the hot path.
An object counts as referenced by every checkpoint whose entries name it, directly or as a
base of a delta.

Garbage collection does not trust the index alone: before deleting anything it syncs the
manifest folders (so no deletion or rename of a manifest can be undone by a crash later),
lists them again and reads every manifest the index lacks, the manifests of branches
(``branches/NAME/``: checkpoints a rollback set aside) included. An object is deleted only
when no manifest on disk, none the index holds and none it was told to :meth:`~Index.hold`
names it; while any manifest cannot be read, or a folder cannot be synced or listed, nothing
is deleted.

It is long because garbage collection and the branch moves must see the same in-memory
index under one lock as the commits that change it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatError,
    StorageError,
)
from ckptwise.records import CheckpointInfo
from ckptwise.store.backend import Backend
from ckptwise.store.branch import check_branch_name
from ckptwise.store.codecs import readable
from ckptwise.store.layout import (
    BRANCHES,
    CHECKPOINTS,
    OBJECTS,
    TMP_MARK,
    manifest_path,
    manifest_step,
)
from ckptwise.store.manifest import Manifest, TensorEntry, decode_manifest, load_manifest

__all__ = ["Index", "branch_manifest_path", "read_manifest"]

log = logging.getLogger("ckptwise")

_BRANCH_MANIFEST = re.compile(rf"^{BRANCHES}/([^/]+)/(\d+)\.json$")


def branch_manifest_path(name: str, step: int) -> str:
    """Where branch ``name`` keeps the manifest of ``step``."""
    return f"{BRANCHES}/{name}/{step:012d}.json"


def read_manifest(backend: Backend, path: str) -> Manifest:
    """Read and validate one manifest (see :func:`load_manifest`, which bounds its size);
    :class:`FormatError` says what is wrong with it.

    A copy in a local cache that fails is dropped and the manifest read again from where it
    is kept for good (see :meth:`Backend.drop_cached <ckptwise.store.backend.Backend.drop_cached>`).
    """
    try:
        return load_manifest(backend, path)
    except CheckpointNotFoundError:
        raise
    except CheckpointError as exc:
        if not backend.drop_cached(path):
            raise
        log.warning(
            "manifest %s in the local cache: %s; reading it from %s", path, exc, backend.url
        )
        return load_manifest(backend, path)


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
        #: objects garbage collection keeps whatever the manifests say (see :meth:`hold`)
        self._held: set[str] = set()
        #: branch manifests read so far, by path (a branch's files are written once)
        self._branch_cache: dict[str, Manifest] = {}

    def refresh(self) -> None:
        """Reload from the committed manifests.

        A manifest that cannot be read or validated, for whatever reason, goes into
        :attr:`broken` and the others load; one that vanished since the listing (pruned
        meanwhile) is skipped. A file named like a manifest but not canonically
        (``checkpoints/1.json``) is never read: it is listed in :attr:`broken` with the
        name it needs.
        """
        from ckptwise.store.layout import misnamed_manifest

        with self.lock:
            self._manifests.clear()
            self._refs.clear()
            self._entries.clear()
            self.broken.clear()
            for path in self.backend.list_files(CHECKPOINTS):
                step = manifest_step(path)
                if step is None:
                    canonical = misnamed_manifest(path)
                    if canonical is not None:
                        self.broken[path] = (
                            "not read: a manifest's name is its step in 12 digits; if it is a "
                            f"checkpoint, rename it to {canonical.rsplit('/', 1)[-1]}"
                        )
                    continue
                try:
                    manifest = read_manifest(self.backend, path)
                    if manifest.step != step:
                        raise FormatError(f"manifest {path} says step {manifest.step}")
                except CheckpointNotFoundError:
                    continue  # deleted since it was listed: a prune, not damage
                except CheckpointError as exc:
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
        """Stored size of every object a checkpoint references, on the main line or in a
        branch (what the run holds on disk)."""
        with self.lock:
            out = {oid: self._entries[oid].stored_bytes for oid in self._refs}
            for manifests in self.branches().values():
                for manifest in manifests:
                    for entry in manifest.entries():
                        for oid, described in _objects_of(entry):
                            out.setdefault(oid, described.stored_bytes)
            return out

    # -- changes ---------------------------------------------------------------------------

    def _add(self, manifest: Manifest) -> None:
        self._manifests[manifest.step] = manifest
        for entry in manifest.entries():
            for oid, described in _objects_of(entry):
                self._refs.setdefault(oid, set()).add(manifest.step)
                # the newest description wins: a repaired object is stored as it says
                self._entries[oid] = described

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

    def follow(self, manifest: Manifest, kept: Iterable[int]) -> None:
        """Take in what another process committed and kept: add ``manifest`` (it replaces
        one of the same step) and drop every step not in ``kept``, touching no storage and
        collecting nothing (the process that committed and pruned owns the deletions)."""
        with self.lock:
            self._remove(manifest.step)
            self._add(manifest)
            keep = set(kept)
            for step in [s for s in self._manifests if s not in keep]:
                self._remove(step)

    def forget(self, step: int) -> None:
        """Drop ``step`` from the index without touching the disk (its manifest is gone)."""
        with self.lock:
            self._remove(step)

    def hold(self, manifest: Manifest) -> None:
        """Keep the objects of ``manifest`` from garbage collection for this index's life.

        For a manifest that may or may not be on disk (a commit whose outcome could not be
        established): a later run re-reads the disk and decides from what it finds.
        """
        with self.lock:
            for entry in manifest.entries():
                self._held.update(oid for oid, _ in _objects_of(entry))

    def delete(self, steps: Iterable[int]) -> None:
        """Delete committed checkpoints: manifests first, then objects no one references.

        A step leaves the index as soon as its manifest is unlinked, so a failure part way
        leaves every step either deleted or whole. Garbage collection runs only once the
        deletions are durable; its own failures are logged, never raised (what it leaves is
        debris that a later collection removes).
        """
        with self.lock:
            doomed = [s for s in steps if s in self._manifests]
            if not doomed:
                return
            for step in doomed:
                self.backend.delete(manifest_path(step))
                self._remove(step)
            self.backend.sync_dirs([CHECKPOINTS])
            self.collect_garbage()

    # -- branches --------------------------------------------------------------------------

    def branches(self) -> dict[str, list[Manifest]]:
        """The run's branches, each with its manifests oldest first, as on disk now.

        Lists ``branches/`` on every call; a branch manifest is read once and then cached
        (branch files are written once). One that cannot be read is left out and recorded
        in :attr:`broken`, which stops garbage collection.
        """
        with self.lock:
            found: dict[str, list[Manifest]] = {}
            seen: set[str] = set()
            for path in self.backend.list_files(BRANCHES):
                match = _BRANCH_MANIFEST.match(path)
                if match is None:
                    continue
                seen.add(path)
                manifest = self._branch_cache.get(path)
                if manifest is None:
                    try:
                        manifest = read_manifest(self.backend, path)
                        if manifest.step != int(match.group(2)):
                            raise FormatError(f"manifest {path} says step {manifest.step}")
                    except CheckpointNotFoundError:
                        continue  # deleted since the listing
                    except CorruptCheckpointError as exc:
                        self.broken[path] = str(exc)
                        continue
                    self._branch_cache[path] = manifest
                self.broken.pop(path, None)
                found.setdefault(match.group(1), []).append(manifest)
            for path in set(self._branch_cache) - seen:
                del self._branch_cache[path]
            for path in [p for p in self.broken if p.startswith(BRANCHES + "/")]:
                if path not in seen:
                    del self.broken[path]
            return {name: sorted(ms, key=lambda m: m.step) for name, ms in sorted(found.items())}

    def move_to_branch(self, steps: Iterable[int], name: str) -> None:
        """Move committed checkpoints off the main line into branch ``name``.

        Each manifest's bytes are first written, durably, to ``branches/NAME/``; only then
        are the originals deleted from ``checkpoints/``. A crash in between leaves a step in
        both places, which is harmless; never in neither. The objects are not touched: the
        branch's manifests keep them referenced. An existing branch of that name gains the
        steps (a step it already holds is replaced).

        Raises:
            ConfigError: ``name`` cannot name a folder.
            CheckpointNotFoundError: a step is not committed.
        """
        folder = f"{BRANCHES}/{check_branch_name(name)}"
        with self.lock:
            chosen = sorted(set(steps))
            for step in chosen:
                self.manifest(step)  # every step must be committed before anything moves
            if not chosen:
                return
            copies: dict[str, Manifest] = {}
            for step in chosen:
                data = self.backend.read_bytes(manifest_path(step))
                path = branch_manifest_path(name, step)
                copies[path] = decode_manifest(data, where=path, codecs=readable())
                self.backend.write_atomic(path, [data])
            self.backend.sync_dirs(["", BRANCHES, folder])
            self._branch_cache.update(copies)
            for step in chosen:
                self.backend.delete(manifest_path(step))
                self._remove(step)
            self.backend.sync_dirs([CHECKPOINTS])

    def delete_branch(self, name: str) -> None:
        """Delete branch ``name``'s manifests, then the objects nothing else references.

        Raises:
            ConfigError: ``name`` cannot name a folder.
            CheckpointNotFoundError: the run has no such branch.
        """
        folder = f"{BRANCHES}/{check_branch_name(name)}"
        with self.lock:
            files = self.backend.list_files(folder)
            if not any(_BRANCH_MANIFEST.match(p) for p in files):
                have = ", ".join(self.branches()) or "none"
                raise CheckpointNotFoundError(
                    f"run {self.backend.url} has no branch {name!r} (have: {have})"
                )
            for path in files:
                self.backend.delete(path)
                self._branch_cache.pop(path, None)
                self.broken.pop(path, None)
            self.backend.sync_dirs([folder])
            self.collect_garbage()

    # -- garbage ---------------------------------------------------------------------------

    def _referenced(self) -> set[str] | None:
        """Every object some manifest on disk (or this index, or a hold) references, or
        ``None`` when that cannot be known (see the module docstring)."""
        branches = self.branches()
        if self.broken:
            log.warning(
                "not collecting unreferenced objects: %d manifest(s) cannot be read (%s)",
                len(self.broken),
                ", ".join(self.broken),
            )
            return None
        # make every manifest deletion and rename so far durable: none can reappear after
        # a crash to name an object deleted below
        self.backend.sync_dirs([CHECKPOINTS, *(f"{BRANCHES}/{name}" for name in branches)])
        keep = set(self._refs) | self._held
        manifests = [m for ms in branches.values() for m in ms]
        for path in self.backend.list_files(CHECKPOINTS):
            step = manifest_step(path)
            if step is None or step in self._manifests:
                continue
            try:
                manifests.append(read_manifest(self.backend, path))
            except CheckpointNotFoundError:
                continue  # deleted since the listing
        for manifest in manifests:
            for entry in manifest.entries():
                keep.update(oid for oid, _ in _objects_of(entry))
        return keep

    def unreferenced(self) -> list[str]:
        """The objects (run-relative paths) that no committed checkpoint, branch or hold
        names, without changing anything: what the next :meth:`collect_garbage` removes
        (left by a save that failed or was interrupted, or written by one in progress)."""
        with self.lock:
            keep = set(self._refs) | self._held
            for manifests in self.branches().values():
                for manifest in manifests:
                    for entry in manifest.entries():
                        keep.update(oid for oid, _ in _objects_of(entry))
            return [
                path
                for path in self.backend.list_files(OBJECTS)
                if TMP_MARK not in (oid := path.rsplit("/", 1)[-1]) and oid not in keep
            ]

    def collect_garbage(self) -> int:
        """Delete objects no manifest references; returns how many.

        Skipped (with a warning) while some manifest cannot be read, since its objects are
        unknown and a person may still want to rescue them, and when the manifest folders
        cannot be synced or listed. Storage errors are logged, not raised: what is left is
        debris that the next collection removes.
        """
        with self.lock:
            try:
                keep = self._referenced()
            except CheckpointError as exc:
                log.warning("not collecting unreferenced objects: %s", exc)
                return 0
            if keep is None:
                return 0
            removed = 0
            try:
                for path in self.backend.list_files(OBJECTS):
                    oid = path.rsplit("/", 1)[-1]
                    if TMP_MARK not in oid and oid not in keep:
                        self.backend.delete(path)
                        removed += 1
            except StorageError as exc:
                log.warning("stopped collecting unreferenced objects: %s", exc)
            return removed

    def clean(self) -> int:
        """Remove debris a crash can leave: temporary files and unreferenced objects."""
        removed = 0
        try:
            for path in self.backend.list_files(""):
                if TMP_MARK in path.rsplit("/", 1)[-1]:
                    self.backend.delete(path)
                    removed += 1
        except StorageError as exc:
            log.warning("could not remove every temporary file: %s", exc)
        return removed + self.collect_garbage()
