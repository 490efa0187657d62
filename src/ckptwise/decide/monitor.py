"""Turns outside events into save requests: POSIX signals and a file in the run folder.

The signal handler only records the signal's name (and chains to a Python handler that was
installed before); everything else happens at the next step boundary, on the training
thread, as :class:`~ckptwise.policy.Request` values that the ``on_signal``/``on_file``
triggers look for.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, Protocol

from ckptwise.errors import StorageError
from ckptwise.policy.base import Trigger
from ckptwise.policy.requests import OnFile, OnSignal
from ckptwise.policy.state import Decision, Request

__all__ = ["Monitor", "Watched"]

log = logging.getLogger("ckptwise")

#: Remote stores are asked whether the request file exists at most this often (seconds).
REMOTE_POLL_SECONDS = 5.0

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Watched(Protocol):
    """The run folder whose request files a :class:`Monitor` watches: a
    :class:`~ckptwise.store.CheckpointStore`, or :class:`~ckptwise.store.RequestFiles`."""

    @property
    def remote(self) -> bool:
        """Whether each look costs a network call (then it is made at most every
        :data:`REMOTE_POLL_SECONDS`)."""
        ...

    def request_exists(self, name: str) -> bool:
        """Whether the request file ``name`` is there."""
        ...

    def remove_request(self, name: str) -> None:
        """Remove the request file ``name``."""
        ...


class Monitor:
    """Watches for the signals and files named by the ``on_signal``/``on_file`` triggers.

    Request files are looked for in ``run``. With ``files=False`` (the ranks but rank 0 of a
    multi-process job, which share rank 0's run folder) only signals are watched.
    """

    def __init__(self, run: Watched, triggers: Iterable[Trigger], *, files: bool = True) -> None:
        self.run = run
        leaves = list(triggers)
        self.signals = sorted({n for t in leaves if isinstance(t, OnSignal) for n in t.signals})
        self.exit_on = sorted(
            {n for t in leaves if isinstance(t, OnSignal) and t.then == "exit" for n in t.signals}
        )
        self.files = sorted({t.name for t in leaves if isinstance(t, OnFile)}) if files else []
        self._received: set[Request] = set()
        self._previous: dict[int, Handler] = {}
        self._last_poll = -float("inf")
        self._remote = run.remote
        if self.signals:
            self._install()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "on_signal(%s) is not active: signal handlers can only be installed from the "
                "main thread; create the CheckpointManager there",
                ", ".join(self.signals),
            )
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received.add(Request("signal", signal.Signals(signum).name))
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def poll(self) -> frozenset[Request]:
        """The requests that are pending now."""
        requests = set(self._received)
        if self.files:
            now = time.monotonic()
            if not self._remote or now - self._last_poll >= REMOTE_POLL_SECONDS:
                self._last_poll = now
                for name in self.files:
                    try:
                        if self.run.request_exists(name):
                            requests.add(Request("file", name))
                    except StorageError as exc:
                        log.warning("could not look for the request file %s: %s", name, exc)
        return frozenset(requests)

    def consume(self, requests: Iterable[Request]) -> None:
        """Forget requests a committed save answered; remove their request files."""
        for request in requests:
            self._received.discard(request)
            if request.kind == "file" and request.name in self.files:
                with contextlib.suppress(StorageError):
                    self.run.remove_request(request.name)

    def wants_exit(self, decision: Decision) -> bool:
        """Whether the save made for ``decision`` should end the process: it answers a signal
        that an ``on_signal(then="exit")`` trigger watches."""
        return any(r.kind == "signal" and r.name in self.exit_on for r in decision.requests)

    def close(self) -> None:
        """Put back the signal handlers that were installed before."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
