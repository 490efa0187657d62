"""What the commands share: opening a run read-only, and printing sizes."""

from __future__ import annotations

import click

from ckptwise.errors import CheckpointError
from ckptwise.manager import CheckpointManager

__all__ = ["human_size", "open_run"]


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def open_run(run: str) -> CheckpointManager:
    try:
        manager = CheckpointManager(run)
        if not manager.store.backend.list_files(""):
            raise click.ClickException(
                f"{run} holds no ckptwise run (no checkpoints/ or objects/ in it); "
                "pass the folder given to CheckpointManager"
            )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    return manager
