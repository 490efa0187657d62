"""Progress of long saves and restores: a bar on a terminal, nothing elsewhere, a log line
always; off with ``CKPTWISE_PROGRESS=0``."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptwise.manager import CheckpointManager
from ckptwise.policy import every
from ckptwise.records import CheckpointInfo
from ckptwise.report import Progress, Transfer, metered, metered_progress, set_progress

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")


class Terminal:
    """A real pseudo-terminal: ``stream`` is its writing end, :meth:`output` what it shows."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.stream = open(slave, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def output(self) -> str:
        self.stream.flush()
        time.sleep(0.2)  # let the reader drain what the terminal holds
        return b"".join(self._chunks).decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a terminal closed under the stream: EIO
            self.stream.close()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    yield term
    term.close()


@pytest.fixture(autouse=True)
def _defaults(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CKPTWISE_PROGRESS", raising=False)
    yield
    set_progress(None)


def _move(transfer: Transfer, total: int, steps: int = 5) -> None:
    for _ in range(steps):
        transfer.advance(total // steps)  # as the store's writer threads report bytes
        time.sleep(0.06)


def test_a_long_transfer_draws_a_bar_with_bytes_rate_and_time_left(terminal: Terminal) -> None:
    with Transfer("saving step 7", 50_000_000, stream=terminal.stream, after=0.0) as transfer:
        _move(transfer, 50_000_000)
        transfer.finish(50_000_000)
    shown = terminal.output()
    assert "ckptwise: saving step 7" in shown
    assert "50.0/50.0 MB" in shown  # bytes done of the total
    assert re.search(r"\d+(\.\d+)? [kMG]?B/s", shown)  # the rate
    assert "━" in shown  # the bar itself
    assert transfer.drew
    assert re.search(r"ckptwise: saving step 7: 50 MB in \d+\.\d s \(\d+ MB/s\)\r?\n$", shown)


def test_a_short_transfer_draws_nothing(terminal: Terminal) -> None:
    with Transfer("saving step 7", 1000, stream=terminal.stream, after=5.0) as transfer:
        transfer.advance(1000)
        transfer.finish(1000)
    assert terminal.output() == ""
    assert not transfer.drew


def test_nothing_is_drawn_when_the_stream_is_not_a_terminal(tmp_path: Path) -> None:
    with (
        (tmp_path / "log").open("w") as stream,
        Transfer("saving step 7", 10**6, stream=stream, after=0.0) as transfer,
    ):
        _move(transfer, 10**6)
        transfer.finish(10**6)
    assert (tmp_path / "log").read_text() == ""
    assert not transfer.drew


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_variable_turns_bars_off(
    terminal: Terminal, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CKPTWISE_PROGRESS", value)
    with Transfer("saving step 7", 10**6, stream=terminal.stream, after=0.0) as transfer:
        _move(transfer, 10**6)
        transfer.finish(10**6)
    assert terminal.output() == ""


def test_set_progress_turns_bars_off(terminal: Terminal) -> None:
    set_progress(False)
    with Transfer("saving step 7", 10**6, stream=terminal.stream, after=0.0) as transfer:
        _move(transfer, 10**6)
        transfer.finish(10**6)
    assert terminal.output() == ""


def test_without_rich_a_long_transfer_prints_one_line_at_the_end(
    terminal: Terminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` now fails
    with Transfer("saving step 7", 10**6, stream=terminal.stream, after=0.0) as transfer:
        _move(transfer, 10**6)
        transfer.finish(10**6)
    lines = terminal.output().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"ckptwise: saving step 7: 1 MB in \d+\.\d s \(\d+ MB/s\)", lines[0])


def test_the_bar_is_removed_when_the_transfer_fails(terminal: Terminal) -> None:
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="disk on fire"),
        Transfer("saving step 7", 10**6, stream=terminal.stream, after=0.0) as transfer,
    ):
        _move(transfer, 10**6, steps=2)
        raise RuntimeError("disk on fire")
    assert transfer._bar is not None
    assert transfer._watcher is not None
    assert not transfer._watcher.is_alive()
    with Transfer("saving step 8", 10, stream=terminal.stream) as following:
        following.advance(5)  # the next save's bytes go to its own transfer only
    assert following.done == 5
    assert transfer.done == 10**6 // 2 * 2


def test_every_transfer_ends_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptwise")
    with Transfer("restoring step 3", 10**6, stream=io.StringIO(), log_every=0.05) as transfer:
        _move(transfer, 10**6)
        transfer.finish(10**6)
    messages = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"restoring step 3: 1 MB in \d+\.\d s \(\d+ MB/s\)", messages[-1])
    # a long one also says how far it got while it runs
    assert any(re.fullmatch(r"restoring step 3: \d+ MB of 1 MB after \d+ s", m) for m in messages)


def test_a_managers_save_logs_its_size_and_speed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ckptwise")
    with CheckpointManager(tmp_path, save=every(1), rng=False) as manager:
        manager.save(4, {"w": torch.ones(1 << 18)})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved step 4")]
    assert len(lines) == 1
    assert re.fullmatch(r"saved step 4: 1 MB in \d+\.\d s \(\d+ MB/s\)", lines[0])


def test_a_terminal_that_fails_never_fails_the_transfer(terminal: Terminal) -> None:
    os.close(terminal.master)  # the terminal went away: writing to it now fails
    terminal.master = os.open(os.devnull, os.O_RDONLY)  # so close() has something to close
    with Transfer("saving step 7", 10**6, stream=terminal.stream, after=0.0) as transfer:
        _move(transfer, 10**6)
        transfer.finish(10**6)
    assert transfer.done == 10**6


def test_saves_and_reads_count_every_byte_of_the_state(tmp_path: Path) -> None:
    from ckptwise.store import CheckpointStore, LocalBackend

    store = CheckpointStore(LocalBackend(tmp_path))
    tensors = {"a": torch.zeros(1000), "b": torch.ones(500), "a2": torch.zeros(1000)}
    total = sum(t.nbytes for t in tensors.values())
    for step in (1, 2):  # the second save writes nothing: every object is reused
        with Transfer("saving", total, show=False) as transfer:
            store.commit(step, tensors, progress=transfer.advance)
        assert transfer.done == total  # written, reused, or "a"'s object again (as "a2")
    with Transfer("restoring", show=False) as transfer:
        store.load_tensors(2, progress=transfer.advance)
    assert transfer.done == total


def test_metered_progress_hands_the_job_the_transfers_progress(tmp_path: Path) -> None:
    from ckptwise.store import open_store

    store = open_store(tmp_path)
    tensors = {"a": torch.zeros(1000), "b": torch.ones(500)}
    seen: list[int] = []

    def job(progress: Progress) -> CheckpointInfo:
        def count(nbytes: int) -> None:
            seen.append(nbytes)
            progress(nbytes)

        return store.commit(1, tensors, progress=count)

    info = metered_progress(job, "saving", "saved", 6000, show=False)()
    assert sum(seen) == sum(t.nbytes for t in tensors.values())
    assert info.new_bytes > 0
    # the older form still runs its job, which is handed no progress
    again = metered(lambda: store.commit(2, tensors), "saving", "saved", 6000, show=False)()
    assert again.step == 2
