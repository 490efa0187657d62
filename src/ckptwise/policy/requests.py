"""Triggers for saves requested from outside: a POSIX signal or a file in the run folder.

The triggers only look for a :class:`~ckptwise.policy.state.Request` in
``TrainingState.requests``; the manager's monitor (:mod:`ckptwise.decide.monitor`) installs the signal
handlers and looks for the file, and turns what it sees into those requests. A decision lists
the requests it answers in ``Decision.requests``, so the manager knows what to forget (and
which request files to remove) once the save has committed.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ckptwise.errors import ConfigError
from ckptwise.policy.base import TriggerOps
from ckptwise.policy.state import Decision, Request, TrainingState

__all__ = ["OnFile", "OnSignal", "on_file", "on_signal"]

Then = Literal["exit", "continue"]


@dataclass(frozen=True)
class OnSignal(TriggerOps):
    """Fires at the first step boundary after one of ``signals`` arrived.

    With ``then="exit"`` the manager, once that save has committed, raises
    ``SystemExit(0)`` from ``step()`` so ``finally`` blocks and context managers run; with
    ``"continue"`` training goes on.
    """

    signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    then: Then = "exit"

    def __post_init__(self) -> None:
        if not self.signals:
            raise ConfigError("on_signal needs at least one signal name, e.g. ('SIGTERM',)")
        canonical = []
        for name in self.signals:
            if not isinstance(name, str) or name not in signal.Signals.__members__:
                raise ConfigError(
                    f"on_signal got {name!r}, which is not a signal of this platform; use "
                    "names such as 'SIGTERM' or 'SIGUSR1'"
                )
            if name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"on_signal cannot catch {name}: no process can")
            # aliases (SIGIOT, SIGCLD) become the name the monitor reports (SIGABRT, SIGCHLD)
            canonical.append(signal.Signals[name].name)
        object.__setattr__(self, "signals", tuple(dict.fromkeys(canonical)))
        if self.then not in ("exit", "continue"):
            raise ConfigError(f"on_signal(then=) must be 'exit' or 'continue', got {self.then!r}")

    def decide(self, state: TrainingState) -> Decision:
        mine = (Request("signal", name) for name in self.signals)
        received = [r for r in mine if r in state.requests]
        if not received:
            return Decision.no()
        # one reason (the first of this trigger's own signals), but the save answers them all
        return Decision.yes(f"on_signal({received[0].name})", requests=received)


def on_signal(
    signals: Iterable[str] | str = ("SIGTERM", "SIGUSR1"), *, then: Then = "exit"
) -> OnSignal:
    """Save when the process receives a signal (a scheduler's preemption notice, say)."""
    names = (signals,) if isinstance(signals, str) else tuple(signals)
    return OnSignal(names, then)


@dataclass(frozen=True)
class OnFile(TriggerOps):
    """Fires when the file ``RUN/name`` exists; the manager removes it once the save
    committed, so ``touch RUN/SAVE_NOW`` asks for exactly one save."""

    name: str = "SAVE_NOW"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or "/" in self.name
            or "\\" in self.name
            or self.name.startswith(".")
        ):
            raise ConfigError(
                f"on_file needs a plain file name inside the run folder, e.g. 'SAVE_NOW'; "
                f"got {self.name!r}"
            )

    def decide(self, state: TrainingState) -> Decision:
        request = Request("file", self.name)
        if request in state.requests:
            return Decision.yes(f"on_file({self.name})", requests=(request,))
        return Decision.no()


def on_file(name: str = "SAVE_NOW") -> OnFile:
    """Save when someone creates ``RUN/name`` (``touch runs/exp1/SAVE_NOW``)."""
    return OnFile(name)
