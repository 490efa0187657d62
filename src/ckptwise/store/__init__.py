"""Storage: layout, manifests, content-addressed objects, codecs, locks and backends."""

from ckptwise.store.backend import Backend, FsspecBackend, LocalBackend, open_backend
from ckptwise.store.lock import RunLock
from ckptwise.store.manifest import FORMAT_VERSION, Manifest, TensorEntry
from ckptwise.store.reader import Problem
from ckptwise.store.retry import RetryPolicy
from ckptwise.store.store import CheckpointStore
from ckptwise.store.tiered import TieredBackend

__all__ = [
    "FORMAT_VERSION",
    "Backend",
    "CheckpointStore",
    "FsspecBackend",
    "LocalBackend",
    "Manifest",
    "Problem",
    "RetryPolicy",
    "RunLock",
    "TensorEntry",
    "TieredBackend",
    "open_backend",
]
