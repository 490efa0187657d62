"""Which rank writes which object of a checkpoint written by several ranks together."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptwise.distributed.save import _assign, _Report
from ckptwise.store import CheckpointStore, LocalBackend


def report(names: dict[str, str], new: dict[str, int]) -> _Report:
    return _Report(7, {n: (oid, "float32", (4,)) for n, oid in names.items()}, {}, new, {})


def test_stored_objects_are_skipped_new_ones_written_once_and_repairs_by_their_rank(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, {"frozen": torch.zeros(4), "rank1": torch.ones(4)})
    frozen = store.manifest(1).tensors["frozen"].object
    rank1 = store.manifest(1).tensors["rank1"].object
    fresh = "f" * 64
    jobs = _assign(
        [
            report({"frozen": frozen, "w": fresh}, {fresh: 16}),
            # rank 1 found its stored copy of `rank1` damaged and planned to write it again
            report({"frozen": frozen, "w": fresh, "rank1": rank1}, {fresh: 16, rank1: 16}),
        ],
        store,
    )
    assert jobs[0] | jobs[1] == {fresh, rank1}  # the stored, healthy `frozen` is not rewritten
    assert not jobs[0] & jobs[1]  # each object by one rank
    assert rank1 in jobs[1]  # the repair by the rank that holds the live bytes
