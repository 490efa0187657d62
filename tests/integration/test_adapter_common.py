"""What the framework adapters share (no framework needed): one open manager per run in a
process, the resume scratch folders a killed process left, the metric "best" means."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckptwise as cw
from ckptwise.integrations.common import (
    _HOST,
    open_manager,
    policy_metric,
    scratch_folder,
)


def test_opening_a_run_again_in_this_process_closes_the_earlier_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = open_manager("run", save=cw.every(1))
    other = open_manager(tmp_path / "other", save=cw.every(1))
    second = open_manager(tmp_path / "run", save=cw.every(1))  # the same folder, absolute
    assert first.closed
    assert not other.closed
    assert not second.closed
    with pytest.raises(cw.RunLockedError):  # a manager opened by anything else still waits
        cw.CheckpointManager(tmp_path / "run", save=cw.every(1))
    second.close()
    other.close()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_scratch_folders_that_no_live_process_owns_are_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    dead, alive = _dead_pid(), os.getppid()
    stale = {
        f"hf-resume-{dead}@{_HOST}-abcd1234",  # its process was killed before training
        f"hf-resume-{os.getpid()}@{_HOST}-efgh5678",  # this process's, training failed
    }
    kept = {
        f"hf-resume-{alive}@{_HOST}-ijkl9012",  # another live process (another rank)
        f"hf-resume-{dead}@another.host-mnop3456",  # a pid of another machine
        f"lightning-resume-{dead}@{_HOST}-qrst7890",  # another kind
        "hf-resume-notes",  # not ours
    }
    for name in stale | kept:
        (run / name).mkdir(parents=True)
        (run / name / "weights.bin").write_bytes(b"x")
    folder = scratch_folder(str(run), "hf-resume")
    assert folder.parent == run
    assert folder.name.startswith(f"hf-resume-{os.getpid()}@{_HOST}-")
    assert set(os.listdir(run)) == kept | {folder.name}


def test_the_metric_best_means_comes_from_keep_best_then_on_improvement() -> None:
    improve = cw.every(5) | cw.on_improvement("val_acc", "max")
    assert policy_metric(improve, cw.keep_last(2)) == ("val_acc", "max")
    assert policy_metric(improve, cw.keep_last(2) | cw.keep_best(1, "val_loss")) == (
        "val_loss",
        "min",
    )
    assert policy_metric(cw.every(5), cw.keep_last(2)) is None
    assert policy_metric(None, None) is None
