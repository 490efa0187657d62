"""Manager features behind the newer triggers: signals, request files, the clock, disk space."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import FrameType

import pytest
import torch

import ckptwise as cw
from ckptwise.save.pipeline import SavePipeline
from ckptwise.store import LocalBackend
from ckptwise.testing import FakeClock


@pytest.fixture
def restore_sigusr1() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def steps_of(manager: cw.CheckpointManager) -> list[int]:
    return [c.step for c in manager.run.checkpoints()]


@pytest.mark.usefixtures("restore_sigusr1")
def test_signal_requests_a_save_and_chains_the_previous_handler(run_dir: Path) -> None:
    seen: list[int] = []

    def earlier(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGUSR1, earlier)
    save = cw.every(100) | cw.on_signal("SIGUSR1", then="continue")
    with cw.CheckpointManager(run_dir, save=save) as manager:
        assert not manager.step(1, {"x": 1}).save
        os.kill(os.getpid(), signal.SIGUSR1)
        decision = manager.step(2, {"x": 2})
        assert decision.reasons == ("on_signal(SIGUSR1)",)
        assert not manager.step(3, {"x": 3}).save  # the request was consumed
        assert seen == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is earlier  # put back by close()


@pytest.mark.usefixtures("restore_sigusr1")
def test_signal_with_then_exit_raises_system_exit_zero_after_the_commit(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = cw.CheckpointManager(run_dir, save=cw.on_signal("SIGUSR1"))
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit) as exit_info, caplog.at_level("WARNING", "ckptwise"):
        manager.step(7, {"w": torch.ones(2)})
    assert exit_info.value.code == 0
    assert steps_of(manager) == [7]
    # the log says why the process ended, at a level shown by default
    (record,) = [r for r in caplog.records if "exiting" in r.message]
    assert record.levelname == "WARNING"
    assert "saved step 7 to " in record.message
    assert "on_signal(SIGUSR1)" in record.message
    manager.close()


def test_request_file_saves_once_and_is_removed(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1000) | cw.on_file("SAVE_NOW")) as manager:
        assert not manager.step(1, {"x": 1}).save
        (run_dir / "SAVE_NOW").touch()
        assert manager.step(2, {"x": 2}).reasons == ("on_file(SAVE_NOW)",)
        assert not manager.step(3, {"x": 3}).save  # answered, even while still in flight
        manager.wait()
        assert not (run_dir / "SAVE_NOW").exists()  # removed once the save is durable
    assert [c.step for c in cw.open_run(run_dir).checkpoints()] == [2]


def test_wall_clock_triggers_use_the_injected_clock(run_dir: Path) -> None:
    clock = FakeClock()
    save = cw.every_duration(timedelta(minutes=30))
    with cw.CheckpointManager(run_dir, save=save, clock=clock) as manager:
        saved = []
        for step in range(1, 200):
            clock.advance(timedelta(minutes=1))
            if manager.step(step, {"x": step}).save:
                saved.append(step)
        assert saved == [30, 60, 90, 120, 150, 180]
    # after a restore the clock counts from the restore, not from the old save's time
    clock.advance(timedelta(days=1))
    with cw.CheckpointManager(run_dir, save=save, clock=clock) as manager:
        assert manager.restore({"x": 0}) == 180
        clock.advance(timedelta(minutes=1))
        assert not manager.step(181, {"x": 181}).save


def test_overhead_budget_measures_save_cost_with_the_clock(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    real_write = SavePipeline.write

    def slow_write(self: SavePipeline, *args: object, **kwargs: object) -> object:
        clock.advance(timedelta(seconds=10))  # every save costs 10 s of the fake clock
        return real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SavePipeline, "write", slow_write)
    save = cw.overhead_budget(0.1, first_after=timedelta(seconds=30))
    with cw.CheckpointManager(run_dir, save=save, clock=clock) as manager:
        saved = []
        for step in range(1, 400):
            clock.advance(timedelta(seconds=1))
            if manager.step(step, {"x": step}).save:
                saved.append(step)
    assert saved[0] == 30
    gaps = {b - a for a, b in itertools.pairwise(saved)}
    assert gaps == {90}  # 10 s of saving per 100 s cycle: 90 one-second steps between saves


def test_improvement_patience_survives_resume(run_dir: Path) -> None:
    save = cw.on_improvement("eval_loss", patience=3)
    losses = [0.9, 0.8, 0.7, 0.6, 0.5]
    with cw.CheckpointManager(run_dir, save=save) as manager:
        got = [
            manager.step(s, {"x": s}, metrics={"eval_loss": v}).save
            for s, v in enumerate(losses[:2], start=1)
        ]
    with cw.CheckpointManager(run_dir, save=save) as manager:
        manager.restore({"x": 0})
        got += [
            manager.step(s, {"x": s}, metrics={"eval_loss": v}).save
            for s, v in enumerate(losses[1:], start=2)
        ]
    # step 1 saves; the next improvement may save only at the 3rd report after it (step 4),
    # and the second process (resumed from step 1) counts exactly as the first one did
    assert got == [True, False, False, False, True, False]


def test_not_enough_disk_space_fails_the_save_and_keeps_the_rest(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        manager.step(1, {"w": torch.zeros(1000)})
        manager.wait()
        monkeypatch.setattr(LocalBackend, "free_bytes", lambda self: 1024)
        manager.step(2, {"w": torch.ones(1000)})  # fails in the background
        with pytest.raises(cw.StorageError, match=r"not enough free space.*keep fewer"):
            manager.wait()
        monkeypatch.undo()
        assert steps_of(manager) == [1]
        assert manager.run.verify() == []
        manager.step(2, {"w": torch.zeros(1000)})  # nothing new to write: no space needed
        manager.wait()
        assert steps_of(manager) == [1, 2]


def test_keep_budget_counts_deduplicated_bytes(run_dir: Path) -> None:
    frozen = torch.randn(64, 1024)  # 256 KiB, shared by every checkpoint
    budget = frozen.nbytes + 3 * 4096 + 100
    with cw.CheckpointManager(
        run_dir, save=cw.every(1), keep=cw.keep_budget(budget), rng=False
    ) as manager:
        for step in range(1, 8):
            manager.step(step, {"frozen": frozen, "head": torch.full((1024,), float(step))})
        manager.wait()
        assert steps_of(manager) == [5, 6, 7]


def test_manager_from_a_policy_file(run_dir: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[save]\nevery = 2\nstart = 4\n\n[keep]\nlast = 1\n")
    with cw.CheckpointManager.from_config(run_dir, policy, rng=False) as manager:
        saved = [s for s in range(1, 9) if manager.step(s, {"x": s}).save]
        assert saved == [4, 6, 8]
        manager.wait()
        assert steps_of(manager) == [8]
