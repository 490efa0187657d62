"""Resident memory of this process, now and at its peak over a block, for the benchmarks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(period: float = 0.02) -> Iterator[list[int]]:
    """Samples the resident size every ``period`` seconds on a thread; the yielded list
    holds the peak, final once the block ends."""
    peak = [rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(period):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], rss())
