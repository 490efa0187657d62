"""Remote runs written through a local cache (:mod:`ckptwise.store.tiered`), against a real
S3-compatible server (``moto_server``) behind a loopback proxy that holds, slows and fails
requests (:mod:`s3_proxy`). Assertions are on order and state, never on wall time."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptwise.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RunLockedError,
    StorageError,
)
from ckptwise.store import CheckpointStore, FsspecBackend, RunLock, open_backend, runfile
from ckptwise.store.layout import (
    manifest_path,
    manifest_step,
    object_id,
    object_path,
    tensor_bytes,
)
from ckptwise.store.retry import RetryPolicy
from ckptwise.store.tiered import TieredBackend
from ckptwise.store.uploads import Uploads
from s3_proxy import S3Proxy, matching

pytestmark = pytest.mark.integration

#: the bucket the s3 fixture (conftest.py) creates for this module
BUCKET = "tiered"
#: quick retries, so that giving up takes milliseconds
FAST = RetryPolicy(
    attempts=4, first_delay=timedelta(milliseconds=10), max_delay=timedelta(milliseconds=50)
)
WAIT = timedelta(seconds=60)


def _url(tmp_path: Path) -> str:
    return f"s3://{BUCKET}/{tmp_path.name}-{uuid.uuid4().hex[:6]}"


def _through(proxy: S3Proxy, s3: dict[str, Any]) -> dict[str, Any]:
    """Storage options that reach the server through ``proxy``, with botocore's own retries
    off (the store's are tested) and a filesystem of their own (s3fs's retries off too)."""
    return {
        **proxy.options(s3),
        "skip_instance_cache": True,
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }


def _tiered(cache: Path, url: str, options: dict[str, Any], **kwargs: Any) -> TieredBackend:
    backend = open_backend(
        url, cache=cache, retry=FAST, **{"skip_instance_cache": True, **options}, **kwargs
    )
    assert isinstance(backend, TieredBackend)
    backend.remote.fs.retries = 1  # s3fs's own SlowDown retries: the store's are tested
    return backend


def _writer(backend: TieredBackend) -> tuple[RunLock, CheckpointStore]:
    lock = RunLock(backend)
    lock.acquire()
    return lock, CheckpointStore(backend)


def _remote(url: str, s3: dict[str, Any]) -> CheckpointStore:
    """The run as another machine reads it: the remote alone, straight to the server."""
    return CheckpointStore(FsspecBackend(url, **s3))


def _bucket_lists(url: str, s3: dict[str, Any], steps: list[int]) -> None:
    """The bucket, read as another machine reads it, lists ``steps``, each whole."""
    remote = _remote(url, s3)
    assert remote.steps() == steps
    assert remote.verify() == []


def _tensors(step: int, n: int = 2048) -> dict[str, torch.Tensor]:
    return {
        "frozen": torch.arange(float(n)),  # the same every step: one shared object
        "w": torch.full((n,), float(step)),
        "b": torch.arange(float(n)) * step + 0.5,
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _objects(store: CheckpointStore, step: int) -> set[str]:
    return {object_path(e.object) for e in store.manifest(step).entries()}


def _first(proxy: S3Proxy, method: str, path: str) -> int:
    """Where in the proxy's log the first ``method`` of ``path`` that succeeded is."""
    for i, r in enumerate(proxy.log):
        if r.method == method and r.path.endswith("/" + path) and r.status in (200, 204):
            return i
    raise AssertionError(f"no {method} of {path} reached the server")


def test_a_remote_reader_sees_a_checkpoint_only_once_its_manifest_is_uploaded(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, _through(proxy, s3))
    lock, store = _writer(backend)
    held = proxy.hold(matching("PUT", "/checkpoints/"))
    saved = _tensors(1)
    store.commit(1, saved)
    assert backend.upload_state(1) == "uploading"  # the commit did not wait for the network
    assert held.arrived.wait(30)  # every object is up; the manifest waits at the proxy
    remote = _remote(url, s3)
    assert remote.steps() == []
    assert all(remote.backend.exists(p) for p in _objects(store, 1))
    assert CheckpointStore(backend).steps() == [1]  # the cached view: remote + not uploaded
    held.release.set()
    backend.flush(WAIT)
    assert backend.upload_state(1) == "remote"
    remote.refresh()
    assert remote.steps() == [1]
    assert remote.verify() == []
    assert _same(remote.load_tensors(1), saved)
    manifest_put = _first(proxy, "PUT", manifest_path(1))
    assert all(_first(proxy, "PUT", p) < manifest_put for p in _objects(store, 1))
    lock.release()
    backend.close()


def test_a_slow_server_slows_uploads_not_saves_and_order_is_kept(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, _through(proxy, s3))
    lock, store = _writer(backend)
    proxy.delay = 0.02  # throttled: every request waits
    held = proxy.hold(matching("PUT"))  # and, until the saves are done, no upload completes
    saved = {step: _tensors(step) for step in (1, 2, 3)}
    for step, tensors in saved.items():
        store.commit(step, tensors)
    assert backend.upload_states() == {1: "uploading", 2: "uploading", 3: "uploading"}
    assert not proxy.requests("PUT", "/objects/")  # saved with nothing uploaded
    assert not proxy.requests("PUT", "/checkpoints/")
    held.release.set()
    backend.flush(WAIT)
    assert backend.upload_states() == {1: "remote", 2: "remote", 3: "remote"}
    manifests = [_first(proxy, "PUT", manifest_path(s)) for s in (1, 2, 3)]
    assert manifests == sorted(manifests)  # in the order they were committed
    for step, at in zip((1, 2, 3), manifests, strict=True):
        assert all(_first(proxy, "PUT", p) < at for p in _objects(store, step))
    remote = _remote(url, s3)
    assert remote.verify() == []
    assert all(_same(remote.load_tensors(s), saved[s]) for s in saved)
    lock.release()
    backend.close()


def test_transient_errors_are_retried_by_the_uploader_and_the_plain_backend(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    options = _through(proxy, s3)
    backend = _tiered(tmp_path / "cache", url, options)
    lock, store = _writer(backend)
    proxy.fail(matching("PUT", "/objects/"), times=2)
    proxy.fail(matching("PUT", "/checkpoints/"), times=1)
    store.commit(1, _tensors(1))
    backend.flush(WAIT)
    slowed = [r for r in proxy.log if r.status == 503]
    assert len(slowed) == 3
    for failed in slowed:  # each was sent again, and went through
        assert any(r.path == failed.path and r.status == 200 for r in proxy.requests("PUT"))
    assert _remote(url, s3).verify() == []
    lock.release()
    backend.close()

    plain = FsspecBackend(url, retry=FAST, **options)
    plain.fs.retries = 1
    proxy.fail(matching("GET", "/checkpoints/"), times=2)
    assert json.loads(plain.read_bytes(manifest_path(1)))["step"] == 1
    assert [r.status for r in proxy.requests("GET", "/checkpoints/")][-3:] == [503, 503, 200]


def test_retries_give_up_with_a_clear_error_that_holds_no_credentials(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "do-not-log-" + uuid.uuid4().hex
    options = {**_through(proxy, s3), "secret": secret}
    url = _url(tmp_path)
    caplog.set_level(logging.DEBUG, logger="ckptwise")
    backend = _tiered(tmp_path / "cache", url, options)
    lock, store = _writer(backend)
    proxy.fail(matching("PUT", "/checkpoints/"))  # every time
    store.commit(1, _tensors(1))  # the save itself succeeds: it needs only the cache
    with pytest.raises(StorageError) as failed:
        backend.flush(WAIT)
    message = str(failed.value)
    assert manifest_path(1) in message
    assert "4 attempt(s)" in message
    assert "flush() again" in message
    assert backend.upload_state(1) == "local"  # the uploader stopped
    assert _remote(url, s3).steps() == []  # objects may be up, the checkpoint is not
    proxy.heal()
    backend.flush(WAIT)  # tries again, and succeeds
    assert backend.upload_state(1) == "remote"

    plain = FsspecBackend(url, retry=FAST, **options)
    plain.fs.retries = 1
    proxy.fail(matching("PUT", "/objects/"))
    with pytest.raises(StorageError, match=r"objects/x: gave up after 4 attempt\(s\)") as info:
        plain.write_atomic("objects/x", [b"x"])
    assert "RetryPolicy" in str(info.value)
    proxy.heal()
    lock.release()
    backend.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "attempt 1 of 4" in logged
    for text in (message, str(info.value), logged):
        assert secret not in text


def test_retention_deletes_remotely_only_after_the_decision_and_never_resurrects(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, _through(proxy, s3))
    lock, store = _writer(backend)
    for step in (1, 2, 3):
        store.commit(step, _tensors(step))
    backend.flush(WAIT)
    only_1 = _objects(store, 1) - _objects(store, 2) - _objects(store, 3)
    shared = _objects(store, 1) & _objects(store, 2)
    assert only_1
    assert shared

    # an uploaded checkpoint: its manifest goes first, remotely, and its tombstone stays
    # until then, so a pin from another machine cannot slip in between
    held = proxy.hold(matching("DELETE", "/checkpoints/"))
    runfile.delete_unpinned(backend, [1], store.delete)  # what the manager's prune does
    assert store.steps() == [2, 3]
    assert not backend.exists(manifest_path(1))  # decided: gone from the writer's view
    assert held.arrived.wait(30)
    remote = FsspecBackend(url, **s3)
    assert remote.exists(manifest_path(1))  # not yet remotely
    with pytest.raises(CheckpointNotFoundError, match="being deleted"):
        runfile.pin(remote, 1)
    held.release.set()
    backend.flush(WAIT)
    gone = _first(proxy, "DELETE", manifest_path(1))
    assert all(_first(proxy, "DELETE", p) > gone for p in only_1)
    assert _first(proxy, "DELETE", "pruning/000000000001") > gone
    assert not remote.exists(manifest_path(1))
    assert all(not remote.exists(p) for p in only_1)
    assert all(remote.exists(p) for p in shared)  # a remote manifest still names them
    assert _remote(url, s3).verify() == []

    # a checkpoint deleted before it was uploaded is never uploaded at all
    held = proxy.hold(matching("PUT"))
    store.commit(4, _tensors(4))
    store.commit(5, _tensors(5))
    only_4 = _objects(store, 4) - _objects(store, 5)
    store.delete([4])
    held.release.set()
    backend.flush(WAIT)
    assert not proxy.requests("PUT", manifest_path(4))
    assert not remote.exists(manifest_path(4))
    assert all(not remote.exists(p) for p in only_4)
    final = _remote(url, s3)
    assert final.steps() == [2, 3, 5]
    assert final.verify() == []
    for step in final.steps():  # nothing a remote manifest names was deleted
        assert all(remote.exists(p) for p in _objects(final, step))
    lock.release()
    backend.close()


def test_a_bounded_cache_evicts_uploaded_files_and_reads_them_back_bit_exact(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    url = _url(tmp_path)
    bound = 40_000
    backend = _tiered(tmp_path / "cache", url, s3, cache_bytes=bound)
    lock, store = _writer(backend)
    saved = {step: _tensors(step) for step in range(1, 5)}  # 24 KiB of new objects each
    for step, tensors in saved.items():
        store.commit(step, tensors)
    backend.flush(WAIT)
    assert backend.cached_bytes <= bound
    cached = {p for p in backend.local.list_files("") if not p.startswith("ckptwise")}
    remote = set(FsspecBackend(url, **s3).list_files(""))
    assert cached < remote
    evicted = {p for step in saved for p in _objects(store, step)} - cached
    assert evicted
    reopened = CheckpointStore(backend)
    for step, tensors in saved.items():
        assert _same(reopened.load_tensors(step), tensors)
    assert reopened.verify() == []
    lock.release()
    backend.close()


def test_a_damaged_cached_copy_is_read_from_the_remote_but_an_unsent_one_is_not_replaced(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, _through(proxy, s3))
    lock, store = _writer(backend)
    saved = _tensors(1)
    store.commit(1, saved)
    backend.flush(WAIT)
    flipped, folder = sorted(_objects(store, 1))[:2]
    cached = Path(backend.local.root, flipped)
    data = bytearray(cached.read_bytes())
    data[10] ^= 0x40
    cached.write_bytes(bytes(data))
    Path(backend.local.root, folder).unlink()
    Path(backend.local.root, folder).mkdir()  # not a file any more
    assert _same(CheckpointStore(backend).load_tensors(1), saved)
    assert store.verify() == []

    # a copy not uploaded yet is the only one: its damage is reported, never papered over
    held = proxy.hold(matching("PUT"))
    store.commit(2, _tensors(2))
    unsent = Path(backend.local.root, sorted(_objects(store, 2) - _objects(store, 1))[0])
    data = bytearray(unsent.read_bytes())
    data[10] ^= 0x40
    unsent.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.load_tensors(2)
    held.release.set()
    backend.flush(WAIT)
    lock.release()
    backend.close()


def test_the_lock_is_taken_on_the_remote_and_pins_go_straight_there(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, s3)
    lock, store = _writer(backend)
    remote = FsspecBackend(url, **s3)
    assert remote.exists("ckptwise.lock")
    with pytest.raises(RunLockedError):
        RunLock(_tiered(tmp_path / "other-cache", url, s3)).acquire()
    with pytest.raises(RunLockedError):
        RunLock(FsspecBackend(url, **s3)).acquire()
    with pytest.raises(StorageError, match="in use"):
        _tiered(tmp_path / "cache", url, s3).start_uploads()
    with pytest.raises(ConfigError, match="belongs to the run"):
        _tiered(tmp_path / "cache", url + "-elsewhere", s3)

    store.commit(1, _tensors(1))
    backend.flush(WAIT)
    runfile.pin(backend, 1)
    assert remote.exists(runfile.pin_path(1))  # at once, with nothing to flush
    assert backend.pending == 0
    lock.release()
    backend.close()
    assert not remote.exists("ckptwise.lock")


def test_a_writer_whose_lock_was_taken_over_uploads_no_manifest(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, s3)
    lock, store = _writer(backend)
    store.commit(1, _tensors(1))
    backend.flush(WAIT)
    FsspecBackend(url, **s3).delete("ckptwise.lock")
    other = RunLock(FsspecBackend(url, **s3))
    other.acquire()  # a second machine takes the run
    store.commit(2, _tensors(2))  # lands in this writer's cache only
    with pytest.raises(RunLockedError):
        backend.flush(WAIT)
    with pytest.raises(RunLockedError):
        lock.check()
    assert _remote(url, s3).steps() == [1]
    lock.release()
    assert FsspecBackend(url, **s3).exists("ckptwise.lock")  # the other writer's, untouched
    other.release()
    with pytest.raises(StorageError, match="nothing uploads them"):
        backend.close()  # step 2 stays in the cache, unsent


def test_every_pin_reported_done_keeps_its_checkpoint_through_the_cache(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    url = _url(tmp_path)
    backend = _tiered(tmp_path / "cache", url, s3)
    lock, store = _writer(backend)
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:  # saves and prunes every step, keeping the newest (and the pinned)
        step = 0
        try:
            while not stop.is_set():
                step += 1
                store.commit(step, {"w": torch.full((16,), float(step))})
                # until it is uploaded (a training step), so that what is pruned is remote
                while backend.upload_state(step) != "remote" and not stop.is_set():
                    time.sleep(0.005)
                older = [s for s in store.steps() if s < step]
                runfile.delete_unpinned(backend, older, store.delete)
        except BaseException as exc:
            failures.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    remote = FsspecBackend(url, **s3)
    pinned: list[int] = []
    tried = attempts = 0
    deadline = time.monotonic() + 60
    try:
        while attempts < 10 and not failures and time.monotonic() < deadline:
            listed = sorted(
                s for s in map(manifest_step, remote.list_files("checkpoints")) if s is not None
            )
            # alternately the newest uploaded, and an older one the writer is deleting
            candidates = [s for s in listed if s > tried and s not in pinned]
            if not candidates:
                time.sleep(0.01)
                continue
            step = candidates[-1] if attempts % 2 == 0 else candidates[0]
            tried, attempts = step, attempts + 1
            try:
                runfile.pin(remote, step)
            except CheckpointNotFoundError:
                continue  # refused: gone, or being deleted; never half-done
            pinned.append(step)
    finally:
        stop.set()
        writer.join(60)
    assert not failures, failures
    assert attempts == 10, "the writer's checkpoints never reached the remote"
    backend.flush(WAIT)
    final = _remote(url, s3)
    assert set(pinned) <= set(final.steps())
    assert set(pinned) <= runfile.read_pins(remote)
    assert final.verify(sorted(pinned)) == []
    lock.release()
    backend.close()


WRITER = """
import json, sys, time, torch
from datetime import timedelta
from ckptwise.store import CheckpointStore, RunLock, open_backend
from ckptwise.store.retry import RetryPolicy

url, cache, options, count, mode = sys.argv[1:6]
backend = open_backend(
    url, cache=cache, retry=RetryPolicy(first_delay=timedelta(milliseconds=20)),
    **json.loads(options),
)
RunLock(backend).acquire()
store = CheckpointStore(backend)
n = 2048
for step in range(1, int(count) + 1):
    store.commit(step, {
        "frozen": torch.arange(float(n)),
        "w": torch.full((n,), float(step)),
        "b": torch.arange(float(n)) * step + 0.5,
    })
    print("committed", step, backend.upload_state(step), flush=True)
if mode == "sleep":
    time.sleep(600)
"""


def _spawn(url: str, cache: Path, options: dict[str, Any], count: int, mode: str) -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(cache), json.dumps(options), str(count), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_a_writer_killed_while_uploading_leaves_only_whole_checkpoints_remotely(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    cache = tmp_path / "cache"
    proxy.delay = 0.01
    held = proxy.hold(matching("PUT", manifest_path(3)))
    child = _spawn(url, cache, proxy.options(s3), 5, "sleep")
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline() for _ in range(5)]
        assert lines[-1].startswith("committed 5"), lines
        assert held.arrived.wait(60)  # half-way: step 3's objects are up, its manifest not
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
        held.drop = True  # the dead writer's request never completes
        held.release.set()

    remote = _remote(url, s3)
    assert remote.steps() == [1, 2]  # nothing partial is listed
    half = object_path(object_id(tensor_bytes(_tensors(3)["w"])))
    assert remote.backend.exists(half)  # though step 3's objects are there
    assert remote.verify() == []
    assert all(_same(remote.load_tensors(s), _tensors(s)) for s in (1, 2))

    # a writer on another machine (a fresh cache) resumes from the newest whole checkpoint
    fresh = _tiered(tmp_path / "fresh-cache", url, s3)
    lock, store = _writer(fresh)  # takes over the dead writer's lock
    assert store.steps() == [1, 2]
    store.clean()  # step 3's uploaded objects are debris to it
    lock.release()
    fresh.close()
    assert not remote.backend.exists(half)

    # the same cache again: what was committed into it, never or partly uploaded, goes up
    again = _tiered(cache, url, s3)
    lock, store = _writer(again)
    assert store.steps() == [1, 2, 3, 4, 5]
    again.flush(WAIT)
    assert again.upload_states() == dict.fromkeys(range(1, 6), "remote")
    remote.refresh()
    assert remote.steps() == [1, 2, 3, 4, 5]
    assert remote.verify() == []
    assert all(_same(remote.load_tensors(s), _tensors(s)) for s in range(1, 6))
    lock.release()
    again.close()


def test_an_interpreter_exiting_without_close_finishes_the_uploads(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url = _url(tmp_path)
    proxy.delay = 0.05  # so that the uploads lag behind the saves
    child = _spawn(url, tmp_path / "cache", proxy.options(s3), 3, "exit")
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    assert out.splitlines()[-1] == "committed 3 uploading"  # not uploaded when it returned
    remote = _remote(url, s3)
    assert remote.steps() == [1, 2, 3]
    assert remote.verify() == []


def _from_another_rank(
    writer: CheckpointStore, publisher: CheckpointStore, step: int
) -> dict[str, torch.Tensor]:
    """What a job of two ranks commits (see ckptwise.distributed.save), by hand: ``writer``
    (rank 1's store, its own cache) writes the objects, ``publisher`` (rank 0's) the
    manifest naming them."""
    from ckptwise.store import Manifest

    saved = _tensors(step)
    plan = writer.plan(saved, rank=1)
    written = writer.write_objects(plan.new)
    entries = {
        name: dataclasses.replace(written[oid], dtype=dtype, shape=shape)
        for name, (oid, dtype, shape) in plan.names.items()
    }
    publisher.publish(Manifest(step=step, time=float(step), tensors=entries))
    return saved


def _two_ranks(
    tmp_path: Path, url: str, options: dict[str, Any]
) -> tuple[TieredBackend, RunLock, CheckpointStore, TieredBackend, CheckpointStore]:
    """Rank 0's cached backend (expecting confirmations, its lock taken, its store) and
    rank 1's (uploading under rank 0's lock, its store), each with a cache folder of its own."""
    first = _tiered(tmp_path / "rank-00000", url, options)
    first.expect_confirmations()
    lock, publisher = _writer(first)
    other = _tiered(tmp_path / "rank-00001", url, options)
    writer = CheckpointStore(other)
    writer.start_uploads()  # rank 0's lock covers the job
    return first, lock, publisher, other, writer


def test_rank_0s_manifest_waits_for_the_other_ranks_confirmed_uploads(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url, options = _url(tmp_path), _through(proxy, s3)
    first, lock, publisher, other, writer = _two_ranks(tmp_path, url, options)
    held = proxy.hold(matching("PUT", "/objects/"))
    saved = _from_another_rank(writer, publisher, 1)
    unsent = other.unsent_objects()
    assert unsent == _objects(publisher, 1)
    assert other.wait_sent(unsent, 0.2) is False  # held at the proxy
    first.flush(WAIT)  # the manifest does not go up: rank 0 has no word of its objects
    remote = _remote(url, s3)
    assert remote.steps() == []
    assert first.upload_state(1) == "local"
    held.release.set()
    assert other.wait_sent(unsent, 30) is True
    first.flush(WAIT)
    remote.refresh()
    assert remote.steps() == []  # uploaded, but not confirmed: rank 0 never lists the bucket
    first.confirm_step(1)
    first.flush(WAIT)
    remote.refresh()
    assert remote.steps() == [1]
    assert remote.verify() == []
    assert _same(remote.load_tensors(1), saved)

    # rank 1's uploads fail (then the job dies) before step 2's objects are up: restarted
    # on the same caches, rank 0 asks the remote for them once rank 1 says its leftovers
    # are up (the recovery round)
    proxy.fail(matching("PUT", "/objects/"))
    _from_another_rank(writer, publisher, 2)
    with pytest.raises(StorageError):
        other.close(WAIT)  # its uploader gave up: step 2's objects stay in its cache
    lock.release()
    first.close()
    proxy.heal()
    again = _tiered(tmp_path / "rank-00000", url, options)
    again.expect_confirmations()
    lock, _ = _writer(again)
    again.flush(WAIT)
    remote.refresh()
    assert remote.steps() == [1]  # step 2 waits: its objects were only in rank 1's cache
    assert again.upload_state(2) == "local"
    other_again = _tiered(tmp_path / "rank-00001", url, options)
    CheckpointStore(other_again).start_uploads()
    other_again.flush(WAIT)
    again.recheck_parked()
    again.flush(WAIT)
    remote.refresh()
    assert remote.steps() == [1, 2]
    assert remote.verify() == []
    lock.release()
    again.close()
    other_again.close()


def test_a_manifest_whose_objects_were_lost_with_a_ranks_cache_is_set_aside(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path
) -> None:
    url, options = _url(tmp_path), _through(proxy, s3)
    first, lock, publisher, other, writer = _two_ranks(tmp_path, url, options)
    _from_another_rank(writer, publisher, 1)
    assert other.wait_sent(other.unsent_objects(), 30) is True
    first.confirm_step(1)
    proxy.fail(matching("PUT", "/objects/"))
    _from_another_rank(writer, publisher, 2)  # rank 1's objects of step 2 never go up
    with pytest.raises(StorageError):
        other.close(WAIT)
    first.flush(WAIT)
    lock.release()
    first.close()
    proxy.heal()
    shutil.rmtree(tmp_path / "rank-00001")  # rank 1 comes back without its cache folder

    again = _tiered(tmp_path / "rank-00000", url, options)
    again.expect_confirmations()
    lock, store = _writer(again)
    # a bucket that cannot be asked is no "not there": nothing is taken as lost
    proxy.fail(lambda method, path: method in ("HEAD", "GET") and "rank-" not in path)
    with pytest.raises(StorageError, match=r"could not ask .* which objects"):
        again.recheck_parked()
    proxy.heal()
    again.recheck_parked()  # the bucket lacks them too: nothing can upload step 2 now
    again.flush(WAIT)
    assert store.steps() == [1, 2]  # rank 0 alone would read step 2
    assert again.set_aside_parked() == [2]
    assert again.set_aside_parked() == []
    store.refresh()
    assert store.steps() == [1]
    aside = tmp_path / "rank-00000" / "set-aside" / manifest_path(2)
    assert aside.is_file()  # kept for a person to look at, never uploaded
    again.flush(WAIT)
    _bucket_lists(url, s3, [1])
    lock.release()
    again.close()


def test_the_recovery_check_covers_a_manifest_the_uploader_has_not_checked_yet(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart rank 0 asks the remote once for the objects its manifests wait for.
    A manifest the uploader is still about to check must be counted, or it parks right
    after for objects the remote holds by then, and never goes up."""
    url, options = _url(tmp_path), _through(proxy, s3)
    first, lock, publisher, other, writer = _two_ranks(tmp_path, url, options)
    held = proxy.hold(matching("PUT", "/objects/"))
    _from_another_rank(writer, publisher, 1)  # rank 1's objects wait at the proxy
    first.flush(WAIT)
    lock.release()
    first.close()

    # rank 0 restarts; its uploader lists the remote (without rank 1's objects) and is
    # about to check step 1's manifest when rank 1's objects arrive in the bucket
    checking, go_on = threading.Event(), threading.Event()
    real_check = Uploads._check

    def slow_check(uploads: Uploads, path: str, staged: str) -> None:
        if path == manifest_path(1):
            checking.set()
            go_on.wait(30)
        real_check(uploads, path, staged)

    monkeypatch.setattr(Uploads, "_check", slow_check)
    again = _tiered(tmp_path / "rank-00000", url, options)
    again.expect_confirmations()
    lock, _ = _writer(again)
    assert checking.wait(30)
    held.release.set()
    assert other.wait_sent(other.unsent_objects(), 30) is True
    again.recheck_parked()  # the recovery round's one look at the remote
    go_on.set()
    again.flush(WAIT)
    _bucket_lists(url, s3, [1])
    lock.release()
    again.close()
    other.close()


def test_a_confirmation_that_lands_while_the_uploader_parks_the_manifest_releases_it(
    s3: dict[str, Any], proxy: S3Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uploader checks a manifest's objects, then parks it: a confirmation between the
    two must still let it go up (the job's last checkpoint was left in rank 0's cache)."""
    checked, go_on = threading.Event(), threading.Event()
    real_check = Uploads._check

    def check_then_pause(uploads: Uploads, path: str, staged: str) -> None:
        try:
            real_check(uploads, path, staged)
        except Exception:
            if path == manifest_path(1):
                checked.set()
                go_on.wait(30)
            raise

    monkeypatch.setattr(Uploads, "_check", check_then_pause)
    url, options = _url(tmp_path), _through(proxy, s3)
    first, lock, publisher, other, writer = _two_ranks(tmp_path, url, options)
    _from_another_rank(writer, publisher, 1)
    assert other.wait_sent(other.unsent_objects(), 30) is True
    assert checked.wait(30)  # the uploader found rank 1's objects not confirmed yet
    first.confirm_step(1)  # the confirmation lands before it parks the manifest
    go_on.set()
    first.flush(WAIT)
    _bucket_lists(url, s3, [1])
    lock.release()
    first.close()
    other.close()
