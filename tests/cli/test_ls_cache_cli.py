"""``ckptwise ls --cache``: a remote run seen through its writer's local cache."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from click.testing import CliRunner

from ckptwise.cli.main import cli
from ckptwise.store import CheckpointStore, RunLock, open_backend


def test_ls_through_the_cache_shows_where_each_checkpoint_is_durable(tmp_path: Path) -> None:
    url = f"memory://ls-cache-{uuid.uuid4().hex}/run"
    cache = tmp_path / "cache"
    backend = open_backend(url, cache=cache)
    lock = RunLock(backend)
    lock.acquire()
    store = CheckpointStore(backend)
    store.commit(1, {"w": torch.zeros(64)})
    lock.release()  # uploads what was saved, then stops uploading
    store.commit(2, {"w": torch.ones(64)})  # saved into the cache only

    result = CliRunner().invoke(cli, ["ls", url, "--cache", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["checkpoints"]
    assert {row["step"]: row["upload"] for row in rows} == {1: "remote", 2: "local"}
    table = CliRunner().invoke(cli, ["ls", url, "--cache", str(cache)])
    assert table.exit_code == 0, table.output
    assert "upload" in table.output
    assert "local" in table.output

    # the remote alone: only what was uploaded, and no upload column
    plain = CliRunner().invoke(cli, ["ls", url, "--json"])
    assert plain.exit_code == 0, plain.output
    rows = json.loads(plain.output)["checkpoints"]
    assert [row["step"] for row in rows] == [1]
    assert "upload" not in rows[0]
    assert "upload" not in CliRunner().invoke(cli, ["ls", url]).output


def test_ls_refuses_a_folder_that_is_no_cache(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["ls", "memory://no-run", "--cache", str(tmp_path)])
    assert result.exit_code != 0
    assert "no ckptwise cache folder" in result.output
