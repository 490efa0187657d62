"""Two nodes, one object store, a local cache on each: what MiniCPM-V's ``NNODES`` launch does.

Each "node" is its own ``torchrun --nnodes 2 --node_rank N`` launch on this machine, against
one rendezvous, with its own cache folder, writing one run on the S3-compatible server on
127.0.0.1. Nothing of one node's disk is named to the other: the run is ``s3://``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptwise as cw
from s3_server import free_port, moto_s3

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("dist_train.py")


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    with moto_s3("nodes") as options:
        yield options


class Nodes:
    """Two node launches of one job (started together; see :meth:`start`)."""

    def __init__(self, s3: dict[str, Any], tmp: Path, run: str) -> None:
        self.s3, self.tmp, self.run = s3, tmp, run
        self.procs: list[subprocess.Popen[str]] = []

    def cache(self, node: int) -> Path:
        return self.tmp / f"cache-node{node}"

    def out(self, node: int, tag: str) -> Path:
        return self.tmp / f"{tag}-node{node}"

    def start(self, tag: str, *args: str, slow: dict[int, float] | None = None) -> None:
        port = free_port()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "CKPTWISE_TEST_S3": json.dumps(self.s3),
        }
        self.procs = []
        for node in (0, 1):
            delay = (slow or {}).get(node)
            extra = (
                [] if delay is None else ["--slow-uploads", str(delay), "--slow-node", str(node)]
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--node_rank", str(node), "--nproc_per_node", "1",
                     "--master_addr", "127.0.0.1", "--master_port", str(port),
                     str(SCRIPT), self.run, str(self.out(node, tag)),
                     "--cache", str(self.cache(node)), *args,
                     *extra],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                    start_new_session=True,  # killed as a node dies: every process at once
                )
            )  # fmt: skip

    def wait(self, *, ok: bool = True, timeout: float = 240) -> list[str]:
        logs = []
        for proc in self.procs:
            try:
                logs.append(proc.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                self.kill(self.procs.index(proc))
                logs.append(proc.communicate()[0])
            if ok:
                assert proc.returncode == 0, "\n".join(logs)[-6000:]
        return logs

    def kill(self, node: int) -> None:
        """SIGKILL a node's launcher and its workers (torchrun starts each worker in a
        session of its own), workers first."""
        root = self.procs[node].pid
        for pid in [*descendants(root), root]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def record(self, node: int, tag: str) -> dict[str, Any]:
        """The rank's record as last written ({} while it is being written)."""
        try:
            found: dict[str, Any] = json.loads(
                (self.out(node, tag) / f"rank{node}.json").read_text()
            )
        except (OSError, ValueError):
            return {}
        return found


def descendants(root: int) -> list[int]:
    """Every living process below ``root``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def remote(s3: dict[str, Any], run: str) -> cw.Run:
    return cw.open_run(run, storage_options=s3)


def test_two_nodes_upload_whole_checkpoints_and_a_killed_node_resumes_exactly(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    # an uninterrupted job on two nodes: the reference
    straight = Nodes(s3, tmp_path / "straight", "s3://nodes/straight")
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
    job = Nodes(s3, tmp_path / "killed", "s3://nodes/killed")
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
    committed = sorted(
        int(p.name.split(".")[0])
        for p in (job.cache(0) / "rank-00000" / "files" / "checkpoints").glob("*.json")
    )
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


def cli(s3: dict[str, Any], *args: str) -> str:
    """``ckptwise ARGS`` in a process of its own, reaching the bucket as any machine would
    (fsspec's environment settings)."""
    env = {
        **os.environ,
        "FSSPEC_S3_ENDPOINT_URL": s3["endpoint_url"],
        "FSSPEC_S3_KEY": s3["key"],
        "FSSPEC_S3_SECRET": s3["secret"],
        "AWS_DEFAULT_REGION": s3["client_kwargs"]["region_name"],
    }
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ckptwise")), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
