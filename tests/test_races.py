"""Races between real processes: pins and readers against a pruning writer, writers
starting together, and a writer whose lock file is deleted under it.

``CKPTWISE_RACE_COUNT`` sets how many pins / trials each test makes (default: a few, so CI
spends seconds); run by hand with a few hundred to hunt rare interleavings::

    CKPTWISE_RACE_COUNT=500 python -m pytest -q tests/test_races.py -s
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import ckptwise as cw
from ckptwise.store import open_backend
from ckptwise.store.layout import CHECKPOINTS, manifest_step
from s3_server import moto_s3

pytestmark = pytest.mark.integration

COUNT = int(os.environ.get("CKPTWISE_RACE_COUNT", "20"))


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A moto S3 server on loopback, and the storage options that reach it."""
    with moto_s3("races") as options:
        yield options


def _where(kind: str, tmp_path: Path, s3: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """A run URL of the given kind and its storage options."""
    if kind == "s3":
        assert s3 is not None
        return f"s3://races/{tmp_path.name}", s3
    if kind == "local-url":
        return f"local://{tmp_path / 'run'}", {}
    return str(tmp_path / "run"), {}


# -- (a) pins against a writer that saves and prunes every step ----------------------------

WRITER = """
import json, os, sys, torch, ckptwise as cw
url, stop, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with cw.CheckpointManager(
    url, save=cw.every(1), keep=cw.keep_last(1), rng=False, storage_options=options
) as manager:
    step = 0
    while not os.path.exists(stop):
        step += 1
        manager.step(step, {"w": torch.full((16,), float(step))})
        if step == 1:
            print("saving", flush=True)
print("saved", step, flush=True)
"""


def _target(backend: Any, doomed: bool) -> int | None:
    """The newest step, or with ``doomed`` the one the writer is deleting right now (the
    older of the two it holds while it prunes: it keeps one)."""
    steps = [manifest_step(p) for p in backend.list_files(CHECKPOINTS)]
    found = sorted(s for s in steps if s is not None)
    if doomed:
        return found[-2] if len(found) >= 2 else None
    return found[-1] if found else None


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_every_pin_reported_done_keeps_its_checkpoint(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    import json

    url, options = _where(kind, tmp_path, request.getfixturevalue("s3") if kind == "s3" else None)
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(stop), json.dumps(options)],
        stdout=subprocess.PIPE,
        text=True,
    )
    pinned: list[int] = []
    refused: Counter[str] = Counter()
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "saving"
        run = cw.open_run(url, storage_options=options)
        backend = open_backend(url, **options)
        tried = attempts = 0
        while attempts < COUNT:
            # each step once: alternately the newest, and one the writer is deleting
            step = _target(backend, doomed=attempts % 2 == 1)
            if step is None or step <= tried:
                continue
            tried = step
            attempts += 1
            try:
                run.pin(step)
            except cw.CheckpointNotFoundError as exc:
                # gone before the pin, or deleted while pinning: refused, never half-done
                refused["being deleted" if "being deleted" in str(exc) else "gone"] += 1
            else:
                pinned.append(step)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0, out
    final = cw.open_run(url, storage_options=options)
    lost_checkpoints = sorted(set(pinned) - set(final.steps()))
    lost_pins = sorted(set(pinned) - final.pins())
    print(
        f"\n[{kind}] {len(pinned)} pins done, refused {dict(refused)}, writer {out.strip()}; "
        f"checkpoints lost {len(lost_checkpoints)}, pins lost {len(lost_pins)}"
    )
    assert lost_checkpoints == []
    assert lost_pins == []
    assert final.verify(sorted(set(pinned))) == []  # their objects survived the collection


# -- (a') readers against a writer that saves and prunes every step ------------------------

READ_WRITER = WRITER.replace("keep=cw.keep_last(1)", "keep=cw.keep_last(2)")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_readers_never_see_a_prune_half_way(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """``ls`` and ``verify`` (through :class:`cw.Run`) while another process saves and
    prunes every step, until COUNT steps were seen: every listing is readable and every
    verification clean."""
    import json

    url, options = _where(kind, tmp_path, request.getfixturevalue("s3") if kind == "s3" else None)
    assert "keep_last(2)" in READ_WRITER
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", READ_WRITER, url, str(stop), json.dumps(options)],
        stdout=subprocess.PIPE,
        text=True,
    )
    problems: list[str] = []
    seen: set[int] = set()
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "saving"
        rounds, deadline = 0, time.monotonic() + 300
        # until the writer has saved (and pruned) COUNT steps while this process read
        while len(seen) < COUNT and time.monotonic() < deadline:
            rounds += 1
            run = cw.open_run(url, storage_options=options)
            problems += [f"unreadable {path}: {why}" for path, why in run.unreadable.items()]
            seen |= {info.step for info in run.checkpoints()}
            problems += [str(problem) for problem in run.verify()]
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0, out
    print(f"\n[{kind}] {rounds} rounds over steps {min(seen)}..{max(seen)}; writer {out.strip()}")
    assert problems == []
    assert len(seen) >= COUNT  # the readers really ran while the writer saved and pruned


# -- (b) writers started at the same instant -----------------------------------------------


def _contend(url: str, options: dict[str, Any], trials: int, barrier: Any, results: Any) -> None:
    """One contender: at each trial, try to open a writer on the trial's run together with
    the others, hold it until all have tried, then close it."""
    for trial in range(trials):
        barrier.wait()
        try:
            manager: cw.CheckpointManager | None = cw.CheckpointManager(
                f"{url}/trial-{trial}", save=cw.every(1), storage_options=options
            )
        except cw.RunLockedError:
            manager = None
        except Exception as exc:  # reported, so the parent fails with the cause
            results.put((trial, repr(exc)))
            manager = None
        else:
            results.put((trial, "held"))
        barrier.wait()
        if manager is not None:
            manager.close()
        results.put((trial, "done"))


@pytest.mark.parametrize("kind", ["local", "local-url", "s3"])
def test_writers_started_together_never_both_hold_a_run(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    url, options = _where(kind, tmp_path, request.getfixturevalue("s3") if kind == "s3" else None)
    contenders = 4
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(contenders)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_contend, args=(url, options, COUNT, barrier, results))
        for _ in range(contenders)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, list[str]] = {t: [] for t in range(COUNT)}
    try:
        for _ in range(COUNT * contenders):
            while True:
                trial, what = results.get(timeout=120)
                if what == "done":
                    break
                outcomes[trial].append(what)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    errors = [what for whats in outcomes.values() for what in whats if what != "held"]
    assert errors == []
    holders = Counter(len(whats) for whats in outcomes.values())
    print(f"\n[{kind}] {COUNT} trials of {contenders} writers: holders per trial {dict(holders)}")
    assert set(holders) == {1}  # exactly one writer took each run


# -- (c) the lock file deleted under a live writer -----------------------------------------

COMMANDED = """
import json, sys, torch, ckptwise as cw
url, options = sys.argv[1], json.loads(sys.argv[2])
manager = cw.CheckpointManager(url, save=cw.every(1), keep=cw.keep_all(), storage_options=options)
print("ready", flush=True)
for line in sys.stdin:
    step = int(line)
    try:
        manager.step(step, {"w": torch.full((4,), float(step))})
        manager.wait()  # committed, or refused by the fence on the background thread
        print("saved", step, flush=True)
    except cw.RunLockedError as exc:
        print("refused", step, exc, flush=True)
"""


def _ask(proc: subprocess.Popen[str], step: int) -> str:
    stdin: IO[str] | None = proc.stdin
    assert stdin is not None
    assert proc.stdout is not None
    stdin.write(f"{step}\n")
    stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_writer_whose_lock_file_is_deleted_never_commits_next_to_the_next(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    import json

    url, options = _where(kind, tmp_path, request.getfixturevalue("s3") if kind == "s3" else None)

    def writer() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", COMMANDED, url, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    first = writer()
    second: subprocess.Popen[str] | None = None
    try:
        assert _ask(first, 1) == "saved 1"
        open_backend(url, **options).delete("ckptwise.lock")
        second = writer()  # the lock looked free
        assert _ask(second, 2) == "saved 2"
        answer = _ask(first, 3)
        assert answer.startswith("refused 3")
        assert "was deleted or replaced" in answer
        assert _ask(second, 4) == "saved 4"
        assert _ask(first, 5).startswith("refused 5")
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.communicate(timeout=60)
    assert cw.open_run(url, storage_options=options).steps() == [1, 2, 4]
