"""The processes of a multi-process run, as the checkpoint sees them.

:class:`Ranks` is created by every process of a ``torchrun`` job (one manager per rank,
same arguments). It opens the checkpoint's own ``gloo`` process group, so checkpoint
collectives never queue behind (or deadlock with) the training's own collectives on the
default group, and offers the few collectives the save and restore protocols need. A
collective fails, on every rank, when any rank raised or died: :meth:`Ranks.agree` turns a
local failure into the same :class:`~ckptwise.errors.CheckpointError` everywhere, and
:meth:`Ranks.same` refuses, on every rank, ranks created with different arguments. A
collective torch itself fails (a rank died, or one waited past ``dist_timeout``) raises a
:class:`~ckptwise.errors.CheckpointError` too; gloo cannot use the group again after that.
:meth:`Ranks.meet` waits for every rank without the group, through torch's store, so a rank
that never comes is reported within a short wait and the group stays usable.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatError,
    RunLockedError,
    SnapshotError,
    StorageError,
)

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist
else:
    from ckptwise._lazy import dist, torch

__all__ = ["DEFAULT_TIMEOUT", "Failure", "Ranks", "arrival_timeout", "describe", "node_name"]

#: How long a rank waits for the others in one checkpoint collective. A save's longest wait
#: is a rank that writes more than the others, so it must cover a whole save.
DEFAULT_TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


def node_name() -> str:
    """The machine this process runs on, as the job sees it: torchrun's node rank
    (``GROUP_RANK``, set by ``torchrun --nnodes``) when set, else the host name. Ranks of one
    node share its local disk; ranks of two nodes share nothing but the job's collectives
    and the run's store (two "nodes" may be one host, as in tests: the node rank tells them
    apart)."""
    group = os.environ.get("GROUP_RANK")
    return f"node{group}" if group is not None else socket.gethostname()


def arrival_timeout(timeout: timedelta) -> timedelta:
    """How long :meth:`Ranks.meet` waits for every rank to call the same method: a minute,
    or a quarter of ``timeout`` (the manager's ``dist_timeout``) when that is shorter. Ranks
    start a restore within seconds of each other; a rank that has not come by then is not
    coming (it called something else), and saying so beats waiting out ``dist_timeout``."""
    return min(timeout / 4, timedelta(minutes=1))


#: the ckptwise error classes a failure keeps when it is raised on every rank
_KEPT: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (
        CheckpointNotFoundError,
        ConfigError,
        CorruptCheckpointError,
        FormatError,
        RunLockedError,
        SnapshotError,
        StorageError,
    )
}


@dataclass(frozen=True)
class Failure:
    """What went wrong on one rank, in a form every rank can raise."""

    rank: int
    kind: str  # the ckptwise error class name, or "" for anything else
    message: str

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> Failure:
        kind = type(exc).__name__ if isinstance(exc, CheckpointError) else ""
        return cls(rank, kind, f"{type(exc).__name__}: {exc}")

    def error(self, what: str) -> CheckpointError:
        """The error to raise on every rank, of the failing rank's class when it was a
        ckptwise error (a full disk stays a StorageError, a state that does not fit the
        checkpoint a ConfigError), else a CheckpointError."""
        text = f"{what} failed on rank {self.rank}: {self.message}"
        return _KEPT.get(self.kind, CheckpointError)(text)


#: the Ranks of this process not closed yet (held: a manager dropped without close() leaves
#: its group in torch's registry all the same), and the groups closed managers kept
_live: set[Ranks] = set()
_kept: list[Any] = []


def _destroy(group: Any) -> None:
    """Destroy ``group`` on this rank, unless the job already destroyed every group."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(ValueError):  # destroyed with all the job's groups
            dist.destroy_process_group(group)


@atexit.register
def _destroy_at_exit() -> None:
    for ranks in list(_live):
        ranks._close(at_exit=True)
    while _kept:
        _destroy(_kept.pop())


class Ranks:
    """This process's place among the ranks, and the checkpoint's process group."""

    def __init__(
        self,
        group: Any,
        *,
        rank: int,
        size: int,
        destroyable: bool = True,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        self._group = group
        #: how long a collective waits for the other ranks (the manager's ``dist_timeout``)
        self.timeout = timeout
        self._destroyable = destroyable
        self.rank = rank
        self.size = size
        #: collectives and meetings every rank passed: the same on every rank at the same
        #: point of the job, so it names a meeting's store keys (see meet)
        self._passed = 0
        _live.add(self)

    @property
    def group(self) -> Any:
        """The checkpoint's process group.

        Raises:
            CheckpointError: :meth:`close` destroyed it.
        """
        if self._group is None:
            raise CheckpointError(
                "the checkpoint's process group is closed (its CheckpointManager was closed); "
                "create a new CheckpointManager on every rank to save or restore together"
            )
        return self._group

    def close(self) -> None:
        """Destroy the checkpoint's process group on this rank (a group of a subgroup's
        ranks is kept until exit: see :meth:`detect`); safe to call twice, and after the job
        destroyed every group itself.

        Each manager opens a group of its own, so closing it frees its threads and
        connections at once. Groups still alive when the interpreter exits (managers never
        closed, subgroups' groups) are destroyed by an ``atexit`` hook, while the interpreter
        still runs: left to the interpreter's own teardown, a gloo worker thread that drops
        the last reference to a tensor Python created (this group's collectives send such
        tensors) needs the interpreter lock, and the process aborts with "terminate called
        without an active exception".
        """
        self._close(at_exit=False)

    def _close(self, *, at_exit: bool) -> None:
        group, self._group = self._group, None
        _live.discard(self)
        if group is None:
            return
        if self._destroyable or at_exit:
            _destroy(group)
        else:
            _kept.append(group)

    @classmethod
    def detect(
        cls, process_group: Any = None, *, timeout: timedelta = DEFAULT_TIMEOUT
    ) -> Ranks | None:
        """The ranks of the running process group, or ``None`` for a one-process run.

        Every rank must call this at the same point (it creates a process group).
        """
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ConfigError(
                    "process_group= was given but torch.distributed is not initialized; call "
                    "torch.distributed.init_process_group() first (torchrun sets it up)"
                )
            return None
        size = dist.get_world_size(process_group)
        if size == 1:
            return None
        members = None if process_group is None else dist.get_process_group_ranks(process_group)
        # For a subgroup of a larger job only its own ranks take part in creating the group
        # (local synchronization). torch names such a group after its ranks and the number of
        # groups alive, so one destroyed and another created would share a name, and the
        # new one could meet the old one's stale addresses in the store: it is kept until
        # exit. A group of every rank is named by a counter that never repeats, and
        # close() destroys it.
        local = members is not None and len(members) != dist.get_world_size()
        return cls._open(members, local=local, timeout=timeout)

    @classmethod
    def _open(cls, members: list[int] | None, *, local: bool, timeout: timedelta) -> Ranks:
        group = dist.new_group(
            ranks=members, backend="gloo", timeout=timeout, use_local_synchronization=local
        )
        return cls(
            group,
            rank=dist.get_rank(group),
            size=dist.get_world_size(group),
            destroyable=not local,
            timeout=timeout,
        )

    def channel(self) -> Ranks:
        """The same ranks on a new ``gloo`` group of their own, for collectives another
        thread runs beside this group's (a background save's commit); every rank calls it
        at the same point, as :meth:`detect`. Closed on its own."""
        members = dist.get_process_group_ranks(self.group)
        local = len(members) != dist.get_world_size()
        return self._open(members if local else None, local=local, timeout=self.timeout)

    @property
    def coordinator(self) -> bool:
        """Whether this is rank 0, which holds the lock, writes manifests and prunes."""
        return self.rank == 0

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` on rank 0 (``None`` elsewhere)."""
        out: list[Any] | None = [None] * self.size if self.coordinator else None
        self._run(lambda: dist.gather_object(value, out, dst=self._global(0), group=self.group))
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        box: list[Any] = [value]
        self._run(lambda: dist.broadcast_object_list(box, src=self._global(0), group=self.group))
        result: T = box[0]
        return result

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` on every rank."""
        out: list[Any] = [None] * self.size
        self._run(lambda: dist.all_gather_object(out, value, group=self.group))
        return out

    def max_flags(self, flags: list[int]) -> list[int]:
        """The element-wise maximum of every rank's ``flags`` (all ranks pass as many)."""
        tensor = torch.tensor(flags, dtype=torch.int64)
        self._run(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group))
        return [int(v) for v in tensor.tolist()]

    def leaders(self) -> list[int]:
        """For each rank, the lowest rank of its node (see :func:`node_name`): the one that
        writes what the node's ranks share on its local disk. A collective."""
        nodes = self.all_gather(node_name())
        return [nodes.index(node) for node in nodes]

    def barrier(self) -> None:
        """Wait until every rank got here."""
        self._run(lambda: dist.barrier(group=self.group))

    def agree(self, failure: Failure | None, what: str) -> None:
        """Raise on every rank when any rank failed (the first failure is named)."""
        failures = [f for f in self.all_gather(failure) if f is not None]
        if failures:
            raise failures[0].error(what)

    def each(self, work: Callable[[], T], what: str) -> list[T]:
        """Every rank's result of ``work`` (which each rank calls), or else the first failure
        raised on every rank (its own error on the rank that failed), as :meth:`agree` does:
        a rank that fails does not leave the others waiting for it. A collective."""
        try:
            mine: tuple[T | None, Failure | None] = (work(), None)
        except Exception as exc:
            self.all_gather((None, Failure.of(self.rank, exc)))
            raise
        sent = self.all_gather(mine)
        failures = [f for _, f in sent if f is not None]
        if failures:
            raise failures[0].error(what)
        return [cast(T, result) for result, _ in sent]

    def same(self, values: Mapping[str, str], failure: Failure | None, what: str) -> None:
        """Raise the same :class:`~ckptwise.errors.ConfigError` on every rank when the ranks'
        ``values`` differ (naming each that differs and which rank has which), else raise
        on every rank when any rank's ``failure`` is not ``None``: one collective.
        """
        sent = self.all_gather((dict(values), failure))
        differ = []
        for key in values:
            held: dict[str, list[int]] = {}
            for rank, (theirs, _) in enumerate(sent):
                held.setdefault(theirs.get(key, "(missing)"), []).append(rank)
            if len(held) > 1:
                ways = "; ".join(f"{_ranks(r)}: {v}" for v, r in held.items())
                differ.append(f"{key} differs ({ways})")
        if differ:
            raise ConfigError(
                f"{what}: the ranks were given different arguments: {'; '.join(differ)}. "
                "Create the manager with the same arguments on every rank; for a timestamped "
                "run folder, compute its name on rank 0 and broadcast it (e.g. with "
                "torch.distributed.broadcast_object_list)"
            )
        failures = [f for _, f in sent if f is not None]
        if failures:
            raise failures[0].error(what)

    def meet(self, what: str, *, within: timedelta | None = None) -> None:
        """Wait until every rank called ``what`` (every rank calls this at the same point of
        it), at most ``within`` (by default :func:`arrival_timeout` of :attr:`timeout`);
        else raise the same :class:`~ckptwise.errors.CheckpointError` on every rank that
        came.

        The ranks count themselves in torch's store, not in the checkpoint's group: a rank
        that never comes fails this wait only, and the group stays usable. The first rank
        to give up marks the meeting failed for all (a rank that comes later raises at
        once), unless the last to arrive marked it complete first. A meeting is named by
        how many collectives and meetings the ranks passed before it, which a failed one
        does not change: a rank that comes late meets the failure, and a meeting at the
        same point again fails at once (the ranks must first pass a collective together).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        within = arrival_timeout(self.timeout) if within is None else within
        key = f"ckptwise/{self.group.group_name}/{what}/{self._passed}"
        store = dist.distributed_c10d._get_default_store()
        try:
            if store.add(f"{key}/in", 1) == self.size:
                store.compare_set(f"{key}/out", "", "complete")
            with contextlib.suppress(dist.DistStoreError):  # waited long enough
                store.wait([f"{key}/out"], within)
            gave_up = f"rank {self.rank} waited {within.total_seconds():g} s"
            outcome = store.compare_set(f"{key}/out", "", gave_up).decode()
        except RuntimeError as exc:  # the store itself failed: the job's rendezvous is gone
            raise CheckpointError(f"{what}: the ranks could not meet: {exc}") from exc
        if outcome == "complete":
            self._passed += 1
        else:
            raise CheckpointError(
                f"{what} was not called by every rank ({outcome} for the others, who "
                f"called something else or nothing): every rank must call {what}, at the "
                "same point of the job"
            )

    def _run(self, collective: Callable[[], object]) -> None:
        """Run a collective on the group; torch's own failure becomes a CheckpointError."""
        try:
            collective()
            self._passed += 1
        except RuntimeError as exc:
            raise CheckpointError(
                f"a checkpoint collective failed on rank {self.rank}: another rank died, "
                "called another collective or did not come within dist_timeout; the "
                "checkpoint's process group cannot be used again (create a new "
                f"CheckpointManager on every rank): {type(exc).__name__}: {exc}"
            ) from exc

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def describe(value: object) -> str:
    """``repr(value)`` without memory addresses, the same on every rank for equal values."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))
