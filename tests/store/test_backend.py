"""Backends: atomic writes, reads into buffers, listing, deletion, and wrapped errors."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptwise.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ckptwise.store import Backend, FsspecBackend, LocalBackend, open_backend
from ckptwise.store.layout import TMP_MARK


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield LocalBackend(tmp_path / "run")
        return
    memory = FsspecBackend(f"memory://ckptwise-backend-{uuid.uuid4().hex}/run")
    yield memory
    if memory.fs.exists(memory.root):
        memory.fs.rm(memory.root, recursive=True)


def test_write_then_read_whole_files(backend: Backend) -> None:
    assert backend.write_atomic("objects/ab/abc", [b"hello ", memoryview(b"world")]) == 11
    assert backend.read_bytes("objects/ab/abc") == b"hello world"
    assert backend.size("objects/ab/abc") == 11
    assert backend.exists("objects/ab/abc")
    assert not backend.exists("objects/ab/abd")
    backend.write_atomic("objects/ab/abc", [b"new"])  # replacing is allowed
    assert backend.read_bytes("objects/ab/abc") == b"new"


def test_a_reader_never_sees_a_partial_file(backend: Backend) -> None:
    backend.write_atomic("checkpoints/1.json", [b"old"])
    seen: list[list[str]] = []

    def chunks() -> Iterator[bytes]:
        yield b"first half, "
        seen.append(backend.list_files(""))
        assert backend.read_bytes("checkpoints/1.json") == b"old"
        yield b"second half"

    backend.write_atomic("checkpoints/1.json", chunks())
    assert backend.read_bytes("checkpoints/1.json") == b"first half, second half"
    (during,) = seen
    # the new bytes live under a temporary name (locally) or in memory (object stores)
    assert all(p == "checkpoints/1.json" or TMP_MARK in p for p in during)
    assert backend.list_files("") == ["checkpoints/1.json"]


def test_a_failed_write_leaves_the_old_file_and_no_debris(backend: Backend) -> None:
    backend.write_atomic("run.json", [b"old"])

    def failing() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        backend.write_atomic("run.json", failing())
    assert backend.read_bytes("run.json") == b"old"
    assert backend.list_files("") == ["run.json"]


def test_local_temporary_names_carry_the_mark(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    names: list[str] = []

    def chunks() -> Iterator[bytes]:
        names.extend(p.name for p in (tmp_path / "objects").iterdir())
        yield b"x"

    backend.write_atomic("objects/abc", chunks())
    (name,) = names
    assert name.startswith("abc" + TMP_MARK)


def test_read_into_fills_a_buffer(backend: Backend) -> None:
    backend.write_atomic("o", [bytes(range(10))])
    buffer = bytearray(10)
    assert backend.read_into("o", memoryview(buffer)) == 10
    assert buffer == bytes(range(10))
    short = bytearray(4)
    backend.read_into("o", memoryview(short))
    assert short == bytes(range(4))
    with pytest.raises(CheckpointNotFoundError):
        backend.read_into("missing", memoryview(bytearray(1)))


def test_list_files_is_recursive_root_relative_and_sorted(backend: Backend) -> None:
    for path in ("objects/bb/b2", "objects/aa/a1", "checkpoints/1.json", "run.json"):
        backend.write_atomic(path, [b"."])
    assert backend.list_files("objects") == ["objects/aa/a1", "objects/bb/b2"]
    assert backend.list_files("") == [
        "checkpoints/1.json",
        "objects/aa/a1",
        "objects/bb/b2",
        "run.json",
    ]
    assert backend.list_files("nothing-here") == []


def test_delete_removes_one_file_and_ignores_a_missing_one(backend: Backend) -> None:
    backend.write_atomic("a/x", [b"1"])
    backend.write_atomic("a/y", [b"2"])
    backend.delete("a/x")
    backend.delete("a/x")
    backend.delete("never/was")
    assert backend.list_files("") == ["a/y"]


def test_missing_files_are_not_found_errors(backend: Backend) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        backend.read_bytes("checkpoints/7.json")
    with pytest.raises(FileNotFoundError):  # the built-in a caller would catch
        backend.size("checkpoints/7.json")


def test_sync_dirs_accepts_missing_folders(backend: Backend) -> None:
    backend.write_atomic("objects/ab/x", [b"."])
    backend.sync_dirs(["objects/ab", "objects", "not/there"])


def test_free_bytes(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "not" / "created" / "yet")
    free = local.free_bytes()
    assert free is not None
    assert free > 0
    assert FsspecBackend(f"memory://ckptwise-free-{uuid.uuid4().hex}").free_bytes() is None


def test_local_failures_are_storage_errors(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    backend = LocalBackend(tmp_path)
    with pytest.raises(StorageError, match="could not write") as info:
        backend.write_atomic("a-file/below", [b"x"])
    assert isinstance(info.value.__cause__, OSError)
    (tmp_path / "folder").mkdir()
    # a folder where a file belongs is damage to the run, not a failing disk
    with pytest.raises(CorruptCheckpointError, match="is a folder, not a regular file"):
        backend.read_bytes("folder")
    with pytest.raises(CorruptCheckpointError, match="is a folder, not a regular file"):
        backend.read_into("folder", memoryview(bytearray(1)))


def test_fsspec_failures_are_storage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FsspecBackend(f"memory://ckptwise-fail-{uuid.uuid4().hex}")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("access denied (injected)")

    monkeypatch.setattr(backend.fs, "pipe_file", refuse)
    with pytest.raises(StorageError, match=r"could not write .*injected") as info:
        backend.write_atomic("objects/x", [b"."])
    assert isinstance(info.value.__cause__, PermissionError)


def test_open_backend_picks_by_url(tmp_path: Path) -> None:
    assert isinstance(open_backend(tmp_path), LocalBackend)
    plain = open_backend(f"file://{tmp_path}")
    assert isinstance(plain, LocalBackend)
    assert plain.url == str(tmp_path)
    assert isinstance(open_backend("memory://ckptwise-open"), FsspecBackend)
    with pytest.raises(StorageError, match="cannot open"):
        open_backend("nosuchprotocol://bucket/run")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "target").write_bytes(b"precious")
    return folder


def test_the_root_may_be_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    backend = LocalBackend(tmp_path / "link")
    backend.write_atomic("objects/ab/x", [b"1"])
    assert backend.list_files("") == ["objects/ab/x"]
    assert (tmp_path / "real" / "objects" / "ab" / "x").read_bytes() == b"1"


@pytest.mark.parametrize("folder", ["objects", "objects/ab"])
def test_nothing_is_written_listed_synced_or_deleted_through_a_linked_folder(
    tmp_path: Path, outside: Path, folder: str
) -> None:
    backend = LocalBackend(tmp_path / "run")
    (tmp_path / "run" / folder).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / folder).symlink_to(outside)
    for action in (
        lambda: backend.write_atomic("objects/ab/target", [b"evil"]),
        lambda: backend.delete("objects/ab/target"),
        lambda: backend.list_files("objects/ab"),
        lambda: backend.sync_dirs(["objects/ab"]),
    ):
        with pytest.raises(StorageError, match=r"symbolic link where a folder belongs.*remove it"):
            action()
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        backend.read_bytes("objects/ab/target")
    assert backend.exists("objects/ab/target") is False
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_bytes() == b"precious"


def test_a_linked_file_is_neither_followed_nor_replaced_nor_deleted(
    tmp_path: Path, outside: Path
) -> None:
    backend = LocalBackend(tmp_path / "run")
    backend.write_atomic("checkpoints/keep.json", [b"{}"])
    link = tmp_path / "run" / "checkpoints" / "000000000001.json"
    link.symlink_to(outside / "target")
    with pytest.raises(StorageError, match="symbolic link where a file belongs"):
        backend.write_atomic("checkpoints/000000000001.json", [b"evil"])
    with pytest.raises(StorageError, match="symbolic link where a file belongs"):
        backend.delete("checkpoints/000000000001.json")
    with pytest.raises(CorruptCheckpointError, match="symbolic link, not a regular file"):
        backend.read_bytes("checkpoints/000000000001.json")
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        backend.size("checkpoints/000000000001.json")
    # listed by name (so it can be reported), never followed
    assert backend.list_files("checkpoints") == [
        "checkpoints/000000000001.json",
        "checkpoints/keep.json",
    ]
    assert link.is_symlink()
    assert (outside / "target").read_bytes() == b"precious"
    assert not list(outside.glob("*.tmp-*"))


def test_a_fifo_or_device_is_refused_at_once(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block forever
    with pytest.raises(CorruptCheckpointError, match="is a FIFO, not a regular file"):
        backend.read_bytes("fifo")
    with pytest.raises(CorruptCheckpointError, match="is a FIFO"):
        backend.read_into("fifo", memoryview(bytearray(4)))
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        backend.read_bytes("zero")
    assert backend.list_files("") == ["fifo", "zero"]


def test_fsspec_reads_are_bounded_by_the_buffer() -> None:
    backend = FsspecBackend(f"memory://ckptwise-bounded-{uuid.uuid4().hex}")
    backend.write_atomic("o", [bytes(range(100))])
    short = bytearray(10)
    assert backend.read_into("o", memoryview(short)) == 10
    assert short == bytes(range(10))
    backend.fs.makedirs(f"{backend.root}/folder/inner", exist_ok=True)
    backend.write_atomic("folder/inner/x", [b"1"])
    with pytest.raises(CorruptCheckpointError, match="not a file"):
        backend.size("folder")
