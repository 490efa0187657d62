"""Damage on disk never spreads into new checkpoints: dedup checks what it reuses, and a delta
whose base cannot be read back is stored whole."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store.codecs import DELTA
from ckptwise.store.layout import object_path


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def delete(path: Path) -> None:
    path.unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": flip, "truncate": truncate, "delete": delete}


def state(step: int) -> dict[str, torch.Tensor]:
    """A frozen tower (the same bytes at every step) and a head that trains."""
    frozen = torch.linspace(-1, 1, 4096).reshape(64, 64)
    return {"tower": frozen, "head": torch.full((16,), float(step))}


def object_file(root: Path, store: CheckpointStore, step: int, name: str) -> Path:
    return root / object_path(store.manifest(step).tensors[name].object)


@pytest.mark.parametrize("codec", ["raw", "zstd", "bytegroup"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_rotten_shared_object_is_rewritten_and_older_checkpoints_heal(
    tmp_path: Path, damage: str, codec: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = CheckpointStore(LocalBackend(tmp_path), codec=codec)
    writer.commit(1, state(1))
    writer.commit(2, state(2))
    tower = writer.manifest(1).tensors["tower"]
    DAMAGE[damage](object_file(tmp_path, writer, 1, "tower"))
    assert {p.step for p in writer.verify()} == {1, 2}  # both share the damaged object

    resumed = CheckpointStore(LocalBackend(tmp_path), codec=codec)  # a new process
    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        info = resumed.commit(3, state(3))
    assert tower.object in caplog.text
    assert "'tower'" in caplog.text
    assert tower.object in info.objects
    assert info.new_bytes >= tower.stored_bytes  # written again, not reused
    fresh = CheckpointStore(LocalBackend(tmp_path))
    assert fresh.verify() == []  # the repair healed steps 1 and 2 too
    for step in (1, 2, 3):
        assert torch.equal(fresh.load_tensors(step)["tower"], state(step)["tower"])
    assert fresh.manifest(3).tensors["tower"].codec == tower.codec


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_the_same_store_notices_a_changed_size_on_its_next_save(
    tmp_path: Path, damage: str
) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    store.commit(1, state(1))
    DAMAGE[damage](object_file(tmp_path, store, 1, "tower"))
    store.commit(2, state(2))  # within the recheck interval: the size check alone
    assert CheckpointStore(LocalBackend(tmp_path)).verify() == []


def test_flipped_bytes_are_found_once_the_recheck_interval_has_passed(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), recheck=timedelta(0))
    store.commit(1, state(1))
    flip(object_file(tmp_path, store, 1, "tower"))
    store.commit(2, state(2))
    assert CheckpointStore(LocalBackend(tmp_path)).verify() == []


def test_a_reused_object_is_read_back_only_on_its_first_reuse_and_after_the_interval(
    tmp_path: Path,
) -> None:
    CheckpointStore(LocalBackend(tmp_path)).commit(1, state(1))
    store = CheckpointStore(LocalBackend(tmp_path))
    before = store.reads
    store.commit(2, state(2))
    assert store.reads - before == 1  # the tower, on its first reuse by this store
    store.commit(3, state(3))
    assert store.reads - before == 1  # checked recently: its size is enough
    eager = CheckpointStore(LocalBackend(tmp_path), recheck=timedelta(0))
    eager.commit(4, state(4))
    eager.commit(5, state(5))
    assert eager.reads == 2


def test_recheck_must_be_a_non_negative_timedelta(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"recheck=.*non-negative timedelta"):
        CheckpointStore(LocalBackend(tmp_path), recheck=timedelta(seconds=-1))


def drift(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=g) * 0.02
    w[:step] += 1e-4
    return w


def test_a_damaged_delta_base_stores_a_keyframe_instead_of_failing_the_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=8)
    store.commit(1, {"w": drift(1)})
    store.commit(2, {"w": drift(2)})
    newest = store.manifest(2).tensors["w"]
    assert newest.codec == DELTA
    flip(tmp_path / object_path(newest.object))
    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        store.commit(3, {"w": drift(3)})
        store.commit(4, {"w": drift(4)})
    assert newest.object in caplog.text
    assert "whole instead" in caplog.text
    third, fourth = store.manifest(3).tensors["w"], store.manifest(4).tensors["w"]
    assert (third.codec, third.bases) == ("bytegroup", ())  # a keyframe
    assert fourth.codec == DELTA  # and the chain goes on from it
    problems = CheckpointStore(LocalBackend(tmp_path)).verify()
    assert {p.step for p in problems} == {2}  # only the damaged step itself
    fresh = CheckpointStore(LocalBackend(tmp_path))
    for step in (1, 3, 4):
        assert torch.equal(fresh.load_tensors(step)["w"], drift(step))


def test_a_damaged_delta_object_reused_as_is_is_rewritten_whole(tmp_path: Path) -> None:
    """Training paused: step 3 holds the same weights as step 2, whose object is a delta."""
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=8)
    store.commit(1, {"w": drift(1)})
    store.commit(2, {"w": drift(2)})
    delta = store.manifest(2).tensors["w"]
    assert delta.codec == DELTA
    flip(tmp_path / object_path(delta.object))
    resumed = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=8)
    resumed.commit(3, {"w": drift(2)})
    entry = resumed.manifest(3).tensors["w"]
    assert (entry.object, entry.codec, entry.bases) == (delta.object, "bytegroup", ())
    resumed.commit(4, {"w": drift(4)})
    fresh = CheckpointStore(LocalBackend(tmp_path))
    assert torch.equal(fresh.load_tensors(3)["w"], drift(2))
    assert torch.equal(fresh.load_tensors(4)["w"], drift(4))
    assert {p.step for p in fresh.verify()} == {2}  # step 2 still reads it as a delta
