"""Two nodes, one object store, a local cache on each: what MiniCPM-V's ``NNODES`` launch does.

Each "node" is its own ``torchrun --nnodes 2 --node_rank N`` launch on this machine, against
one rendezvous, with its own cache folder, writing one run on the S3-compatible server on
127.0.0.1. Nothing of one node's disk is named to the other: the run is ``s3://``.
"""

from __future__ import annotations

import json
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


def test_two_nodes_upload_whole_checkpoints_and_a_killed_node_resumes_exactly(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    # an uninterrupted job on two nodes: the reference
    straight = Nodes(SCRIPT, s3, tmp_path / "straight", "s3://nodes/straight")
    straight.start("a", "--steps", "20", "--keep", "last(2)")
    straight.wait()
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

    # the same job, node 1's uploads slowed down; node 1 is killed (every process, -9) as
    # the save of step 15 begins, with its objects of earlier saves still uploading
    job = Nodes(SCRIPT, s3, tmp_path / "killed", "s3://nodes/killed")
    job.start("b", "--steps", "20", "--keep", "all", slow={1: 1.0})
    deadline = time.monotonic() + 120
    while [15, ["every(5)"]] not in job.record(1, "b").get("saves", []):
        assert time.monotonic() < deadline, "node 1 never saved step 15"
        time.sleep(0.05)
    job.kill(1)
    job.wait(ok=False, timeout=90)  # node 0 fails on its dead peer (or is killed)
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
    job.wait()
    resumed = [job.record(node, "c") for node in (0, 1)]
    reference = [straight.record(node, "a") for node in (0, 1)]
    assert resumed[0]["restored"] == max(committed)
    for mine, theirs in zip(resumed, reference, strict=True):
        assert mine["restored"] == max(committed)
        assert mine["losses"], mine
        for step, loss in mine["losses"].items():
            assert loss == theirs["losses"][step], step  # bit-exact: the same data order
    final = remote(s3, job.run)
    assert final.verify() == []
    assert final.steps() == [5, 10, 15, 20]
    assert cli(s3, "verify", job.run).strip().endswith(": ok")
    assert "20" in cli(s3, "du", job.run)
    cli(s3, "export", job.run, str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "model.safetensors").is_file()
