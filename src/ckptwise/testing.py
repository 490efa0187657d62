"""Test doubles for code that uses ckptwise: a controllable clock.

An in-memory store needs no double: ``CheckpointManager("memory://name", ...)`` runs on
fsspec's memory filesystem.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that only moves when told to; pass it as ``CheckpointManager(clock=...)``.

    >>> clock = FakeClock()
    >>> clock.advance(timedelta(minutes=5))
    >>> clock().minute
    5
    """

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start if start is not None else datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta``."""
        self.now += delta
