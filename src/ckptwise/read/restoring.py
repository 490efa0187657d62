"""Restore planning: which checkpoint a read or restore takes, and whether the state fits it.

Checkpoints are tried newest first; one whose bytes fail verification is skipped with a
:class:`RestoreWarning` (on every rank of a multi-process job together) and the next older
one is tried. Before a restore writes into a live state, the state is checked against the
checkpoint as a whole (see :mod:`ckptwise.snapshot.mismatch`), so a state that does not fit is left
untouched. :class:`~ckptwise.read.run.Run` offers this as ``read`` and ``restore``.

It is long because choosing the checkpoint and checking the state against it happen
together, on one process or on every rank of a job, and a rank's choice must be theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ckptwise.distributed.ranks import Failure, Ranks
from ckptwise.distributed.restore import (
    RankPlan,
    damaged_object,
    placeholders,
    plan_rank,
    prime_optimizers,
    read_rank,
    sharded_names,
)
from ckptwise.distributed.shards import is_sharded, like, whole
from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
)
from ckptwise.policy import Variant
from ckptwise.report import Progress, Transfer
from ckptwise.snapshot import (
    RNG_KEY,
    RngState,
    apply,
    capture,
    fit_problems,
    misfit_message,
    rebuild,
    tensor_names,
)
from ckptwise.store import CHECKPOINTS, CheckpointStore, Manifest

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "MOST_REMOVED",
    "Loaded",
    "RestoreWarning",
    "candidates",
    "catch_up",
    "live_rng_alike",
    "read_first_good",
    "restore_state",
    "variant_of",
]

log = logging.getLogger("ckptwise")

#: failures that make a restore fall back to an older checkpoint (the bytes are bad)
_CORRUPT = frozenset({"CorruptCheckpointError", "FormatError"})
#: the failure of a checkpoint the writer removed (or saved again) while it was read
_REMOVED = "CheckpointNotFoundError"
#: how many checkpoints may be removed under one read for "the newest" before it gives up
#: (a writer saving and pruning faster than a checkpoint can be read)
MOST_REMOVED = 16


class RestoreWarning(UserWarning):
    """Something about a restore the caller should know: a checkpoint skipped because it
    fails verification, saved entries the state left out, a change in the number of
    processes, a run holding only checkpoints that cannot resume training."""


def variant_of(manifest: Manifest) -> Variant:
    """What a checkpoint holds, from the manager's bookkeeping (full when it says nothing)."""
    return Variant.from_json(manifest.extra.get("variant"))


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read and verified: its step, manifest and tensors by name."""

    step: int
    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]
    #: whose part of a multi-process checkpoint was read
    rank: int = 0
    #: what the rank read gets when the number of ranks changed (see :class:`RankPlan`)
    plan: RankPlan | None = None

    @property
    def tree(self) -> dict[str, Any]:
        """The state tree of the rank read: rank 0's for a rank the checkpoint lacked, whose
        RNG entry then holds only the generators it takes (see :func:`plan_rank`)."""
        if self.plan is not None:
            return self.plan.tree(self.manifest)
        return self.manifest.tree_of(self.rank if self.rank < self.manifest.world_size else 0)

    def values(self, *, rng: bool = False) -> dict[str, Any]:
        """Every saved entry rebuilt (state dicts, tensors, JSON values); RNG states under
        ``"__rng__"`` only with ``rng=True``."""
        tree = self.tree
        return {k: rebuild(tree, self.tensors, k) for k in tree if rng or k != RNG_KEY}


def live_rng_alike(ranks: Ranks | None) -> frozenset[str] | None:
    """The RNG generators whose live state is the same on every rank (``None`` on one
    process); every rank calls it at the same point, before anything is restored."""
    if ranks is None:
        return None
    snap = capture({RNG_KEY: RngState()})
    mine: dict[str, str] = {}
    for generator, node in snap.tree[RNG_KEY]["state"].items():
        digest = hashlib.blake2b(json.dumps(node, sort_keys=True).encode(), digest_size=16)
        prefix = f"{RNG_KEY}/{generator}"
        for name in sorted(n for n in snap.tensors if n == prefix or n.startswith(prefix + "/")):
            digest.update(
                snap.tensors[name]
                .detach()
                .cpu()
                .contiguous()
                .view(-1)
                .view(torch.uint8)
                .numpy()
                .tobytes()
            )
        mine[generator] = digest.hexdigest()
    every = ranks.all_gather(mine)
    return frozenset(g for g, d in mine.items() if all(o.get(g) == d for o in every))


def candidates(store: CheckpointStore, step: int | None, *, full_only: bool) -> list[int]:
    """The steps a read tries, newest first (only ``step`` when given).

    ``full_only`` leaves out slim (weights-only) checkpoints; an explicit ``step`` that is
    one raises :class:`~ckptwise.CheckpointError`.
    """
    if step is not None:
        if full_only:
            kind = variant_of(store.manifest(step)).kind
            if kind != "full":
                raise CheckpointError(
                    f"step {step} holds {kind} only and cannot resume training; "
                    "load() or export() it, or restore a full checkpoint"
                )
        return [step]
    steps = sorted(store.steps(), reverse=True)
    if not full_only:
        return steps
    return [s for s in steps if variant_of(store.manifest(s)).kind == "full"]


def catch_up(store: CheckpointStore, step: int) -> None:
    """After ``step`` was found removed while it was read: re-list the run if its list
    still holds ``step`` (another process's writer pruned it; this process's writer has
    already dropped it from the list, which is then left alone)."""
    if step in store.steps():
        store.refresh()


def read_first_good(
    store: CheckpointStore,
    step: int | None,
    *,
    into: Mapping[str, torch.Tensor] | None,
    full_only: bool,
    rank: int,
    ranks: Ranks | None,
    prepare: Callable[[Manifest, RankPlan], Collection[str] | None] | None = None,
    restoring: Collection[str] | None = None,
    stacklevel: int = 1,
    progress: Progress | None = None,
) -> Loaded | None:
    """The newest checkpoint that verifies (or exactly ``step``), read and verified; ``None``
    when there is none to try (see :meth:`ckptwise.Run.read` for the arguments).

    A checkpoint the writer removes while it is read is not damaged: with ``step`` that
    raises :class:`~ckptwise.CheckpointNotFoundError` saying so; without, the run is listed
    again and the newest checkpoint now is read (at most :data:`MOST_REMOVED` times).

    ``prepare`` is called with each candidate's manifest, and what ``rank`` restores of it
    (see :func:`~ckptwise.distributed.restore.plan_rank`), before any of its tensors is
    read: it raises to stop the read (on every rank), and returns the names of the tensors
    to read (``None``: all of them). A read for resuming (``full_only``) of a checkpoint
    saved by another number of ranks says what this rank gets in a :class:`RestoreWarning`:
    for a restore of the entries ``restoring``, a rank the checkpoint lacked keeps its own
    value of those that differed between the saved ranks (the restore's to do); for an
    adapter's values (``None``) it is given rank 0's. ``stacklevel`` places the warnings as :func:`warnings.warn` would for the caller.
    ``progress`` is told the bytes read and checked.
    """
    for path, why in dict(store.broken).items():
        warnings.warn(
            f"skipping unreadable manifest {path}: {why}",
            RestoreWarning,
            stacklevel=stacklevel + 1,
        )
    tried = candidates(store, step, full_only=full_only)
    if ranks is not None:
        tried = ranks.broadcast(tried)
    alike = live_rng_alike(ranks)
    now_on = rank + 1 if ranks is None else ranks.size
    failed: list[int] = []  # failed verification
    removed: list[int] = []  # removed (or saved again) while read
    queue = list(tried)
    while queue:
        candidate = queue.pop(0)
        failure: Exception | None = None
        manifest: Manifest | None = None
        tensors: dict[str, torch.Tensor] = {}
        plan: RankPlan | None = None
        try:
            manifest = store.manifest(candidate)
            plan = plan_rank(manifest, rank, now_on=now_on, alike=alike)
            names = None if prepare is None else prepare(manifest, plan)
            tensors = read_rank(
                store, manifest, rank=rank, into=into, names=names, progress=progress
            )
        except Exception as exc:
            if ranks is None and not isinstance(
                exc, CorruptCheckpointError | CheckpointNotFoundError
            ):
                raise
            failure = exc
        gone = isinstance(failure, CheckpointNotFoundError)
        if ranks is not None:
            # every rank must take the same path: fall back together, or raise together
            mine = None if failure is None else Failure.of(rank, failure)
            failures = [f for f in ranks.all_gather(mine) if f is not None]
            odd = [f for f in failures if f.kind not in _CORRUPT and f.kind != _REMOVED]
            if odd:
                raise odd[0].error(f"reading step {candidate}") from failure
            gone = any(f.kind == _REMOVED for f in failures)
            if failures and (
                failure is None or gone != isinstance(failure, CheckpointNotFoundError)
            ):
                first = next(f for f in failures if (f.kind == _REMOVED) == gone)
                kind = CheckpointNotFoundError if gone else CorruptCheckpointError
                failure = kind(f"rank {first.rank}: {first.message}")
        if failure is None:
            assert manifest is not None
            assert plan is not None
            if full_only and plan.changed:
                entries = plan.tree(manifest).keys() if restoring is None else restoring
                warnings.warn(
                    plan.message(
                        f"checkpoint at step {candidate} of {store.url}",
                        entries=[e for e in entries if e in manifest.tree_of(plan.source)],
                        leave=restoring is not None,
                    ),
                    RestoreWarning,
                    stacklevel=stacklevel + 1,
                )
            return Loaded(candidate, manifest, tensors, rank, plan)
        if step is not None:
            raise failure
        if gone:
            removed.append(candidate)
            if len(removed) > MOST_REMOVED:
                raise CheckpointNotFoundError(
                    f"the writer of {store.url} removed {len(removed)} checkpoints while they "
                    f"were read (steps {', '.join(map(str, removed))}); read while it saves "
                    "less often, or pin() the step to read"
                ) from failure
            log.info(
                "step %d was removed while it was read (%s); reading the newest", candidate, failure
            )
            catch_up(store, candidate)
            queue = [
                s
                for s in candidates(store, None, full_only=full_only)
                if s not in failed and s not in removed
            ]
            if ranks is not None:
                queue = ranks.broadcast(queue)
            continue
        failed.append(candidate)
        warnings.warn(
            f"checkpoint at step {candidate} fails verification ({failure}); "
            "falling back to an older one",
            RestoreWarning,
            stacklevel=stacklevel + 1,
        )
    if failed:
        raise CorruptCheckpointError(
            f"no checkpoint in {store.url} verifies (tried steps "
            f"{', '.join(map(str, failed))}); run `ckptwise verify` for details"
        )
    if removed:
        raise CheckpointNotFoundError(
            f"every checkpoint of {store.url} was removed while it was read (steps "
            f"{', '.join(map(str, removed))}); the run is empty now"
        )
    return None


def restore_state(
    store: CheckpointStore,
    state: MutableMapping[str, Any],
    *,
    step: int | None,
    strict: bool,
    rng: bool,
    missing: Literal["start", "error"],
    ranks: Ranks | None,
    rank: int | None,
    stacklevel: int = 1,
) -> int:
    """Load the newest full checkpoint that verifies into ``state``; returns its step (0 when
    there is none and ``missing="start"``). :meth:`ckptwise.Run.restore` documents the
    arguments; ``stacklevel`` places the warnings as :func:`warnings.warn` would for the
    caller.
    """
    if missing not in ("start", "error"):
        raise ConfigError(
            f"missing= must be 'start' (return 0 when there is no checkpoint) or 'error', "
            f"got {missing!r}"
        )
    url = store.url
    entries = {**state, RNG_KEY: RngState()} if rng else dict(state)
    rank = ranks.rank if ranks is not None else rank or 0

    def prepare(manifest: Manifest, plan: RankPlan, say: bool = True) -> set[str]:
        """Check ``state`` against one checkpoint; the names of the tensors it needs."""
        mine = plan.source
        leave = _left(plan)
        tree = plan.tree(manifest, leave=leave)
        names = tensor_names(tree, [k for k in entries if k not in leave])
        where = f"checkpoint at step {manifest.step} of {url}"
        kept = {k: v for k, v in state.items() if k not in leave}
        found, blamed = fit_problems(kept, tree, placeholders(manifest, mine), strict=strict)
        if found:
            # blame the state only if the checkpoint holds what its manifest says: one
            # object that does is proof enough (another damaged one is found by the read)
            damage = damaged_object(store, manifest, mine, blamed[:1])
            if damage is not None:
                _unless_removed(store, manifest, mine, blamed[0])
                raise CorruptCheckpointError(f"step {manifest.step}, {damage}")
            raise ConfigError(misfit_message(where, found))
        if not say:
            return names
        log.info(
            "restoring step %d of %s: %s%s",
            manifest.step,
            url,
            ", ".join(repr(k) for k in state if k in tree) or "nothing",
            " and the RNG states" if rng and RNG_KEY in tree else "",
        )
        return names

    # the live tensors are captured under the names they were saved with and alias the
    # live memory, so the read fills them in place
    live = capture(entries).tensors
    # one process: a DTensor (FSDP2 in a world of one) holds all its values here, read into
    # them in place and handed back to its owner as a DTensor
    shaped = {} if ranks is not None else {k: t for k, t in live.items() if is_sharded(t)}
    if shaped and candidates(store, step, full_only=True) and prime_optimizers(state):
        live = capture(entries).tensors  # optimizer states laid out like their DTensors
        shaped = {k: t for k, t in live.items() if is_sharded(t)}
    live = {k: whole(t, k) if k in shaped else t for k, t in live.items()}
    if ranks is not None:
        newest = ranks.broadcast(candidates(store, step, full_only=True)[:1])
        if newest:
            manifest = store.manifest(newest[0])
            plan = plan_rank(manifest, rank, now_on=ranks.size)
            # checked before optimizers are primed: a state that does not fit stays as is
            _on_every_rank(
                ranks, lambda: prepare(manifest, plan, say=False), f"checking step {newest[0]}"
            )
            # sharded optimizer state to read into, from saved chunks or (saved by one
            # process) from whole tensors
            wanted = sharded_names(manifest)
            if any(is_sharded(t) for t in live.values()):
                wanted |= manifest.view(plan.source).keys()
            if wanted - live.keys() and prime_optimizers(state):
                live = capture(entries).tensors
    with Transfer("restoring", show=ranks is None or ranks.coordinator) as transfer:
        loaded = read_first_good(
            store,
            step,
            into=live,
            full_only=True,
            rank=rank,
            ranks=ranks,
            prepare=prepare,
            restoring=list(state),
            stacklevel=stacklevel + 1,
            progress=transfer.advance,
        )
        if loaded is None:
            _nothing_to_restore(store, missing, stacklevel=stacklevel + 1)
            return 0
        transfer.total = loaded.manifest.logical_bytes
        where = f"checkpoint at step {loaded.step} of {url}"
        assert loaded.plan is not None
        leave = _left(loaded.plan)
        tree = loaded.plan.tree(loaded.manifest, leave=leave)
        tensors = {k: like(t, shaped[k]) if k in shaped else t for k, t in loaded.tensors.items()}
        kept = {k: v for k, v in state.items() if k not in leave}
        apply(kept, tree, tensors, strict=strict, where=where)
        state.update(kept)  # apply() replaces plain values in the mapping it is given
        if rng and RNG_KEY in tree:
            apply({RNG_KEY: RngState()}, tree, loaded.tensors, where=where)
        left = [k for k in tree if k not in state and k != RNG_KEY]
        if left:
            warnings.warn(
                f"{where} also holds {', '.join(map(repr, left))}, which were not restored "
                "(the state passed to restore() has no entry for them); add them to the state "
                "to restore them",
                RestoreWarning,
                stacklevel=stacklevel + 1,
            )
        transfer.finish(loaded.manifest.logical_bytes, f"restored step {loaded.step}")
    return loaded.step


def _left(plan: RankPlan) -> frozenset[str]:
    """The entries a rank leaves as they are in a restore: on a rank the checkpoint lacked,
    those that differed between the saved ranks (the RNG states are judged by generator)."""
    return frozenset() if plan.existed else plan.per_rank - {RNG_KEY}


def _unless_removed(store: CheckpointStore, manifest: Manifest, rank: int, name: str) -> None:
    """Raise :class:`~ckptwise.CheckpointNotFoundError` if the object of ``name`` that
    failed its size check failed because the writer removed the checkpoint meanwhile: the
    verified read of it tells removal from damage (and fails fast, on the size, for both)."""
    view = manifest.view(rank if rank < manifest.world_size else 0)
    entry = view.get(name)
    if entry is None:
        return
    try:
        store.read_tensor(entry, step=manifest.step, name=name)
    except CheckpointNotFoundError:
        raise
    except CheckpointError:
        return


def _nothing_to_restore(store: CheckpointStore, missing: str, *, stacklevel: int) -> None:
    """Raise (``missing="error"``) or log that the run has no checkpoint to restore,
    saying why, and naming a run one folder down when there is one."""
    url = store.url
    steps = store.steps()
    if steps:
        why = (
            f"run {url} holds only weights-only checkpoints (steps "
            f"{', '.join(map(str, steps))}), which cannot resume training"
        )
    elif broken := dict(store.broken):
        why = (
            f"no checkpoint of {url} can be read ({len(broken)} unreadable "
            f"manifest(s); `ckptwise verify {url}` lists them)"
        )
    elif store.has_files():
        why = f"run {url} has no committed checkpoint yet"
    else:
        why = f"{url} holds no ckptwise run"
    below = [] if steps else _runs_below(store.local_root)
    if below:
        why += f"; did you mean {' or '.join(below)}?"
    if missing == "error":
        raise CheckpointNotFoundError(
            f"nothing to restore: {why}. Pass the run's folder (the one holding "
            f"{CHECKPOINTS}/), or missing='start' to start from scratch when there is none"
        )
    if steps:
        warnings.warn(
            f"nothing restored: {why}; starting from scratch",
            RestoreWarning,
            stacklevel=stacklevel + 1,
        )
    log.info("nothing to restore: %s; starting from scratch", why)


def _on_every_rank(ranks: Ranks, action: Callable[[], object], what: str) -> None:
    """Run ``action`` on every rank; if it raised on any, raise on all (never on some only,
    which would leave the others waiting in the next collective)."""
    error: Exception | None = None
    try:
        action()
    except Exception as exc:
        error = exc
    mine = None if error is None else Failure.of(ranks.rank, error)
    failures = [f for f in ranks.all_gather(mine) if f is not None]
    if failures:
        raise failures[0].error(what) from error


def _runs_below(root: str | None, most: int = 3) -> list[str]:
    """Runs in the folders right inside the local folder ``root``, such as the ``ckptwise``
    run inside a Trainer's ``output_dir`` (``None``, a remote store, is not listed: that
    costs)."""
    if root is None or not os.path.isdir(root):
        return []
    try:
        with os.scandir(root) as entries:
            folders = sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    return [f for f in folders if os.path.isdir(os.path.join(f, CHECKPOINTS))][:most]
