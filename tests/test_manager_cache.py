"""A training loop saving to S3 through a local cache: the network is never in a save's way.

Real parts: ``moto_server`` on 127.0.0.1 behind the loopback proxy of :mod:`s3_proxy`, which
holds every upload until the test lets it go.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptwise as cw
from s3_proxy import S3Proxy, matching
from tiny_state import make_state, train_step

pytestmark = pytest.mark.integration

#: the bucket the s3 fixture (conftest.py) creates for this module
BUCKET = "cached"


def test_saves_commit_to_the_cache_while_uploads_are_held_then_the_remote_has_them_all(
    tmp_path: Path, s3: dict[str, Any], proxy: S3Proxy
) -> None:
    url = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:6]}"
    options = {**proxy.options(s3), "skip_instance_cache": True}
    state = make_state(32)
    manager = cw.CheckpointManager(
        url,
        save=cw.every(2),
        keep=cw.keep_last(2),
        cache=tmp_path / "cache",
        storage_options=options,
    )
    held = proxy.hold(matching("PUT", "/objects/"))  # no object reaches the server yet
    for step in range(1, 7):
        train_step(state, 32)
        manager.step(step, state)
    manager.wait()  # committed locally, although not one upload went through
    states = manager.run.upload_states()
    assert states is not None
    assert sorted(states) == [4, 6]
    assert set(states.values()) <= {"local", "uploading"}
    assert cw.open_run(url, storage_options=dict(s3)).steps() == []  # the remote: nothing whole
    expected = {k: v.detach().clone() for k, v in state["model"].state_dict().items()}
    held.release.set()
    manager.close()  # waits for every upload
    remote = cw.open_run(url, storage_options=dict(s3))
    assert remote.steps() == [4, 6]
    assert remote.verify() == []
    fresh = make_state(32, seed=1)
    with cw.CheckpointManager(
        url, save=cw.every(2), cache=tmp_path / "other-cache", storage_options=dict(s3)
    ) as again:
        assert again.restore(fresh) == 6
    for name, value in fresh["model"].state_dict().items():
        assert torch.equal(value, expected[name])


def test_a_cache_for_a_local_run_is_refused_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(cw.ConfigError, match="drop cache="):
        cw.CheckpointManager(tmp_path / "run", save=cw.every(1), cache=tmp_path / "cache")


def test_upload_states_is_none_without_a_cache(tmp_path: Path) -> None:
    with cw.CheckpointManager(tmp_path / "run", save=cw.every(1)) as manager:
        assert manager.run.upload_states() is None
        manager.flush_uploads()  # nothing to wait for
