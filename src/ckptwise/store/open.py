"""Which back end a run's root names: the factory above the local, fsspec and tiered ones.

:func:`open_backend` is the one place that knows every back end, so none of them needs to
import another (a tiered run's cache is built here, not by the fsspec back end).
"""

from __future__ import annotations

import os
from typing import Any

from ckptwise.errors import ConfigError
from ckptwise.store.backend import Backend
from ckptwise.store.fsspec_backend import FsspecBackend
from ckptwise.store.local import LocalBackend
from ckptwise.store.retry import DEFAULT_RETRY, RetryPolicy
from ckptwise.store.tiered import TieredBackend

__all__ = ["open_backend"]


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
