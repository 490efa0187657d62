"""The monitor: real signals sent to this process and real request files, turned into
:class:`~ckptwise.policy.Request` values."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Literal

import pytest

import ckptwise as cw
import ckptwise.decide.monitor
from ckptwise.decide.monitor import Monitor
from ckptwise.errors import StorageError
from ckptwise.policy import Decision, Request, TrainingState, Trigger, walk
from ckptwise.store import FsspecBackend, LocalBackend, RequestFiles

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SIGUSR1 = Request("signal", "SIGUSR1")
SIGUSR2 = Request("signal", "SIGUSR2")
SAVE_NOW = Request("file", "SAVE_NOW")


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def monitors() -> Iterator[list[Monitor]]:
    """Monitors to close after the test, whatever it asserted."""
    opened: list[Monitor] = []
    yield opened
    for monitor in opened:
        monitor.close()


def watch(monitors: list[Monitor], root: Path, save: Trigger) -> Monitor:
    monitor = Monitor(RequestFiles(LocalBackend(root)), walk(save))
    monitors.append(monitor)
    return monitor


def test_a_signal_becomes_a_request_until_it_is_consumed(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    monitor = watch(monitors, tmp_path, cw.every(100) | cw.on_signal("SIGUSR1"))
    assert monitor.poll() == frozenset()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert monitor.poll() == {SIGUSR1}
    assert monitor.poll() == {SIGUSR1}  # polling does not consume
    monitor.consume([SIGUSR1])
    assert monitor.poll() == frozenset()


def test_only_the_signals_of_the_triggers_are_watched(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    seen: list[int] = []

    def earlier(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGUSR2, earlier)
    monitor = watch(monitors, tmp_path, cw.on_signal("SIGUSR1"))
    os.kill(os.getpid(), signal.SIGUSR2)
    assert seen == [signal.SIGUSR2]
    assert monitor.poll() == frozenset()


def test_the_previous_handler_is_chained_and_put_back(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    seen: list[int] = []

    def earlier(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGUSR1, earlier)
    before_usr2 = signal.getsignal(signal.SIGUSR2)
    monitor = watch(monitors, tmp_path, cw.on_signal(["SIGUSR1", "SIGUSR2"]))
    assert signal.getsignal(signal.SIGUSR1) is not earlier
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR2)
    assert seen == [signal.SIGUSR1]
    assert monitor.poll() == {SIGUSR1, SIGUSR2}
    monitor.consume([SIGUSR2])  # a save that answered one of them
    assert monitor.poll() == {SIGUSR1}
    monitor.close()
    assert signal.getsignal(signal.SIGUSR1) is earlier
    assert signal.getsignal(signal.SIGUSR2) is before_usr2


def test_a_request_file_is_a_request_and_consuming_it_removes_it(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    monitor = watch(monitors, tmp_path, cw.every(10) | cw.on_file())
    assert monitor.poll() == frozenset()
    (tmp_path / "SAVE_NOW").touch()
    assert monitor.poll() == {SAVE_NOW}
    monitor.consume([])  # a save that answered nothing leaves it
    assert (tmp_path / "SAVE_NOW").exists()
    monitor.consume([SAVE_NOW])
    assert not (tmp_path / "SAVE_NOW").exists()
    assert monitor.poll() == frozenset()


def test_files_no_trigger_names_are_neither_reported_nor_removed(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    monitor = watch(monitors, tmp_path, cw.on_file("STOP"))
    (tmp_path / "SAVE_NOW").touch()
    assert monitor.poll() == frozenset()
    monitor.consume([SAVE_NOW])
    assert (tmp_path / "SAVE_NOW").exists()


def test_a_monitor_without_request_triggers_installs_nothing(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    monitor = watch(monitors, tmp_path, cw.every(10))
    assert (monitor.signals, monitor.files) == ([], [])
    assert signal.getsignal(signal.SIGUSR1) is before
    (tmp_path / "SAVE_NOW").touch()
    assert monitor.poll() == frozenset()


@pytest.mark.parametrize(
    ("then", "decision", "exits"),
    [
        ("exit", Decision.yes("on_signal(SIGUSR1)", requests=[SIGUSR1]), True),
        ("continue", Decision.yes("on_signal(SIGUSR1)", requests=[SIGUSR1]), False),
        ("exit", Decision(True, ("every(10)", "on_signal(SIGUSR1)"), frozenset({SIGUSR1})), True),
        # the reason alone does not count: the decision must answer the signal
        ("exit", Decision.yes("on_signal(SIGUSR1)"), False),
        ("exit", Decision.yes("every(10)"), False),
        ("exit", Decision.yes("on_file(SAVE_NOW)", requests=[SAVE_NOW]), False),
        ("exit", Decision.yes("on_signal(SIGUSR2)", requests=[SIGUSR2]), False),
        ("exit", Decision.no(), False),
    ],
)
def test_wants_exit(
    tmp_path: Path,
    monitors: list[Monitor],
    then: Literal["exit", "continue"],
    decision: Decision,
    exits: bool,
) -> None:
    save = cw.on_signal("SIGUSR1", then=then) | cw.on_file()
    assert watch(monitors, tmp_path, save).wants_exit(decision) is exits


def test_wants_exit_with_one_exit_and_one_continue_trigger(
    tmp_path: Path, monitors: list[Monitor]
) -> None:
    save = cw.on_signal("SIGUSR1", then="continue") | cw.on_signal("SIGUSR2")
    monitor = watch(monitors, tmp_path, save)
    os.kill(os.getpid(), signal.SIGUSR1)
    decision = save.decide(TrainingState(step=1, now=NOW, requests=monitor.poll()))
    assert decision.requests == {SIGUSR1}
    assert not monitor.wants_exit(decision)
    os.kill(os.getpid(), signal.SIGUSR2)
    decision = save.decide(TrainingState(step=2, now=NOW, requests=monitor.poll()))
    assert decision.requests == {SIGUSR1, SIGUSR2}
    assert monitor.wants_exit(decision)


def test_a_remote_store_is_asked_for_the_file_at_most_every_few_seconds(
    tmp_path: Path, monitors: list[Monitor], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FsspecBackend(f"memory://{tmp_path.name}/run")
    monitor = Monitor(RequestFiles(backend), walk(cw.on_file()))
    monitors.append(monitor)
    assert monitor.poll() == frozenset()
    backend.write_atomic("SAVE_NOW", [b""])
    assert monitor.poll() == frozenset()  # asked a moment ago
    monkeypatch.setattr(ckptwise.decide.monitor, "REMOTE_POLL_SECONDS", 0.0)
    assert monitor.poll() == {SAVE_NOW}
    monitor.consume([SAVE_NOW])
    assert not backend.exists("SAVE_NOW")


class _Unreachable:
    """A store whose every look-up fails, as a remote store does when the network is down."""

    remote = False

    def request_exists(self, name: str) -> bool:
        raise StorageError(f"cannot reach {name}")

    def remove_request(self, name: str) -> None:
        raise StorageError(f"cannot reach {name}")


def test_a_store_that_cannot_be_asked_is_logged_not_raised(
    monitors: list[Monitor], caplog: pytest.LogCaptureFixture
) -> None:
    monitor = Monitor(_Unreachable(), walk(cw.on_file()))
    monitors.append(monitor)
    assert monitor.poll() == frozenset()
    assert "could not look for the request file SAVE_NOW" in caplog.text
    monitor.consume([SAVE_NOW])  # nothing to remove, and nothing raised
