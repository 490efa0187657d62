"""The local folder a :class:`~ckptwise.store.tiered.TieredBackend` writes a remote run into.

:class:`CacheFolder` is the folder on disk: its identity record, its lock, the debris a killed
process leaves, and which files it holds uploaded or not. :class:`CacheEntries` is the
in-memory account of those files (sizes, versions, least recently used first) and evicts the
uploaded ones when the cache holds more than its bound.

**State on disk.** The cache folder holds ``cache.json`` (the remote URL it belongs to),
``files/`` (the run's files, as on the remote) and ``cache.lock`` (held while uploading). A
file counts as uploaded once its owner-execute bit is set: set on the uploaded inode after
the upload, never present on a freshly written file whatever the umask, and kept with the
file across crashes, so no journal is needed.

**Bounded cache.** With ``cache_bytes`` the uploaded files are evicted, least recently used
first, until the cache holds no more; they are then read from the remote (reads are not
cached back). Files not uploaded yet are never evicted, so a cache whose uploads lag may
exceed the bound (a warning says so once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ckptwise.errors import ConfigError, StorageError
from ckptwise.store.layout import BRANCHES, CACHE_FILE, CHECKPOINTS, OBJECTS, RUN_FILE, TMP_MARK
from ckptwise.store.local import LocalBackend

__all__ = [
    "CACHE_FILE",
    "SET_ASIDE",
    "TIERED_DIRS",
    "UPLOADED",
    "CacheEntries",
    "CacheFolder",
    "Entry",
    "rank_cache",
    "tiered",
]

log = logging.getLogger("ckptwise")

CACHE_LOCK = "cache.lock"
FILES = "files"
#: where manifests that can never be uploaded are moved (see :meth:`CacheFolder.set_aside`)
SET_ASIDE = "set-aside"
STAGING = "staging"
FORMAT = {"format": "ckptwise.cache", "version": 1}

#: Top-level folders and files of a run that go through the cache.
TIERED_DIRS = frozenset({OBJECTS, CHECKPOINTS, BRANCHES})
TIERED_FILES = frozenset({RUN_FILE})
#: The mark of an uploaded file (see the module docstring).
UPLOADED = stat.S_IXUSR


def rank_cache(rank: int) -> str:
    """The folder, inside the cache folder a job names, of one rank of a job of several:
    each rank has its own (see :mod:`ckptwise.distributed.confirm`)."""
    return f"rank-{rank:05d}"


def tiered(path: str) -> bool:
    """Whether ``path`` (run-relative) goes through the cache."""
    return path in TIERED_FILES or path.split("/", 1)[0] in TIERED_DIRS


@dataclass
class Entry:
    """What the cache holds at one path."""

    size: int
    #: incremented on every write of the path, to tell whether an upload sent the latest
    version: int
    uploaded: bool


class CacheFolder:
    """The cache folder ``root`` of the remote run ``url``: the run's files under ``files/``
    (:attr:`local`), its record ``cache.json``, its lock ``cache.lock`` and the ``staging/``
    folder uploads send from.

    Not thread-safe by itself: the backend calls it from one thread, or under its lock.
    """

    def __init__(self, root: str, url: str) -> None:
        self.root = root
        self.url = url
        self.local = LocalBackend(os.path.join(root, FILES))
        self.staging = os.path.join(root, STAGING)
        self._lock_fd: int | None = None
        self._identified = False

    def check_identity(self, *, create: bool) -> None:
        """Refuse a cache of another run; with ``create``, make the folder and its record."""
        if self._identified:
            return
        path = os.path.join(self.root, CACHE_FILE)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 16)
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise StorageError(f"could not read the cache record {path}: {exc}") from exc
        if raw is not None:
            try:
                doc = json.loads(raw)
                owner = doc["remote"] if isinstance(doc, dict) else None
            except (ValueError, KeyError, RecursionError):
                owner = None
            if not isinstance(owner, str):
                raise ConfigError(
                    f"{path} is not a ckptwise cache record; give cache= a folder of its own "
                    "(one per run), or remove that file"
                )
            if owner.rstrip("/") != self.url.rstrip("/"):
                raise ConfigError(
                    f"the cache folder {self.root} belongs to the run {owner}, not {self.url}: "
                    "give each run its own cache folder"
                )
            self._identified = True
            return
        if not create:
            return
        try:
            os.makedirs(self.root, exist_ok=True)
            LocalBackend(self.root).write_atomic(
                CACHE_FILE, [json.dumps({**FORMAT, "remote": self.url}).encode()]
            )
        except OSError as exc:
            raise StorageError(f"could not create the cache folder {self.root}: {exc}") from exc
        self._identified = True

    def path(self, path: str) -> str:
        """The local file of the run-relative ``path``."""
        return os.path.join(self.local.root, *path.split("/"))

    def set_aside(self, path: str) -> str:
        """Move the cached file ``path`` out of the files the cache lists, into
        ``SET_ASIDE`` beside them (kept for a person to look at, never read or uploaded);
        returns where it went."""
        target = os.path.join(self.root, SET_ASIDE, *path.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(self.path(path), target)
        return target

    def scan(self) -> Iterator[tuple[int, str, int, bool]]:
        """The regular files the cache holds that go through it, in listing order: their
        modification time (ns), path, size and whether they are marked uploaded."""
        for path in self.local.list_files(""):
            if TMP_MARK in path or not tiered(path):
                continue
            try:
                st = os.lstat(self.path(path))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            yield st.st_mtime_ns, path, st.st_size, bool(st.st_mode & UPLOADED)

    def unsent(self, path: str) -> bool:
        """Whether the cache holds ``path`` as a regular file not marked uploaded."""
        if TMP_MARK in path or not tiered(path):
            return False
        try:
            mode = os.lstat(self.path(path)).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode) and not mode & UPLOADED

    def take_lock(self) -> None:
        """Hold ``cache.lock`` (an exclusive ``flock``, recording this process) until
        :meth:`release_lock`.

        Raises:
            StorageError: another process holds it, or it cannot be opened or locked.
        """
        import fcntl

        path = os.path.join(self.root, CACHE_LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"could not open the cache's lock {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StorageError(
                f"the cache folder {self.root} is in use by {holder}, which uploads from it: "
                "give this writer its own cache folder, or stop that process"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"could not lock the cache's lock {path}: {exc}") from exc
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        """Let ``cache.lock`` go, if held."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def in_use(self) -> bool:
        """Whether a process (this one included) holds the cache's lock: it is uploading."""
        import fcntl

        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(os.path.join(self.root, CACHE_LOCK), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return False

    def clear_debris(self) -> None:
        """Remove what a killed process left in the cache: temporary and staged files."""
        for path in self.local.list_files(""):
            if TMP_MARK in path.rsplit("/", 1)[-1]:
                with contextlib.suppress(StorageError):
                    self.local.delete(path)
        staging = LocalBackend(self.staging)
        for path in staging.list_files(""):
            with contextlib.suppress(StorageError):
                staging.delete(path)


class CacheEntries:
    """What the cache ``folder`` holds, in memory: an :class:`Entry` per file in
    :attr:`files`, least recently used first, their total :attr:`bytes`, and the paths being
    written right now (never evicted meanwhile).

    Guarded by ``cond``, the backend's lock, which the uploader shares: every method but
    :meth:`load` is called holding it.
    """

    def __init__(self, cond: threading.Condition, folder: CacheFolder) -> None:
        self._cond = cond
        self._folder = folder
        #: the cached files, least recently used first
        self.files: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self._versions = 0
        #: paths being written into the cache right now: never evicted meanwhile
        self.writing: Counter[str] = Counter()
        self._warned_full = False

    def load(self, found: Iterable[tuple[int, str, int, bool]]) -> None:
        """Replace the entries with the files ``found`` (as :meth:`CacheFolder.scan` gives
        them), oldest first; takes the lock itself."""
        loaded: list[tuple[int, str, Entry]] = []
        for mtime_ns, path, size, uploaded in found:
            self._versions += 1
            loaded.append((mtime_ns, path, Entry(size, self._versions, uploaded)))
        with self._cond:
            self.files.clear()
            self.bytes = 0
            for _, path, entry in sorted(loaded):
                self.files[path] = entry
                self.bytes += entry.size

    def wrote(self, path: str, size: int) -> None:
        """Record a new version of ``path``, not uploaded, as the most recently used."""
        old = self.files.pop(path, None)
        self.bytes += size - (old.size if old is not None else 0)
        self._versions += 1
        self.files[path] = Entry(size, self._versions, uploaded=False)

    def forget(self, path: str) -> Entry | None:
        """Drop ``path``'s entry (not its file); the entry, if there was one."""
        entry = self.files.pop(path, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def evict(self, bound: int | None, busy: Callable[[str], bool]) -> None:
        """Delete uploaded files from the cache, least recently used first, until it holds
        at most ``bound`` bytes (``None``: no bound); a file being written or ``busy`` (an
        upload or deletion queued or under way) is kept."""
        if bound is None or self.bytes <= bound:
            return
        for path, entry in list(self.files.items()):
            if self.bytes <= bound:
                break
            if not entry.uploaded or busy(path) or self.writing[path]:
                continue
            try:
                self._folder.local.delete(path)
            except StorageError as exc:
                log.warning("could not evict %s from the cache: %s", path, exc)
                continue
            del self.files[path]
            self.bytes -= entry.size
        if self.bytes > bound and not self._warned_full:
            self._warned_full = True
            log.warning(
                "the cache %s holds %d bytes, more than its bound of %d: the files not "
                "uploaded yet cannot be evicted (uploads lag behind the saves)",
                self._folder.root,
                self.bytes,
                bound,
            )
