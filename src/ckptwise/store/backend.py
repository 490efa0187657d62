"""Where bytes live: a local directory (with fsync) or any fsspec filesystem.

A backend speaks in ``/``-separated paths relative to the run's root and offers exactly what
the store needs: atomic whole-file writes, reads, listing, deletion and a durability barrier.
Errors from the underlying filesystem are wrapped in :class:`~ckptwise.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

from ckptwise.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    StorageError,
)
from ckptwise.store.retry import DEFAULT_RETRY, RetryPolicy, retrying

__all__ = [
    "TMP_MARK",
    "Backend",
    "FsspecBackend",
    "LocalBackend",
    "drop_cached",
    "open_backend",
]

#: Infix of every temporary file name; anything carrying it is debris after a crash.
TMP_MARK = ".tmp-"

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


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


def drop_cached(backend: Backend, path: str) -> bool:
    """Stop reading ``path`` from a local cache in front of ``backend``, so the next read
    fetches the copy kept for good; whether there was such a copy to fall back to.

    For a reader that found the cached copy damaged (it fails its checksum): with ``True`` it
    reads again. Backends without a cache (and a cached file not uploaded yet, the only
    copy) answer ``False``.
    """
    drop = getattr(backend, "drop_cached", None)
    return bool(drop(path)) if callable(drop) else False


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    name = f"{tail}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    return f"{head}/{name}" if head else name


_FOLLOWS_NO_LINK = os.O_NOFOLLOW | os.O_CLOEXEC
#: Folders nested deeper than this below a listed folder are listed as names, not entered
#: (a run's own folders are at most two deep).
_DEEPEST = 16
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | _FOLLOWS_NO_LINK


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


class LocalBackend:
    """A directory on a local (or mounted) filesystem, written with fsync and rename.

    The root may be a symbolic link; nothing inside it is followed: every path is walked
    from the root one folder at a time without following links, and files are opened with
    ``O_NOFOLLOW``. Reading what is not a regular file (a link, FIFO, device or folder)
    raises :class:`~ckptwise.errors.CorruptCheckpointError` at once, without opening it for
    reading; writing over it, deleting it or listing through a linked folder raises
    :class:`~ckptwise.errors.StorageError`. Nothing outside the root is read, written or
    deleted.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, *path.split("/")) if path else self.root

    def _linked(self, path: str, what: str, action: str, *, expected: str) -> StorageError:
        return StorageError(
            f"could not {action} {self._abs(path)}: it is {what} where {expected} belongs. A "
            "run holds only regular files and folders, and ckptwise never follows a link out "
            "of it: remove it (or replace a link by a real copy of what it points to)"
        )

    def _folder(self, parts: list[str], *, create: bool, action: str) -> int:
        """An open descriptor of the folder ``parts`` (root-relative), reached without
        following a link below the root; created when missing with ``create``."""
        if create:
            os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, name in enumerate(parts):
                try:
                    inner = os.open(name, _FOLDER, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                    inner = self._open_folder(fd, parts[: i + 1], action)
                except OSError as exc:
                    problem = self._not_a_folder(fd, parts[: i + 1], action)
                    if problem is None:
                        raise
                    raise problem from exc
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_folder(self, parent: int, parts: list[str], action: str) -> int:
        try:
            return os.open(parts[-1], _FOLDER, dir_fd=parent)
        except OSError as exc:
            problem = self._not_a_folder(parent, parts, action)
            if problem is None:
                raise
            raise problem from exc

    def _not_a_folder(self, parent: int, parts: list[str], action: str) -> StorageError | None:
        """The error for ``parts`` failing to open as a folder if it is no folder at all."""
        try:
            mode = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode):
            return None
        return self._linked("/".join(parts), _kind(mode), action, expected="a folder")

    def _parent(self, path: str, *, create: bool, action: str) -> tuple[int, str]:
        """The open folder holding ``path``, and the file's name in it."""
        *parts, name = path.split("/")
        return self._folder(parts, create=create, action=action), name

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        tmp = _tmp_name(path).rsplit("/", 1)[-1]
        written = 0
        try:
            fd_dir, name = self._parent(path, create=True, action="write")
            try:
                with contextlib.suppress(FileNotFoundError):
                    mode = os.stat(name, dir_fd=fd_dir, follow_symlinks=False).st_mode
                    if not stat.S_ISREG(mode):
                        raise self._linked(path, _kind(mode), "write", expected="a file")
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FOLLOWS_NO_LINK
                fd = os.open(tmp, flags, 0o644, dir_fd=fd_dir)
                try:
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
                    # rename replaces the name itself, never what a link there points to
                    os.rename(tmp, name, src_dir_fd=fd_dir, dst_dir_fd=fd_dir)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=fd_dir)
                    raise
            finally:
                os.close(fd_dir)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"could not write {self._abs(path)}: {exc}") from exc
        return written

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        for d in sorted(set(dirs)):
            try:
                fd = self._folder(d.split("/") if d else [], create=False, action="sync")
            except FileNotFoundError:
                continue
            except StorageError:
                raise
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

    @contextlib.contextmanager
    def _reading(self, path: str) -> Iterator[int]:
        """An open descriptor of the regular file ``path``, reached and opened without
        following a link and without blocking on a FIFO."""
        try:
            fd_dir, name = self._parent(path, create=False, action="read")
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self._abs(path)} does not exist") from exc
        except StorageError as exc:
            raise CorruptCheckpointError(str(exc)) from exc
        except OSError as exc:
            raise StorageError(f"could not read {self._abs(path)}: {exc}") from exc
        try:
            try:
                mode = os.stat(name, dir_fd=fd_dir, follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    raise self._not_a_file(path, mode)
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _FOLLOWS_NO_LINK, dir_fd=fd_dir)
            except FileNotFoundError as exc:
                raise CheckpointNotFoundError(f"{self._abs(path)} does not exist") from exc
            except OSError as exc:
                raise StorageError(f"could not read {self._abs(path)}: {exc}") from exc
        finally:
            os.close(fd_dir)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # swapped in since the check above
                raise self._not_a_file(path, mode)
            yield fd
        except OSError as exc:
            raise StorageError(f"could not read {self._abs(path)}: {exc}") from exc
        finally:
            os.close(fd)

    def _not_a_file(self, path: str, mode: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self._abs(path)} is {_kind(mode)}, not a regular file: a run holds only regular "
            "files, and ckptwise neither follows links nor reads FIFOs or devices. Remove it"
        )

    def read_bytes(self, path: str) -> bytes:
        with self._reading(path) as fd:
            size = os.fstat(fd).st_size
            buffer = bytearray(size)
            n = _fill(fd, memoryview(buffer))
            return bytes(buffer[:n]) if n < size else bytes(buffer)

    def read_into(self, path: str, buffer: memoryview) -> int:
        with self._reading(path) as fd:
            return _fill(fd, buffer.cast("B"))

    def size(self, path: str) -> int:
        with self._reading(path) as fd:
            return os.fstat(fd).st_size

    def exists(self, path: str) -> bool:
        try:
            fd_dir, name = self._parent(path, create=False, action="read")
        except (OSError, StorageError):
            return False
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=fd_dir, follow_symlinks=False).st_mode)
        except OSError:
            return False
        finally:
            os.close(fd_dir)

    def list_files(self, prefix: str) -> list[str]:
        """Every name below ``prefix`` that is not a folder (links, FIFOs... included, never
        followed); :class:`StorageError` when ``prefix`` itself is reached through a link."""
        parts = prefix.split("/") if prefix else []
        try:
            fd = self._folder(parts, create=False, action="list")
        except FileNotFoundError:
            return []
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"could not list {self._abs(prefix)}: {exc}") from exc
        out: list[str] = []
        try:
            self._walk(fd, prefix, out)
        except OSError as exc:
            raise StorageError(f"could not list {self._abs(prefix)}: {exc}") from exc
        finally:
            os.close(fd)
        return sorted(out)

    def _walk(self, fd: int, prefix: str, out: list[str], depth: int = 0) -> None:
        with os.scandir(fd) as entries:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in found:
            rel = f"{prefix}/{name}" if prefix else name
            if not is_dir or depth >= _DEEPEST:
                out.append(rel)
                continue
            try:
                inner = os.open(name, _FOLDER, dir_fd=fd)
            except FileNotFoundError:
                continue  # removed since it was listed
            except OSError:
                out.append(rel)  # replaced by a link or file since: list it, never follow
                continue
            try:
                self._walk(inner, rel, out, depth + 1)
            finally:
                os.close(inner)

    def delete(self, path: str) -> None:
        try:
            fd_dir, name = self._parent(path, create=False, action="delete")
        except FileNotFoundError:
            return
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"could not delete {self._abs(path)}: {exc}") from exc
        try:
            mode = os.stat(name, dir_fd=fd_dir, follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                raise self._linked(path, _kind(mode), "delete", expected="a file")
            os.unlink(name, dir_fd=fd_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"could not delete {self._abs(path)}: {exc}") from exc
        finally:
            os.close(fd_dir)

    def free_bytes(self) -> int | None:
        path = self.root
        while not os.path.exists(path):
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        return shutil.disk_usage(path).free


def _fill(fd: int, view: memoryview) -> int:
    """Read from ``fd`` until ``view`` is full or the file ends; the bytes read."""
    total = 0
    while total < len(view):
        n = os.readv(fd, [view[total:]])
        if not n:
            break
        total += n
    return total


class FsspecBackend:
    """Any fsspec filesystem (``s3://``, ``memory://``, ...).

    Object stores make a whole-file ``put`` atomic by themselves; for them a temporary name
    would only cost a copy, so files are written in place. ``sync`` is a no-op: a completed
    upload is durable.

    Every call is repeated on transient errors (throttling, 5xx, lost connections) as
    ``retry`` says (see :mod:`~ckptwise.store.retry`); other errors are raised at once.
    ``storage_options`` go to fsspec and appear in no message.
    """

    def __init__(
        self, url: str, *, retry: RetryPolicy = DEFAULT_RETRY, **storage_options: Any
    ) -> None:
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ValueError, ImportError) as exc:
            raise StorageError(
                f"cannot open {url!r}: {exc}. For s3:// URLs install the extra: pip install ckptwise[s3]"
            ) from exc
        self.root = root.rstrip("/")
        self.url = url
        self.retry = retry

    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def _fresh(self, path: str) -> str:
        """The absolute path, with fsspec's listing cache for it dropped: another process
        (a writer, ``ckptwise pin``) may have created or deleted the file since this
        process last listed its folder, and s3fs answers ``info`` from that listing."""
        full = self._abs(path)
        self.fs.invalidate_cache(full)
        return full

    def _call(self, action: str, path: str, call: Callable[[], T]) -> T:
        """``call()`` with retries, its errors wrapped: a missing file is
        :class:`CheckpointNotFoundError`, any other failure :class:`StorageError`."""
        where = f"{self.url}/{path}"
        try:
            return retrying(call, policy=self.retry, action=action, where=where)
        except (StorageError, CheckpointNotFoundError):
            raise
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{where} does not exist") from exc
        except Exception as exc:
            raise StorageError(f"could not {action} {where}: {exc}") from exc

    def write_atomic(self, path: str, chunks: Iterable[Buffer], *, sync: bool = True) -> int:
        data = b"".join(memoryview(c).cast("B") for c in chunks)
        self._call("write", path, lambda: self.fs.pipe_file(self._abs(path), data))
        return len(data)

    def put_file(self, path: str, local: str) -> None:
        """Upload the local file ``local`` to ``path``, streamed from disk (s3fs sends a
        large file in parts and shows it only once every part arrived)."""
        self._call("upload", path, lambda: self.fs.put_file(local, self._abs(path)))

    def sync_dirs(self, dirs: Iterable[str]) -> None:
        return None

    def read_bytes(self, path: str) -> bytes:
        def read() -> bytes:
            data: bytes = self.fs.cat_file(self._fresh(path))
            return data

        return self._call("read", path, read)

    def read_into(self, path: str, buffer: memoryview) -> int:
        view = buffer.cast("B")

        def read() -> bytes:
            # a ranged read: never more than the buffer holds, whatever the file's size
            full = self._fresh(path)
            if not view:
                self.fs.info(full)  # still not found when missing
                return b""
            data: bytes = self.fs.cat_file(full, start=0, end=len(view))
            return data

        data = self._call("read", path, read)
        n = min(len(data), len(view))
        view[:n] = data[:n]
        return n

    def size(self, path: str) -> int:
        info: dict[str, Any] = self._call("stat", path, lambda: self.fs.info(self._fresh(path)))
        if info.get("type") != "file":
            raise CorruptCheckpointError(
                f"{self.url}/{path} is a {info.get('type')}, not a file; remove it"
            )
        return int(info.get("size") or 0)

    def exists(self, path: str) -> bool:
        return self._call("stat", path, lambda: bool(self.fs.isfile(self._fresh(path))))

    def list_files(self, prefix: str) -> list[str]:
        def find() -> list[str]:
            base = self._fresh(prefix)
            if not self.fs.exists(base):
                return []
            found: list[str] = self.fs.find(base)
            return found

        found = self._call("list", prefix, find)
        strip = self.root.lstrip("/")
        out = []
        for p in found:
            rel = p.lstrip("/")
            out.append(rel[len(strip) :].lstrip("/") if strip else rel)
        return sorted(out)

    def delete(self, path: str) -> None:
        def remove() -> None:
            full = self._fresh(path)
            if self.fs.exists(full):
                self.fs.rm_file(full)

        self._call("delete", path, remove)

    def free_bytes(self) -> int | None:
        return None


def open_backend(
    root: str | os.PathLike[str],
    *,
    cache: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    retry: RetryPolicy | None = None,
    **storage_options: Any,
) -> Backend:
    """A :class:`LocalBackend` for plain paths and ``file://``, else an fsspec backend.

    With ``cache`` (a local folder, one per run) a remote run is written through a
    :class:`~ckptwise.store.tiered.TieredBackend`: saves land in the cache and an uploader
    copies them to ``root`` in the background, keeping at most ``cache_bytes`` of uploaded
    files there (``None``: no bound). ``retry`` says how transient remote errors are
    retried (:data:`~ckptwise.store.retry.DEFAULT_RETRY` when ``None``).

    Raises:
        ConfigError: ``cache`` given for a local run, or a bad ``cache_bytes``.
        StorageError: the URL's filesystem cannot be opened.

    >>> backend = open_backend("s3://bucket/run", cache="/scratch/run-cache")  # doctest: +SKIP
    """
    text = os.fspath(root)
    policy = DEFAULT_RETRY if retry is None else retry
    local = text.startswith("file://") or "://" not in text
    if cache is not None:
        if local:
            raise ConfigError(
                f"cache={os.fspath(cache)!r} is for a remote run (an fsspec URL such as "
                f"s3://bucket/run), but {text!r} is a local folder, written directly; drop "
                "cache="
            )
        from ckptwise.store.tiered import TieredBackend

        remote = FsspecBackend(text, retry=policy, **storage_options)
        return TieredBackend(cache, remote, cache_bytes=cache_bytes)
    if cache_bytes is not None:
        raise ConfigError(
            f"cache_bytes={cache_bytes!r} bounds a local cache, but no cache= was given; pass "
            "cache=FOLDER with it, or drop it"
        )
    if text.startswith("file://"):
        return LocalBackend(text[len("file://") :])
    if "://" in text:
        return FsspecBackend(text, retry=policy, **storage_options)
    return LocalBackend(text)
