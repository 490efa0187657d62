"""The local back end: a directory on a local (or mounted) filesystem, written with fsync.

:class:`LocalBackend` implements :class:`~ckptwise.store.backend.Backend` with atomic
renames and without ever following a link out of the run's folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Collection, Iterable, Iterator

from ckptwise.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ckptwise.store.backend import Buffer, Direct, Sizes, sizes_one_by_one, tmp_name

__all__ = ["LocalBackend"]

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


class LocalBackend(Direct):
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
        tmp = tmp_name(path).rsplit("/", 1)[-1]
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

    def sizes(self, paths: Collection[str]) -> Sizes:
        return sizes_one_by_one(self, paths)  # a stat each: cheap on a local disk

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
