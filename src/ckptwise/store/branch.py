"""A read-only view of a run's branch: the checkpoints a rollback set aside.

When training goes back to an earlier step, the writer moves the manifests of the later
steps from ``checkpoints/`` to ``branches/NAME/`` (their objects stay where they are, shared
with the rest of the run). :class:`BranchBackend` shows such a branch to the ordinary read
path as if its manifests were a run's own ``checkpoints/``, so listing, verifying, loading and
restoring a branch need no code of their own; every write through it is refused.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from ckptwise.errors import ConfigError, StorageError
from ckptwise.store.backend import Backend, Buffer, Direct, Sizes
from ckptwise.store.layout import BRANCHES, CHECKPOINTS

__all__ = ["BranchBackend", "check_branch_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_branch_name(name: str) -> str:
    """``name`` if it can name a branch folder (letters, digits, ``._-``), else ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{name!r} is not a branch name: use letters, digits, '.', '_' and '-' "
            "(see Run.branches() for the run's branches)"
        )
    return name


class BranchBackend(Direct):
    """``backend`` with ``checkpoints/`` read from ``branches/NAME/``; writes are refused."""

    def __init__(self, backend: Backend, name: str) -> None:
        self.inner = backend
        self.folder = f"{BRANCHES}/{check_branch_name(name)}"
        self.url = f"{backend.url} (branch {name})"

    def _map(self, path: str) -> str:
        if path == CHECKPOINTS or path.startswith(CHECKPOINTS + "/"):
            return self.folder + path[len(CHECKPOINTS) :]
        return path

    def _unmap(self, path: str) -> str:
        if path == self.folder or path.startswith(self.folder + "/"):
            return CHECKPOINTS + path[len(self.folder) :]
        return path

    def _refuse(self, path: str) -> StorageError:
        return StorageError(
            f"{self.url} is read-only (a branch of abandoned checkpoints); could not write "
            f"{path}. Restore from it, then save through a CheckpointManager on the run"
        )

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        raise self._refuse(path)

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        return None

    def read_bytes(self, path: str) -> bytes:
        return self.inner.read_bytes(self._map(path))

    def read_into(self, path: str, buffer: memoryview) -> int:
        return self.inner.read_into(self._map(path), buffer)

    def size(self, path: str) -> int:
        return self.inner.size(self._map(path))

    def exists(self, path: str) -> bool:
        return self.inner.exists(self._map(path))

    def sizes(self, paths: Collection[str]) -> Sizes:
        mapped = {self._map(p): p for p in paths}
        return {mapped[p]: size for p, size in self.inner.sizes(mapped).items()}

    def list_files(self, prefix: str) -> list[str]:
        return sorted(self._unmap(p) for p in self.inner.list_files(self._map(prefix)))

    def delete(self, path: str) -> None:
        raise self._refuse(path)

    def free_bytes(self) -> int | None:
        return None

    def drop_cached(self, path: str) -> bool:
        return self.inner.drop_cached(self._map(path))
