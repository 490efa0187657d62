"""Where bytes live: a local directory (with fsync) or any fsspec filesystem.

A backend speaks in ``/``-separated paths relative to the run's root and offers exactly what
the store needs: atomic whole-file writes, reads, listing, deletion and a durability barrier.
Errors from the underlying filesystem are wrapped in :class:`~ckptwise.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from ckptwise.errors import CheckpointNotFoundError, StorageError

__all__ = ["TMP_MARK", "Backend", "FsspecBackend", "LocalBackend", "open_backend"]

#: Infix of every temporary file name; anything carrying it is debris after a crash.
TMP_MARK = ".tmp-"

Buffer = bytes | bytearray | memoryview


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

    def list_files(self, prefix: str) -> list[str]:
        """Every file below the folder ``prefix`` (recursively), as root-relative paths."""
        ...

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""
        ...

    def free_bytes(self) -> int | None:
        """Free space where the run lives, or ``None`` when the backend cannot tell."""
        ...


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    name = f"{tail}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    return f"{head}/{name}" if head else name


class LocalBackend:
    """A directory on a local (or mounted) filesystem, written with fsync and rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, *path.split("/")) if path else self.root

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        final = self._abs(path)
        tmp = self._abs(_tmp_name(path))
        written = 0
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        written += n
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"could not write {final}: {exc}") from exc
        return written

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        for d in sorted(set(dirs)):
            try:
                fd = os.open(self._abs(d), os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(
                    f"could not open folder {self._abs(d)} to sync it: {exc}"
                ) from exc
            try:
                os.fsync(fd)
            except OSError as exc:
                raise StorageError(f"could not sync folder {self._abs(d)}: {exc}") from exc
            finally:
                os.close(fd)

    def read_bytes(self, path: str) -> bytes:
        try:
            with open(self._abs(path), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self._abs(path)} does not exist") from exc
        except OSError as exc:
            raise StorageError(f"could not read {self._abs(path)}: {exc}") from exc

    def read_into(self, path: str, buffer: memoryview) -> int:
        try:
            with open(self._abs(path), "rb", buffering=0) as f:
                total = 0
                view = buffer.cast("B")
                while total < len(view):
                    n = f.readinto(view[total:])
                    if not n:
                        break
                    total += n
                return total
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self._abs(path)} does not exist") from exc
        except OSError as exc:
            raise StorageError(f"could not read {self._abs(path)}: {exc}") from exc

    def size(self, path: str) -> int:
        try:
            return os.path.getsize(self._abs(path))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self._abs(path)} does not exist") from exc
        except OSError as exc:
            raise StorageError(f"could not stat {self._abs(path)}: {exc}") from exc

    def exists(self, path: str) -> bool:
        return os.path.isfile(self._abs(path))

    def list_files(self, prefix: str) -> list[str]:
        base = self._abs(prefix)
        out: list[str] = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            out.extend(f if rel == "." else f"{rel}/{f}" for f in files)
        return sorted(out)

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._abs(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"could not delete {self._abs(path)}: {exc}") from exc

    def free_bytes(self) -> int | None:
        path = self.root
        while not os.path.exists(path):
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        return shutil.disk_usage(path).free


class FsspecBackend:
    """Any fsspec filesystem (``s3://``, ``memory://``, ...).

    Object stores make a whole-file ``put`` atomic by themselves; for them a temporary name
    would only cost a copy, so files are written in place. ``sync`` is a no-op: a completed
    upload is durable.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ValueError, ImportError) as exc:
            raise StorageError(
                f"cannot open {url!r}: {exc}. For s3:// URLs install the extra: pip install ckptwise[s3]"
            ) from exc
        self.root = root.rstrip("/")
        self.url = url

    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    @contextlib.contextmanager
    def _wrap(self, action: str, path: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self.url}/{path} does not exist") from exc
        except Exception as exc:
            raise StorageError(f"could not {action} {self.url}/{path}: {exc}") from exc

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        data = b"".join(memoryview(c).cast("B") for c in chunks)
        with self._wrap("write", path):
            self.fs.pipe_file(self._abs(path), data)
        return len(data)

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        return None

    def read_bytes(self, path: str) -> bytes:
        with self._wrap("read", path):
            data: bytes = self.fs.cat_file(self._abs(path))
            return data

    def read_into(self, path: str, buffer: memoryview) -> int:
        data = self.read_bytes(path)
        view = buffer.cast("B")
        n = min(len(data), len(view))
        view[:n] = data[:n]
        return len(data)

    def size(self, path: str) -> int:
        with self._wrap("stat", path):
            return int(self.fs.size(self._abs(path)))

    def exists(self, path: str) -> bool:
        with self._wrap("stat", path):
            return bool(self.fs.isfile(self._abs(path)))

    def list_files(self, prefix: str) -> list[str]:
        base = self._abs(prefix)
        with self._wrap("list", prefix):
            if not self.fs.exists(base):
                return []
            found = self.fs.find(base)
        strip = self.root.lstrip("/")
        out = []
        for p in found:
            rel = p.lstrip("/")
            out.append(rel[len(strip) :].lstrip("/") if strip else rel)
        return sorted(out)

    def delete(self, path: str) -> None:
        with self._wrap("delete", path):
            if self.fs.exists(self._abs(path)):
                self.fs.rm_file(self._abs(path))

    def free_bytes(self) -> int | None:
        return None


def open_backend(root: str | os.PathLike[str], **storage_options: Any) -> Backend:
    """A :class:`LocalBackend` for plain paths and ``file://``, else an fsspec backend."""
    text = os.fspath(root)
    if text.startswith("file://"):
        return LocalBackend(text[len("file://") :])
    if "://" in text:
        return FsspecBackend(text, **storage_options)
    return LocalBackend(text)
