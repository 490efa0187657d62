"""Reading one rank's part of a checkpoint, on the same or another number of ranks.

A rank restores its own view of the checkpoint (its per-rank state, such as RNG and data
position, and its chunks of sharded tensors). A rank the checkpoint did not have (more
ranks now than then) restores rank 0's per-rank state; a checkpoint of one process is all
rank 0's, so the one-process read path is the same. Sharded tensors are cut to the chunk
each live ``DTensor`` holds now, from whichever saved chunks overlap it; on one process
they are put back together whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ckptwise.distributed.shards import chunk_of, copy_overlap, is_sharded, local_part, pieces_of
from ckptwise.errors import CheckpointError, CorruptCheckpointError
from ckptwise.store import CheckpointStore, Manifest, TensorEntry

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["damaged_object", "placeholders", "prime_optimizers", "read_rank", "sharded_names"]


def sharded_names(manifest: Manifest) -> set[str]:
    """Names of the tensors saved as chunks of a sharded tensor."""
    views = [manifest.view(r) for r in range(manifest.world_size)]
    return {n for view in views for n, e in view.items() if e.shard is not None}


def placeholders(manifest: Manifest, rank: int) -> dict[str, torch.Tensor]:
    """Meta tensors of the shape and dtype of each tensor ``rank`` restores (a sharded one's
    whole shape, as a live ``DTensor`` reports it), to check a state against before
    anything is read."""
    view = manifest.view(rank if rank < manifest.world_size else 0)
    return {
        name: torch.empty(
            entry.shape if entry.shard is None else entry.shard.shape,
            dtype=entry.torch_dtype,
            device="meta",
        )
        for name, entry in view.items()
    }


def damaged_object(
    store: CheckpointStore, manifest: Manifest, rank: int, names: Collection[str]
) -> str | None:
    """What is wrong with the first object of ``names`` (in ``rank``'s view) whose size
    contradicts its entry, or ``None``. Objects are only sized (see
    :meth:`CheckpointStore.object_nbytes <ckptwise.store.CheckpointStore.object_nbytes>`),
    never decoded or hashed: the read that follows checks every byte.

    A manifest may describe shapes its objects do not hold (damage that only the objects
    reveal): before a restore blames the live state for not fitting, this tells a damaged
    checkpoint, to fall back from, from a state built differently.
    """
    view = manifest.view(rank if rank < manifest.world_size else 0)
    for name in sorted(set(names) & view.keys()):
        entry = view[name]
        try:
            size = store.object_nbytes(entry)
        except (CheckpointError, OSError) as exc:
            return f"tensor {name!r}: object {entry.object} cannot be read ({exc})"
        if size != entry.nbytes:
            return (
                f"tensor {name!r}: object {entry.object} holds {size} bytes, its entry says "
                f"{entry.nbytes}"
            )
    return None


def read_rank(
    store: CheckpointStore,
    manifest: Manifest,
    *,
    rank: int,
    into: Mapping[str, torch.Tensor] | None = None,
    names: Collection[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``rank`` restores from ``manifest`` (only ``names`` if given), verified.

    ``into`` holds the live tensors by name: plain ones are read into where they fit, a
    ``DTensor``'s local chunk is filled from the saved chunks it overlaps (and the
    ``DTensor`` itself returned). Without a live ``DTensor`` a sharded tensor is rebuilt
    whole. ``progress`` is told the bytes of each saved tensor or chunk once read and
    checked.
    """
    live = into or {}
    step = manifest.step
    view = manifest.view(rank if rank < manifest.world_size else 0)
    views = [manifest.view(r) for r in range(manifest.world_size)]
    sharded = sharded_names(manifest)
    if names is not None:
        view = {n: e for n, e in view.items() if n in names}
        sharded &= set(names)
    plain = {n: e for n, e in view.items() if n not in sharded}
    targets = {n: t for n, t in live.items() if n in plain and not is_sharded(t)}
    out = store.load_tensors(step, into=targets, entries=plain, progress=progress)
    for name in sharded:
        pieces = pieces_of(views, name)
        target = live.get(name)
        if target is not None and is_sharded(target):
            out[name] = _fill_chunk(store, step, name, target, pieces, progress)
        else:
            out[name] = _whole(store, step, name, pieces, target, progress)
    return out


def _fill_chunk(
    store: CheckpointStore,
    step: int,
    name: str,
    target: torch.Tensor,
    pieces: list[TensorEntry],
    progress: Callable[[int], None] | None,
) -> torch.Tensor:
    """Fill a live ``DTensor``'s local chunk from the saved chunks; returns the DTensor."""
    shard = chunk_of(target)
    if shard is None:
        return target  # this rank holds none of it
    local = local_part(target)
    filled = 0
    for piece in pieces:
        assert piece.shard is not None
        if piece.shard.shape != shard.shape:
            raise CorruptCheckpointError(
                f"step {step}, tensor {name!r}: saved with shape {piece.shard.shape}, the live "
                f"tensor has {shard.shape}"
            )
        if piece.shard.offsets == shard.offsets and piece.shape == tuple(local.shape):
            got = store.read_tensor(piece, step=step, name=name, into=local, progress=progress)
            if got is not local:  # read elsewhere (another dtype or device): copy, casting
                with torch.no_grad():
                    local.copy_(got)
            return target
        overlaps = all(
            p < s + n and s < p + m
            for p, m, s, n in zip(
                piece.shard.offsets, piece.shape, shard.offsets, local.shape, strict=True
            )
        )
        if overlaps:
            saved = store.read_tensor(piece, step=step, name=name, progress=progress)
            filled += copy_overlap(local, shard.offsets, saved, piece.shard.offsets)
    if filled != local.numel():
        raise CorruptCheckpointError(
            f"step {step}, tensor {name!r}: the saved chunks cover {filled} of the "
            f"{local.numel()} values this rank needs"
        )
    return target


def _whole(
    store: CheckpointStore,
    step: int,
    name: str,
    pieces: list[TensorEntry],
    target: torch.Tensor | None,
    progress: Callable[[int], None] | None,
) -> torch.Tensor:
    """A sharded tensor put back together from all its saved chunks."""
    first = pieces[0]
    assert first.shard is not None
    shape = first.shard.shape
    dtype = first.torch_dtype
    if (
        target is not None
        and tuple(target.shape) == shape
        and target.dtype == dtype
        and target.device.type == "cpu"
        and not target.requires_grad
    ):
        whole = target
    else:
        whole = torch.empty(shape, dtype=dtype)
    filled = 0
    for piece in pieces:
        assert piece.shard is not None
        saved = store.read_tensor(piece, step=step, name=name, progress=progress)
        filled += copy_overlap(whole, (0,) * len(shape), saved, piece.shard.offsets)
    if filled != math.prod(shape):
        raise CorruptCheckpointError(
            f"step {step}, tensor {name!r}: the saved chunks cover {filled} of its "
            f"{math.prod(shape)} values"
        )
    return whole


def prime_optimizers(state: MutableMapping[str, Any]) -> bool:
    """Create the state of optimizers that have none yet, so a restore has live tensors
    of the right layout (sharded like their parameters) to read into.

    Takes one step with zero gradients and a learning rate of 0, as
    ``torch.distributed.checkpoint.state_dict`` does; the restore then overwrites every
    value it created. Returns whether any optimizer was primed.
    """
    primed = False
    for value in state.values():
        if not isinstance(value, torch.optim.Optimizer) or value.state:
            continue
        params = [p for g in value.param_groups for p in g["params"] if p.requires_grad]
        if any(p.grad is not None for p in params):
            continue
        for p in params:
            p.grad = torch.zeros_like(p)
        rates = [g.get("lr") for g in value.param_groups]
        for group in value.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        value.step()
        for group, rate in zip(value.param_groups, rates, strict=True):
            if rate is not None:
                group["lr"] = rate
        value.zero_grad(set_to_none=True)
        primed = True
    return primed
