"""Storage: layout, manifests, content-addressed objects, codecs, locks and backends.

This package is the store's one door: code outside ``ckptwise.store`` imports only the names
below, and reaches everything else through :class:`CheckpointStore` (open one with
:func:`open_store`).
"""

from ckptwise.store.backend import Backend, UploadState
from ckptwise.store.cache_folder import rank_cache
from ckptwise.store.codecs import LOSSLESS
from ckptwise.store.commit import CommitPlan, ObjectUse
from ckptwise.store.fsspec_backend import FsspecBackend
from ckptwise.store.layout import CHECKPOINTS, tensor_bytes
from ckptwise.store.local import LocalBackend
from ckptwise.store.lock import RunLock
from ckptwise.store.manifest import FORMAT_VERSION, Manifest, RankView, Shard, TensorEntry
from ckptwise.store.open import open_backend
from ckptwise.store.reader import Problem
from ckptwise.store.retry import RetryPolicy
from ckptwise.store.store import CheckpointStore, RequestFiles, is_cache_folder, open_store
from ckptwise.store.tiered import TieredBackend

__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "LOSSLESS",
    "Backend",
    "CheckpointStore",
    "CommitPlan",
    "FsspecBackend",
    "LocalBackend",
    "Manifest",
    "ObjectUse",
    "Problem",
    "RankView",
    "RequestFiles",
    "RetryPolicy",
    "RunLock",
    "Shard",
    "TensorEntry",
    "TieredBackend",
    "UploadState",
    "is_cache_folder",
    "open_backend",
    "open_store",
    "rank_cache",
    "tensor_bytes",
]
