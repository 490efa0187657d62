"""What a background save costs the training loop, measured from the loop's own step times.

An async save returns at once, but its copy and its hashing, encoding and writing share the
machine with training: the steps that run while it is in flight take longer. :class:`Felt`
compares each such step with the median of recent steps that ran with no save in flight and
charges the difference to the save, so ``overhead_budget`` sees what training really lost,
not only the time ``step()`` took to return.
"""

from __future__ import annotations

import statistics
from collections import deque

__all__ = ["Felt"]

#: how many quiet step times the baseline is the median of
WINDOW = 16


class Felt:
    """Times between ``step()`` calls, split into quiet ones and ones a save slowed down.

    The manager calls :meth:`left` when ``step()`` returns and :meth:`arrived` when the next
    one starts (with ``busy`` telling whether a save was in flight meanwhile); ``arrived``
    returns the seconds to add to the last save's cost. Until a few quiet steps are known
    nothing is charged (no baseline to compare with).
    """

    def __init__(self) -> None:
        self._quiet: deque[float] = deque(maxlen=WINDOW)
        self._left: float | None = None
        self._charging = False

    def saved(self) -> None:
        """A background save started: the steps until it is done are charged to it."""
        self._charging = True

    def left(self, now: float) -> None:
        """``step()`` returns to the training loop at ``now``."""
        self._left = now

    def arrived(self, now: float, *, busy: bool) -> float:
        """The loop calls ``step()`` again at ``now``; ``busy``: a save is still in flight.
        Returns what the step just run cost beyond a quiet one (0 when it was quiet)."""
        if self._left is None:
            return 0.0
        took = now - self._left
        self._left = None
        if not self._charging:
            self._quiet.append(took)
            return 0.0
        self._charging = busy  # the step after the save finished is the last one charged
        if len(self._quiet) < 3:
            return 0.0
        return max(0.0, took - statistics.median(self._quiet))
