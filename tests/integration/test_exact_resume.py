"""Exact resume across real processes: 40 steps straight equal 20 steps, stop, restore, 20."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("tiny_train.py")

pytestmark = pytest.mark.integration


def train(run: Path, out: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--out", str(out), *args],
        check=True,
        timeout=300,
    )


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight.json", tmp_path / "split.json"
    train(tmp_path / "run-a", straight, "--steps", "40")
    train(tmp_path / "run-b", split, "--steps", "40", "--stop-after", "20")
    train(tmp_path / "run-b", split, "--steps", "40")

    a, b = json.loads(straight.read_text()), json.loads(split.read_text())
    assert b["restored"] == [0, 20]
    assert list(a["losses"]) == [str(s) for s in range(1, 41)]
    assert a["losses"] == b["losses"]
    assert a["weights"] == b["weights"]


def test_resume_without_rng_state_diverges(tmp_path: Path) -> None:
    """The check above is not vacuous: dropout draws from the RNG that ckptwise restores."""
    straight, split = tmp_path / "straight.json", tmp_path / "split.json"
    train(tmp_path / "run-a", straight, "--steps", "12", "--no-rng")
    train(tmp_path / "run-b", split, "--steps", "12", "--stop-after", "6", "--no-rng")
    train(tmp_path / "run-b", split, "--steps", "12", "--no-rng")
    a, b = json.loads(straight.read_text())["losses"], json.loads(split.read_text())["losses"]
    assert [a[str(s)] for s in range(1, 7)] == [b[str(s)] for s in range(1, 7)]
    assert a["7"] != b["7"]
