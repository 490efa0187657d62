"""Tensors sharded across ranks: a ``DTensor``'s local chunk, and putting chunks back.

A sharded tensor (FSDP2's ``fully_shard`` parameters and their optimizer state) is saved
as each rank's local chunk, with the chunk's place in the whole tensor (a
:class:`~ckptwise.store.Shard`), as ``torch.distributed.checkpoint`` describes it
(``DTensor.__create_chunk_list__``). Restoring on another number of ranks, or on one
process, copies from every saved chunk the part that overlaps the chunk wanted: the box
intersection is all of resharding that a content-addressed store needs (DCP's planner
also decides file layout and request batching, which the store does its own way).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ckptwise.store import Shard, TensorEntry

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "chunk_of",
    "copy_overlap",
    "is_sharded",
    "like",
    "local_part",
    "pieces_of",
    "whole",
]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (sharded or replicated across a device mesh).

    Without ``torch.distributed.tensor`` imported there is no ``DTensor``: its import takes
    seconds, which a DDP job's first save must not pay inside ``step()``."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def chunk_of(tensor: torch.Tensor) -> Shard | None:
    """Where this rank's local values of a ``DTensor`` sit in the whole tensor, or ``None``
    when this rank holds none of it (an uneven split can leave a rank empty)."""
    chunks = tensor.__create_chunk_list__()  # type: ignore[attr-defined]
    if not chunks:
        return None
    (chunk,) = chunks
    return Shard(tuple(tensor.shape), tuple(int(o) for o in chunk.offsets))


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The local values of a ``DTensor`` (sharing its memory); a plain tensor as it is."""
    if is_sharded(tensor):
        local: torch.Tensor = tensor.to_local()  # type: ignore[attr-defined]
        return local
    return tensor


def whole(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as a plain tensor holding all its values: a ``DTensor`` of a world of one
    (FSDP2 on one process) as its local values, which are the whole tensor.

    Raises:
        ConfigError: ``tensor`` is a ``DTensor`` whose values are spread over several ranks,
            which one process cannot save alone.
    """
    if not is_sharded(tensor):
        return tensor
    local = local_part(tensor)
    if local.shape != tensor.shape:
        from ckptwise.errors import ConfigError

        raise ConfigError(
            f"{name!r} is a DTensor split over several ranks ({tuple(local.shape)} of "
            f"{tuple(tensor.shape)} here), but this manager saves as one process; create the "
            "manager after torch.distributed.init_process_group() on every rank"
        )
    return local


def like(values: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``values`` (all of a tensor's values) as ``live`` holds them: a ``DTensor`` of a world
    of one on ``live``'s mesh and placements, for its owner's ``load_state_dict``; a plain
    ``live`` takes ``values`` as they are."""
    if not is_sharded(live):
        return values
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        values,
        device_mesh=live.device_mesh,  # type: ignore[attr-defined]
        placements=live.placements,  # type: ignore[attr-defined]
        run_check=False,
    )


def copy_overlap(
    dst: torch.Tensor, dst_at: tuple[int, ...], src: torch.Tensor, src_at: tuple[int, ...]
) -> int:
    """Copy into ``dst`` (placed at offsets ``dst_at`` of a whole tensor) the part of ``src``
    (placed at ``src_at``) they share; returns how many elements were copied."""
    if dst.dim() != src.dim():
        raise ValueError(f"a {dst.dim()}-d chunk cannot take values of a {src.dim()}-d one")
    dst_view, src_view = dst, src
    for dim, (d0, dn, s0, sn) in enumerate(zip(dst_at, dst.shape, src_at, src.shape, strict=True)):
        lo, hi = max(d0, s0), min(d0 + dn, s0 + sn)
        if hi <= lo:
            return 0
        dst_view = dst_view.narrow(dim, lo - d0, hi - lo)
        src_view = src_view.narrow(dim, lo - s0, hi - lo)
    with torch.no_grad():
        dst_view.copy_(src_view)
    return dst_view.numel()


def pieces_of(views: Iterable[Mapping[str, TensorEntry]], name: str) -> list[TensorEntry]:
    """The saved chunks of the sharded tensor ``name``, one per place, from every rank."""
    found: dict[tuple[int, ...], TensorEntry] = {}
    for view in views:
        entry = view.get(name)
        if entry is not None and entry.shard is not None:
            found.setdefault(entry.shard.offsets, entry)
    return list(found.values())
