"""The processes of a multi-process run, as the checkpoint sees them.

:class:`Ranks` is created by every process of a ``torchrun`` job (one manager per rank,
same arguments). It opens the checkpoint's own ``gloo`` process group, so checkpoint
collectives never queue behind (or deadlock with) the training's own collectives on the
default group, and offers the few collectives the save and restore protocols need. A
collective fails, on every rank, when any rank raised or died: :meth:`Ranks.agree` turns a
local failure into the same :class:`~ckptwise.errors.CheckpointError` everywhere.
"""

from __future__ import annotations

import atexit
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

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

__all__ = ["DEFAULT_TIMEOUT", "Failure", "Ranks"]

#: How long a rank waits for the others in one checkpoint collective. A save's longest wait
#: is a rank that writes more than the others, so it must cover a whole save.
DEFAULT_TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


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

    def __init__(self, group: Any, *, rank: int, size: int, destroyable: bool = True) -> None:
        self._group = group
        self._destroyable = destroyable
        self.rank = rank
        self.size = size
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
        group = dist.new_group(
            ranks=members, backend="gloo", timeout=timeout, use_local_synchronization=local
        )
        return cls(group, rank=dist.get_rank(group), size=size, destroyable=not local)

    @property
    def coordinator(self) -> bool:
        """Whether this is rank 0, which holds the lock, writes manifests and prunes."""
        return self.rank == 0

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` on rank 0 (``None`` elsewhere)."""
        out: list[Any] | None = [None] * self.size if self.coordinator else None
        dist.gather_object(value, out, dst=self._global(0), group=self.group)
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        result: T = box[0]
        return result

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` on every rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def max_flags(self, flags: list[int]) -> list[int]:
        """The element-wise maximum of every rank's ``flags`` (all ranks pass as many)."""
        tensor = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in tensor.tolist()]

    def barrier(self) -> None:
        """Wait until every rank got here."""
        dist.barrier(group=self.group)

    def agree(self, failure: Failure | None, what: str) -> None:
        """Raise on every rank when any rank failed (the first failure is named)."""
        failures = [f for f in self.all_gather(failure) if f is not None]
        if failures:
            raise failures[0].error(what)

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"
