"""One checkpoint written by every rank together, committed by rank 0 once all are durable.

The protocol, on the checkpoint's commit channel (see
:class:`~ckptwise.save.pipeline.RanksPath`):

1. every rank lists its large tensors (name, dtype, shape, size, a hash of sampled pages);
   rank 0 picks those every rank holds alike and unsharded (DDP's weights and Adam
   moments, ZeRO-2's 16-bit weights; not ZeRO's partitions, whose pages differ) and gives
   each to one rank to hash, balancing bytes;
2. every rank hashes the tensors that are not shared and the shared ones it was given, and
   takes a fingerprint of every shared one (see :func:`fingerprint`); it sends rank 0 the
   object each hashed name uses, the fingerprints, the size of objects it has not seen
   stored, and its state tree;
3. rank 0 takes for each shared tensor whose fingerprint matches its hasher's the hasher's
   object, and asks a rank whose fingerprint differs to hash that tensor itself; it decides
   which objects are new (by its own index: it alone prunes) and gives each to one rank
   that holds it, balancing bytes, so replicated tensors are written once and the writing
   is split across ranks; it checks the free space for all of them;
4. every rank writes and syncs the objects it was given (and hashes and writes the tensors
   it was asked to), and reports their entries;
5. rank 0 writes the one manifest (rank 0's tensors and tree, and each other rank's
   differences), prunes, and tells every rank the outcome.

So the replicated part of a state is hashed about once across ranks, not once per rank.
What that trusts: two tensors of the same name, dtype and shape on two ranks whose
fingerprints match hold the same bytes. A fingerprint reads every byte (a 64-bit sum) and
hashes sampled pages, so any difference in one word, and any random difference, is seen;
words that change together so that the sum stays equal, outside the sampled pages, are not.
Elsewhere content addressing needs no trust: a tensor that differs on some rank simply has
another object. A rank that raises fails the save on every rank (named,
with its cause); a rank that dies fails the collectives the others wait in; either way no
manifest is written and the objects already written are debris that the next prune
collects.

It is long because the protocol's rounds, what each rank sends in them and how rank 0
decides between them are one argument: each round relies on what the one before checked.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import blake3
import numpy as np
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
    tensor_bytes,
)

__all__ = [
    "SHARED_MIN_BYTES",
    "RankState",
    "commit_across_ranks",
    "fail_across_ranks",
    "fingerprint",
    "rank_state",
]


#: shared tensors smaller than this are hashed by every rank that holds them: a fingerprint
#: would cost about as much
SHARED_MIN_BYTES = 1 << 20

#: pages of a tensor a fingerprint hashes, and their size
_PAGES, _PAGE = 16, 4096


@dataclass(frozen=True)
class _Listing:
    """What one rank holds, before any hashing: each large plain tensor's dtype, shape,
    size and a hash of sampled pages (see :func:`_pages`)."""

    step: int
    tensors: dict[str, tuple[str, tuple[int, ...], int, str]]


@dataclass(frozen=True)
class _Report:
    """What one rank tells rank 0 after hashing."""

    step: int
    names: dict[str, ObjectUse]
    shards: dict[str, Shard]
    new: dict[str, int]  # object id -> raw bytes: objects to write (unknown, or damaged)
    tree: dict[str, Any]
    #: shared tensor name -> fingerprint, for every shared tensor this rank holds
    prints: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Jobs:
    """What rank 0 tells each rank to do after hashing: the new objects it writes, and the
    shared tensors it must hash and write itself (its fingerprint did not match)."""

    write: list[set[str]]
    rehash: list[set[str]]


def _pages(raw: memoryview) -> str:
    """A hash of 16 pages spread over ``raw`` (all of it when it is small): what a rank
    lists of a large tensor, so that per-rank tensors of one shape (ZeRO's partitions) are
    told apart from replicated ones before anything is hashed whole."""
    hasher = blake3.blake3(str(len(raw)).encode())
    for page in _sampled(len(raw)):
        hasher.update(raw[page])
    return hasher.hexdigest()


def _sampled(size: int) -> list[slice]:
    """The pages :func:`_pages` reads of ``size`` bytes."""
    if size <= _PAGES * _PAGE:
        return [slice(0, size)]
    return [
        slice(at, at + _PAGE) for at in ((size - _PAGE) * i // (_PAGES - 1) for i in range(_PAGES))
    ]


def _pages_of(tensor: torch.Tensor) -> str:
    """:func:`_pages` of a tensor's bytes, copying only the sampled pages off a GPU."""
    if tensor.device.type == "cpu":
        return _pages(tensor_bytes(tensor))
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    pages = b"".join(flat[page].cpu().numpy().tobytes() for page in _sampled(flat.numel()))
    hasher = blake3.blake3(str(flat.numel()).encode())
    hasher.update(pages)
    return hasher.hexdigest()


def fingerprint(tensor: torch.Tensor) -> str:
    """A check that two tensors of the same dtype and shape hold the same bytes, at about a
    fifth of the cost of hashing them (23 against 4.3 GB/s here): the sum of its bytes as
    64-bit words modulo 2**64 (every byte read once) and a hash of 16 pages spread over it.
    A change of one word always changes the sum; a random change does but for a chance of
    2**-64; changes that cancel in the sum outside the sampled pages go unseen."""
    raw = tensor_bytes(tensor)
    size = len(raw)
    words = np.frombuffer(raw, dtype=np.uint64, count=size // 8)
    total = int(words.sum(dtype=np.uint64)) if words.size else 0
    tail = bytes(raw[size - size % 8 :]).hex()
    return f"{total:x}:{tail}:{_pages(raw)}"


def _listing(step: int, state: RankState) -> _Listing:
    return _Listing(
        step,
        {
            name: (str(t.dtype), tuple(t.shape), t.nbytes, _pages_of(t))
            for name, t in state.tensors.items()
            if name not in state.shards and t.nbytes >= SHARED_MIN_BYTES
        },
    )


def _hashers(listings: list[_Listing]) -> dict[str, int]:
    """The shared tensors (held alike by every rank: unsharded, at least
    :data:`SHARED_MIN_BYTES`, the same sampled pages) and the rank that hashes each,
    balancing bytes."""
    steps = {listing.step for listing in listings}
    if len(steps) > 1:
        raise CheckpointError(
            f"the ranks are saving different steps ({sorted(steps)}): a rank fell out of step "
            "(did one skip a save after an error?); every rank must save every step"
        )
    first = listings[0].tensors
    shared = [
        name
        for name, held in first.items()
        if all(other.tensors.get(name) == held for other in listings[1:])
    ]
    load = [0] * len(listings)
    hashers: dict[str, int] = {}
    for name in sorted(shared, key=lambda n: (-first[n][2], n)):
        rank = min(range(len(listings)), key=lambda r: (load[r], r))
        load[rank] += first[name][2]
        hashers[name] = rank
    return hashers


def _trust(reports: list[_Report], hashers: Mapping[str, int]) -> list[set[str]]:
    """Give every rank's matching shared tensors their hasher's object (in place); returns,
    for each rank, the shared tensors whose fingerprint differs from the hasher's."""
    rehash: list[set[str]] = [set() for _ in reports]
    for rank, report in enumerate(reports):
        for name, hasher in hashers.items():
            if hasher == rank:
                continue
            source = reports[hasher]
            if report.prints.get(name) == source.prints.get(name) and name in source.names:
                report.names[name] = source.names[name]
            else:
                rehash[rank].add(name)
    return rehash


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


def _assign(reports: list[_Report], store: CheckpointStore, *, more: int = 0) -> list[set[str]]:
    """For each rank, the new objects it writes: each once, by the least loaded holder
    (``more``: bytes the ranks write besides, for the free space check).

    Rank 0's index decides what is stored (it alone prunes; the others re-read the run
    after every save, so their plans agree with it), except that an object some rank
    planned although it is stored is written again by that rank: its check of the stored
    copy failed, and the live bytes repair it (see :meth:`CheckpointStore.plan`).
    """
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
    store.check_space(sum(load) + more)
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
    stale: bool = True,
) -> CheckpointInfo:
    """Save this rank's state, given by ``capture``, as part of ``manifest.step``.

    ``manifest`` carries rank 0's metadata (step, time, metrics, reasons, extra); its
    tensors and tree are filled in here. ``capture`` runs inside the protocol (it returns
    the state, or a private copy taken earlier, or raises the error taking it met), so a
    rank whose state cannot be captured fails the save on every rank instead of falling out
    of step. ``ranks`` must be a group no other thread of this process uses meanwhile: a
    background save runs this on its writer thread, on the checkpoint's commit channel.
    ``after_commit`` runs on rank 0 once the manifest is durable and before any rank
    returns (the manager prunes there); ``progress`` is told this rank's bytes hashed and
    written. Every rank returns the committed checkpoint's summary or raises the same error.

    The other ranks plan their deduplication by their own view of the run: with ``stale``
    they list it again first (their first save, or after a failure); otherwise they take in
    what rank 0 committed and kept at the end of each save (:meth:`CheckpointStore.follow`),
    which keeps them current without a listing per save, and without seeing rank 0's
    local cache in front of a remote run.
    """
    step = manifest.step
    what = f"saving step {step}"
    state: RankState | None = None
    listing: _Listing | Failure
    try:
        if not ranks.coordinator and stale:
            store.refresh()  # rank 0 alone prunes: see what it kept before planning dedup
        state = capture()
        listing = _listing(step, state)
    except Exception as exc:
        listing = Failure.of(ranks.rank, exc)
    listings = ranks.gather(listing)

    hashers: dict[str, int] | Failure = {}
    if listings is not None:
        failed = next((r for r in listings if isinstance(r, Failure)), None)
        try:
            hashers = failed or _hashers([r for r in listings if isinstance(r, _Listing)])
        except Exception as exc:
            hashers = Failure.of(0, exc)
    hashers = ranks.broadcast(hashers)
    if isinstance(hashers, Failure):
        raise hashers.error(what)

    assert state is not None  # a rank whose capture failed raised above
    plan: CommitPlan | None = None
    report: _Report | Failure
    try:
        mine = {n: t for n, t in state.tensors.items() if hashers.get(n, ranks.rank) == ranks.rank}
        plan = store.plan(mine, rank=ranks.rank, progress=progress)
        prints = {n: fingerprint(state.tensors[n]) for n in hashers}
        if progress is not None:  # the shared tensors others hash are done, if they match
            progress(sum(t.nbytes for n, t in state.tensors.items() if n not in mine))
        new = {oid: len(job.raw) for oid, job in plan.new.items()}
        report = _Report(step, dict(plan.names), state.shards, new, state.tree, prints)
    except Exception as exc:
        report = Failure.of(ranks.rank, exc)
    reports = ranks.gather(report)

    jobs: _Jobs | Failure
    if reports is not None:
        failed = next((r for r in reports if isinstance(r, Failure)), None)
        try:
            if failed is not None:
                jobs = failed
            else:
                hashed = [r for r in reports if isinstance(r, _Report)]
                rehash = _trust(hashed, hashers)
                listed = [r for r in listings or [] if isinstance(r, _Listing)]
                more = sum(listed[r].tensors[n][2] for r, names in enumerate(rehash) for n in names)
                jobs = _Jobs(_assign(hashed, store, more=more), rehash)
        except Exception as exc:
            jobs = Failure.of(0, exc)
    else:
        jobs = _Jobs([], [])
    jobs = ranks.broadcast(jobs)
    if isinstance(jobs, Failure):
        raise jobs.error(what)

    assert plan is not None  # a rank whose planning failed raised above
    written: _Written | Failure
    try:
        objects = {oid: plan.new[oid] for oid in jobs.write[ranks.rank]}
        names: dict[str, ObjectUse] = {}
        if jobs.rehash[ranks.rank]:
            # this rank's copy of a shared tensor differs from its hasher's: its own object
            again = {n: state.tensors[n] for n in jobs.rehash[ranks.rank]}
            extra = store.plan(again, rank=ranks.rank)
            names = dict(extra.names)
            objects.update({oid: job for oid, job in extra.new.items() if oid not in objects})
        written = _Written(store.write_objects(objects, progress=progress), names)
    except Exception as exc:
        written = Failure.of(ranks.rank, exc)
    results = ranks.gather(written)

    outcome: _Committed | Failure | None = None
    if results is not None and reports is not None:
        outcome = next((r for r in results if isinstance(r, Failure)), None)
        if outcome is None:
            try:
                done = [r for r in results if isinstance(r, _Written)]
                hashed = [r for r in reports if isinstance(r, _Report)]
                for report_, result in zip(hashed, done, strict=True):
                    report_.names.update(result.names)
                ours = dataclasses.replace(manifest, tree=state.tree)
                info = _publish(hashed, [r.entries for r in done], store, ours)
                after_commit()
                outcome = _Committed(info, store.manifest(step), tuple(store.steps()))
            except Exception as exc:
                outcome = Failure.of(0, exc)
    outcome = ranks.broadcast(outcome)
    if isinstance(outcome, Failure):
        raise outcome.error(what)
    assert outcome is not None
    if not ranks.coordinator:
        store.follow(outcome.manifest, outcome.kept)
    return outcome.info


@dataclass(frozen=True)
class _Committed:
    """What rank 0 tells every rank at the end of a save: the checkpoint's summary, its
    manifest, and the steps kept after pruning."""

    info: CheckpointInfo
    manifest: Manifest
    kept: tuple[int, ...]


@dataclass(frozen=True)
class _Written:
    """What one rank tells rank 0 after writing: the entries of the objects it wrote, and
    the objects of the shared tensors it hashed itself."""

    entries: dict[str, TensorEntry]
    names: dict[str, ObjectUse]


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
