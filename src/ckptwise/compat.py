"""Names kept working for one release after they moved, each warning where it went.

Everything here is deleted in the next release; nothing new may call it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ckptwise.records import CheckpointInfo
from ckptwise.run import Run
from ckptwise.store import CheckpointStore

__all__ = ["ManagerReads"]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"CheckpointManager.{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )


class ManagerReads:
    """The manager's reads that moved to :class:`~ckptwise.run.Run` (``manager.run``)."""

    run: Run
    _store: CheckpointStore

    @property
    def store(self) -> CheckpointStore:
        """Deprecated: the store is private; read through ``manager.run``."""
        _deprecated("store", "manager.run (a ckptwise.Run) for listing, reading and verifying")
        return self._store

    def load(self, step: int | None = None) -> dict[str, Any]:
        """Deprecated: use ``manager.run.load(step)``."""
        _deprecated("load()", "manager.run.load()")
        return self.run.load(step)

    def export(
        self, step: int | None, out_dir: str | os.PathLike[str], *, key: str = "model"
    ) -> Path:
        """Deprecated: use ``manager.run.export(step, out_dir)``."""
        _deprecated("export()", "manager.run.export()")
        return self.run.export(step, out_dir, key=key)

    def archive(
        self,
        step: int | None,
        out: str | os.PathLike[str],
        *,
        lossy: tuple[str, ...] = ("optimizer/",),
        codec: str = "bytegroup",
    ) -> CheckpointInfo:
        """Deprecated: use ``manager.run.archive(step, out)``."""
        _deprecated("archive()", "manager.run.archive()")
        return self.run.archive(step, out, lossy=lossy, codec=codec)
