"""The remote back end: any fsspec filesystem (``s3://``, ``memory://``, ...).

:class:`FsspecBackend` implements :class:`~ckptwise.store.backend.Backend` over fsspec,
retrying transient errors and wrapping the others in :class:`~ckptwise.errors.StorageError`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

from ckptwise.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ckptwise.store.backend import Buffer, Direct, Sizes, sizes_one_by_one
from ckptwise.store.retry import DEFAULT_RETRY, RetryPolicy, retrying

__all__ = ["HEADS_AT_MOST", "FsspecBackend"]

T = TypeVar("T")

#: :meth:`FsspecBackend.sizes` asks up to this many files' sizes one request each, and more
#: by listing their folders (on S3 one request per 1,000 files). Against ``moto_server``
#: (``python -m bench.remote --check-only``) a listing of a run's 10 objects took 26 ms and
#: a request each 166 ms; 1,000 objects 0.28 s against 7.3 s. A listing's cost grows with
#: the objects the run holds, a request each with those the save reuses: a listing wins
#: unless a save reuses only a few objects of a large run.
HEADS_AT_MOST = 4


class FsspecBackend(Direct):
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

    def sizes(self, paths: Collection[str]) -> Sizes:
        """See :meth:`Backend.sizes <ckptwise.store.backend.Backend.sizes>`: a request per
        file for up to :data:`HEADS_AT_MOST` files, else one listing of each top folder
        they are in (``objects/``)."""
        if len(paths) <= HEADS_AT_MOST:
            return sizes_one_by_one(self, paths)
        folders: dict[str, list[str]] = {}
        out: Sizes = {}
        for path in paths:
            top, slash, _ = path.partition("/")
            if slash:
                folders.setdefault(top, []).append(path)
            else:
                out.update(sizes_one_by_one(self, [path]))
        for top, inside in folders.items():
            listed = self._sizes_below(top)
            for path in inside:
                size = listed.get(path)
                out[path] = (
                    CheckpointNotFoundError(f"{self.url}/{path} does not exist")
                    if size is None
                    else size
                )
        return out

    def _sizes_below(self, prefix: str) -> dict[str, int]:
        """The size of every file below the folder ``prefix``, by root-relative path, from
        one listing (paged by the store)."""

        def find() -> dict[str, Any]:
            try:
                found: dict[str, Any] = self.fs.find(self._fresh(prefix), detail=True)
            except FileNotFoundError:
                return {}
            return found

        strip = self.root.lstrip("/")
        out: dict[str, int] = {}
        for p, info in self._call("list", prefix, find).items():
            if info.get("type", "file") != "file":
                continue
            rel = p.lstrip("/")
            out[rel[len(strip) :].lstrip("/") if strip else rel] = int(info.get("size") or 0)
        return out

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
