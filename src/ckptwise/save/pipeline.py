"""The save pipeline: a decided save of a state becomes a committed checkpoint.

A save goes through two phases. :meth:`SavePipeline.capture` runs on the training thread and
takes what must be taken before training moves on (a snapshot of the state, or the private
copy an async save needs); :meth:`SavePipeline.write` hands the rest (hash, encode, write,
commit, then the run's upkeep) to a writer, on the caller's thread or in the background.
How the state is captured and committed is a :class:`SavePath`: one process synchronously
(:class:`SyncPath`), one process in the background (:class:`AsyncPath`), or every rank of a
job together (:class:`RanksPath`). Nothing here calls back into the manager: what a commit
must be followed by is the :class:`~ckptwise.save.upkeep.Upkeep` it was given, and what the
caller wants done once a save is durable is a callback run on the caller's thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import torch

from ckptwise.distributed.ranks import Ranks
from ckptwise.distributed.save import commit_across_ranks
from ckptwise.distributed.shards import whole
from ckptwise.records import CheckpointInfo
from ckptwise.report import Progress, metered_progress
from ckptwise.save.upkeep import Upkeep
from ckptwise.save.writer import AsyncWriter, SyncWriter, Writer
from ckptwise.snapshot import Snapshot, capture
from ckptwise.snapshot.copying import SnapshotCopier, available_memory, optimizers_in
from ckptwise.store import CheckpointStore, Manifest, RunLock

__all__ = [
    "AsyncPath",
    "Captured",
    "RanksPath",
    "SaveOrder",
    "SavePath",
    "SavePipeline",
    "SyncPath",
]

log = logging.getLogger("ckptwise")


@dataclass(frozen=True)
class SaveOrder:
    """What a checkpoint records besides its tensors, fixed once the save is decided."""

    step: int
    now: datetime
    metrics: Mapping[str, float]
    reasons: tuple[str, ...]
    extra: Mapping[str, Any]


@dataclass(frozen=True)
class Captured:
    """A state taken from training, ready to be committed by ``commit`` on a writer.

    ``background`` says whether ``commit`` may run beside training (the tensors it reads are
    private copies); ``nbytes`` is what the state holds, for progress reports, which
    ``commit`` tells how many bytes it has moved.
    """

    nbytes: int
    background: bool
    commit: Callable[[SaveOrder, Progress], CheckpointInfo]


class SavePath(Protocol):
    """One way from a state to a committed checkpoint."""

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        """Take ``entries`` (state key -> value, as :func:`~ckptwise.snapshot.capture`
        reads them) on the training thread; the returned ``commit`` does the rest."""
        ...

    def close(self) -> None:
        """Let go of what the path holds (threads, hooks, copies)."""
        ...


def _capture_whole(entries: Mapping[str, Any]) -> Snapshot:
    """:func:`~ckptwise.snapshot.capture` for one process: a ``DTensor`` (FSDP2 in a world
    of one) is taken as the plain tensor of its values, which are all here."""
    snap = capture(entries)
    return Snapshot({k: whole(t, k) for k, t in snap.tensors.items()}, snap.tree)


class _LocalCommit:
    """The commit of one process: branch off, write the checkpoint, then upkeep."""

    def __init__(self, store: CheckpointStore, lock: RunLock, upkeep: Upkeep) -> None:
        self._store = store
        self._lock = lock
        self._upkeep = upkeep

    def __call__(
        self,
        order: SaveOrder,
        progress: Progress,
        tensors: Mapping[str, torch.Tensor],
        tree: Any,
    ) -> CheckpointInfo:
        self._upkeep.before_commit(order.step, order.now)
        self._lock.check()  # fenced: never commit next to a writer that took over
        info = self._store.commit(
            order.step,
            tensors,
            tree=tree,
            metrics=order.metrics,
            reasons=order.reasons,
            extra=order.extra,
            time=order.now.timestamp(),
            progress=progress,
        )
        self._upkeep.after_commit(order.step, order.now)
        return info


class SyncPath:
    """One process, synchronously: the snapshot is taken and written before ``save``
    returns, so the state may change right after."""

    def __init__(self, store: CheckpointStore, lock: RunLock, upkeep: Upkeep) -> None:
        self._commit = _LocalCommit(store, lock, upkeep)

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        snap = _capture_whole(entries)
        total = sum(t.nbytes for t in snap.tensors.values())
        return Captured(
            total,
            False,
            lambda order, progress: self._commit(order, progress, snap.tensors, snap.tree),
        )

    def close(self) -> None:
        return None


class AsyncPath:
    """One process, in the background: the state is copied to private memory before
    :meth:`capture` returns (with ``defer``, what the optimizers overwrite is copied while
    the next forward and backward run instead; see
    :class:`~ckptwise.snapshot.copying.SnapshotCopier`), and the commit reads only the copies.

    A save whose copy would not fit in the memory available is taken synchronously, with
    a warning the first time.
    """

    def __init__(
        self, store: CheckpointStore, lock: RunLock, upkeep: Upkeep, *, defer: bool = False
    ) -> None:
        self._commit = _LocalCommit(store, lock, upkeep)
        self.copier = SnapshotCopier(defer=defer)
        self._warned_memory = False

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        snap = _capture_whole(entries)
        tensors = snap.tensors
        total = sum(t.nbytes for t in tensors.values())
        if not self._copy_fits(step, tensors):
            return Captured(
                total,
                False,
                lambda order, progress: self._commit(order, progress, tensors, snap.tree),
            )
        pending = self.copier.start(
            tensors,
            step=step,
            optimizers=optimizers_in(entries.values()),
            untracked=[k for k, v in entries.items() if getattr(v, "untracked_writes", False)],
        )
        return Captured(
            total,
            True,
            lambda order, progress: self._commit(order, progress, pending.result(), snap.tree),
        )

    def _copy_fits(self, step: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether the private copy fits in the memory available now (keeping a tenth of it
        for training); warns once when it does not."""
        needed = self.copier.new_bytes(tensors)
        free = available_memory()
        if free is None or needed <= 0.9 * free:
            return True
        if not self._warned_memory:
            log.warning(
                "step %d is saved synchronously: its background copy needs %.1f GiB more "
                "memory and %.1f GiB are available; save less (content=cw.trainable_only() "
                "for frozen backbones) or pass async_save=False to silence this",
                step,
                needed / 2**30,
                free / 2**30,
            )
            self._warned_memory = True
        return False

    def close(self) -> None:
        self.copier.close()


class RanksPath:
    """Every rank of a job together (see :mod:`ckptwise.distributed.save`): the capture
    runs inside the save's protocol, so a rank whose state cannot be captured fails the
    save on every rank instead of falling out of step."""

    def __init__(self, store: CheckpointStore, ranks: Ranks, upkeep: Upkeep) -> None:
        self._store = store
        self._ranks = ranks
        self._upkeep = upkeep

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        return Captured(0, False, lambda order, progress: self._commit(order, progress, entries))

    def _commit(
        self, order: SaveOrder, progress: Progress, entries: Mapping[str, Any]
    ) -> CheckpointInfo:
        self._upkeep.before_commit(order.step, order.now)
        ours = Manifest(
            step=order.step,
            time=order.now.timestamp(),
            tensors={},
            metrics=dict(order.metrics),
            reasons=order.reasons,
            extra=dict(order.extra),
        )
        return commit_across_ranks(
            self._ranks,
            self._store,
            ours,
            lambda: capture(entries),
            # on rank 0, once every rank's part is durable; no read-back: the other ranks
            # wait for rank 0 within a timeout
            after_commit=lambda: self._upkeep.after_commit(order.step, order.now, verify=False),
            progress=progress,
        )

    def close(self) -> None:
        return None


class SavePipeline:
    """Saves one state at a time through a :class:`SavePath`, at most one in flight.

    Errors keep their class on every path (see :func:`~ckptwise.save.writer.save_failed`): a
    synchronous save raises from :meth:`write`, a background one from the next
    :meth:`capture`, :meth:`poll`, :meth:`wait` or :meth:`close`. Callbacks given to
    :meth:`write` run on the caller's thread once their save has committed, or with a later
    save that commits if theirs failed.
    """

    def __init__(self, path: SavePath, *, show: bool = True) -> None:
        self.path = path
        self._show = show
        self._writer: Writer = AsyncWriter() if isinstance(path, AsyncPath) else SyncWriter()
        self._on_commit: list[Callable[[], None]] = []
        #: the step of the last save handed to a writer
        self.saving: int | None = None
        #: bytes the commits added to the store (new objects, after dedup)
        self.bytes_written = 0

    @property
    def busy(self) -> bool:
        """Whether a background save is still writing."""
        return self._writer.busy

    @property
    def last_copy(self) -> tuple[int, int]:
        """Bytes the last async save copied before ``capture`` returned, and in the
        background while training went on (only with ``defer``)."""
        if not isinstance(self.path, AsyncPath):
            return 0, 0
        return self.path.copier.copied_bytes, self.path.copier.deferred_bytes

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        """Wait for the save in flight, then take ``entries`` for a save of ``step``."""
        self.wait()
        return self.path.capture(step, entries)

    def write(
        self, captured: Captured, order: SaveOrder, *, on_commit: Callable[[], None] | None = None
    ) -> CheckpointInfo | None:
        """Commit ``captured`` as ``order`` says; returns the checkpoint, or ``None`` while
        it is still writing in the background."""
        if on_commit is not None:
            self._on_commit.append(on_commit)

        def job(progress: Progress) -> CheckpointInfo:
            info = captured.commit(order, progress)
            self.bytes_written += info.new_bytes
            return info

        step = order.step
        shown = metered_progress(
            job, f"saving step {step}", f"saved step {step}", captured.nbytes, show=self._show
        )
        self.saving = step
        # an async path's save taken synchronously (its copy did not fit) bypasses the thread
        background = captured.background or not isinstance(self._writer, AsyncWriter)
        writer = self._writer if background else SyncWriter()
        return self._committed(writer.write(shown, step=step))

    def _committed(self, info: CheckpointInfo | None) -> CheckpointInfo | None:
        """Run what waits for a commit (request files are removed only once it is durable)."""
        if info is not None:
            actions, self._on_commit = self._on_commit, []
            for action in actions:
                action()
        return info

    def poll(self) -> CheckpointInfo | None:
        """The checkpoint a background save committed since the last call (raising its
        failure), else ``None``."""
        return self._committed(self._writer.poll())

    def wait(self) -> CheckpointInfo | None:
        """Block until no save is in flight; re-raise the failure of the last one."""
        return self._committed(self._writer.wait())

    def settle(self, step: int) -> None:
        """Before a read of ``step``: wait for its save if it is the one in flight (a read
        naming the step just saved means it; listings show committed steps only)."""
        if self.busy and step == self.saving:
            self.wait()

    def close(self) -> None:
        """Wait for the last save, then let go of the writer and the path, even when the
        last save failed (its error is raised)."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.path.close)
            stack.callback(self._writer.close)
            self.wait()
