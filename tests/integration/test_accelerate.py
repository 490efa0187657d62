"""An ``Accelerator`` loop (prepared model, optimizer, scheduler, data loader) resumes exactly."""

from __future__ import annotations

import json
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


def test_state_unwraps_the_model_and_keeps_other_objects() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    sampler = object()
    state = accelerate_state(accelerator, model=model, data=sampler)
    assert state["model"] is accelerator.unwrap_model(model)
    assert state["data"] is sampler
    assert "scaler" not in state  # no fp16 on this accelerator
