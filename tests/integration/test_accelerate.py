"""An ``Accelerator`` loop (prepared model, optimizer, scheduler, data loader) resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from ckptwise.integrations.accelerate import accelerate_state

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("accelerate_train.py")


def train(run: Path, out: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_stop_and_resume_in_a_new_process_is_bit_identical(tmp_path: Path) -> None:
    train(tmp_path / "a", tmp_path / "a.json")
    train(tmp_path / "b", tmp_path / "b.json", "--stop-after", "11")  # mid-epoch (9 per epoch)
    train(tmp_path / "b", tmp_path / "b.json")
    a, b = (
        json.loads((tmp_path / "a.json").read_text()),
        json.loads((tmp_path / "b.json").read_text()),
    )
    assert b["restored"] == [0, 11]
    assert sorted(map(int, a["losses"])) == list(range(1, 25))
    assert a["losses"] == b["losses"]
    assert a["weights"] == b["weights"]


def test_two_processes_stop_and_resume_bit_identically(tmp_path: Path) -> None:
    def torchrun(run: Path, out: Path, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", str(SCRIPT), str(run), "--out", str(out), *args],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    args = ("--steps", "16", "--samples", "64")  # 4 steps an epoch on 2 processes
    torchrun(tmp_path / "a", tmp_path / "a.json", *args)
    torchrun(tmp_path / "b", tmp_path / "b.json", *args, "--stop-after", "7")  # mid-epoch
    torchrun(tmp_path / "b", tmp_path / "b.json", *args)
    for rank in (0, 1):
        a = json.loads((tmp_path / f"a{rank}.json").read_text())
        b = json.loads((tmp_path / f"b{rank}.json").read_text())
        assert b["restored"] == [0, 7]  # the stop counts as final: on_final saved it
        assert a["losses"] == b["losses"]
        assert a["weights"] == b["weights"]


def test_state_unwraps_the_model_and_keeps_other_objects() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    sampler = object()
    state = accelerate_state(accelerator, model=model, data=sampler)
    assert state["model"] is accelerator.unwrap_model(model)
    assert state["data"] is sampler
    assert "scaler" not in state  # no fp16 on this accelerator
