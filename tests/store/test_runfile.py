"""Pins as files of their own, the writer's retention handshake, and an advisory run.json
that never stops training."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.store import CheckpointStore, LocalBackend, runfile


def _save(manager: cw.CheckpointManager, step: int) -> None:
    """Save ``step`` and wait for its commit and prune (in the background by default)."""
    manager.step(step, {"w": torch.full((4,), float(step))})
    manager.wait()


def _commit(store: CheckpointStore, *steps: int) -> None:
    for step in steps:
        store.commit(step, {"w": torch.full((4,), float(step))})


# -- pins ----------------------------------------------------------------------------------


def test_a_pin_is_its_own_file_and_the_writers_record_never_drops_it(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        _save(manager, 1)
        cw.open_run(run_dir).pin(1)
        for step in (2, 3):
            _save(manager, step)
        assert manager.run.steps() == [1, 3]
        assert manager.last_plan is not None
        assert manager.last_plan.keep[1] == ("pinned",)
    assert (run_dir / "pins" / "000000000001").is_file()
    record = json.loads((run_dir / "run.json").read_text())
    assert "pins" not in record
    assert record["kept"]["1"] == ["pinned"]
    assert cw.open_run(run_dir).pins() == {1}
    cw.open_run(run_dir).pin(1)  # pinning twice is fine
    cw.open_run(run_dir).unpin(1)
    assert cw.open_run(run_dir).pins() == set()
    assert not (run_dir / "pins" / "000000000001").exists()


def test_pinning_a_missing_step_fails_and_leaves_no_pin(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        _save(manager, 1)
        _save(manager, 2)
    with pytest.raises(cw.CheckpointNotFoundError, match="no committed checkpoint at step 1"):
        cw.open_run(run_dir).pin(1)
    assert cw.open_run(run_dir).pins() == set()


def test_a_pin_made_after_the_writer_planned_keeps_the_step(run_dir: Path) -> None:
    store = CheckpointStore(LocalBackend(run_dir))
    _commit(store, 1, 2)
    cw.open_run(run_dir).pin(1)  # the plan (delete 1) was made without this pin
    assert runfile.delete_unpinned(store.backend, [1], store.delete) == {1}
    assert store.steps() == [1, 2]
    assert not (run_dir / "pruning").exists() or not any((run_dir / "pruning").iterdir())


def test_a_pin_racing_the_deletion_fails_and_takes_itself_back(run_dir: Path) -> None:
    store = CheckpointStore(LocalBackend(run_dir))
    _commit(store, 1, 2)
    failures: list[str] = []

    def delete(steps: list[int]) -> None:
        # the writer has written its tombstone and not seen a pin: a pin now must fail
        with pytest.raises(cw.CheckpointNotFoundError) as err:
            cw.open_run(run_dir).pin(1)
        failures.append(str(err.value))
        store.delete(steps)

    assert runfile.delete_unpinned(store.backend, [1], delete) == set()
    assert failures == [
        f"step 1 of {store.backend.url} is being deleted by the writer's retention, so it "
        "cannot be pinned any more; pin a newer step"
    ]
    assert store.steps() == [2]
    assert cw.open_run(run_dir).pins() == set()
    assert list((run_dir / "pruning").iterdir()) == []


def test_a_crashed_writers_tombstone_blocks_pins_until_the_next_writer(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(2)) as manager:
        _save(manager, 1)
        _save(manager, 2)
    (run_dir / "pruning").mkdir()
    (run_dir / "pruning" / "000000000001").write_text("{}")
    with pytest.raises(cw.CheckpointNotFoundError, match="being deleted"):
        cw.open_run(run_dir).pin(1)
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(2)) as manager:
        manager.prune()
    assert list((run_dir / "pruning").iterdir()) == []
    cw.open_run(run_dir).pin(1)
    assert cw.open_run(run_dir).pins() == {1}


def test_legacy_pins_in_run_json_are_kept_then_moved_into_pin_files(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_all()) as manager:
        for step in (1, 2, 3):
            _save(manager, step)
    legacy = {"format": "ckptwise.run", "version": 1, "pins": [1, 2], "note": "mine"}
    (run_dir / "run.json").write_text(json.dumps(legacy))
    assert cw.open_run(run_dir).pins() == {1, 2}
    cw.open_run(run_dir).unpin(2)  # no writer running: the record itself is edited
    assert json.loads((run_dir / "run.json").read_text())["pins"] == [1]
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        _save(manager, 4)
        assert manager.run.steps() == [1, 4]
    record = json.loads((run_dir / "run.json").read_text())
    assert "pins" not in record
    assert record["note"] == "mine"
    assert (run_dir / "pins" / "000000000001").is_file()
    cw.open_run(run_dir).unpin(1)
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        _save(manager, 5)
        assert manager.run.steps() == [5]


def test_junk_in_the_pins_folder_is_not_a_pin(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        _save(manager, 1)
        (run_dir / "pins" / "sub").mkdir(parents=True)
        (run_dir / "pins" / "sub" / "000000000001").write_text("")
        (run_dir / "pins" / "notes.txt").write_text("")
        (run_dir / "pins" / "000000000001.tmp-abc").write_text("")
        assert manager.run.pins() == set()
        _save(manager, 2)
        assert manager.run.steps() == [2]


def test_a_retention_marker_that_cannot_be_written_deletes_nothing(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        _save(manager, 1)
        (run_dir / "pruning").write_text("in the way")
        with pytest.raises(cw.StorageError, match="pruning"):
            _save(manager, 2)
        assert cw.open_run(run_dir).steps() == [1, 2]
        (run_dir / "pruning").unlink()
        _save(manager, 3)
        assert manager.run.steps() == [3]


# -- run.json is advisory ------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_RECORDS: dict[str, bytes] = {
    "bad json": b'{"kept": {"1": ["newest"]',
    "not utf-8": b"\xff\xfe\x00{}",
    "not an object": b"[1, 2, 3]",
    "wrong types": json.dumps({"pins": "all", "kept": {"x": 3}}).encode(),
    "pins of other types": json.dumps({"pins": [1.5, "2", True, -3]}).encode(),
    "nested 100k deep": DEEP,
}


def _record_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "run record" in r.getMessage()]


@pytest.mark.parametrize("content", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_malformed_run_json_is_reported_once_ignored_and_repaired(
    run_dir: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir.mkdir()
    (run_dir / "run.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        assert cw.open_run(run_dir).kept() == {}
        with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
            for step in range(1, 5):
                _save(manager, step)
                assert manager.run.steps() == [step]  # retention ran at every step
    assert len(_record_warnings(caplog)) == 1, _record_warnings(caplog)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["kept"] == {"4": ["last 1", "newest"]}
    assert cw.open_run(run_dir).kept() == {4: ["last 1", "newest"]}


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_run_json_that_cannot_be_read_or_written_never_stops_training(
    run_dir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir.mkdir()
    if kind == "folder":
        (run_dir / "run.json").mkdir()
    else:
        os.mkfifo(run_dir / "run.json")  # reading it would block forever
    with (
        caplog.at_level(logging.WARNING, logger="ckptwise"),
        cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager,
    ):
        for step in range(1, 5):
            _save(manager, step)
            assert manager.run.steps() == [step]
        manager.pin(4)
        assert manager.run.pins() == {4}
    warnings = _record_warnings(caplog)  # one for reading, one for writing
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("ignoring the unreadable run record")
    assert warnings[1].startswith("could not write the run record")


UNREADABLE = """
import logging, os, sys, numpy.random, torch, ckptwise as cw, ckptwise.manager, ckptwise.read.run
if os.geteuid() == 0:  # root reads anything: act as an ordinary user, imports done
    os.setgid(65534)
    os.setuid(65534)
logging.basicConfig(level=logging.WARNING)
with cw.CheckpointManager(sys.argv[1], save=cw.every(1), keep=cw.keep_last(1)) as manager:
    for step in range(1, 5):
        manager.step(step, {"w": torch.full((4,), float(step))})
        manager.wait()
        assert manager.run.steps() == [step]
print("kept", cw.open_run(sys.argv[1]).kept())
"""


@pytest.mark.integration
def test_an_unreadable_run_json_is_reported_once_and_replaced() -> None:
    base = Path(tempfile.mkdtemp())  # not under pytest's folder, which only its owner enters
    try:
        base.chmod(0o755)
        run = base / "run"
        run.mkdir()
        (run / "run.json").write_text("{}")
        (run / "run.json").chmod(0)
        if os.geteuid() == 0:
            os.chown(run, 65534, 65534)
        out = subprocess.run(
            [sys.executable, "-c", UNREADABLE, str(run)], capture_output=True, text=True
        )
    finally:
        shutil.rmtree(base)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("run record") == 1, out.stderr
    assert "Permission denied" in out.stderr
    assert "kept {4: ['last 1', 'newest']}" in out.stdout


def test_a_huge_planted_run_record_is_not_read_and_never_stops_training(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_bytes(b" " * (runfile.MAX_RECORD_BYTES + 1))
    with cw.CheckpointManager(tmp_path, save=cw.every(1), keep=cw.keep_last(1)) as m:
        for step in (1, 2, 3):
            m.step(step, {"w": torch.full((4,), float(step))})
        m.wait()
        assert m.run.steps() == [3]
    assert json.loads((tmp_path / "run.json").read_text())["kept"] == {"3": ["last 1", "newest"]}
