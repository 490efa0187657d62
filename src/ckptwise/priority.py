"""The CPU priority of ckptwise's background threads: below training's, so that hashing,
encoding, writing and uploading slow training as little as they can.

Linux schedules threads by their own nice value, and threads a thread starts inherit it.
The copy thread of an async save (:mod:`ckptwise.snapshot.copying`) is not lowered: an optimizer
step may be waiting for it.
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["BACKGROUND_NICE", "lower_thread_priority"]

#: niceness of the background writer and uploader threads
BACKGROUND_NICE = 10


def lower_thread_priority() -> None:
    """Give the calling thread (and the threads it starts) :data:`BACKGROUND_NICE`; a no-op
    where threads have no priority of their own."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
