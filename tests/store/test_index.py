"""The index of committed manifests: references (bases included), replacement and GC."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptwise.errors import CheckpointNotFoundError
from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store.index import Index
from ckptwise.store.layout import object_path


def objects_on_disk(root: Path) -> set[str]:
    return {p.name for p in (root / "objects").rglob("*") if p.is_file()}


def test_a_fresh_index_reads_what_the_store_committed(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    shared = torch.randn(64)
    store.commit(1, {"s": shared, "x": torch.zeros(3)})
    store.commit(2, {"s": shared, "x": torch.ones(3)})
    index = Index(LocalBackend(tmp_path))
    index.refresh()
    assert index.steps() == [1, 2]
    assert [m.step for m in index.manifests()] == [1, 2]
    latest = index.latest()
    assert latest is not None
    assert latest.step == 2
    oid = index.manifest(1).tensors["s"].object
    known = index.known(oid)
    assert known is not None
    assert known.nbytes == shared.nbytes
    assert set(index.object_bytes()) == objects_on_disk(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"no committed checkpoint at step 3.*1, 2"):
        index.manifest(3)


def test_bases_count_as_referenced_by_every_checkpoint_built_on_them(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=8)
    w = torch.randn(128, 128) * 0.02
    for step in range(1, 4):
        w = w.clone()
        w[step] += 1e-4
        store.commit(step, {"w": w})
    keyframe = store.manifest(1).tensors["w"].object
    store.delete([1, 2])
    assert store.steps() == [3]
    assert keyframe in store.object_bytes()
    assert keyframe in objects_on_disk(tmp_path)
    assert store.verify() == []
    store.delete([3])
    assert objects_on_disk(tmp_path) == set()
    assert store.physical_bytes() == 0


def test_saving_a_step_again_replaces_it_and_collects_its_objects(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, {"w": torch.zeros(10)})
    old = store.manifest(1).tensors["w"].object
    store.commit(1, {"w": torch.ones(10)})
    assert store.steps() == [1]
    assert old not in objects_on_disk(tmp_path)
    assert torch.equal(store.load_tensors(1)["w"], torch.ones(10))


def test_an_object_deleted_behind_the_index_is_found_by_verify(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, {"w": torch.zeros(10)})
    (tmp_path / object_path(store.manifest(1).tensors["w"].object)).unlink()
    (problem,) = store.verify()
    assert (problem.step, problem.tensor) == (1, "w")
    assert "missing" in problem.message


def test_iter_manifests_is_a_snapshot(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    for step in (3, 1, 2):
        store.commit(step, {"w": torch.full((2,), float(step))})
    manifests = store.iter_manifests()
    store.delete([2])
    assert [m.step for m in manifests] == [1, 2, 3]
    assert [m.step for m in store.iter_manifests()] == [1, 3]
