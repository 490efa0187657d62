"""Private copies of a snapshot's tensors for a background save.

By default :class:`SnapshotCopier` copies every tensor of a snapshot before the save returns
(into buffers kept from the previous save, so no fresh memory is faulted in): whatever the
loop does next, through an optimizer, ``.data``, numpy or a restore, the checkpoint holds
the state as it was at ``step()``. Nothing is reused or deferred on the strength of torch's
version counter, which writes through ``.data`` and numpy never move.

With ``defer=True`` (the manager's ``defer_copy=True``) the copier splits a snapshot in two,
under a contract the user accepts: until an optimizer's next ``step()``, its parameters and
states change only through that optimizer. Those tensors are copied on a copy thread while
the next forward and backward run, and the optimizer's next ``step()`` waits, through a
pre-step hook, for the part of the copy it would overwrite; everything else (buffers written
in forward, an EMA model, numpy arrays, anything no hook guards) is copied before the save
returns. An in-place write that torch's version counter sees before the background copy
reached it fails the save (:class:`SnapshotError`, never a mixed checkpoint); a write through
``.data`` breaks the contract and cannot be seen afterwards.

It is long because the copy's soundness rests on the pieces being read together: what is
deferred, the optimizer hooks, the version checks and the CUDA stream handling.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptwise.errors import SnapshotError

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["PendingCopy", "SnapshotCopier", "available_memory", "optimizers_in"]

#: how deep wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
#: ``LightningOptimizer``) are unwrapped through their ``.optimizer`` attribute
_MAX_WRAPPERS = 8

View = tuple[Any, ...]


def _view(tensor: torch.Tensor) -> View:
    """Which memory a tensor reads: storage, offset, shape, strides, dtype and device (of
    its local values, for a ``DTensor``: FSDP2's parameters and their optimizer states)."""
    to_local = getattr(tensor, "to_local", None)
    if to_local is not None:
        tensor = to_local()
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        tensor.device,
    )


def available_memory() -> int | None:
    """Bytes of memory the kernel says can be allocated without swapping (Linux's
    ``MemAvailable``); ``None`` where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _hookable(optimizer: Any) -> bool:
    """Whether ``optimizer.step()`` runs torch's pre-step hooks (``Optimizer.__init__`` ran)."""
    return (
        isinstance(optimizer, torch.optim.Optimizer)
        and "_optimizer_step_pre_hooks" in vars(optimizer)
        and bool(getattr(type(optimizer).step, "hooked", False))
    )


def optimizers_in(values: Iterable[Any]) -> list[torch.optim.Optimizer]:
    """The torch optimizers among ``values`` whose ``step()`` a pre-step hook can guard.

    Wrappers are followed through ``.optimizer`` to the optimizer whose own ``step()`` does
    the writes. Anything else (a DeepSpeed engine's optimizer, a hand-written one) is not
    returned, so its tensors are copied before the save returns.
    """
    found: dict[int, torch.optim.Optimizer] = {}
    for value in values:
        current = value
        for _ in range(_MAX_WRAPPERS):
            if _hookable(current):
                found.setdefault(id(current), current)
            inner = getattr(current, "optimizer", None)
            if inner is None or inner is current or not isinstance(inner, torch.optim.Optimizer):
                break
            current = inner
    return list(found.values())


@dataclass
class _Copy:
    """One tensor to copy: its name, the source as it was at the save, the source's version
    counter then, and the target."""

    name: str
    source: torch.Tensor
    version: int
    target: torch.Tensor


def _fill(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into ``target`` on the calling (copy) thread.

    Contiguous CPU tensors are copied as bytes by numpy, on this thread alone: torch's copy
    would start a parallel region of its own beside training's and oversubscribe the cores.
    """
    if (
        source.device.type == "cpu"
        and source.is_contiguous()
        and target.is_contiguous()
        and source.nbytes > 0
    ):
        dst = target.view(-1).view(torch.uint8).numpy()
        src = source.view(-1).view(torch.uint8).numpy()
        dst[...] = src  # numpy releases the GIL for a plain byte copy
    else:
        target.copy_(source, non_blocking=source.device.type == "cuda")


def _cuda_devices(copies: Iterable[_Copy]) -> list[torch.device]:
    """The CUDA devices of the copies' sources, in order of appearance."""
    return list(dict.fromkeys(c.source.device for c in copies if c.source.device.type == "cuda"))


@dataclass
class PendingCopy:
    """A snapshot whose guarded tensors are still being copied on the copy thread.

    ``groups[i]`` holds the tensors the ``i``-th guarded optimizer writes (a parameter two
    optimizers share goes with the first); ``waits`` maps an optimizer to the group its
    ``step()`` waits for, groups being copied in order.
    """

    step: int
    out: dict[str, torch.Tensor]
    groups: list[list[_Copy]]
    waits: dict[int, int]
    #: the CUDA device of the deferred copies (``None``: on the CPU)
    device: Any = None
    _done: list[threading.Event] = field(default_factory=list)
    _gpu_done: list[Any] = field(default_factory=list)
    _start_event: Any = None
    _future: Future[None] | None = None
    #: which groups' sources were checked against their version at the copy (see _check)
    _checked: list[bool] = field(default_factory=list)
    #: the sources found written in place under their copy
    _changed: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._done = [threading.Event() for _ in self.groups]
        self._gpu_done = [None] * len(self.groups)
        self._checked = [False] * len(self.groups)

    @property
    def deferred(self) -> bool:
        """Whether any tensor is copied in the background."""
        return any(self.groups)

    def run(self) -> None:
        """Copy every group in order (on the copy thread), then check no source changed."""
        stream = None
        try:
            if self.device is not None:  # the copy thread's current device may be another
                stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
                if self._start_event is not None:
                    stream.wait_event(self._start_event)
            for i, group in enumerate(self.groups):
                try:
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            for c in group:
                                _fill(c.target, c.source)
                            self._gpu_done[i] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                            self._gpu_done[i].record(stream)
                    else:
                        for c in group:
                            _fill(c.target, c.source)
                        self._check(i)  # copied: only the optimizer's step() may write now
                finally:
                    self._done[i].set()
            if stream is not None:
                stream.synchronize()
        finally:
            for event in self._done:  # never leave a step() waiting
                event.set()
        self._check_unchanged()

    def _check(self, index: int) -> None:
        """Compare group ``index``'s sources with their versions at ``step()``, once: when
        its copy is done (CPU) or when an optimizer is let go to write it (CUDA: the copy
        may still run, but every write launched from then on is ordered after it). Later
        writes are the optimizer's own, so checking all groups only at the end would take
        an optimizer that stepped meanwhile (a second optimizer, a CUDA copy slower than a
        forward and backward) for a write by hand."""
        with self._lock:
            if self._checked[index]:
                return
            self._checked[index] = True
            self._changed.extend(
                c.name for c in self.groups[index] if c.source._version != c.version
            )

    def _check_unchanged(self) -> None:
        for i in range(len(self.groups)):
            self._check(i)
        changed = self._changed
        if changed:
            shown = ", ".join(changed[:5]) + (
                f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            )
            raise SnapshotError(
                f"step {self.step} was not saved: {shown} was written in place after the save "
                "began and before its background copy finished, by something other than the "
                "optimizer's step() (which waits for the copy): defer_copy=True promises no such "
                "write; move it after the next optimizer.step(), or drop defer_copy=True"
            )

    def wait_for(self, optimizer: Any) -> None:
        """Block until the copy no longer needs what ``optimizer.step()`` overwrites."""
        index = self.waits.get(id(optimizer))
        if index is None:
            return
        self._done[index].wait()
        for earlier in range(index + 1):  # groups are copied in order: all these are let go
            self._check(earlier)
        gpu = self._gpu_done[index]
        if gpu is not None:  # the step's kernels run after the copy's, without a CPU stall
            torch.cuda.current_stream(self.device).wait_event(gpu)

    def result(self) -> dict[str, torch.Tensor]:
        """The private copies, once all are taken (raising :class:`SnapshotError` when a
        source changed under the copy)."""
        if self._future is not None:
            self._future.result()
        return self.out


class _StepGuard:
    """Pre-step hooks that make each optimizer wait for its share of the pending copy."""

    def __init__(self) -> None:
        self._hooks: dict[int, tuple[weakref.ref[Any], Any]] = {}
        self.pending: PendingCopy | None = None

    def watch(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        for optimizer in optimizers:
            hooked = self._hooks.get(id(optimizer))
            if hooked is not None and hooked[0]() is optimizer:
                continue
            handle = optimizer.register_step_pre_hook(self._before_step)
            self._hooks[id(optimizer)] = (weakref.ref(optimizer), handle)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self.pending
        if pending is not None:
            pending.wait_for(optimizer)
        return

    def close(self) -> None:
        for _, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.pending = None


class SnapshotCopier:
    """Copies a snapshot's tensors to private CPU memory so training can go on at once.

    Every tensor is copied at every save (see the module docstring for ``defer``); the
    buffers are kept from one save to the next, so a new copy must not start before the
    previous one is written (the pipeline keeps one save in flight). CUDA tensors go to
    pinned memory, ordered after the kernels that produced them.
    """

    def __init__(self, *, defer: bool = False) -> None:
        self.defer = defer
        self._buffers: dict[str, torch.Tensor] = {}
        self._guard = _StepGuard()
        self._pool: ThreadPoolExecutor | None = None
        #: bytes the last call copied before it returned, and in the background
        self.copied_bytes = 0
        self.deferred_bytes = 0

    @property
    def pending(self) -> PendingCopy | None:
        """The copy still running, if any."""
        return self._guard.pending

    def _target(self, name: str, source: torch.Tensor) -> torch.Tensor:
        kept = self._buffers.get(name)
        if (
            kept is not None
            and kept.shape == source.shape
            and kept.dtype == source.dtype
            and kept.is_pinned() == (source.device.type == "cuda")
        ):
            # the previous save is written by now (one in flight): reuse its buffer, which
            # spares the page faults of fresh memory -- most of a copy's cost on the CPU
            return kept
        return torch.empty(
            source.shape, dtype=source.dtype, pin_memory=source.device.type == "cuda"
        )

    def new_bytes(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Bytes of memory a copy of ``tensors`` would allocate (buffers are reused)."""
        total = 0
        for name, tensor in tensors.items():
            kept = self._buffers.get(name)
            if kept is None or kept.shape != tensor.shape or kept.dtype != tensor.dtype:
                total += tensor.nbytes
        return total

    def start(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        step: int,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        untracked: Iterable[str] = (),
    ) -> PendingCopy:
        """Copy ``tensors``: all of them before this returns, or with ``defer`` what no
        optimizer in ``optimizers`` guards now and the rest in the background.

        ``optimizers`` (see :func:`optimizers_in`) are the ones whose next ``step()`` waits
        for the copy of their parameters and states. Tensors under the state keys
        ``untracked`` are never deferred: their owner writes them without bumping the
        version counter (DeepSpeed updates its 16-bit weights through ``.data``).
        """
        fresh = tuple(untracked)
        if self.pending is not None:
            self.pending.result()  # the pipeline waits before a new save; this is a guard
        guarded = optimizers if self.defer else ()
        order: dict[View, int] = {}  # view -> index of the optimizer whose step writes it
        for index, optimizer in enumerate(guarded):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    order.setdefault(_view(param.detach()), index)
                    for value in optimizer.state.get(param, {}).values():
                        if isinstance(value, torch.Tensor):
                            order.setdefault(_view(value.detach()), index)
        out: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        now: list[_Copy] = []
        later: list[list[_Copy]] = [[] for _ in guarded]
        for name, tensor in tensors.items():
            source = tensor.detach()
            target = out[name] = buffers[name] = self._target(name, source)
            owner = order.get(_view(source))
            if owner is not None and any(name == k or name.startswith(f"{k}/") for k in fresh):
                owner = None
            (now if owner is None else later[owner]).append(
                _Copy(name, source, source._version, target)
            )
        if len(_cuda_devices(c for g in later for c in g)) > 1:
            # one side stream serves one device: a state spread over several GPUs is copied
            # before step() returns, each device synchronized
            now += [c for g in later for c in g]
            later = [[] for _ in guarded]
        # groups are copied in order, so waiting for group k covers the earlier ones too,
        # where a parameter optimizer k shares with an earlier optimizer was put
        waits = {
            id(optimizer): index
            for index, optimizer in enumerate(guarded)
            if any(later[: index + 1])
        }
        pending = PendingCopy(step, out, later, waits)
        self.copied_bytes = sum(c.target.nbytes for c in now)
        self.deferred_bytes = sum(c.target.nbytes for g in later for c in g)
        self._buffers = buffers
        self._copy_now(now)
        if not pending.deferred:
            return pending
        devices = _cuda_devices(c for g in later for c in g)
        if devices:
            pending.device = devices[0]
            pending._start_event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            pending._start_event.record(torch.cuda.current_stream(pending.device))
        # the hooks see the pending copy before anything else can call step()
        self._guard.watch([o for o in guarded if id(o) in pending.waits])
        self._guard.pending = pending
        if self._pool is None:
            # normal priority: a step() may wait for this thread (unlike the writer's)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptwise-copy")

        def run() -> None:
            try:
                pending.run()
            finally:
                if self._guard.pending is pending:
                    self._guard.pending = None

        pending._future = self._pool.submit(run)
        return pending

    def _copy_now(self, copies: list[_Copy]) -> None:
        """Copy what is not deferred before the save returns (on the caller's thread)."""
        for c in copies:
            c.target.copy_(c.source, non_blocking=c.source.device.type == "cuda")
        for device in _cuda_devices(copies):
            torch.cuda.synchronize(device)

    def close(self) -> None:
        """Wait for a copy in flight, remove the hooks, stop the copy thread and let go of
        the copy buffers."""
        try:
            if self.pending is not None:
                self.pending.result()
        finally:
            self._buffers = {}
            self._guard.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
