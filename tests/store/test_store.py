"""The content-addressed store: round trips, dedup, corruption, atomic commit, debris."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptwise.errors import CorruptCheckpointError, SnapshotError, StorageError
from ckptwise.store import CheckpointStore, LocalBackend, open_backend
from ckptwise.store.commit import space_margin
from ckptwise.store.layout import object_path
from ckptwise.store.manifest import DTYPES


def store_at(path: Path, codec: str = "raw") -> CheckpointStore:
    return CheckpointStore(LocalBackend(path), codec=codec)


def object_file(root: Path, oid: str) -> Path:
    return root / object_path(oid)


def test_round_trip_of_awkward_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "complex": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "conj": torch.tensor([1 + 2j], dtype=torch.complex64).conj(),
        "grad": torch.ones(3, requires_grad=True),
    }
    store = store_at(tmp_path)
    store.commit(1, tensors)
    loaded = CheckpointStore(LocalBackend(tmp_path)).load_tensors(1)
    for name, tensor in tensors.items():
        expected = tensor.detach().resolve_conj()
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        assert torch.equal(loaded[name], expected), name


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 5), max_size=3),
    codec=st.sampled_from(["raw", "zstd"]),
    seed=st.integers(0, 2**16),
)
def test_any_dtype_and_shape_round_trips_bit_exactly(
    tmp_path_factory: pytest.TempPathFactory, dtype: str, shape: list[int], codec: str, seed: int
) -> None:
    torch_dtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (int(torch.tensor(shape).prod()) * torch_dtype.itemsize,),
        dtype=torch.uint8,
        generator=g,
    )
    tensor = raw.view(torch_dtype).reshape(shape)  # any bit pattern: NaN, Inf, denormals
    root = tmp_path_factory.mktemp("rt")
    store_at(root, codec).commit(3, {"t": tensor})
    back = store_at(root).load_tensors(3)["t"]
    assert back.dtype == torch_dtype
    assert back.shape == tensor.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_unchanged_tensors_are_written_once(tmp_path: Path) -> None:
    frozen = torch.randn(256, 256)
    store = store_at(tmp_path)
    infos = [
        store.commit(step, {"frozen": frozen, "moving": torch.full((4,), float(step))})
        for step in range(1, 6)
    ]
    assert infos[0].new_bytes == frozen.nbytes + 16
    assert all(info.new_bytes == 16 for info in infos[1:])
    objects = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1 + 5


def test_identical_tensors_in_one_checkpoint_share_an_object(tmp_path: Path) -> None:
    t = torch.randn(10)
    info = store_at(tmp_path).commit(1, {"a": t, "b": t.clone()})
    assert info.new_bytes == t.nbytes
    assert len(info.objects) == 1


def test_flipped_byte_fails_verification_naming_step_and_tensor(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.commit(1, {"w": torch.randn(100), "b": torch.randn(3)})
    oid = store.manifest(1).tensors["w"].object
    path = object_file(tmp_path, oid)
    data = bytearray(path.read_bytes())
    data[17] ^= 0x01
    path.write_bytes(bytes(data))
    problems = store.verify()
    assert [(p.step, p.tensor) for p in problems] == [(1, "w")]
    assert "checksum" in problems[0].message
    with pytest.raises(CorruptCheckpointError, match=r"step 1, tensor 'w'"):
        store.load_tensors(1)


def test_missing_and_truncated_objects_are_corruption(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.commit(1, {"w": torch.randn(100), "b": torch.randn(3)})
    entries = store.manifest(1).tensors
    object_file(tmp_path, entries["w"].object).unlink()
    path_b = object_file(tmp_path, entries["b"].object)
    path_b.write_bytes(path_b.read_bytes()[:-1])
    problems = {p.tensor: p.message for p in store.verify()}
    assert "missing" in problems["w"]
    assert "bytes" in problems["b"]


def test_failure_before_manifest_leaves_previous_checkpoint_and_debris_is_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(tmp_path)
    store.commit(1, {"w": torch.zeros(1000)})
    real = LocalBackend.write_atomic

    def failing(self: LocalBackend, path: str, chunks: object, *, sync: bool = True) -> int:
        if path.startswith("checkpoints/"):
            raise StorageError("disk full (injected)")
        return real(self, path, chunks, sync=sync)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalBackend, "write_atomic", failing)
    with pytest.raises(StorageError, match="injected"):
        store.commit(2, {"w": torch.ones(1000)})
    monkeypatch.undo()

    reopened = store_at(tmp_path)
    assert reopened.steps() == [1]
    assert reopened.verify() == []
    removed = reopened.clean()
    assert removed == 1  # the orphaned object of step 2
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        "checkpoints/000000000001.json",
        object_path(reopened.manifest(1).tensors["w"].object),
    ]


def test_temporary_files_are_debris(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.commit(1, {"w": torch.zeros(10)})
    (tmp_path / "checkpoints" / "000000000002.json.tmp-abc").write_text("{")
    (tmp_path / "objects" / "aa").mkdir()
    (tmp_path / "objects" / "aa" / ("a" * 64 + ".tmp-123")).write_bytes(b"x")
    assert store_at(tmp_path).clean() == 2
    assert store_at(tmp_path).steps() == [1]


def test_delete_removes_only_unshared_objects(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    shared = torch.randn(50)
    store.commit(1, {"s": shared, "x": torch.zeros(3)})
    store.commit(2, {"s": shared, "x": torch.ones(3)})
    store.delete([1])
    assert store.steps() == [2]
    assert store.verify() == []
    assert len([p for p in (tmp_path / "objects").rglob("*") if p.is_file()]) == 2


def test_unreadable_manifest_blocks_garbage_collection(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.commit(1, {"w": torch.zeros(10)})
    store.commit(2, {"w": torch.ones(10)})
    (tmp_path / "checkpoints" / "000000000002.json").write_text("{not json")
    reopened = store_at(tmp_path)
    assert reopened.steps() == [1]
    assert "not valid JSON" in next(iter(reopened.broken.values()))
    assert reopened.collect_garbage() == 0
    assert len([p for p in (tmp_path / "objects").rglob("*") if p.is_file()]) == 2


def test_in_memory_fsspec_store_round_trips() -> None:
    store = CheckpointStore(open_backend(f"memory://ckptwise-{os.getpid()}-rt"))
    t = torch.randn(4, 4)
    store.commit(5, {"t": t}, metrics={"loss": 1.5})
    again = CheckpointStore(open_backend(f"memory://ckptwise-{os.getpid()}-rt"))
    assert again.steps() == [5]
    assert torch.equal(again.load_tensors(5)["t"], t)
    assert again.info(5).metrics == {"loss": 1.5}
    again.delete([5])
    assert again.backend.list_files("objects") == []


def test_zstd_codec_is_recorded_and_objects_keep_their_codec(tmp_path: Path) -> None:
    zeros = torch.zeros(10_000)
    info = store_at(tmp_path, "zstd").commit(1, {"z": zeros})
    assert info.new_bytes < zeros.nbytes // 10
    raw_store = store_at(tmp_path, "raw")
    raw_store.commit(2, {"z": zeros})
    assert raw_store.manifest(2).tensors["z"].codec == "zstd"  # reused, not rewritten
    assert torch.equal(raw_store.load_tensors(2)["z"], zeros)


def test_a_dtype_the_format_lacks_is_the_callers_error(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path))
    with pytest.raises(SnapshotError, match="cannot be stored; convert them"):
        store.commit(1, {"w": torch.zeros(2, dtype=torch.float8_e4m3fnuz)})
    assert store.steps() == []
    assert not (tmp_path / "objects").exists()


class SmallDisk(LocalBackend):
    """A real local backend on a volume that says it has only ``free`` bytes left."""

    def __init__(self, root: Path, free: int) -> None:
        super().__init__(root)
        self.free = free

    def free_bytes(self) -> int | None:
        return self.free


def test_the_space_margin_grows_with_the_save() -> None:
    assert space_margin(0) == 2**20  # at least 1 MiB
    assert space_margin(10 * 2**20) == 2**20
    assert space_margin(1000 * 2**20) == 20 * 2**20  # 2 % of a large save
    assert space_margin(1000 * 2**20, files=256) == 21 * 2**20  # and a block per file


def test_a_small_save_fits_on_a_nearly_full_volume(tmp_path: Path) -> None:
    store = CheckpointStore(SmallDisk(tmp_path, free=3 * 2**20))
    store.commit(1, {"w": torch.zeros(2**18)})  # 1 MiB; a flat 64 MiB margin refused it
    assert store.verify() == []


def test_a_save_that_would_eat_the_margin_is_refused_naming_it(tmp_path: Path) -> None:
    store = CheckpointStore(SmallDisk(tmp_path, free=int(2.5 * 2**20)))
    with pytest.raises(StorageError, match=r"keeping 1\.0 MiB spare \(2% of the save, at least 1"):
        store.commit(1, {"w": torch.zeros(2**19)})  # 2 MiB
    assert store.steps() == []
    assert not (tmp_path / "objects").exists()  # nothing was written


class FailingSync(LocalBackend):
    """A real local backend whose folder syncs of ``checkpoints/`` fail ``sync_failures``
    times, and whose deletions fail while ``deletes_fail``."""

    def __init__(self, root: Path, *, sync_failures: int, deletes_fail: bool = False) -> None:
        super().__init__(root)
        self.sync_failures = sync_failures
        self.deletes_fail = deletes_fail

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        dirs = list(dirs)
        if "checkpoints" in dirs and self.sync_failures:
            self.sync_failures -= 1
            raise StorageError("could not sync folder checkpoints: EIO (injected)")
        super().sync_dirs(dirs)

    def delete(self, path: str) -> None:
        if self.deletes_fail:
            raise StorageError(f"could not delete {path}: EIO (injected)")
        super().delete(path)


def test_a_manifest_that_cannot_be_made_durable_is_removed_again(tmp_path: Path) -> None:
    store_at(tmp_path).commit(1, {"w": torch.zeros(10)})
    backend = FailingSync(tmp_path, sync_failures=1)
    store = CheckpointStore(backend)
    with pytest.raises(StorageError, match="removed again, so the step was not saved"):
        store.commit(2, {"w": torch.ones(10)})
    assert store.steps() == [1]
    assert not (tmp_path / "checkpoints" / "000000000002.json").exists()
    store.commit(3, {"w": torch.full((10,), 3.0)})
    assert store_at(tmp_path).steps() == [1, 3]
    assert store_at(tmp_path).verify() == []


def test_a_manifest_that_can_be_neither_synced_nor_removed_is_kept_with_its_objects(
    tmp_path: Path,
) -> None:
    store_at(tmp_path).commit(1, {"w": torch.zeros(10)})
    backend = FailingSync(tmp_path, sync_failures=1, deletes_fail=True)
    store = CheckpointStore(backend)
    with pytest.raises(StorageError, match="is kept, with all its objects"):
        store.commit(2, {"w": torch.ones(10)})
    assert store.steps() == [1, 2]  # the index knows it, so its objects stay referenced
    backend.deletes_fail = False
    store.delete([1])  # garbage collection must not take step 2's objects
    reopened = store_at(tmp_path)
    assert reopened.steps() == [2]
    assert reopened.verify() == []
    assert torch.equal(reopened.load_tensors(2)["w"], torch.ones(10))
