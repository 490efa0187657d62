"""One checkpoint written by every rank together, committed by rank 0 once all are durable.

The protocol, on the checkpoint's own process group:

1. every rank hashes its tensors (a ``DTensor`` as its local chunk) and sends rank 0 the
   object each name uses, the size of objects it has not seen stored, and its state tree;
2. rank 0 decides which objects are new (by its own index: it alone prunes) and gives each
   to one rank that holds it, balancing bytes, so replicated tensors (DDP) are written once
   and the writing is split across ranks; it checks the free space for all of them;
3. every rank writes and syncs the objects it was given, and reports their entries;
4. rank 0 writes the one manifest (rank 0's tensors and tree, and each other rank's
   differences), prunes, and tells every rank the outcome.

Content addressing makes this safe without trusting that "replicated" state really is: a
tensor that differs on some rank simply has another object. A rank that raises fails the
save on every rank (named, with its cause); a rank that dies fails the collectives the
others wait in; either way no manifest is written and the objects already written are
debris that the next prune collects.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from ckptwise.distributed.ranks import Failure, Ranks
from ckptwise.distributed.shards import chunk_of, is_sharded, local_part
from ckptwise.errors import CheckpointError
from ckptwise.records import CheckpointInfo
from ckptwise.report import Progress
from ckptwise.snapshot import Snapshot
from ckptwise.store import (
    CheckpointStore,
    CommitPlan,
    Manifest,
    ObjectUse,
    RankView,
    Shard,
    TensorEntry,
)

__all__ = ["RankState", "commit_across_ranks", "fail_across_ranks", "rank_state"]


@dataclass(frozen=True)
class _Report:
    """What one rank tells rank 0 after hashing."""

    step: int
    names: dict[str, ObjectUse]
    shards: dict[str, Shard]
    new: dict[str, int]  # object id -> raw bytes: objects to write (unknown, or damaged)
    tree: dict[str, Any]


@dataclass(frozen=True)
class RankState:
    """What one rank saves: its tensors as plain tensors (a ``DTensor`` as its local chunk,
    which may be a private copy of it), where the sharded ones sit, and its state tree."""

    tensors: dict[str, torch.Tensor]
    shards: dict[str, Shard]
    tree: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def rank_state(snapshot: Snapshot) -> RankState:
    """This rank's part of ``snapshot``, as :func:`commit_across_ranks` saves it."""
    plain: dict[str, torch.Tensor] = {}
    shards: dict[str, Shard] = {}
    for name, tensor in snapshot.tensors.items():
        if is_sharded(tensor):
            shard = chunk_of(tensor)
            if shard is None:
                continue  # this rank holds no part of it
            shards[name] = shard
        plain[name] = local_part(tensor)
    return RankState(plain, shards, dict(snapshot.tree))


def _assign(reports: list[_Report], store: CheckpointStore) -> list[set[str]]:
    """For each rank, the new objects it writes: each once, by the least loaded holder.

    Rank 0's index decides what is stored (it alone prunes; the others re-read the run
    after every save, so their plans agree with it), except that an object some rank
    planned although it is stored is written again by that rank: its check of the stored
    copy failed, and the live bytes repair it (see :meth:`CheckpointStore.plan`).
    """
    steps = {report.step for report in reports}
    if len(steps) > 1:
        raise CheckpointError(
            f"the ranks are saving different steps ({sorted(steps)}): a rank fell out of step "
            "(did one skip a save after an error?); every rank must save every step"
        )
    sizes: dict[str, int] = {}
    holders: dict[str, list[int]] = {}
    used: set[str] = set()
    for rank, report in enumerate(reports):
        sizes.update(report.new)
        used.update(oid for oid, _, _ in report.names.values())
        for oid in report.new:  # only a rank that planned an object can write it
            holders.setdefault(oid, []).append(rank)
    to_write = {
        oid: holders.get(oid, []) for oid in used if store.known(oid) is None or oid in holders
    }
    unplanned = [oid for oid, writers in to_write.items() if not writers]
    if unplanned:
        raise CheckpointError(
            f"{len(unplanned)} object(s) are neither stored nor planned: the ranks' views of "
            "the run disagree (did another process change the run folder during training?)"
        )
    load = [0] * len(reports)
    jobs: list[set[str]] = [set() for _ in reports]
    for oid in sorted(to_write, key=lambda o: (-sizes[o], o)):
        rank = min(to_write[oid], key=lambda r: (load[r], r))
        load[rank] += sizes[oid]
        jobs[rank].add(oid)
    store.check_space(sum(load))
    return jobs


def _views(
    reports: list[_Report], written: dict[str, TensorEntry], store: CheckpointStore
) -> tuple[dict[str, TensorEntry], tuple[RankView, ...]]:
    """Rank 0's entries, and each other rank's differences from them."""

    def entries(report: _Report) -> dict[str, TensorEntry]:
        out = {}
        for name, (oid, dtype, shape) in report.names.items():
            known = written.get(oid) or store.known(oid)
            assert known is not None  # _assign checked every object is stored or written
            out[name] = dataclasses.replace(
                known, dtype=dtype, shape=shape, shard=report.shards.get(name)
            )
        return out

    first = entries(reports[0])
    views = []
    for report in reports[1:]:
        mine = entries(report)
        views.append(
            RankView(
                tensors={n: e for n, e in mine.items() if first.get(n) != e},
                absent=tuple(n for n in first if n not in mine),
                tree={k: v for k, v in report.tree.items() if not _same(reports[0].tree.get(k), v)},
                tree_absent=tuple(k for k in reports[0].tree if k not in report.tree),
            )
        )
    return first, tuple(views)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON says (Python's ``==`` takes ``1 == True == 1.0`` and ``-0.0 == 0.0``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def commit_across_ranks(
    ranks: Ranks,
    store: CheckpointStore,
    manifest: Manifest,
    capture: Callable[[], RankState],
    *,
    after_commit: Callable[[], object],
    progress: Progress | None = None,
) -> CheckpointInfo:
    """Save this rank's state, given by ``capture``, as part of ``manifest.step``.

    ``manifest`` carries rank 0's metadata (step, time, metrics, reasons, extra); its
    tensors and tree are filled in here. ``capture`` runs inside the protocol (it returns
    the state, or a private copy taken earlier, or raises the error taking it met), so a
    rank whose state cannot be captured fails the save on every rank instead of falling out
    of step. ``ranks`` must be a group no other thread of this process uses meanwhile: a
    background save runs this on its writer thread, on the checkpoint's commit channel. ``after_commit`` runs on rank 0 once the manifest is durable and before any rank
    returns (the manager prunes there); ``progress`` is told this rank's bytes hashed and
    written. Every rank returns the committed checkpoint's
    summary or raises the same error.
    """
    step = manifest.step
    what = f"saving step {step}"
    plan: CommitPlan | None = None
    report: _Report | Failure
    tree: dict[str, Any] = {}
    try:
        if not ranks.coordinator:
            store.refresh()  # rank 0 alone prunes: see what it kept before planning dedup
        state = capture()
        tree = state.tree
        plan = store.plan(state.tensors, rank=ranks.rank, progress=progress)
        new = {oid: len(job.raw) for oid, job in plan.new.items()}
        report = _Report(step, plan.names, state.shards, new, tree)
    except Exception as exc:
        report = Failure.of(ranks.rank, exc)
    reports = ranks.gather(report)

    jobs: list[set[str]] | Failure
    if reports is not None:
        failed = next((r for r in reports if isinstance(r, Failure)), None)
        try:
            jobs = failed or _assign([r for r in reports if isinstance(r, _Report)], store)
        except Exception as exc:
            jobs = Failure.of(0, exc)
    else:
        jobs = []
    jobs = ranks.broadcast(jobs)
    if isinstance(jobs, Failure):
        raise jobs.error(what)

    assert plan is not None  # a rank whose planning failed raised above
    written: dict[str, TensorEntry] | Failure
    try:
        written = store.write_objects(
            {oid: plan.new[oid] for oid in jobs[ranks.rank]}, progress=progress
        )
    except Exception as exc:
        written = Failure.of(ranks.rank, exc)
    results = ranks.gather(written)

    outcome: CheckpointInfo | Failure | None = None
    if results is not None:
        outcome = next((r for r in results if isinstance(r, Failure)), None)
        if outcome is None:
            try:
                ours = dataclasses.replace(manifest, tree=tree)
                outcome = _publish(reports, results, store, ours)  # type: ignore[arg-type]
                after_commit()
            except Exception as exc:
                outcome = Failure.of(0, exc)
    outcome = ranks.broadcast(outcome)
    if isinstance(outcome, Failure):
        raise outcome.error(what)
    assert outcome is not None
    return outcome


def fail_across_ranks(
    ranks: Ranks, store: CheckpointStore, step: int, error: Exception
) -> NoReturn:
    """Join the save of ``step`` that the other ranks are in, only to fail it on every rank
    with ``error`` (this rank's, named): for a rank that cannot save (its input to
    ``step()`` was refused) while the others, each deciding alone, save this step.
    """

    def refuse() -> RankState:
        raise error

    commit_across_ranks(
        ranks, store, Manifest(step=step, time=0.0, tensors={}), refuse, after_commit=lambda: None
    )
    raise AssertionError("a save whose capture failed on this rank commits nothing")


def _publish(
    reports: list[_Report],
    results: list[dict[str, TensorEntry]],
    store: CheckpointStore,
    manifest: Manifest,
) -> CheckpointInfo:
    written = {oid: e for result in results for oid, e in result.items()}
    first, views = _views(reports, written, store)
    return store.publish(
        dataclasses.replace(
            manifest,
            tensors=first,
            ranks=views,
            written_bytes=sum(e.stored_bytes for e in written.values()),
        )
    )
