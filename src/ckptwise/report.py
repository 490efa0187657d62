"""What a save or restore tells the person waiting for it.

On a terminal, a save or restore still running after :data:`REPORT_AFTER_SECONDS` shows a
progress bar on stderr (bytes, rate, time left; drawn with ``rich`` when it is installed,
otherwise one line at the end). Not on a terminal, nothing is drawn. Either way each one
ends with an INFO line on the ``ckptwise`` logger (what the ``Trainer``'s logs show), and a
long one logs its progress every :data:`LOG_EVERY_SECONDS`. ``CKPTWISE_PROGRESS=0`` or
:func:`set_progress` turns the bars off.

The code that moves the bytes is handed the transfer's :meth:`Transfer.advance` (the
store's ``progress=`` argument) and reports them through it, from any thread (the store's
writer threads included); nothing reaches a transfer it was not handed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Protocol, TypeVar

__all__ = [
    "ENV",
    "LOG_EVERY_SECONDS",
    "REPORT_AFTER_SECONDS",
    "Progress",
    "Transfer",
    "bars_wanted",
    "metered",
    "metered_progress",
    "set_progress",
]

log = logging.getLogger("ckptwise")

#: saves and restores shorter than this draw nothing on the terminal
REPORT_AFTER_SECONDS = 2.0
#: how often a long save or restore logs how far it got
LOG_EVERY_SECONDS = 30.0
#: the environment variable that turns the bars off (``0``, ``false``, ``no``, ``off``)
ENV = "CKPTWISE_PROGRESS"

#: What is told how many more bytes a save or restore has moved (from any thread).
Progress = Callable[[int], None]

_switch: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Turn progress bars on or off for this process; ``None``: as ``CKPTWISE_PROGRESS``
    says (on unless it is ``0``). Bars are only ever drawn on a terminal."""
    global _switch
    _switch = enabled


def bars_wanted(stream: IO[str]) -> bool:
    """Whether a progress bar may be drawn on ``stream``."""
    if _switch is False:
        return False
    if _switch is None and os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.0f} MB"


class _Bar(Protocol):
    def update(self, done: int, total: int | None) -> None: ...

    def stop(self) -> None: ...


class _RichBar:
    """A ``rich`` progress bar on ``stream``: description, bar, bytes, rate, time left."""

    def __init__(self, what: str, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("ckptwise: {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream, stderr=stream is sys.stderr),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(what, total=None)
        self._progress.start()

    def update(self, done: int, total: int | None) -> None:
        self._progress.update(self._task, completed=done, total=total if done else None)

    def stop(self) -> None:
        self._progress.stop()


class Transfer:
    """The bytes one save or restore moves, shown while it runs (see the module docstring).

    Use as a context manager; :meth:`advance` (handed to the code moving the bytes as its
    ``progress``) counts bytes, and :meth:`finish` says what was done. Leaving the block removes the bar even on an error.
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        show: bool = True,
        stream: IO[str] | None = None,
        after: float | None = None,
        log_every: float | None = None,
    ) -> None:
        """``after`` and ``log_every`` default to :data:`REPORT_AFTER_SECONDS` and
        :data:`LOG_EVERY_SECONDS` as they are when the transfer starts."""
        self.what = what
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.after = REPORT_AFTER_SECONDS if after is None else after
        self.log_every = LOG_EVERY_SECONDS if log_every is None else log_every
        self.started = time.perf_counter()
        self.drew = False
        self._show = show
        self._count = threading.Lock()
        self._stop = threading.Event()
        self._bar: _Bar | None = None
        self._watcher: threading.Thread | None = None
        self._end = ""

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as moved (from any thread)."""
        with self._count:
            self.done += nbytes

    @property
    def seconds(self) -> float:
        """Time since the transfer started."""
        return time.perf_counter() - self.started

    def __enter__(self) -> Transfer:
        self.started = time.perf_counter()
        wants_bar = self._show and bars_wanted(self.stream)
        if wants_bar or log.isEnabledFor(logging.INFO):
            self._watcher = threading.Thread(
                target=self._watch, args=(wants_bar,), name="ckptwise-progress", daemon=True
            )
            self._watcher.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        # what shows progress must never fail the save or restore it shows
        with contextlib.suppress(Exception):
            if self._bar is not None:
                self._bar.update(self.done, self.total)
                self._bar.stop()
        with contextlib.suppress(Exception):
            if self._end:  # below the bar, once it has stopped
                self.stream.write(self._end)
                self.stream.flush()

    def _watch(self, wants_bar: bool) -> None:
        """Draw the bar once the transfer has run ``after`` seconds; log every ``log_every``."""
        next_log = self.log_every
        tick = 0.1 if wants_bar else max(0.05, min(1.0, self.log_every / 4))
        while not self._stop.wait(tick):
            if wants_bar and self.seconds >= self.after:
                wants_bar = False
                try:
                    self._bar = _RichBar(self.what, self.stream)
                    self.drew = True
                except Exception:  # rich missing or unusable here: finish() prints a line
                    self._bar = None
            if self._bar is not None:
                try:
                    self._bar.update(self.done, self.total)
                except Exception:  # the terminal went away: stop drawing, keep logging
                    self._bar = None
            if self.seconds >= next_log:
                next_log += self.log_every
                total = f" of {_mb(self.total)}" if self.total else ""
                log.info("%s: %s%s after %.0f s", self.what, _mb(self.done), total, self.seconds)

    def finish(self, nbytes: int, done: str | None = None) -> None:
        """Report the end: ``nbytes`` moved; ``done`` names it (default: ``what``).

        Logged always; on a terminal, after a transfer that took ``after`` seconds, also
        printed below the bar (or instead of it, without ``rich``).
        """
        seconds = self.seconds
        rate = f"{nbytes / 1e6 / seconds:.0f} MB/s" if seconds > 0 else "-"
        line = f"{done or self.what}: {_mb(nbytes)} in {seconds:.1f} s ({rate})"
        log.info("%s", line)
        if self._show and seconds >= self.after and bars_wanted(self.stream):
            self._end = f"ckptwise: {line}\n"


class _Committed(Protocol):
    @property
    def new_bytes(self) -> int: ...


_T = TypeVar("_T", bound=_Committed)


def metered(
    job: Callable[[], _T], what: str, done: str, total: int, *, show: bool = True
) -> Callable[[], _T]:
    """``job`` (a commit returning its checkpoint) run inside a :class:`Transfer` of
    ``total`` bytes called ``what`` while it runs and ``done`` (with the new bytes it
    wrote) at the end.

    ``job`` is not handed the transfer's progress, so the bar shows no bytes until the
    end; :func:`metered_progress` hands it over."""
    return metered_progress(lambda _progress: job(), what, done, total, show=show)


def metered_progress(
    job: Callable[[Progress], _T], what: str, done: str, total: int, *, show: bool = True
) -> Callable[[], _T]:
    """:func:`metered`, with ``job`` called with the transfer's :class:`Progress`, to pass
    on as the commit's ``progress=``.

    >>> run = metered_progress(  # doctest: +SKIP
    ...     lambda progress: store.commit(step, tensors, progress=progress),
    ...     f"saving step {step}", f"saved step {step}", total,
    ... )
    """

    def run() -> _T:
        with Transfer(what, total, show=show) as transfer:
            info = job(transfer.advance)
            transfer.finish(info.new_bytes, done)
        return info

    return run
