"""scripts/kill9.py: kill -9 a real saving process across modes, and its checks can fail."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import ckptwise as cw

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kill9.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kill9", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill9"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


kill9 = _load_script()


def _rows(output: str) -> dict[str, list[str]]:
    """The table's rows by mode, each cell stripped."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 5 and cells[1].isdigit():
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow  # about 30 s: a dozen workers, each importing torch
def test_twelve_kills_across_every_mode_lose_and_corrupt_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", "12", "--seed", "11", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert set(rows) == {*kill9.MODES, "total"}
    assert rows["total"][1] == "12"
    assert all(int(rows[m][1]) >= 1 for m in kill9.MODES)
    assert int(rows["total"][5]) > 0  # checkpoints were there to check
    assert "OK: 0 failure(s)" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # passing run folders are removed


def _committed_run(root: Path, steps: range) -> None:
    """What a worker leaves when it is not killed: ``steps`` saved with keep_last(2)."""
    mode = kill9.MODES["deltas"]
    with mode.manager(root, cw.keep_last(2)) as manager:
        state = kill9.expected(0)
        for step in steps:
            kill9.advance(state, step)
            manager.step(step, state)


def test_checks_pass_on_a_whole_run(tmp_path: Path) -> None:
    _committed_run(tmp_path, range(1, 5))
    found = kill9.check_run(tmp_path, {1, 2, 3, 4})
    assert list(found.failures()) == []
    assert found.steps == [3, 4]
    assert "xor-bytegroup" in found.codecs  # the deltas mode stores deltas
    assert kill9.check_writer(tmp_path, kill9.MODES["deltas"], found) == 5
    assert list(found.failures()) == []


def test_a_flipped_byte_is_corrupt(tmp_path: Path) -> None:
    _committed_run(tmp_path, range(1, 4))
    oid = cw.open_run(tmp_path).manifest(3).tensors["counter"].object
    path = tmp_path / "objects" / oid[:2] / oid
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert kill9.check_run(tmp_path, {3}).corrupt


def test_a_deleted_newest_checkpoint_is_lost(tmp_path: Path) -> None:
    _committed_run(tmp_path, range(1, 4))
    (tmp_path / "checkpoints" / f"{3:012d}.json").unlink()
    found = kill9.check_run(tmp_path, {2, 3})
    assert [m.split(" was")[0] for m in found.lost] == ["step 3"]


def test_other_values_under_a_step_are_wrong(tmp_path: Path) -> None:
    with cw.CheckpointManager(tmp_path, save=cw.every(1)) as manager:
        manager.save(2, kill9.expected(1))
    found = kill9.check_run(tmp_path, {2})
    assert found.wrong
    assert not found.corrupt  # the bytes are whole: only the values are off
