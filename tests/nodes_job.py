"""Two "nodes" of one ``torchrun`` job on this machine, writing one ``s3://`` run through a
cache folder each, for the tests: two ``torchrun --nnodes 2 --node_rank N`` launches
against one rendezvous, each with its own cache and temporary folders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from s3_server import free_port


def slow_uploads(seconds: float) -> None:
    """Make every object upload of this process take ``seconds`` longer (in a node's job:
    its objects lag behind the other node's)."""
    import time

    from ckptwise.store import FsspecBackend

    real_put = FsspecBackend.put_file

    def slow_put(backend: FsspecBackend, path: str, local: str) -> None:
        if path.startswith("objects/"):
            time.sleep(seconds)
        real_put(backend, path, local)

    FsspecBackend.put_file = slow_put  # type: ignore[method-assign,assignment]


class Nodes:
    """Two node launches of one job (started together; see :meth:`start`)."""

    def __init__(self, script: Path, s3: dict[str, Any], tmp: Path, run: str) -> None:
        self.script, self.s3, self.tmp, self.run = script, s3, tmp, run
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
            scratch = self.tmp / f"tmp-node{node}"  # the node's own temporary folder
            scratch.mkdir(parents=True, exist_ok=True)
            delay = (slow or {}).get(node)
            extra = (
                [] if delay is None else ["--slow-uploads", str(delay), "--slow-node", str(node)]
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--node_rank", str(node), "--nproc_per_node", "1",
                     "--master_addr", "127.0.0.1", "--master_port", str(port),
                     str(self.script), self.run, str(self.out(node, tag)),
                     "--cache", str(self.cache(node)), *args,
                     *extra],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    env={**env, "TMPDIR": str(scratch)},
                    start_new_session=True,  # killed as a node dies: every process at once
                )
            )  # fmt: skip

    def wait(self, *, ok: bool = True, timeout: float = 400) -> list[str]:
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

    def committed(self) -> list[int]:
        """The steps whose manifests rank 0's cache folder holds (uploaded or not)."""
        folder = self.cache(0) / "rank-00000" / "files" / "checkpoints"
        return sorted(int(p.name.split(".")[0]) for p in folder.glob("*.json"))

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
