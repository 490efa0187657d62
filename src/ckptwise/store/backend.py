"""The :class:`Backend` protocol: what the checkpoint store asks of the place bytes live.

A backend speaks in ``/``-separated paths relative to the run's root and offers exactly what
the store needs: atomic whole-file writes, reads, listing, deletion and a durability barrier,
plus the few calls a run written through a local cache answers (uploads, the lock's home),
which :class:`Direct` answers trivially for every backend that writes in place. The back ends
themselves live in :mod:`~ckptwise.store.local`, :mod:`~ckptwise.store.fsspec_backend` and
:mod:`~ckptwise.store.tiered`; :func:`~ckptwise.store.open.open_backend` picks one. Errors
from the underlying filesystem are wrapped in :class:`~ckptwise.errors.StorageError`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable
from datetime import timedelta
from typing import Literal, Protocol, Self

from ckptwise.errors import CheckpointError
from ckptwise.store.layout import TMP_MARK

__all__ = [
    "LOCAL",
    "REMOTE",
    "UPLOADING",
    "Backend",
    "Buffer",
    "Direct",
    "Sizes",
    "UploadState",
    "Vouch",
    "sizes_one_by_one",
    "tmp_name",
]

Buffer = bytes | bytearray | memoryview

#: A checkpoint's upload state: only in the cache, being uploaded, or durable remotely.
UploadState = Literal["local", "uploading", "remote"]
#: Each path's size, or the error asking for it raised (see :meth:`Backend.sizes`).
Sizes = dict[str, int | CheckpointError]
#: ``vouch(path, file)`` raises :class:`~ckptwise.errors.CorruptCheckpointError` when the
#: local ``file`` does not hold the object ``path`` names (see :meth:`Backend.start_uploads`).
Vouch = Callable[[str, str], None]
LOCAL: UploadState = "local"
UPLOADING: UploadState = "uploading"
REMOTE: UploadState = "remote"


class Backend(Protocol):
    """The storage operations the checkpoint store is built on."""

    url: str

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        """Write ``chunks`` to ``path`` so a reader sees either nothing or the whole file.

        With ``sync`` the data is durable before the file appears under its name; the new
        name itself becomes durable at the next :meth:`sync_dirs`. Returns the bytes written.
        """
        ...

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        """Make renames and deletions inside ``dirs`` durable."""
        ...

    def read_bytes(self, path: str) -> bytes:
        """The whole file; :class:`CheckpointNotFoundError` when it is missing."""
        ...

    def read_into(self, path: str, buffer: memoryview) -> int:
        """Fill ``buffer`` from the start of the file; returns the bytes read."""
        ...

    def size(self, path: str) -> int:
        """Size of the file in bytes."""
        ...

    def exists(self, path: str) -> bool:
        """Whether a file exists at ``path``."""
        ...

    def sizes(self, paths: Collection[str]) -> Sizes:
        """The size of each of ``paths`` where the run keeps it for good, or the error
        :meth:`size` would raise for it (:class:`CheckpointNotFoundError` when missing), in
        as few requests as the backend can: the reuse check of every save (see
        :mod:`~ckptwise.store.commit`). A run written through a cache asks the remote about
        every file already uploaded, and the cache about the others.

        Raises:
            StorageError: the backend could not be asked at all.
        """
        ...

    def list_files(self, prefix: str) -> list[str]:
        """Every file below the folder ``prefix`` (recursively), as root-relative paths."""
        ...

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""
        ...

    def free_bytes(self) -> int | None:
        """Free space where the run lives, or ``None`` when the backend cannot tell."""
        ...

    # -- what a run written through a local cache adds -------------------------------------

    def drop_cached(self, path: str) -> bool:
        """Stop reading ``path`` from a local cache in front of the store, so the next read
        fetches the copy kept for good; whether there was such a copy to fall back to.

        For a reader that found the cached copy damaged (it fails its checksum): with
        ``True`` it reads again. Backends without a cache (and a cached file not uploaded
        yet, the only copy) answer ``False``.
        """
        ...

    def upload_states(self) -> dict[int, UploadState] | None:
        """Each listed checkpoint's upload state, by step, for a run written through a
        cache; ``None`` for a backend that writes in place (nothing to report)."""
        ...

    def flush(self, timeout: timedelta | None = None) -> None:
        """Wait until everything written so far is where the run is kept for good."""
        ...

    def close(self) -> None:
        """Wait for every upload, then stop uploading; reads keep working. Safe twice."""
        ...

    def lock_backend(self) -> Backend:
        """The backend whose store holds the run's lock: this one, or a cached run's
        remote one (two machines must never both write one remote run)."""
        ...

    def start_uploads(
        self, *, fence: Callable[[], None] | None = None, vouch: Vouch | None = None
    ) -> None:
        """Start uploading in the background, under the run's lock (``fence`` checks it is
        still held; ``vouch`` checks each object's bytes before they leave the machine);
        nothing to do for a backend that writes in place."""
        ...

    def detach(self) -> None:
        """Finish and stop uploading, never raising: the run's lock is about to go."""
        ...

    def check_fence(self) -> bool:
        """Raise the :class:`~ckptwise.errors.RunLockedError` the uploader met if it found
        the lock taken over; whether the uploader checks the lock itself (then the lock's own
        check makes no network call on the save's path)."""
        ...


class Direct:
    """The cache calls of :class:`Backend` for a backend that writes in place: nothing is
    cached, uploaded or fenced, and the lock lives in this backend's own store."""

    def drop_cached(self, path: str) -> bool:
        return False

    def upload_states(self) -> dict[int, UploadState] | None:
        return None

    def flush(self, timeout: timedelta | None = None) -> None:
        return None

    def close(self) -> None:
        return None

    def lock_backend(self) -> Self:
        return self

    def start_uploads(
        self, *, fence: Callable[[], None] | None = None, vouch: Vouch | None = None
    ) -> None:
        return None

    def detach(self) -> None:
        return None

    def check_fence(self) -> bool:
        return False


class _Sized(Protocol):
    def size(self, path: str) -> int: ...


def sizes_one_by_one(backend: _Sized, paths: Collection[str]) -> Sizes:
    """:meth:`Backend.sizes` by one :meth:`~Backend.size` call per path: what a backend whose
    calls are cheap (a local disk) answers."""
    out: Sizes = {}
    for path in paths:
        try:
            out[path] = backend.size(path)
        except CheckpointError as exc:
            out[path] = exc
    return out


def tmp_name(path: str) -> str:
    """A fresh temporary name beside ``path``, marked as debris by :data:`TMP_MARK`."""
    head, _, tail = path.rpartition("/")
    name = f"{tail}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    return f"{head}/{name}" if head else name
