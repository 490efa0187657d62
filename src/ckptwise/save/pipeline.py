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

It is long because the three paths and the pipeline that serializes them are read together:
what runs on which thread, and which failures wait for which save, is the point of each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, Protocol

import torch

from ckptwise.distributed.ranks import Ranks
from ckptwise.distributed.save import RankState, commit_across_ranks, fail_across_ranks, rank_state
from ckptwise.distributed.shards import whole
from ckptwise.errors import CheckpointError
from ckptwise.records import CheckpointInfo
from ckptwise.report import Progress, metered_progress
from ckptwise.save.upkeep import Upkeep
from ckptwise.save.writer import AsyncWriter, SyncWriter, Writer
from ckptwise.snapshot import Snapshot, capture
from ckptwise.snapshot.copying import SnapshotCopier, available_memory, optimizers_in
from ckptwise.store import CheckpointStore, Manifest, RunLock, TensorEntry

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

    @property
    def background(self) -> bool:
        """Whether its saves are written on a background thread (else on the caller's)."""
        ...

    @property
    def copier(self) -> SnapshotCopier | None:
        """What copies a background save's tensors, if it copies them."""
        ...

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        """Take ``entries`` (state key -> value, as :func:`~ckptwise.snapshot.capture`
        reads them) on the training thread; the returned ``commit`` does the rest."""
        ...

    def refuse(self, step: int, error: Exception) -> NoReturn:
        """Raise ``error``, this process's reason not to save ``step``, having failed the
        save of ``step`` with it wherever other processes save it."""
        ...

    def close(self) -> None:
        """Let go of what the path holds (threads, hooks, copies, process groups)."""
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


class _Copies:
    """The private copies of a background save (see
    :class:`~ckptwise.snapshot.copying.SnapshotCopier`), taken only when they fit in memory.

    A copy that would not fit in the memory available now (keeping a tenth of it for
    training) is not taken: that save is written synchronously, with a warning the first
    time, never at the risk of the kernel killing the process.
    """

    def __init__(self, *, defer: bool) -> None:
        self.copier = SnapshotCopier(defer=defer)
        self._warned_memory = False

    def fits(self, step: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a copy of ``tensors`` fits; warns once when it does not."""
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

    def take(
        self, step: int, tensors: Mapping[str, torch.Tensor], entries: Mapping[str, Any]
    ) -> Callable[[], dict[str, torch.Tensor]]:
        """Start copying ``tensors`` (taken from ``entries``); returns what waits for the
        copies."""
        pending = self.copier.start(
            tensors,
            step=step,
            optimizers=optimizers_in(entries.values()),
            untracked=[k for k, v in entries.items() if getattr(v, "untracked_writes", False)],
        )
        return pending.result

    def close(self) -> None:
        self.copier.close()


class SyncPath:
    """One process, synchronously: the snapshot is taken and written before ``save``
    returns, so the state may change right after."""

    background = False
    copier: SnapshotCopier | None = None

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

    def refuse(self, step: int, error: Exception) -> NoReturn:
        raise error

    def close(self) -> None:
        return None


class AsyncPath:
    """One process, in the background: the state is copied to private memory before
    :meth:`capture` returns (with ``defer``, what the optimizers overwrite is copied while
    the next forward and backward run instead; see
    :class:`~ckptwise.snapshot.copying.SnapshotCopier`), and the commit reads only the copies.
    A save whose copy would not fit in memory is written synchronously (see :class:`_Copies`).
    """

    background = True

    def __init__(
        self, store: CheckpointStore, lock: RunLock, upkeep: Upkeep, *, defer: bool = False
    ) -> None:
        self._commit = _LocalCommit(store, lock, upkeep)
        self._copies = _Copies(defer=defer)
        self.copier = self._copies.copier

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        snap = _capture_whole(entries)
        tensors = snap.tensors
        total = sum(t.nbytes for t in tensors.values())
        if not self._copies.fits(step, tensors):
            return Captured(
                total,
                False,
                lambda order, progress: self._commit(order, progress, tensors, snap.tree),
            )
        copied = self._copies.take(step, tensors, entries)
        return Captured(
            total,
            True,
            lambda order, progress: self._commit(order, progress, copied(), snap.tree),
        )

    def refuse(self, step: int, error: Exception) -> NoReturn:
        raise error

    def close(self) -> None:
        self._copies.close()


class RanksPath:
    """Every rank of a job together (see :mod:`ckptwise.distributed.save`), synchronously
    or, with ``background``, as :class:`AsyncPath` does on each rank: the rank's state is
    copied before :meth:`capture` returns, and hashing, writing and the commit run on the
    rank's writer thread.

    A rank whose state cannot be captured still joins the save's protocol, to fail it on
    every rank instead of falling out of step. The protocol runs on a process group of its
    own, the commit channel, opened here (every rank creates its path at the same point):
    neither the training's groups nor the checkpoint group the training thread decides and
    restores on. That is why a background commit cannot interleave or deadlock with them:
    on each rank one thread at a time uses the channel (a save starts only once the last
    one ended, and :meth:`refuse` waits for it too), every rank runs the same collectives
    on it in the same order (one save after another, by step), and a writer never waits for
    its training thread, which waits for its writer only between saves. A rank whose copy
    does not fit (see :class:`_Copies`) runs the same protocol on its training thread; the
    other ranks' writers, which need nothing of it, finish it with it.
    """

    def __init__(
        self,
        store: CheckpointStore,
        ranks: Ranks,
        upkeep: Upkeep,
        *,
        background: bool = False,
        defer: bool = False,
        committed: Callable[[int, Sequence[TensorEntry]], object] | None = None,
    ) -> None:
        self._store = store
        self._upkeep = upkeep
        self.background = background
        self._copies = _Copies(defer=defer) if background else None
        self.copier = None if self._copies is None else self._copies.copier
        self._channel = ranks.channel()
        #: told each step every rank committed, with the entries of this rank's part, on
        #: every rank, in commit order (a cached run's upload confirmations: see
        #: ckptwise.distributed.confirm)
        self._committed = committed
        #: whether this rank's view of the run must be listed again before it plans (its
        #: first save, or one after a failure); else rank 0's word keeps it current
        self._stale = True

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        try:
            state = rank_state(capture(entries))
            if self._copies is None or not self._copies.fits(step, state.tensors):
                return Captured(
                    state.nbytes,
                    False,
                    lambda order, progress: self._commit(order, progress, lambda: state),
                )
            copied = self._copies.take(step, state.tensors, entries)
        except Exception as exc:
            failure = exc

            def failed() -> RankState:
                raise failure

            return Captured(0, self.background, lambda o, p: self._commit(o, p, failed))

        def taken() -> RankState:
            return dataclasses.replace(state, tensors=copied())

        return Captured(state.nbytes, True, lambda o, p: self._commit(o, p, taken))

    def _commit(
        self, order: SaveOrder, progress: Progress, taken: Callable[[], RankState]
    ) -> CheckpointInfo:

        def prepared() -> RankState:
            # inside the protocol: a failure here (rank 0 branching off) fails the save on
            # every rank instead of leaving the others waiting for rank 0
            self._upkeep.before_commit(order.step, order.now)
            return taken()

        ours = Manifest(
            step=order.step,
            time=order.now.timestamp(),
            tensors={},
            metrics=dict(order.metrics),
            reasons=order.reasons,
            extra=dict(order.extra),
        )
        stale, self._stale = self._stale, True
        info = commit_across_ranks(
            self._channel,
            self._store,
            ours,
            prepared,
            # on rank 0, once every rank's part is durable; no read-back: the other ranks
            # wait for rank 0 within a timeout
            after_commit=lambda: self._upkeep.after_commit(order.step, order.now, verify=False),
            progress=progress,
            stale=stale,
        )
        self._stale = False
        if self._committed is not None:
            try:
                part = list(self._store.manifest(order.step).view(self._channel.rank).values())
            except CheckpointError:
                part = []  # pruned as it committed: nothing waits for it
            self._committed(order.step, part)
        return info

    def refuse(self, step: int, error: Exception) -> NoReturn:
        self._stale = True
        fail_across_ranks(self._channel, self._store, step, error)

    def close(self) -> None:
        try:
            if self._copies is not None:
                self._copies.close()
        finally:
            self._channel.close()


class SavePipeline:
    """Saves one state at a time through a :class:`SavePath`, at most one in flight.

    Errors keep their class on every path (see :func:`~ckptwise.save.writer.save_failed`): a
    synchronous save raises from :meth:`write`, a background one from the next
    :meth:`capture`, :meth:`poll`, :meth:`wait` or :meth:`close`. Callbacks given to
    :meth:`write` run on the caller's thread once their save has committed, or with a later
    save that commits if theirs failed.
    """

    def __init__(self, path: SavePath, *, show: bool = True, joint: bool = False) -> None:
        self.path = path
        self._show = show
        #: several processes save together: a failure of the save in flight must not keep
        #: this one out of the next save the others start (see :meth:`wait`)
        self._joint = joint
        self._held: CheckpointError | None = None
        self._writer: Writer = AsyncWriter() if path.background else SyncWriter()
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
        copier = self.path.copier
        if copier is None:
            return 0, 0
        return copier.copied_bytes, copier.deferred_bytes

    def capture(self, step: int, entries: Mapping[str, Any]) -> Captured:
        """Wait for the save in flight (see :meth:`before_save`), then take ``entries`` for
        a save of ``step``."""
        self.before_save()
        return self.path.capture(step, entries)

    def before_save(self) -> None:
        """Wait for the save in flight before another starts; its failure is raised here,
        or held where several processes save together (see :meth:`poll`)."""
        self._hold_if_joint(self._writer.wait)

    def poll(self) -> CheckpointInfo | None:
        """The checkpoint a background save committed since the last call, else ``None``.

        Its failure is raised here, except where several processes save together: then it
        is held, and raised by :meth:`raise_held` or by the next :meth:`write` once the new
        save has started. Each process learns of a failure when its own writer ends, one
        maybe a step before another, and every process must still join every decision and
        save the others make meanwhile.
        """
        return self._hold_if_joint(self._writer.poll)

    def raise_held(self) -> None:
        """Raise the failure :meth:`poll` or :meth:`before_save` held, if any."""
        held, self._held = self._held, None
        if held is not None:
            raise held

    def _hold_if_joint(self, ended: Callable[[], CheckpointInfo | None]) -> CheckpointInfo | None:
        try:
            return self._committed(ended())
        except CheckpointError as exc:
            if not self._joint:
                raise
            self._held = self._held or exc
            return None

    def refuse(self, step: int, error: Exception) -> NoReturn:
        """Raise ``error``, this process's reason not to save ``step``, once the save in
        flight ended, failing the save of ``step`` wherever other processes save it (see
        :meth:`SavePath.refuse`). A failure of the save in flight is logged: the other
        processes save ``step`` all the same, so this one must join them."""
        try:
            self.wait()
            self.raise_held()
        except CheckpointError as exc:
            log.error("%s", exc)
        self.path.refuse(step, error)

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
        background = captured.background or not self.path.background
        writer = self._writer if background else SyncWriter()
        info = self._committed(writer.write(shown, step=step))
        self.raise_held()
        return info

    def _committed(self, info: CheckpointInfo | None) -> CheckpointInfo | None:
        """Run what waits for a commit (request files are removed only once it is durable)."""
        if info is not None:
            actions, self._on_commit = self._on_commit, []
            for action in actions:
                action()
        return info

    def wait(self) -> CheckpointInfo | None:
        """Block until no save is in flight; re-raise the failure of the last one (or one
        held, see :meth:`poll`)."""
        info = self._committed(self._writer.wait())
        self.raise_held()
        return info

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
