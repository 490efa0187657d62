"""Two nodes, one object store, a local cache on each: what MiniCPM-V's ``NNODES`` launch does.

Each "node" is its own ``torchrun --nnodes 2 --node_rank N`` launch on this machine, against
one rendezvous, with its own cache folder, writing one run on the S3-compatible server on
127.0.0.1. Nothing of one node's disk is named to the other: the run is ``s3://``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptwise as cw
from nodes_job import Nodes, cli
from s3_server import moto_s3

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("dist_train.py")


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    with moto_s3("nodes") as options:
        yield options


def remote(s3: dict[str, Any], run: str) -> cw.Run:
    return cw.open_run(run, storage_options=s3)


@pytest.fixture(scope="module")
def straight(s3: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    """An uninterrupted job on two nodes: the reference."""
    job = Nodes(SCRIPT, s3, tmp_path_factory.mktemp("straight"), "s3://nodes/straight")
    job.start("a", "--steps", "20", "--keep", "last(2)")
    job.wait()
    return job


def resumes_exactly(job: Nodes, tag: str, straight: Nodes, step: int) -> None:
    """Both ranks of ``job``'s launch ``tag`` restored ``step`` and trained on with the
    uninterrupted job's losses, bit for bit (the same data order)."""
    for node in (0, 1):
        mine, theirs = job.record(node, tag), straight.record(node, "a")
        assert mine["restored"] == step
        assert mine["errors"] == []
        assert mine["saves"][-1][0] == 20
        assert mine["losses"], mine
        for at, loss in mine["losses"].items():
            assert loss == theirs["losses"][at], at


def kill_node_1_while_its_uploads_lag(job: Nodes, tag: str, *args: str) -> None:
    """Start ``job`` with node 1's uploads slowed down and SIGKILL node 1 (every process)
    as the save of step 15 begins, with its objects of earlier saves still uploading."""
    job.start(tag, "--steps", "20", "--keep", "all", *args, slow={1: 1.0})
    deadline = time.monotonic() + 120
    while [15, ["every(5)"]] not in job.record(1, tag).get("saves", []):
        assert time.monotonic() < deadline, "node 1 never saved step 15"
        time.sleep(0.05)
    job.kill(1)
    job.wait(ok=False, timeout=90)  # node 0 fails on its dead peer (or is killed)


def test_two_nodes_upload_whole_checkpoints_and_a_killed_node_resumes_exactly(
    s3: dict[str, Any], straight: Nodes, tmp_path: Path
) -> None:
    bucket = remote(s3, straight.run)
    assert bucket.steps() == [15, 20]
    assert bucket.verify() == []
    # retention deleted the older checkpoints' objects from the bucket, rank 1's included
    # (rank 0 knows them from the confirmations), and left no debris
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    stored = {p.rsplit("/", 1)[1] for p in fs.find("nodes/straight/objects")}
    named = {e.object for step in (15, 20) for e in bucket.manifest(step).entries()}
    assert stored == named
    # each node's cache holds its own rank's folder, and nothing of the other's
    assert sorted(p.name for p in straight.cache(0).iterdir()) == ["rank-00000"]
    assert sorted(p.name for p in straight.cache(1).iterdir()) == ["rank-00001"]

    # the same job, node 1 killed while its uploads lag
    job = Nodes(SCRIPT, s3, tmp_path / "killed", "s3://nodes/killed")
    kill_node_1_while_its_uploads_lag(job, "b")
    # the bucket lists only whole checkpoints: none waits for node 1's objects
    after_kill = remote(s3, job.run)
    assert after_kill.verify() == []
    uploaded = after_kill.steps()
    committed = job.committed()
    assert committed
    assert max(committed) > max(uploaded, default=0), (uploaded, committed)

    # from any machine: the bucket, and each node's cache folder for what waits there
    listed = cli(s3, "ls", job.run, "--json", "--cache", str(job.cache(0)),
                 "--cache", str(job.cache(1)))  # fmt: skip
    rows = {row["step"]: row for row in json.loads(listed)["checkpoints"]}
    waiting = rows[max(committed)]
    assert waiting["upload"] == "local"
    assert waiting["uploads"]["rank 0"] == "local"  # the manifest waits for rank 1
    assert set(waiting["uploads"]) == {"rank 0", "rank 1"}
    for step in uploaded:
        assert rows[step]["uploads"] == {"rank 0": "remote", "rank 1": "remote"}
    # the bucket alone lists only what is whole there
    alone = json.loads(cli(s3, "ls", job.run, "--json"))["checkpoints"]
    assert [row["step"] for row in alone] == uploaded

    # both nodes start again on their caches: node 1 uploads what it held, rank 0 then
    # uploads the manifests it had committed, and the job resumes from the newest
    job.start("c", "--steps", "20", "--keep", "all")
    logs = job.wait()
    resumes_exactly(job, "c", straight, max(committed))
    final = remote(s3, job.run)
    assert final.verify() == []
    assert final.steps() == [5, 10, 15, 20], "\n".join(log[-4000:] for log in logs)
    assert cli(s3, "verify", job.run).strip().endswith(": ok")
    assert "20" in cli(s3, "du", job.run)
    cli(s3, "export", job.run, str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_a_node_back_without_its_cache_folder_resumes_from_the_newest_whole_checkpoint(
    s3: dict[str, Any], straight: Nodes, tmp_path: Path
) -> None:
    """Node 1 comes back on a new disk: the checkpoints whose objects only its lost cache
    held can never go up. Rank 0 sets their manifests aside (a warning says so), so both
    ranks resume from the newest checkpoint whole in the bucket, not one rank 0 alone
    sees."""
    job = Nodes(SCRIPT, s3, tmp_path / "lost", "s3://nodes/lost")
    job.start("a", "--steps", "5", "--keep", "all")  # step 5 reaches the bucket
    job.wait()
    kill_node_1_while_its_uploads_lag(job, "b")
    uploaded, committed = remote(s3, job.run).steps(), job.committed()
    assert uploaded[0] == 5
    lost = [step for step in committed if step > max(uploaded)]
    assert lost, (uploaded, committed)
    shutil.rmtree(job.cache(1))  # node 1's disk is gone

    job.start("c", "--steps", "20", "--keep", "all")
    logs = job.wait()
    steps = ", ".join(str(step) for step in lost)
    assert f"checkpoint(s) at step {steps} were committed into rank 0's cache but can " in (logs[0])
    resumes_exactly(job, "c", straight, max(uploaded))
    aside = job.cache(0) / "rank-00000" / "set-aside" / "checkpoints"
    assert sorted(p.name for p in aside.iterdir()) == [f"{step:012d}.json" for step in lost]
    final = remote(s3, job.run)
    assert final.verify() == []
    assert final.steps() == [5, 10, 15, 20], "\n".join(log[-4000:] for log in logs)
