"""One line on the terminal for a save or restore long enough for a person to wonder."""

from __future__ import annotations

import sys

__all__ = ["REPORT_AFTER_SECONDS", "report"]

#: saves and restores shorter than this are not reported on the terminal
REPORT_AFTER_SECONDS = 2.0


def report(what: str, step: int, nbytes: int, seconds: float) -> None:
    """Print bytes and MB/s of a long save or restore to stderr, when stderr is a terminal."""
    if seconds < REPORT_AFTER_SECONDS or not sys.stderr.isatty():
        return
    sys.stderr.write(
        f"ckptwise: {what} {step}: {nbytes / 1e6:.0f} MB in {seconds:.1f} s "
        f"({nbytes / 1e6 / seconds:.0f} MB/s)\n"
    )
