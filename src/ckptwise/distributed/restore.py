"""Reading one rank's part of a checkpoint, on the same or another number of ranks.

A rank restores its own view of the checkpoint (its per-rank state, such as RNG and data
position, and its chunks of sharded tensors). Sharded tensors are cut to the chunk each
live ``DTensor`` holds now, from whichever saved chunks overlap it (a tensor saved whole,
by one process, is one such chunk); on one process they are put back together whole.

When the number of ranks changed, :func:`plan_rank` says what each rank gets (see
:class:`RankPlan`): a rank that existed restores its own entries; a rank that did not
(more ranks now than then) restores rank 0's view of the entries every saved rank held
alike, and of the entries that differed between the saved ranks, which have no saved
counterpart for it, whatever its caller decides (:func:`~ckptwise.read.restoring.restore_state`
leaves them as they are, adapters whose framework loads one state on every rank take
rank 0's). Of the RNG states, each generator is judged alone: a new rank takes rank 0's
only when every rank held it alike then and holds it alike now (the framework seeded every
rank with one seed), and otherwise keeps its own, so that no two ranks draw one stream
that did not before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptwise.distributed.shards import chunk_of, copy_overlap, is_sharded, local_part, pieces_of
from ckptwise.errors import CheckpointError, CorruptCheckpointError
from ckptwise.snapshot import RNG_KEY
from ckptwise.store import CheckpointStore, Manifest, Shard, TensorEntry

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "RankPlan",
    "damaged_object",
    "placeholders",
    "plan_rank",
    "prime_optimizers",
    "rank_differences",
    "read_rank",
    "sharded_names",
]


def sharded_names(manifest: Manifest) -> set[str]:
    """Names of the tensors saved as chunks of a sharded tensor."""
    views = [manifest.view(r) for r in range(manifest.world_size)]
    return {n for view in views for n, e in view.items() if e.shard is not None}


def rank_differences(manifest: Manifest) -> tuple[frozenset[str], frozenset[str]]:
    """The entries whose saved values differ between the ranks that saved ``manifest``,
    and the RNG generators (``"torch"``, ``"numpy"``, ...) that do.

    A sharded tensor's chunks differ by nature and are left out: they are resharded. An
    entry held by some ranks only differs too. A checkpoint of one process has none.
    """
    entries: set[str] = set()
    generators: set[str] = set()
    if manifest.world_size == 1:
        return frozenset(), frozenset()
    trees = [manifest.tree_of(r) for r in range(manifest.world_size)]
    views = [manifest.view(r) for r in range(manifest.world_size)]
    first_tree, first_view = trees[0], views[0]
    for tree, view in zip(trees[1:], views[1:], strict=True):
        for key in first_tree.keys() | tree.keys():
            if key == RNG_KEY:
                mine, theirs = _generators(first_tree), _generators(tree)
                generators |= {
                    g for g in mine.keys() | theirs.keys() if mine.get(g) != theirs.get(g)
                }
            elif first_tree.get(key) != tree.get(key):
                entries.add(key)
        for name in first_view.keys() | view.keys():
            a, b = first_view.get(name), view.get(name)
            if (a is not None and a.shard is not None) or (b is not None and b.shard is not None):
                continue
            if (
                a is None
                or b is None
                or (a.object, a.dtype, a.shape) != (b.object, b.dtype, b.shape)
            ):
                # capture names a tensor after its path, which starts with its entry's key
                key, _, rest = name.partition("/")
                if key == RNG_KEY:
                    generators.add(rest.partition("/")[0])
                else:
                    entries.add(key)
    if generators:
        entries.add(RNG_KEY)
    return frozenset(entries), frozenset(generators)


def _generators(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The saved state of each RNG generator in a state tree, by generator."""
    node = tree.get(RNG_KEY)
    state = node.get("state") if isinstance(node, dict) else None
    return dict(state) if isinstance(state, dict) else {}


@dataclass(frozen=True)
class RankPlan:
    """What one rank restores of a checkpoint saved by ``saved_by`` ranks, now that the
    job has ``now_on``.

    A rank that existed then (``rank < saved_by``) restores its own saved entries. A new
    rank reads rank 0's view: exact for what every saved rank held alike (replicated
    weights and optimizer state, a one-process checkpoint's whole state) and for sharded
    tensors, which are resharded. ``per_rank`` names the entries that differed between the
    saved ranks (a data position of each rank's own, the RNG states), which a new rank has
    no saved counterpart of. ``rng_kept`` names the RNG generators a new rank leaves as
    they are.
    """

    rank: int
    saved_by: int
    now_on: int
    per_rank: frozenset[str] = frozenset()
    rng_kept: frozenset[str] = frozenset()

    @property
    def existed(self) -> bool:
        """Whether this rank saved its own part of the checkpoint."""
        return self.rank < self.saved_by

    @property
    def source(self) -> int:
        """The saved rank whose view this rank reads."""
        return self.rank if self.existed else 0

    @property
    def changed(self) -> bool:
        """Whether the number of ranks changed since the save."""
        return self.saved_by != self.now_on

    def tree(self, manifest: Manifest, *, leave: Collection[str] = ()) -> dict[str, Any]:
        """The state tree this rank restores: :attr:`source`'s, without the entries in
        ``leave`` and with the RNG entry holding only the generators it takes (none: no
        RNG entry)."""
        tree = {k: v for k, v in manifest.tree_of(self.source).items() if k not in leave}
        if RNG_KEY in tree and self.rng_kept:
            node = dict(tree[RNG_KEY])
            state = {g: v for g, v in _generators(tree).items() if g not in self.rng_kept}
            if state:
                tree[RNG_KEY] = {**node, "state": state}
            else:
                del tree[RNG_KEY]
        return tree

    def message(self, where: str, *, entries: Collection[str], leave: bool) -> str:
        """One line saying what this rank restores of ``entries`` after the change in the
        number of ranks; ``leave``: a new rank keeps its own value of the entries that
        differed between the saved ranks (else it takes rank 0's)."""
        said = f"{where} was saved by {self.saved_by} process(es) and is restored on {self.now_on}"
        named = sorted(e for e in entries if e != RNG_KEY)
        differed = [e for e in named if e in self.per_rank]
        if self.existed:
            said += f"; rank {self.rank} restores its own state"
            gone = range(self.now_on, self.saved_by)
            what = [*map(repr, differed), *(["RNG states"] if RNG_KEY in self.per_rank else [])]
            if gone and what:
                said += (
                    f"; the per-rank entries of rank(s) {_span(gone)} ({', '.join(what)}) are "
                    "restored by no rank"
                )
            return said
        said += f"; rank {self.rank} did not exist then"
        alike = [e for e in named if e not in self.per_rank]
        if alike:
            said += f": it restores rank 0's {_names(alike)}"
            if self.saved_by == 1:
                said += " (a checkpoint of one process holds one state, given to every rank)"
            else:
                said += ", which every saved rank held alike"
        if differed:
            said += "; of the entries that differed between the saved ranks it " + (
                f"keeps its own {_names(differed)}"
                if leave
                else f"takes rank 0's {_names(differed)}"
            )
        if self.rng_kept:
            said += f"; it keeps its own RNG states ({', '.join(sorted(self.rng_kept))})"
        return said


def _names(entries: Collection[str]) -> str:
    return ", ".join(map(repr, entries))


def _span(ranks: range) -> str:
    return str(ranks.start) if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"


def plan_rank(
    manifest: Manifest, rank: int, *, now_on: int, alike: Collection[str] | None = None
) -> RankPlan:
    """What ``rank`` of a job of ``now_on`` ranks restores of ``manifest``.

    ``alike`` names the RNG generators whose live states are the same on every rank now
    (``None``: all of them, as on one process). A new rank takes rank 0's saved state of a
    generator only when it was alike on every saved rank and is alike on every rank now;
    otherwise it keeps its own.
    """
    plan = RankPlan(rank=rank, saved_by=manifest.world_size, now_on=now_on)
    if not plan.changed:  # every rank restores its own: nothing to compare
        return plan
    per_rank, differing = rank_differences(manifest)
    plan = dataclasses.replace(plan, per_rank=per_rank)
    if plan.existed:
        return plan
    saved = _generators(manifest.tree_of(0)).keys()
    kept = {g for g in saved if g in differing or (alike is not None and g not in alike)}
    return dataclasses.replace(plan, rng_kept=frozenset(kept))


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
    # a tensor saved whole (by one process) that is sharded now: one chunk covering it all
    whole_now = {
        n for n, e in view.items() if n not in sharded and n in live and is_sharded(live[n])
    }
    plain = {n: e for n, e in view.items() if n not in sharded and n not in whole_now}
    targets = {n: t for n, t in live.items() if n in plain and not is_sharded(t)}
    out = store.load_tensors(step, into=targets, entries=plain, progress=progress)
    for name in sorted(whole_now):
        entry = view[name]
        piece = dataclasses.replace(entry, shard=Shard(entry.shape, (0,) * len(entry.shape)))
        out[name] = _fill_chunk(store, step, name, live[name], [piece], progress)
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
