"""Ranks that disagree fail fast, on every rank, and the job can go on (real ``torchrun``, gloo).

One rank's refused ``step()`` (a bad step or bad metrics) fails that step on every rank
through the collective the others are in, and the next save works; managers created with
different arguments (a per-rank run folder, other policies) are refused on every rank at
creation; a ``restore()`` called on one rank only says so within seconds. Every job runs
with ``dist_timeout`` of 10 s, and each failure must come well within it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import ckptwise as cw
from torchrun_job import run_job

pytestmark = pytest.mark.integration

SCRIPT = """
import json, sys, time, torch, torch.distributed as dist, ckptwise as cw
from datetime import timedelta

dist.init_process_group("gloo")
run, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rank = dist.get_rank()
record = {"file": cw.__file__, "errors": [], "saves": []}
common = dict(rng=False, async_save=False, dist_timeout=timedelta(seconds=10))
state = {"w": torch.full((4,), float(rank))}


def attempt(step, call):
    started = time.monotonic()
    try:
        return call()
    except Exception as exc:
        seconds = time.monotonic() - started
        record["errors"].append([step, type(exc).__name__, str(exc), seconds])


if mode in ("collective", "alone"):
    save = cw.every(2) | cw.on_signal() if mode == "collective" else cw.every(2)
    manager = cw.CheckpointManager(run, save=save, **common)
    for step in range(1, 7):
        given, metrics = step, {"loss": 1.0}
        if rank == 1 and step == 3:
            given = -1 if mode == "collective" else step
            metrics = metrics if mode == "collective" else {"loss": "bad"}
        if rank == 1 and step == 4:
            metrics = {"loss": "bad"}
        decision = attempt(step, lambda: manager.step(given, state, metrics=metrics))
        if decision is not None and decision.save:
            record["saves"].append(step)
    manager.close()
elif mode in ("root", "save"):
    root = f"{run}-{rank}" if mode == "root" else run
    save = cw.every(2 + rank) if mode == "save" else cw.every(2)
    attempt(0, lambda: cw.CheckpointManager(root, save=save, **common))
    manager = cw.CheckpointManager(run, save=cw.every(1), **common)  # the same: it works
    manager.step(1, state)
    record["saves"].append(1)
    manager.close()
elif mode == "restore":
    manager = cw.CheckpointManager(run, save=cw.every(1), **common)
    if rank == 0:  # restores alone: the others have begun training
        attempt(0, lambda: manager.restore(state))
    manager.step(1, state)  # the others wait here for rank 0, who comes after its error
    record["saves"].append(1)
    manager.close()
    again = cw.CheckpointManager(run, save=cw.every(1), **common)
    record["restored"] = again.restore(state)  # every rank: fine
    again.close()
with open(f"{out}.{rank}", "w") as f:
    json.dump(record, f)
"""


def job(tmp_path: Path, mode: str) -> list[dict[str, Any]]:
    """Run the script in ``mode`` on two ranks; each rank's record."""
    script = tmp_path / "disagree.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    run_job(script, str(tmp_path / "run"), str(out), mode)
    records = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert all(r["file"].startswith(str(Path(cw.__file__).parent)) for r in records)
    return records


def test_a_refused_step_on_one_rank_fails_it_on_every_rank_at_once_and_saving_goes_on(
    tmp_path: Path,
) -> None:
    records = job(tmp_path, "collective")  # rank 0 decides: one collective a step
    for record in records:
        steps = [(step, kind) for step, kind, _, _ in record["errors"]]
        assert steps == [(3, "ConfigError"), (4, "ConfigError")], record["errors"]
        for _, _, message, seconds in record["errors"]:
            assert "failed on rank 1" in message
            assert seconds < 5  # told within the step's collective, not after dist_timeout
        assert "step must be an integer >= 0, got -1" in record["errors"][0][2]
        assert "loss" in record["errors"][1][2]
        assert record["saves"] == [2, 6]  # the group still works
    assert records[0]["errors"][0][2] == records[1]["errors"][0][2]  # the same error
    assert cw.open_run(tmp_path / "run").steps() == [2, 6]


def test_a_refused_step_where_each_rank_decides_alone_fails_a_save_on_every_rank(
    tmp_path: Path,
) -> None:
    records = job(tmp_path, "alone")  # every(2): no message on steps that do not save
    zero, one = ([(s, k) for s, k, _, _ in r["errors"]] for r in records)
    assert one == [(3, "ConfigError"), (4, "ConfigError")]  # bad metrics at 3 and 4
    assert zero == [(4, "ConfigError")]  # step 3 saves nothing: nobody waits for rank 1
    for record in records:
        assert all(seconds < 5 for _, _, _, seconds in record["errors"])
        assert "failed on rank 1" in record["errors"][-1][2]
        assert record["saves"] == [2, 6]
    assert cw.open_run(tmp_path / "run").steps() == [2, 6]


@pytest.mark.parametrize(("mode", "what"), [("root", "root differs"), ("save", "save differs")])
def test_managers_created_with_different_arguments_are_refused_on_every_rank(
    tmp_path: Path, mode: str, what: str
) -> None:
    records = job(tmp_path, mode)
    for record in records:
        ((_, kind, message, seconds),) = record["errors"]
        assert kind == "ConfigError"
        assert what in message, message
        assert "rank 0" in message
        assert "rank 1" in message
        assert "same arguments on every rank" in message
        assert "broadcast" in message
        assert seconds < 5
        assert record["saves"] == [1]
    if mode == "root":  # nothing was committed in the per-rank folders
        for rank in (0, 1):
            folder = Path(f"{tmp_path / 'run'}-{rank}")
            assert not folder.exists() or cw.open_run(folder).steps() == []
    assert cw.open_run(tmp_path / "run").steps() == [1]


def test_a_restore_on_one_rank_only_says_so_within_seconds_and_the_group_still_works(
    tmp_path: Path,
) -> None:
    zero, one = job(tmp_path, "restore")
    ((_, kind, message, seconds),) = zero["errors"]
    assert kind == "CheckpointError"
    assert "every rank must call restore()" in message
    assert seconds < 5  # a quarter of dist_timeout (10 s), not dist_timeout
    assert not one["errors"]
    for record in (zero, one):
        assert record["saves"] == [1]
        assert record["restored"] == 1
