"""Remote storage against a real S3-compatible server (moto_server) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import ckptwise as cw
from s3_server import moto_s3
from tiny_state import make_state, train_step

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A moto S3 server on loopback, and the storage options that reach it."""
    with moto_s3("ckpt") as options:
        yield options


def test_save_restore_verify_and_prune_on_s3(s3: dict[str, Any]) -> None:
    url = "s3://ckpt/run-a"
    state = make_state(32, freeze=True)
    with cw.CheckpointManager(
        url, save=cw.every(1), keep=cw.keep_last(2), storage_options=s3
    ) as manager:
        for step in range(1, 5):
            train_step(state, 32)
            manager.step(step, state)
        manager.wait()
        assert [c.step for c in manager.run.checkpoints()] == [3, 4]
        assert manager.run.verify() == []
    fresh = make_state(32, freeze=True, seed=9)
    assert cw.open_run(url, storage_options=s3).restore(fresh, rng=True) == 4
    for name, tensor in state["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor)


def test_lock_and_corruption_on_s3(s3: dict[str, Any]) -> None:
    import s3fs

    url = "s3://ckpt/run-b"
    first = cw.CheckpointManager(url, save=cw.every(1), storage_options=s3)
    with pytest.raises(cw.RunLockedError, match=f"pid {os.getpid()}"):
        cw.CheckpointManager(url, save=cw.every(1), storage_options=s3)
    first.step(1, {"w": torch.arange(100.0)})
    first.step(2, {"w": torch.arange(100.0) * 2})
    first.wait()
    oid = first.run.manifest(2).tensors["w"].object
    first.close()
    fs = s3fs.S3FileSystem(**s3)
    path = f"ckpt/run-b/objects/{oid[:2]}/{oid}"
    data = bytearray(fs.cat_file(path))
    data[0] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    reader = cw.open_run(url, storage_options=s3)
    assert [(p.step, p.tensor) for p in reader.verify()] == [(2, "w")]
    state = {"w": torch.zeros(100)}
    with pytest.warns(cw.RestoreWarning, match="step 2 fails verification"):
        assert reader.restore(state) == 1
    assert torch.equal(state["w"], torch.arange(100.0))
