"""What the commands share: opening a run for reading, and printing sizes."""

from __future__ import annotations

import click

from ckptwise.errors import CheckpointError
from ckptwise.run import Run, open_run

__all__ = ["human_size", "open_cli_run"]


def human_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at or above 1."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def open_cli_run(run: str) -> Run:
    """The run at ``run`` for reading; a usage error when the folder holds no run."""
    try:
        opened = open_run(run)
        if not opened.exists():
            raise click.ClickException(
                f"{run} holds no ckptwise run (no checkpoints/ or objects/ in it); "
                "pass the folder given to CheckpointManager"
            )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    return opened
