"""Crash safety with real processes: os._exit between objects and manifest, and kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptwise as cw

pytestmark = pytest.mark.integration

EXIT_BEFORE_MANIFEST = """
import os, sys, torch, ckptwise as cw
from ckptwise.store.commit import Committer
m = cw.CheckpointManager(sys.argv[1], save=cw.every(1))
m.step(1, {"w": torch.zeros(1000)})
m.wait()  # step 1 is durable; step 2's background commit dies
real = Committer.write_objects
def crash(self, new, **options):
    real(self, new, **options)
    os._exit(3)  # objects are durable, the manifest is not written
Committer.write_objects = crash
m.step(2, {"w": torch.ones(1000)})
"""

SAVE_FOREVER = """
import sys, torch, ckptwise as cw
m = cw.CheckpointManager(sys.argv[1], save=cw.every(1), keep=cw.keep_last(2), rng=False)
step = 0
while True:
    step += 1
    m.step(step, {"w": torch.full((1 << 20,), float(step)), "frozen": torch.arange(1 << 18)})
"""


def test_process_dying_between_objects_and_manifest(run_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", EXIT_BEFORE_MANIFEST, str(run_dir)], timeout=120)
    assert proc.returncode == 3
    assert len(list((run_dir / "objects").rglob("*"))) > 2  # the orphaned object is there
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        assert [c.step for c in manager.run.checkpoints()] == [1]
        assert manager.run.verify() == []
        state = {"w": torch.empty(1000)}
        assert manager.restore(state) == 1
        assert torch.equal(state["w"], torch.zeros(1000))
    objects = [p for p in (run_dir / "objects").rglob("*") if p.is_file()]
    referenced = {e.object for e in cw.open_run(run_dir).manifest(1).tensors.values()}
    assert {p.name for p in objects} == referenced


@pytest.mark.parametrize("delay", [0.7, 1.3, 2.1])
def test_kill_9_at_any_moment_leaves_whole_checkpoints(run_dir: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(run_dir)])
    try:
        deadline = time.monotonic() + 60
        while len(list((run_dir / "checkpoints").glob("*.json"))) < 2:
            assert time.monotonic() < deadline, "the saving process never committed twice"
            assert proc.poll() is None
            time.sleep(0.05)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(2)) as manager:
        steps = [c.step for c in manager.run.checkpoints()]
        assert steps, "every committed checkpoint was lost"
        assert manager.run.verify() == []
        assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]
        state = {"w": torch.empty(1 << 20), "frozen": torch.empty(1 << 18, dtype=torch.int64)}
        newest = manager.restore(state)
        assert newest == max(steps)
        assert torch.equal(state["w"], torch.full((1 << 20,), float(newest)))
