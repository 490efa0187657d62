"""What a run's checkpoints cost on disk, and what changed between two of them.

Pure functions over manifests (and, for :func:`diff_manifests`, a tensor reader), so
``ckptwise du`` and ``ckptwise diff`` print what :class:`~ckptwise.read.run.Run` computes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ckptwise.store import Manifest, TensorEntry

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["CheckpointUsage", "TensorChange", "Usage", "diff_manifests", "usage_of"]


@dataclass(frozen=True, kw_only=True)
class CheckpointUsage:
    """One checkpoint's bytes: what it holds, what it wrote, what only it keeps on disk and
    what it shares with other checkpoints."""

    step: int
    logical_bytes: int
    written_bytes: int
    exclusive_bytes: int
    shared_bytes: int


@dataclass(frozen=True, kw_only=True)
class Usage:
    """A run's bytes: logical (every tensor of every checkpoint), unique (after dedup) and
    physical (after compression)."""

    checkpoints: list[CheckpointUsage] = field(default_factory=list)
    logical_bytes: int = 0
    unique_bytes: int = 0
    physical_bytes: int = 0
    #: objects no checkpoint names (a failed or interrupted save's), and their bytes on disk
    unreferenced_objects: int = 0
    unreferenced_bytes: int = 0

    @property
    def saved_by_dedup(self) -> int:
        return self.logical_bytes - self.unique_bytes

    @property
    def saved_by_compression(self) -> int:
        return self.unique_bytes - self.physical_bytes


def usage_of(manifests: Mapping[int, Manifest]) -> Usage:
    """The usage of the checkpoints described by ``manifests`` (step -> manifest)."""
    refs = Counter(oid for m in manifests.values() for oid in {e.object for e in m.entries()})
    objects: dict[str, TensorEntry] = {e.object: e for m in manifests.values() for e in m.entries()}
    rows = []
    for step, manifest in sorted(manifests.items()):
        own = {e.object: e for e in manifest.entries()}  # every rank's, for several processes
        rows.append(
            CheckpointUsage(
                step=step,
                logical_bytes=manifest.logical_bytes,
                written_bytes=manifest.written_bytes,
                exclusive_bytes=sum(e.stored_bytes for o, e in own.items() if refs[o] == 1),
                shared_bytes=sum(e.stored_bytes for o, e in own.items() if refs[o] > 1),
            )
        )
    return Usage(
        checkpoints=rows,
        logical_bytes=sum(r.logical_bytes for r in rows),
        unique_bytes=sum(e.nbytes for e in objects.values()),
        physical_bytes=sum(e.stored_bytes for e in objects.values()),
    )


Status = Literal["same", "changed", "reshaped", "added", "removed"]


@dataclass(frozen=True, kw_only=True)
class TensorChange:
    """How one tensor differs between two checkpoints.

    For changed tensors of equal shape and dtype: how many elements differ and, for floats,
    the largest absolute change and the norm of the change relative to the older value.
    """

    name: str
    status: Status
    changed_elements: int | None = None
    elements: int | None = None
    max_abs_change: float | None = None
    relative_change: float | None = None


def diff_manifests(
    a: Manifest, b: Manifest, read: Callable[[int, str], torch.Tensor], step_a: int, step_b: int
) -> list[TensorChange]:
    """Compare two checkpoints tensor by tensor (rank 0's, sharded ones whole), reading only
    tensors whose objects differ."""
    out: list[TensorChange] = []
    for name in sorted(set(a.tensors) | set(b.tensors)):
        ea, eb = a.tensors.get(name), b.tensors.get(name)
        if ea is None or eb is None:
            out.append(TensorChange(name=name, status="added" if ea is None else "removed"))
        elif ea.object == eb.object:
            out.append(TensorChange(name=name, status="same"))
        elif ea.shape != eb.shape or ea.dtype != eb.dtype:
            out.append(TensorChange(name=name, status="reshaped"))
        else:
            ta, tb = read(step_a, name), read(step_b, name)
            max_abs = relative = None
            if ta.is_floating_point():
                delta = tb.double() - ta.double()
                norm = ta.double().norm().item()
                max_abs = delta.abs().max().item() if delta.numel() else 0.0
                relative = delta.norm().item() / norm if norm else math.inf
            out.append(
                TensorChange(
                    name=name,
                    status="changed",
                    changed_elements=int(torch.ne(ta, tb).sum().item()),
                    elements=ta.numel(),
                    max_abs_change=max_abs,
                    relative_change=relative,
                )
            )
    return out
