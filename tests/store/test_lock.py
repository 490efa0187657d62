"""One writer per run: the lock names its holder, and a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
        reader = cw.CheckpointManager(run_dir)  # readers need no lock
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
        assert manager.writable
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
