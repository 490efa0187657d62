"""What :class:`CheckpointStore` offers its neighbours instead of store internals: pins and
the prune handshake, uploads, the lock, request files, manifest paths, object sizes and the
verified read, branch views, and :func:`open_store`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptwise.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RunLockedError,
    StorageError,
)
from ckptwise.store import CheckpointStore, is_cache_folder, open_store


def _saved(root: Path, steps: tuple[int, ...] = (1, 2, 3)) -> CheckpointStore:
    store = open_store(root)
    for step in steps:
        store.commit(step, {"w": torch.full((64,), float(step))})
    return store


def test_pins_are_read_afresh_and_unpinned(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    store.pin(2)
    assert store.pins() == {2}
    assert open_store(tmp_path).pins() == {2}  # another process sees it
    store.unpin(2)
    store.unpin(2)  # unpinning again does nothing
    assert store.pins() == set()
    with pytest.raises(CheckpointNotFoundError, match="nothing to pin"):
        store.pin(7)


def test_delete_unpinned_keeps_the_steps_pinned_meanwhile(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    open_store(tmp_path).pin(1)  # pinned by someone else after the plan was made
    kept = store.delete_unpinned([1, 2])
    assert kept == {1}
    assert store.steps() == [1, 3]
    assert store.delete_unpinned([]) == set()


def test_unpin_moved_unpins_only_the_pinned_steps_given(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    store.pin(2)
    store.pin(3)
    assert store.unpin_moved([1, 2]) == [2]
    assert store.pins() == {3}


def test_a_crashed_writers_tombstone_blocks_pins_until_cleared(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    store.backend.write_atomic("pruning/000000000002", [b"{}"])  # what a crash leaves
    with pytest.raises(CheckpointNotFoundError, match="being deleted"):
        store.pin(2)
    store.clear_tombstones()
    store.pin(2)
    assert store.pins() == {2}


def test_record_kept_is_read_back_by_kept(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    assert store.kept() == {}
    store.record_kept({3: ["newest"], 1: ("every 1000", "pinned")})
    assert open_store(tmp_path).kept() == {3: ["newest"], 1: ["every 1000", "pinned"]}


def test_a_local_run_has_no_uploads_to_report_flush_or_close(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    assert store.upload_states() is None
    store.flush_uploads()
    store.close()
    store.close()  # twice is fine
    assert store.steps() == [1, 2, 3]  # reads keep working


def test_a_runs_lock_is_taken_once(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    lock = store.lock()
    lock.acquire()
    try:
        with pytest.raises(RunLockedError, match="locked by"):
            open_store(tmp_path).lock().acquire()
    finally:
        lock.release()
    again = store.lock()
    again.acquire()  # free once released
    again.release()


def test_manifest_path_names_the_committed_file(tmp_path: Path) -> None:
    store = _saved(tmp_path, (1000,))
    assert store.manifest_path(1000) == "checkpoints/000000001000.json"
    assert (tmp_path / store.manifest_path(1000)).is_file()
    assert store.url == str(tmp_path)
    assert store.local_root == str(tmp_path)
    assert store.has_files()
    assert not open_store(tmp_path / "empty").has_files()


def test_the_verified_read_finds_one_flipped_byte(tmp_path: Path) -> None:
    store = _saved(tmp_path, (1,))
    entry = store.manifest(1).tensors["w"]
    assert store.object_nbytes(entry) == entry.nbytes
    assert torch.equal(store.read_tensor(entry, step=1, name="w"), torch.full((64,), 1.0))
    path = tmp_path / "objects" / entry.object[:2] / entry.object
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.object_nbytes(entry) == entry.nbytes  # sizing alone cannot tell
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w'.*fails its checksum"):
        store.read_tensor(entry, step=1, name="w")
    path.write_bytes(bytes(data[:-4]))
    assert store.object_nbytes(entry) == entry.nbytes - 4  # a truncated object is sized short


def test_the_read_reports_progress_to_the_callback_it_is_given(tmp_path: Path) -> None:
    store = _saved(tmp_path, (1,))
    entry = store.manifest(1).tensors["w"]
    seen: list[int] = []
    store.read_tensor(entry, step=1, name="w", progress=seen.append)
    assert seen == [entry.nbytes]


def test_request_files_in_a_local_run(tmp_path: Path) -> None:
    store = _saved(tmp_path, (1,))
    assert not store.remote
    assert not store.request_exists("SAVE_NOW")
    (tmp_path / "SAVE_NOW").touch()
    assert store.request_exists("SAVE_NOW")
    store.remove_request("SAVE_NOW")
    assert not (tmp_path / "SAVE_NOW").exists()
    store.remove_request("SAVE_NOW")  # already gone: no error


def test_request_files_in_a_remote_run(tmp_path: Path) -> None:
    store = open_store(f"memory://{tmp_path.name}/run")
    assert store.remote
    assert store.local_root is None
    store.backend.write_atomic("SAVE_NOW", [b""])
    assert store.request_exists("SAVE_NOW")
    store.remove_request("SAVE_NOW")
    assert not store.request_exists("SAVE_NOW")


def test_a_branch_view_reads_the_set_aside_checkpoints_and_refuses_writes(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    store.move_to_branch([2, 3], "old")
    branch = store.branch("old")
    assert branch.steps() == [2, 3]
    assert torch.equal(branch.load_tensors(3)["w"], torch.full((64,), 3.0))
    with pytest.raises(StorageError, match="read-only"):
        branch.commit(4, {"w": torch.zeros(1)})
    with pytest.raises(ConfigError, match="not a branch name"):
        store.branch("../x")


def test_open_store_passes_its_options_on(tmp_path: Path) -> None:
    store = open_store(tmp_path, codec="bytegroup", deltas=4)
    assert store.deltas == 4
    with pytest.raises(ConfigError, match="deltas=4 needs codec"):
        open_store(tmp_path, deltas=4)
    with pytest.raises(ConfigError, match="is a local folder"):
        open_store(tmp_path, cache=tmp_path / "cache")
    with pytest.raises(ConfigError, match="no cache= was given"):
        open_store(tmp_path, cache_bytes=10)
    assert not is_cache_folder(tmp_path)
    (tmp_path / "cache.json").write_text("{}")
    assert is_cache_folder(tmp_path)
