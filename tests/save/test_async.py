"""Asynchronous saves: immune to later mutation, one in flight, errors never lost."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptwise as cw
from ckptwise.save.pipeline import AsyncPath
from ckptwise.store import CheckpointStore
from tiny_state import make_state, train_step
from torchrun_job import run_job


def test_saved_values_are_those_at_the_step_even_if_training_mutates_them(run_dir: Path) -> None:
    w = torch.zeros(1 << 16)
    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False) as manager:
        manager.step(1, {"w": w})
        w.add_(1)  # right after step() returned, while the write may be in flight
        manager.step(2, {"w": w})
        w.mul_(5)
    loaded1 = cw.open_run(run_dir).load(1)["w"]
    loaded2 = cw.open_run(run_dir).load(2)["w"]
    assert torch.equal(loaded1, torch.zeros(1 << 16))
    assert torch.equal(loaded2, torch.ones(1 << 16))


def test_async_training_resumes_exactly_like_sync(tmp_path: Path) -> None:
    def run(root: Path, async_save: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        state = make_state(32, freeze=True)
        with cw.CheckpointManager(root, save=cw.every(2), async_save=async_save) as manager:
            for step in range(1, 7):
                train_step(state, 32)
                manager.step(step, state)
        saved: dict[str, torch.Tensor] = cw.open_run(root).load(6)["model"]
        return saved

    sync, asynchronous = run(tmp_path / "sync", False), run(tmp_path / "async", True)
    assert sync.keys() == asynchronous.keys()
    for name in sync:
        assert torch.equal(sync[name], asynchronous[name])


def test_every_save_copies_the_whole_state_into_the_last_save_s_buffers(run_dir: Path) -> None:
    """The sound default copies a frozen backbone again at every save (nothing is trusted
    unchanged), into the buffers the previous save used: no memory beyond one copy."""
    state = make_state(128, freeze=True)
    frozen = sum(p.nbytes for p in state["model"].backbone.parameters())
    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False) as manager:
        path = manager._pipeline.path
        assert isinstance(path, AsyncPath)
        train_step(state, 128)
        manager.step(1, state)
        first, deferred = manager.last_copy
        buffers = {k: id(v) for k, v in path.copier._buffers.items()}
        train_step(state, 128)
        manager.step(2, state)
        second, _ = manager.last_copy
        assert {k: id(v) for k, v in path.copier._buffers.items()} == buffers
    assert deferred == 0
    assert first == second
    changed = sum(p.nbytes for p in state["model"].head.parameters()) * 3  # weights + 2 moments
    assert second >= frozen + changed  # the frozen backbone too, every time


class SlowStore:
    """Makes every commit take a while, to have a save in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        real = CheckpointStore.commit
        self.started = threading.Event()

        def slow(store: CheckpointStore, *args: Any, **kwargs: Any) -> Any:
            self.started.set()
            time.sleep(seconds)
            return real(store, *args, **kwargs)

        monkeypatch.setattr(CheckpointStore, "commit", slow)


class HeldStore:
    """Holds every commit back until :attr:`release` is set: a save stays in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = CheckpointStore.commit
        self.release = threading.Event()

        def held(store: CheckpointStore, *args: Any, **kwargs: Any) -> Any:
            self.release.wait(timeout=30)  # a synchronous step() would be stuck here
            return real(store, *args, **kwargs)

        monkeypatch.setattr(CheckpointStore, "commit", held)


def test_a_request_file_stays_until_the_save_answering_it_commits_not_the_one_before(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = CheckpointStore.commit
    release = threading.Event()

    def commit(store: CheckpointStore, step: int, *args: Any, **kwargs: Any) -> Any:
        if step == 2:
            release.wait(timeout=30)  # in flight when the request arrives
        if step == 3:
            raise cw.StorageError("No space left on device")
        return real(store, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "commit", commit)
    save = cw.every(2) | cw.on_file("SAVE_NOW")
    with cw.CheckpointManager(run_dir, save=save, rng=False) as manager:
        manager.step(1, {"w": torch.ones(4)})
        manager.step(2, {"w": torch.ones(4)})
        (run_dir / "SAVE_NOW").touch()
        threading.Timer(0.3, release.set).start()
        assert manager.step(3, {"w": torch.ones(4)}).save  # waits for step 2's commit
        assert (run_dir / "SAVE_NOW").exists()  # step 2's commit did not answer it
        with pytest.raises(cw.StorageError, match="No space"):
            manager.wait()
        assert (run_dir / "SAVE_NOW").exists()  # the save answering it failed: still asked
    assert cw.open_run(run_dir).steps() == [2]


def test_one_process_saves_in_the_background_by_default(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldStore(monkeypatch)
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:  # no async_save
        t0 = time.perf_counter()
        manager.step(1, {"w": torch.ones(4)})
        assert time.perf_counter() - t0 < 20  # returned before its commit
        assert manager.run.checkpoints() == []
        held.release.set()
        manager.wait()
        assert [c.step for c in manager.run.checkpoints()] == [1]
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False, async_save=False) as manager:
        manager.step(2, {"w": torch.ones(4)})
        assert [c.step for c in manager.run.checkpoints()] == [1, 2]  # committed when it returned


def test_a_request_answered_by_the_save_in_flight_asks_for_no_other(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldStore(monkeypatch)
    save = cw.every(1000) | cw.on_file("SAVE_NOW")
    with cw.CheckpointManager(run_dir, save=save, rng=False) as manager:
        (run_dir / "SAVE_NOW").touch()
        assert manager.step(1, {"w": torch.ones(4)}).save
        assert not manager.step(2, {"w": torch.ones(4)}).save
        assert (run_dir / "SAVE_NOW").exists()  # removed once the save is durable
        held.release.set()
        manager.wait()
        assert not (run_dir / "SAVE_NOW").exists()
        assert not manager.step(3, {"w": torch.ones(4)}).save
    assert cw.open_run(run_dir).steps() == [1]


SEVERAL_RANKS = """
import json, sys, time, torch, torch.distributed as dist, ckptwise as cw
from ckptwise.store import CheckpointStore
dist.init_process_group("gloo")
run, out = sys.argv[1], sys.argv[2]
rank = dist.get_rank()
try:
    cw.CheckpointManager(run, save=cw.every(1), on_busy="skip")
    refused = ""
except cw.ConfigError as exc:
    refused = str(exc)
real_write = CheckpointStore.write_objects
def slow_write(store, new, **options):
    time.sleep(1.0)
    return real_write(store, new, **options)
CheckpointStore.write_objects = slow_write
record = {"refused": refused}
for name, options in (("default", {}), ("sync", {"async_save": False})):
    manager = cw.CheckpointManager(f"{run}-{name}", save=cw.every(1), rng=False, **options)
    started = time.perf_counter()
    manager.step(1, {"w": torch.full((4,), float(rank))})
    record[name] = {"seconds": time.perf_counter() - started}
    record[name]["committed"] = cw.open_run(f"{run}-{name}").steps()  # as step() returned
    manager.close()
    record[name]["closed"] = cw.open_run(f"{run}-{name}").steps()
with open(f"{out}.{rank}", "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""


@pytest.mark.integration
def test_several_processes_save_in_the_background_by_default(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SEVERAL_RANKS)
    out = tmp_path / "out"
    run_job(script, str(tmp_path / "run"), str(out))
    for rank in (0, 1):
        record = json.loads(Path(f"{out}.{rank}").read_text())
        # every rank's step() returned before its (slowed) write; close() waited for it
        assert record["default"]["seconds"] < 0.9, record
        assert record["default"]["committed"] == []
        assert record["default"]["closed"] == [1]
        assert record["sync"]["seconds"] >= 1.0
        assert record["sync"]["committed"] == [1]  # async_save=False: after the commit
        assert "on_busy='skip' needs one process" in record["refused"]


def test_skip_while_busy_records_the_skipped_steps(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowStore(monkeypatch, 0.5)
    with cw.CheckpointManager(
        run_dir, save=cw.every(1), async_save=True, on_busy="skip", rng=False
    ) as manager:
        t0 = time.perf_counter()
        for step in (1, 2, 3):
            manager.step(step, {"x": torch.full((4,), float(step))})
        assert time.perf_counter() - t0 < 0.4  # nothing waited
        assert manager.skipped == [2, 3]
        manager.wait()
        assert [c.step for c in manager.run.checkpoints()] == [1]


def test_wait_while_busy_saves_every_step(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    SlowStore(monkeypatch, 0.2)
    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False) as manager:
        for step in (1, 2, 3):
            manager.step(step, {"x": torch.full((4,), float(step))})
        assert manager.skipped == []
    assert [c.step for c in cw.open_run(run_dir).checkpoints()] == [1, 2, 3]


def test_close_waits_for_the_write_in_flight(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowStore(monkeypatch, 0.4)
    manager = cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False)
    manager.step(1, {"x": torch.ones(3)})
    assert slow.started.wait(5)
    assert cw.open_run(run_dir).checkpoints() == []
    manager.close()
    assert [c.step for c in cw.open_run(run_dir).checkpoints()] == [1]


def test_a_background_failure_surfaces_on_the_next_call(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire (injected)")

    manager = cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, rng=False)
    monkeypatch.setattr(CheckpointStore, "commit", broken)
    manager.step(1, {"x": torch.ones(3)})  # returns at once; the failure happens behind it
    with pytest.raises(cw.CheckpointError, match="background save of step 1 failed") as err:
        manager.wait()
    assert isinstance(err.value.__cause__, OSError)
    manager.step(2, {"x": torch.ones(3)})
    time.sleep(0.2)
    with pytest.raises(cw.CheckpointError, match="step 2"):
        manager.step(3, {"x": torch.ones(3)})
    monkeypatch.undo()
    manager.close()


def test_exit_without_close_still_finishes_the_write(run_dir: Path) -> None:
    script = (
        "import sys, time, torch, ckptwise as cw\n"
        "from ckptwise.store import CheckpointStore\n"
        "real = CheckpointStore.commit\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.5)\n"
        "    return real(*a, **k)\n"
        "CheckpointStore.commit = slow\n"
        "m = cw.CheckpointManager(sys.argv[1], save=cw.every(1), async_save=True)\n"
        "m.step(1, {'w': torch.ones(1000)})\n"
        "print('returned', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert [c.step for c in cw.open_run(run_dir).checkpoints()] == [1]
    assert cw.open_run(run_dir).verify() == []


def test_bad_on_busy_fails_before_taking_the_lock(run_dir: Path) -> None:
    with pytest.raises(cw.ConfigError, match="on_busy must be 'wait' or 'skip', got 'drop'"):
        cw.CheckpointManager(run_dir, save=cw.every(1), async_save=True, on_busy="drop")  # type: ignore[arg-type]
    cw.CheckpointManager(run_dir, save=cw.every(1)).close()  # the run is not left locked


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_raises_a_storage_error_on_both_paths(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    from ckptwise.store import LocalBackend

    with cw.CheckpointManager(run_dir, save=cw.every(1), async_save=async_save) as manager:
        monkeypatch.setattr(LocalBackend, "free_bytes", lambda self: 1024)

        def save() -> None:
            manager.step(1, {"w": torch.ones(1000)})
            manager.wait()

        with pytest.raises(cw.StorageError, match="not enough free space") as err:
            save()
        monkeypatch.undo()
        if async_save:
            assert "background save of step 1" in str(err.value)
            assert isinstance(err.value.__cause__, cw.StorageError)


def test_deleting_a_branch_waits_for_the_save_in_flight(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collecting the branch's objects beside a save would take the objects it has written
    and not yet named in a manifest (as a prune would; both wait for it)."""
    from ckptwise.store.commit import Committer

    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in (10, 20):
            manager.save(step, {"w": torch.full((64,), float(step))})
        manager.save(11, {"w": torch.full((64,), 11.0)})  # went back: 20 becomes a branch
        manager.wait()
        [name] = manager.run.branches()
        publish, publishing = Committer.publish, threading.Event()

        def late(self: Committer, manifest: Any) -> Any:
            publishing.set()  # the new object is written, its manifest not yet
            time.sleep(0.5)
            return publish(self, manifest)

        monkeypatch.setattr(Committer, "publish", late)
        manager.save(12, {"w": torch.full((64,), 12.0)})
        assert publishing.wait(5)
        manager.delete_branch(name)
        manager.wait()
    run = cw.open_run(run_dir)
    assert run.steps() == [10, 11, 12]
    assert run.verify() == []
    assert torch.equal(run.load(12)["w"], torch.full((64,), 12.0))


def test_the_managers_run_waits_for_the_step_in_flight_when_asked_for_it(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowStore(monkeypatch, 0.3)
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        manager.step(1, {"model": {"w": torch.ones(4)}})
        assert slow.started.wait(5)
        assert manager.run.checkpoints() == []  # listings show what has committed
        path = manager.run.export(1, tmp_path / "out")  # naming the step waits for it
        assert path.is_file()
        assert [c.step for c in manager.run.checkpoints()] == [1]
        manager.step(2, {"model": {"w": torch.full((4,), 2.0)}})
        found = manager.resume_values()  # resumes from the newest, as restore() does
        assert found is not None
        assert found[0] == 2


ENDING = """
import json, sys, time, torch, torch.distributed as dist, ckptwise as cw
from ckptwise.save import pipeline
from ckptwise.store import CheckpointStore
dist.init_process_group("gloo")
run, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rank = dist.get_rank()
real_write = CheckpointStore.write_objects
def slow_write(store, new, **options):
    time.sleep(0.5)
    return real_write(store, new, **options)
CheckpointStore.write_objects = slow_write
if mode == "memory" and rank == 1:  # this rank's copy would not fit: it saves synchronously
    pipeline.available_memory = lambda: 1024
manager = cw.CheckpointManager(run, save=cw.every(1), rng=False)
seconds = []
for step in (1, 2):
    started = time.perf_counter()
    manager.step(step, {"w": torch.full((1000,), float(10 * step + rank))})
    seconds.append(time.perf_counter() - started)
with open(f"{out}.{rank}", "w") as f:
    json.dump({"seconds": seconds, "committed": cw.open_run(run).steps()}, f)
if mode == "exit":
    sys.exit(0)  # no close(), no wait(): the interpreter's exit finishes the save in flight
manager.close()
dist.destroy_process_group()
"""


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["exit", "memory"])
def test_several_processes_end_their_saves_in_flight_and_mix_sync_and_async(
    tmp_path: Path, mode: str
) -> None:
    """``exit``: every rank leaves with step 2's save in flight and no ``close()``; the
    save still commits whole. ``memory``: rank 1's copy does not fit, so it writes its share
    on its training thread while rank 0 writes in the background: one checkpoint all the
    same."""
    script = tmp_path / "ranks.py"
    script.write_text(ENDING)
    out = tmp_path / "out"
    run_job(script, str(tmp_path / "run"), str(out), mode)
    records = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    run = cw.open_run(tmp_path / "run")
    assert run.steps() == [1, 2]
    assert run.verify() == []
    for rank in (0, 1):
        loaded = run.read(2, rank=rank)
        assert loaded is not None
        assert torch.equal(loaded.values()["w"], torch.full((1000,), 20.0 + rank))
    # (a step()'s save waits for the one before it: the first step() tells)
    if mode == "exit":
        assert all(r["seconds"][0] < 0.45 for r in records), records
        assert records[0]["committed"] != [1, 2]  # step 2 was in flight at the exit
    else:
        assert records[0]["seconds"][0] < 0.45, records  # in the background
        assert records[1]["seconds"][0] >= 0.5, records  # waited for its own write
