"""The upload confirmations of a cached run of several ranks, on a real gloo group of one
process and a real S3-compatible server (the many-rank flows run in
``tests/integration/test_nodes.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ckptwise.distributed.confirm import UploadConfirmer
from ckptwise.distributed.ranks import Ranks
from ckptwise.errors import RunLockedError, StorageError
from ckptwise.store import CheckpointStore, FsspecBackend, RunLock, TieredBackend, open_backend

BUCKET = "confirm"
WAIT = timedelta(seconds=30)


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[Ranks]:
    """A gloo group of this process alone, as the confirmations' own group."""
    rendezvous = tmp_path / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    ranks = Ranks._open(None, local=False, timeout=WAIT)
    try:
        yield ranks
    finally:
        ranks.close()
        dist.destroy_process_group()


def test_a_rank_whose_uploads_stopped_for_good_stops_the_confirmations_at_once(
    s3: dict[str, Any], tmp_path: Path, world_of_one: Ranks
) -> None:
    """Its uploader will never send what it holds (another writer took the run's lock):
    the ranks raise together, rather than confirm checkpoints whose manifests can never go
    up, or wait for objects that never will (restore() would hang), so restore() fails at
    once, saying why."""
    url = f"s3://{BUCKET}/{tmp_path.name}"
    backend = open_backend(url, cache=tmp_path / "rank-00000", **s3)
    assert isinstance(backend, TieredBackend)
    backend.expect_confirmations()
    lock = RunLock(backend)
    lock.acquire()
    store = CheckpointStore(backend)
    FsspecBackend(url, **s3).delete("ckptwise.lock")
    other = RunLock(FsspecBackend(url, **s3))
    other.acquire()  # a second job takes the run
    store.commit(1, {"w": torch.ones(4)})
    with pytest.raises(RunLockedError):
        backend.flush(WAIT)
    assert backend.fatal_error is not None

    confirmer = UploadConfirmer(world_of_one, backend)
    confirmer.committed(1, store.manifest(1).view(0).values())
    started = time.monotonic()
    with pytest.raises(StorageError, match="stopped for good"):
        confirmer.drain(WAIT)
    assert time.monotonic() - started < WAIT.total_seconds() / 2
    confirmer.close()
    lock.release()
    other.release()
    with pytest.raises(StorageError, match="wait in the cache"):
        backend.close(WAIT)  # what it held stays there
