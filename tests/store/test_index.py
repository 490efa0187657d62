"""The index of committed manifests: references (bases included), replacement and GC."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptwise.errors import CheckpointNotFoundError, ConfigError
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


def test_garbage_collection_keeps_what_a_manifest_unknown_to_the_index_names(
    tmp_path: Path,
) -> None:
    first = CheckpointStore(LocalBackend(tmp_path))
    first.commit(1, {"w": torch.zeros(10)})
    other = CheckpointStore(LocalBackend(tmp_path))  # another process, say
    other.commit(2, {"w": torch.ones(10)})
    first.delete([1])  # first's index has never seen step 2
    assert first.collect_garbage() == 0
    assert CheckpointStore(LocalBackend(tmp_path)).verify() == []
    (tmp_path / "checkpoints" / "000000000002.json").write_text("{")
    first.commit(3, {"w": torch.full((10,), 3.0)})
    first.delete([3])
    assert torch.ones(10).numpy().tobytes() in {
        p.read_bytes() for p in (tmp_path / "objects").rglob("*") if p.is_file()
    }  # an unreadable manifest the index lacks stops collection too


def test_moving_steps_to_a_branch_keeps_them_and_their_objects(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    frozen = torch.randn(64)
    for step in (10, 20, 30):
        store.commit(step, {"frozen": frozen, "w": torch.full((4,), float(step))})
    store.move_to_branch([20, 30], "went-back")
    assert store.steps() == [10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000000000010.json"]
    branches = store.branches()
    assert list(branches) == ["went-back"]
    assert [m.step for m in branches["went-back"]] == [20, 30]
    store.commit(11, {"frozen": frozen, "w": torch.full((4,), 11.0)})
    store.delete([10])
    assert store.collect_garbage() == 0
    fresh = CheckpointStore(LocalBackend(tmp_path))
    assert [m.step for m in fresh.branches()["went-back"]] == [20, 30]
    for manifest in fresh.branches()["went-back"]:
        for entry in manifest.tensors.values():
            assert (tmp_path / object_path(entry.object)).is_file()
    fresh.delete_branch("went-back")
    assert fresh.branches() == {}
    assert objects_on_disk(tmp_path) == set(fresh.object_bytes())  # only step 11's
    assert fresh.verify() == []


def test_a_crash_between_copy_and_delete_leaves_the_step_in_both_places(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, {"w": torch.zeros(4)})
    store.commit(2, {"w": torch.ones(4)})
    folder = tmp_path / "branches" / "b"
    folder.mkdir(parents=True)
    manifest = tmp_path / "checkpoints" / "000000000002.json"
    (folder / manifest.name).write_bytes(manifest.read_bytes())  # the copy, then the crash
    reopened = CheckpointStore(LocalBackend(tmp_path))
    assert reopened.steps() == [1, 2]
    assert [m.step for m in reopened.branches()["b"]] == [2]
    reopened.delete([2])  # the branch's copy still holds its objects
    assert reopened.clean() == 0
    assert reopened.verify() == []
    assert objects_on_disk(tmp_path) == set(store.object_bytes())


def test_an_unreadable_branch_manifest_stops_garbage_collection(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, {"w": torch.zeros(4)})
    store.commit(2, {"w": torch.ones(4)})
    store.move_to_branch([2], "b")
    (tmp_path / "branches" / "b" / "000000000002.json").write_text("{")
    store.commit(3, {"w": torch.full((4,), 3.0)})
    fresh = CheckpointStore(LocalBackend(tmp_path))
    assert fresh.branches() == {}
    assert "branches/b/000000000002.json" in fresh.broken
    fresh.delete([1])
    assert len(objects_on_disk(tmp_path)) == 3  # step 1's object is kept while 2 is unknown


def test_branch_arguments_are_checked(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, {"w": torch.zeros(4)})
    with pytest.raises(ConfigError, match="not a branch name"):
        store.move_to_branch([1], "../objects")
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint at step 2"):
        store.move_to_branch([1, 2], "b")
    assert store.steps() == [1]  # nothing moved
    with pytest.raises(CheckpointNotFoundError, match="no branch 'b'"):
        store.delete_branch("b")
