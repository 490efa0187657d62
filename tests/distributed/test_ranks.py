"""The checkpoint's own process group lives as long as its manager (real ``torchrun``, gloo).

Each writing manager of a multi-process run opens two gloo groups (its decisions and its commits); ``close()`` destroys them, a
manager whose construction fails does not leave one behind, and a closed manager still reads
on each rank alone. :meth:`Ranks.each` raises one rank's failure on every rank, and the
group goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchrun_job import run_job

pytestmark = pytest.mark.integration

SCRIPT = """
import atexit, gc, json, sys, torch, torch.distributed as dist, ckptwise as cw
from torch.distributed.distributed_c10d import _world

dist.init_process_group("gloo")
run, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rank = dist.get_rank()
groups = lambda: len(_world.pg_map)


def at_exit():  # registered before ckptwise's own exit hook exists, so it runs after it
    with open(f"{out}.exit.{rank}", "w") as f:
        json.dump({"groups": groups()}, f)


if mode == "exit":  # a manager never closed: its group is destroyed at exit all the same
    atexit.register(at_exit)
    manager = cw.CheckpointManager(run, save=cw.every(1), rng=False, async_save=False)
    manager.step(1, {"w": torch.full((4,), float(rank))})
    dropped = cw.CheckpointManager(run + "-dropped", save=cw.every(1), rng=False)
    del dropped  # collected without close()
    gc.collect()
    sys.exit(0)
if mode == "each":  # Ranks.each: every rank's result, or one rank's failure on all of them
    from ckptwise.distributed.ranks import Ranks

    ranks = Ranks.detect()
    record = {"results": ranks.each(lambda: 10 * rank, "gathering"), "leaders": ranks.leaders()}

    def refuse():
        if rank == 1:
            raise cw.ConfigError("rank 1 refuses")
        return rank

    try:
        ranks.each(refuse, "refusing")
    except Exception as exc:
        record["error"] = [type(exc).__name__, str(exc)]
    record["after"] = ranks.each(lambda: "again", "again")  # the group is still usable
    ranks.close()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f)
    sys.exit(0)
record = {"before": groups()}
try:
    cw.CheckpointManager(run, save=cw.every(1), on_busy="skip")  # refused after the group
except cw.ConfigError:
    pass
record["after_refused"] = groups()
for attempt in range(3):  # a job that opens a manager again and again (fit, then fit again)
    manager = cw.CheckpointManager(run, save=cw.every(1), rng=False, async_save=False)
    record.setdefault("open", groups())
    manager.step(attempt + 1, {"w": torch.full((4,), float(10 * attempt + rank))})
    manager.close()
record["closed"] = groups()
world = cw.CheckpointManager(  # the whole job given as process_group= is no subgroup
    run + "-world", save=cw.every(1), rng=False, process_group=dist.group.WORLD
)
world.close()
record["closed_world"] = groups()
record["ranks_after_close"] = manager.ranks is None
state = {"w": torch.zeros(4)}
record["restored"] = manager.restore(state)  # each rank alone, as a read-only manager
record["w"] = state["w"].tolist()
record["steps"] = cw.open_run(run).steps()
manager.close()  # twice
last = cw.CheckpointManager(run, save=cw.every(1), rng=False, async_save=False)
dist.destroy_process_group()  # the job destroys every group first ...
last.close()  # ... and closing the manager afterwards is fine
with open(f"{out}.{rank}", "w") as f:
    json.dump(record, f)
"""


def torchrun(tmp_path: Path, mode: str) -> Path:
    """Run the script on two ranks; returns the prefix of the files they wrote."""
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    out = tmp_path / mode
    run_job(script, str(tmp_path / mode / "run"), str(out), mode)
    return out


def test_closing_a_manager_destroys_its_process_group(tmp_path: Path) -> None:
    out = torchrun(tmp_path, "close")
    for rank in (0, 1):
        record = json.loads(Path(f"{out}.{rank}").read_text())
        assert record["after_refused"] == record["before"]  # the refused manager left none
        # two groups while a manager is open: its decisions' and its commits' channel
        assert record["open"] == record["before"] + 2
        assert record["closed"] == record["before"]  # three managers, none left behind
        assert record["closed_world"] == record["before"]
        assert record["ranks_after_close"] is True
        assert record["restored"] == 3, str(record)
        assert record["w"] == [20.0 + rank] * 4  # this rank's own value of step 3


def test_the_group_of_a_manager_never_closed_is_destroyed_before_the_interpreter_exits(
    tmp_path: Path,
) -> None:
    out = torchrun(tmp_path, "exit")
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.exit.{rank}").read_text()) == {"groups": 1}  # default


def test_each_gives_every_ranks_result_or_raises_one_ranks_failure_on_all(tmp_path: Path) -> None:
    out = torchrun(tmp_path, "each")
    for rank in (0, 1):
        record = json.loads(Path(f"{out}.{rank}").read_text())
        assert record["results"] == [0, 10]
        assert record["leaders"] == [0, 0]  # one node: rank 0 writes what it shares
        kind, message = record["error"]
        assert kind == "ConfigError"  # the failing rank's class, on every rank
        assert "rank 1 refuses" in message
        if rank == 0:
            assert message.startswith("refusing failed on rank 1")
        assert record["after"] == ["again", "again"]
