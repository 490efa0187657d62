"""SIGTERM mid-training: the run saves at the next step, exits 0, and resumes bit-exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_exact_resume import SCRIPT, train

import ckptwise as cw

pytestmark = pytest.mark.integration


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path: Path) -> None:
    run, split, straight = tmp_path / "run", tmp_path / "split.json", tmp_path / "straight.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            str(run),
            "--out",
            str(split),
            "--steps",
            "40",
            "--every",
            "100",
            "--on-signal",
            "--step-sleep",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "step 12":
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0

    infos = cw.open_run(run).checkpoints()
    assert len(infos) == 1
    saved = infos[0].step
    assert 12 <= saved < 40
    assert infos[0].reasons == ("on_signal(SIGTERM)",)
    assert sorted(json.loads(split.read_text())["losses"], key=int)[-1] == str(saved)

    train(run, split, "--steps", "40", "--every", "100")
    train(tmp_path / "ref", straight, "--steps", "40", "--every", "100")
    a, b = json.loads(straight.read_text()), json.loads(split.read_text())
    assert b["restored"] == [0, saved]
    assert a["losses"] == b["losses"]
    assert a["weights"] == b["weights"]
