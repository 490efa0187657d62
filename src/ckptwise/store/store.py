"""The checkpoint store: content-addressed tensor objects plus one manifest per checkpoint.

:class:`CheckpointStore` is the one object the rest of ckptwise talks to; it composes the
store's parts, each in its own module:

- :mod:`~ckptwise.store.layout`: where files live, how tensors are viewed and addressed;
- :mod:`~ckptwise.store.index`: the committed manifests in memory, branches, garbage
  collection;
- :mod:`~ckptwise.store.reader`: objects back into tensors, verified;
- :mod:`~ckptwise.store.commit`: dedup, codecs, deltas and the atomic commit;
- :mod:`~ckptwise.store.runfile`: the run record (``run.json``), pin files, and the
  handshake between pinning and pruning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ckptwise.errors import ConfigError
from ckptwise.records import CheckpointInfo
from ckptwise.store import runfile
from ckptwise.store.backend import Backend, LocalBackend
from ckptwise.store.codecs import BYTEGROUP
from ckptwise.store.commit import RECHECK, CommitPlan, Committer, NewObject
from ckptwise.store.index import Index
from ckptwise.store.manifest import MAX_CHAIN, Manifest, TensorEntry
from ckptwise.store.planner import AUTO, DELTA_MODES, MODES, CodecPlanner
from ckptwise.store.reader import Problem, Reader

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["CheckpointStore"]


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
        self.planner = CodecPlanner(mode=codec, remote=not isinstance(backend, LocalBackend))
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

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the index from the committed manifests, and the branches."""
        self._index.refresh()
        self._index.branches()

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
    ) -> torch.Tensor:
        """Load one tensor, verified; see :meth:`Reader.read_tensor` for ``into``."""
        return self._reader.read_tensor(entry, step=step, name=name, into=into)

    def load_tensors(
        self,
        step: int,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        entries: Mapping[str, TensorEntry] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor of a committed step (or ``entries`` of it), verified; see
        :meth:`Reader.load_tensors`."""
        return self._reader.load_tensors(step, into=into, entries=entries)

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
    ) -> CheckpointInfo:
        """Write a checkpoint: new objects first, then the manifest, atomically.

        Objects whose content is already referenced by a committed checkpoint are not
        written again. Replacing an existing step is allowed (the new manifest wins).
        Float tensors named in ``lossy`` are stored quantized (codec ``q8``); their entries
        then hold what they decode to, and the error in ``note``.
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
        )
        return self._index.info(manifest.step)

    # the same commit in phases, for several processes writing one checkpoint together

    def plan(self, tensors: Mapping[str, torch.Tensor], *, rank: int = 0) -> CommitPlan:
        """Hash ``tensors`` (rank ``rank``'s) and find the objects no committed checkpoint
        holds yet."""
        return self._committer.plan(tensors, rank=rank)

    def check_space(self, needed: int, *, files: int = 0) -> None:
        """Raise :class:`~ckptwise.errors.StorageError` unless ``needed`` bytes in ``files``
        new objects fit, with the margin of :func:`~ckptwise.store.commit.space_margin`."""
        self._committer.check_space(needed, files=files)

    def write_objects(self, new: Mapping[str, NewObject]) -> dict[str, TensorEntry]:
        """Encode, write and sync new objects; returns each one's entry, by object id."""
        return self._committer.write_objects(new)

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
        when ``run.json`` is absent or unreadable). Pins and the writing of this record live
        in :mod:`~ckptwise.store.runfile`."""
        return runfile.read_kept(self.backend)
