"""One writer per run: the lock names its holder, and a dead holder's lock is taken over."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import ckptwise as cw

HOLDER = """
import sys, time, ckptwise as cw
m = cw.CheckpointManager(sys.argv[1], save=cw.every(1))
print("locked", flush=True)
time.sleep(120)
"""


def test_second_manager_in_the_same_process_gets_the_lock_error(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(10)):
        with pytest.raises(cw.RunLockedError) as err:
            cw.CheckpointManager(run_dir, keep=cw.keep_last(1))
        assert f"pid {os.getpid()}" in str(err.value)
        assert socket.gethostname() in str(err.value)
        reader = cw.open_run(run_dir)  # readers need no lock
        assert reader.checkpoints() == []
    with cw.CheckpointManager(run_dir, save=cw.every(10)):  # released by close()
        pass


@pytest.mark.integration
def test_lock_held_by_another_process_then_taken_over_after_kill_9(run_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cw.RunLockedError, match=f"pid {holder.pid} on host"):
            cw.CheckpointManager(run_dir, save=cw.every(1))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        assert not manager.closed
        assert f'"pid": {os.getpid()}' in (run_dir / "ckptwise.lock").read_text()


def test_remote_lock_names_holder_and_stale_local_pid_is_taken_over() -> None:
    url = f"memory://lock-{os.getpid()}"
    first = cw.CheckpointManager(url, save=cw.every(1))
    with pytest.raises(cw.RunLockedError, match=f"pid {os.getpid()}"):
        cw.CheckpointManager(url, save=cw.every(1))
    first.close()
    # a lock record left by a process that no longer exists on this host is stale
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file(
        f"/lock-{os.getpid()}/ckptwise.lock",
        f'{{"pid": {dead.stdout.strip()}, "host": "{socket.gethostname()}"}}'.encode(),
    )
    with cw.CheckpointManager(url, save=cw.every(1)):
        pass


def test_local_url_through_fsspec_is_locked_with_flock(run_dir: Path) -> None:
    # local:// goes through fsspec; it must exclude a plain-path writer of the same folder
    with (
        cw.CheckpointManager(f"local://{run_dir}", save=cw.every(1)),
        pytest.raises(cw.RunLockedError, match=f"pid {os.getpid()}"),
    ):
        cw.CheckpointManager(run_dir, save=cw.every(1))
    with cw.CheckpointManager(run_dir, save=cw.every(1)), pytest.raises(cw.RunLockedError):
        cw.CheckpointManager(f"local://{run_dir}", save=cw.every(1))


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(run_dir: Path) -> None:
    run_dir.mkdir()
    target = run_dir.parent / "precious.txt"
    target.write_text("do not truncate me")
    (run_dir / "ckptwise.lock").symlink_to(target)
    with pytest.raises(cw.StorageError, match="symbolic link") as err:
        cw.CheckpointManager(run_dir, save=cw.every(1))
    assert str(run_dir / "ckptwise.lock") in str(err.value)
    assert target.read_text() == "do not truncate me"


def test_a_fifo_at_the_lock_path_is_refused_without_hanging(run_dir: Path) -> None:
    run_dir.mkdir()
    os.mkfifo(run_dir / "ckptwise.lock")
    with pytest.raises(cw.StorageError, match="not a regular file"):
        cw.CheckpointManager(run_dir, save=cw.every(1))


READ_ONLY = """
import fcntl, os, sys, ckptwise as cw, ckptwise.manager, ckptwise.read.run
if os.geteuid() == 0:  # root ignores permissions: act as an ordinary user, imports done
    os.setgid(65534)
    os.setuid(65534)
try:
    cw.CheckpointManager(sys.argv[1], save=cw.every(1))
except cw.StorageError as exc:
    print("StorageError:", exc)
print("readers still work:", cw.open_run(sys.argv[1]).steps())
"""


@pytest.mark.integration
def test_a_writer_on_a_read_only_folder_gets_a_storage_error_naming_it() -> None:
    # run as an unprivileged user, which a folder's permissions bind (root ignores them)
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        existing = base / "existing"
        with cw.CheckpointManager(existing, save=cw.every(1)) as manager:
            manager.step(1, {"w": torch.ones(2)})
        for path in [existing, *existing.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        base.chmod(0o555)
        for run in (existing, base / "new"):
            out = subprocess.run(
                [sys.executable, "-c", READ_ONLY, str(run)],
                capture_output=True,
                text=True,
                check=True,
            )
            assert f"StorageError: cannot write to the run folder {run}" in out.stdout
            assert "cw.open_run(root)" in out.stdout
            assert "Traceback" not in out.stderr
        assert "readers still work: [1]" in out.stdout or "readers still work: []" in out.stdout
    finally:
        base.chmod(0o755)
        for path in base.rglob("*"):
            path.chmod(0o755)
        shutil.rmtree(base)


def test_a_garbage_remote_lock_record_is_a_clear_lock_error() -> None:
    url = f"memory://garbage-{os.getpid()}"
    import fsspec

    fsspec.filesystem("memory").pipe_file(f"/garbage-{os.getpid()}/ckptwise.lock", b"\x00{nope")
    with pytest.raises(cw.RunLockedError, match=r"lock record .* is unreadable") as err:
        cw.CheckpointManager(url, save=cw.every(1))
    assert f"delete {url}/ckptwise.lock" in str(err.value)


def test_a_filesystem_without_atomic_create_cannot_be_written() -> None:
    with pytest.raises(cw.StorageError, match="no atomic create-if-absent"):
        cw.CheckpointManager("simplecache::memory://nolock", save=cw.every(1))
    assert cw.open_run("simplecache::memory://nolock").steps() == []  # reading is fine


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory"])
def test_a_writer_whose_lock_was_deleted_stops_writing(tmp_path: Path, remote: bool) -> None:
    url = f"memory://fenced-{os.getpid()}" if remote else str(tmp_path / "run")
    first = cw.CheckpointManager(url, save=cw.every(1), keep=cw.keep_last(1))
    first.step(1, {"w": torch.ones(2)})
    first.wait()
    first.pin(1)
    first.step(2, {"w": torch.full((2,), 2.0)})
    first.wait()
    if remote:
        import fsspec

        fsspec.filesystem("memory").rm_file(f"/fenced-{os.getpid()}/ckptwise.lock")
    else:
        (tmp_path / "run" / "ckptwise.lock").unlink()
    second = cw.CheckpointManager(url, save=cw.every(1), keep=cw.keep_last(1))
    first.step(3, {"w": torch.full((2,), 3.0)})  # the fence refuses it in the background
    with pytest.raises(cw.RunLockedError, match="was deleted or replaced"):
        first.wait()
    first.unpin(1)
    with pytest.raises(cw.RunLockedError, match="was deleted or replaced"):
        first.prune()  # nor does it delete anything
    assert cw.open_run(url).steps() == [1, 2]
    second.step(4, {"w": torch.full((2,), 4.0)})
    second.wait()
    assert cw.open_run(url).steps() == [4]
    first.close()  # releasing must not remove the second writer's lock
    with pytest.raises(cw.RunLockedError):
        cw.CheckpointManager(url, save=cw.every(1))
    second.close()
