"""Damage on remote stores never spreads: an object deleted from the bucket is rewritten at the
next save (directly on ``s3://`` and through a cache), and an object damaged in the cache
before its upload never leaves the machine. Against a real S3-compatible server
(``moto_server``) on 127.0.0.1, reached through the loopback proxy of :mod:`s3_proxy` where
requests are counted."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptwise.store import CheckpointStore, FsspecBackend, open_backend
from ckptwise.store.layout import object_path
from ckptwise.store.retry import RetryPolicy
from ckptwise.store.tiered import TieredBackend
from s3_proxy import S3Proxy, matching

pytestmark = pytest.mark.integration

#: the bucket the s3 fixture (conftest.py) creates for this module
BUCKET = "remote-damage"
WAIT = timedelta(seconds=60)
#: quick retries, so that giving up takes milliseconds
FAST = RetryPolicy(
    attempts=3, first_delay=timedelta(milliseconds=10), max_delay=timedelta(milliseconds=50)
)


def _url(tmp_path: Path) -> str:
    return f"s3://{BUCKET}/{tmp_path.name}-{uuid.uuid4().hex[:6]}"


def _options(proxy: S3Proxy, s3: dict[str, Any]) -> dict[str, Any]:
    return {**proxy.options(s3), "skip_instance_cache": True}


def _state(step: int, frozen: int) -> dict[str, torch.Tensor]:
    """``frozen`` tensors with the same bytes at every step (reused objects) and a head
    that trains."""
    tensors = {f"tower.{i}": torch.arange(256.0) + 1000 * i for i in range(frozen)}
    tensors["head"] = torch.full((64,), float(step))
    return tensors


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bucket(s3: dict[str, Any]) -> Any:
    """The bucket as a person (or a lifecycle rule) reaches it: straight to the server."""
    import s3fs

    return s3fs.S3FileSystem(**s3, skip_instance_cache=True)


def _key(url: str, path: str) -> str:
    return f"{url.removeprefix('s3://')}/{path}"


@pytest.mark.parametrize("frozen", [2, 24], ids=["few-reused", "many-reused"])
def test_an_object_deleted_from_the_bucket_is_rewritten_at_the_next_save(
    s3: dict[str, Any],
    proxy: S3Proxy,
    tmp_path: Path,
    frozen: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = _url(tmp_path)
    store = CheckpointStore(FsspecBackend(url, **_options(proxy, s3)))
    store.commit(1, _state(1, frozen))
    gone = store.manifest(1).tensors["tower.1"].object
    _bucket(s3).rm_file(_key(url, object_path(gone)))

    seen = len(proxy.log)
    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        store.commit(2, _state(2, frozen))  # the same store, well within its recheck hour
    assert gone in caplog.text
    assert "is missing" in caplog.text
    requests = proxy.log[seen:]
    heads = [r for r in requests if r.method == "HEAD" and "/objects/" in r.path]
    lists = [r for r in requests if r.method == "GET" and "/objects/" not in r.path]
    if frozen > 2:  # one listing checks them all, not a request per object
        assert heads == []
        assert len(lists) == 1
    else:
        assert len(heads) == frozen  # so few that a HEAD each is cheaper than a listing

    reader = CheckpointStore(FsspecBackend(url, **s3))
    assert reader.verify() == []  # the rewrite repaired step 1 too
    assert all(_same(reader.load_tensors(s), _state(s, frozen)) for s in (1, 2))


def _tiered(cache: Path, url: str, options: dict[str, Any]) -> TieredBackend:
    backend = open_backend(url, cache=cache, **options)
    assert isinstance(backend, TieredBackend)
    return backend


def test_an_object_deleted_from_the_bucket_is_rewritten_through_the_cache(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, _options(proxy, s3))
    store = CheckpointStore(backend)
    lock = store.lock()
    lock.acquire()
    store.commit(1, _state(1, 3))
    backend.flush(WAIT)
    gone = store.manifest(1).tensors["tower.0"].object
    assert Path(backend.local.root, object_path(gone)).is_file()  # the cache still has it
    _bucket(s3).rm_file(_key(url, object_path(gone)))

    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        store.commit(2, _state(2, 3))
    assert gone in caplog.text
    assert "is missing" in caplog.text
    backend.flush(WAIT)
    assert backend.upload_states() == {1: "remote", 2: "remote"}
    remote = CheckpointStore(FsspecBackend(url, **s3))
    assert remote.steps() == [1, 2]
    assert remote.verify() == []
    assert all(_same(remote.load_tensors(s), _state(s, 3)) for s in (1, 2))
    lock.release()
    backend.close()


def test_an_object_damaged_in_the_cache_before_upload_never_leaves_the_machine(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url(tmp_path)
    cache = tmp_path / "cache"
    # a writer commits into the cache and dies before uploading (as after a kill mid-upload)
    first = _tiered(cache, url, _options(proxy, s3))
    store = CheckpointStore(first)
    store.commit(1, _state(1, 2))
    store.commit(2, _state(2, 2))
    damaged = store.manifest(1).tensors["tower.1"].object
    kept = store.manifest(2).tensors["head"].object
    cached = cache / "files" / object_path(damaged)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x10
    cached.write_bytes(bytes(data))
    assert first.upload_states() == {1: "local", 2: "local"}

    # the next writer on the same cache uploads what the first committed, checked first
    backend = _tiered(cache, url, _options(proxy, s3))
    store = CheckpointStore(backend)
    lock = store.lock()
    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        lock.acquire()
        backend.flush(WAIT)
    assert damaged in caplog.text
    assert "checksum" in caplog.text
    assert not any(damaged in r.path for r in proxy.log if r.method == "PUT")
    bucket = _bucket(s3)
    assert not bucket.exists(_key(url, object_path(damaged)))
    assert bucket.exists(_key(url, object_path(kept)))  # the sound objects went up
    assert not cached.exists()  # dropped from the cache
    remote = CheckpointStore(FsspecBackend(url, **s3))
    assert remote.steps() == []  # no manifest naming it was published
    assert backend.upload_states() == {1: "local", 2: "local"}

    # the next save from the live tensor writes it again; then both wait no longer
    store.commit(3, _state(3, 2))
    backend.flush(WAIT)
    assert backend.upload_states() == {1: "remote", 2: "remote", 3: "remote"}
    remote.refresh()
    assert remote.steps() == [1, 2, 3]
    assert remote.verify() == []
    assert all(_same(remote.load_tensors(s), _state(s, 2)) for s in (1, 2, 3))
    lock.release()
    backend.close()


def test_a_checkpoint_whose_damaged_object_is_not_saved_again_stays_local_alone(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    cache = tmp_path / "cache"
    first = _tiered(cache, url, _options(proxy, s3))
    CheckpointStore(first).commit(1, _state(1, 2))
    damaged = CheckpointStore(first).manifest(1).tensors["head"].object  # trains: not saved again
    cached = cache / "files" / object_path(damaged)
    data = bytearray(cached.read_bytes())
    data[0] ^= 0x01
    cached.write_bytes(bytes(data))

    backend = _tiered(cache, url, _options(proxy, s3))
    store = CheckpointStore(backend)
    lock = store.lock()
    lock.acquire()
    store.commit(2, _state(2, 2))  # later checkpoints upload, whatever waits
    backend.flush(WAIT)
    assert backend.upload_states() == {1: "local", 2: "remote"}
    remote = CheckpointStore(FsspecBackend(url, **s3))
    assert remote.steps() == [2]
    assert remote.verify() == []
    assert _same(remote.load_tensors(2), _state(2, 2))
    assert not _bucket(s3).exists(_key(url, object_path(damaged)))

    store.delete([1])  # retention: the checkpoint that could not be uploaded goes
    backend.flush(WAIT)
    assert backend.upload_states() == {2: "remote"}
    remote.refresh()
    assert remote.steps() == [2]
    lock.release()
    backend.close()


def test_a_save_through_the_cache_goes_on_when_the_bucket_cannot_be_asked(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url(tmp_path)
    options = {
        **_options(proxy, s3),
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }
    backend = open_backend(url, cache=tmp_path / "cache", retry=FAST, **options)
    assert isinstance(backend, TieredBackend)
    backend.remote.fs.retries = 1
    store = CheckpointStore(backend)
    lock = store.lock()
    lock.acquire()
    store.commit(1, _state(1, 3))
    backend.flush(WAIT)

    proxy.fail(matching())  # the bucket is out of reach
    with caplog.at_level(logging.WARNING, logger="ckptwise"):
        info = store.commit(2, _state(2, 3))
    assert "checked in the cache this time" in caplog.text
    assert info.new_bytes == _state(2, 3)["head"].nbytes  # the reused objects not rewritten
    proxy.heal()
    backend.flush(WAIT)
    remote = CheckpointStore(FsspecBackend(url, **s3))
    assert remote.steps() == [1, 2]
    assert remote.verify() == []
    lock.release()
    backend.close()


def test_a_confirmation_never_takes_an_object_dropped_as_damaged_as_uploaded(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    """Rank 0 of a job of several: the other ranks' word that a checkpoint's objects are
    up must not cover an object this cache dropped as damaged, or the bucket would list a
    checkpoint without it. And the part of a save naming such an object says so."""
    url = _url(tmp_path)
    cache = tmp_path / "cache"
    first = _tiered(cache, url, _options(proxy, s3))
    CheckpointStore(first).commit(1, _state(1, 2))
    damaged = CheckpointStore(first).manifest(1).tensors["tower.1"].object
    cached = cache / "files" / object_path(damaged)
    data = bytearray(cached.read_bytes())
    data[0] ^= 0x01
    cached.write_bytes(bytes(data))

    backend = _tiered(cache, url, _options(proxy, s3))
    backend.expect_confirmations()  # rank 0: manifests wait for the ranks' word
    store = CheckpointStore(backend)
    lock = store.lock()
    lock.acquire()
    backend.flush(WAIT)  # the damaged object is dropped, the sound ones go up
    part = store.manifest(1).view(0).values()
    assert backend.dropped_of(part) == {object_path(damaged)}
    assert backend.wait_sent(backend.dropped_of(part), 0.1) is None  # never will be
    backend.confirm_step(1)  # every rank's word: all it uploaded is up
    backend.flush(WAIT)
    remote = CheckpointStore(FsspecBackend(url, **s3))
    assert remote.steps() == []  # still waits for the damaged object, written again
    assert backend.upload_states() == {1: "local"}
    lock.release()
    backend.close()
