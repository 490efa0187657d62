"""Where a run's files live, and how a tensor's bytes are viewed and addressed.

Layout of a run folder (see ``docs/FORMAT.md``); every name in it is a constant here::

    RUN/ckptwise.lock                   the writer's lock                     LOCK_FILE
    RUN/run.json                        the last retention decision           RUN_FILE
    RUN/checkpoints/000000001000.json   a committed checkpoint's manifest     CHECKPOINTS
    RUN/objects/ab/ab12...ef            a tensor's bytes, by BLAKE3 digest    OBJECTS
    RUN/branches/NAME/...json           manifests a rollback set aside        BRANCHES
    RUN/pins/000000001000               a pin                                 PINS
    RUN/pruning/000000001000            a retention tombstone                 PRUNING

A cache folder in front of a remote run holds ``cache.json`` (:data:`CACHE_FILE`) beside
the run's files.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import TYPE_CHECKING, Any

import blake3

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "BRANCHES",
    "CACHE_FILE",
    "CHECKPOINTS",
    "LOCK_FILE",
    "OBJECTS",
    "PINS",
    "PRUNING",
    "RUN_FILE",
    "TMP_MARK",
    "byte_view",
    "manifest_path",
    "manifest_step",
    "misnamed_manifest",
    "object_dir",
    "object_id",
    "object_path",
    "tensor_bytes",
]

CHECKPOINTS = "checkpoints"
OBJECTS = "objects"
#: The folder holding one sub-folder of manifests per branch.
BRANCHES = "branches"
#: The advisory run record: the writer's last retention decision.
RUN_FILE = "run.json"
#: The folder of pin files, one per pinned step.
PINS = "pins"
#: The folder of the writer's retention tombstones (see :mod:`~ckptwise.store.runfile`).
PRUNING = "pruning"
#: The writer's lock (see :mod:`~ckptwise.store.lock`).
LOCK_FILE = "ckptwise.lock"
#: Infix of every temporary file name; anything carrying it is debris after a crash.
TMP_MARK = ".tmp-"
#: A cache folder's record of which remote run it belongs to.
CACHE_FILE = "cache.json"
_MANIFEST_NAME = re.compile(rf"^{CHECKPOINTS}/([0-9]+)\.json$")

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("ckptwise's on-disk format is little-endian; this machine is big-endian")


def manifest_path(step: int) -> str:
    """Where the manifest of ``step`` lives, run-relative."""
    return f"{CHECKPOINTS}/{step:012d}.json"


def manifest_step(path: str) -> int | None:
    """The step a path names if it is a manifest's canonical path, else ``None``.

    Only ``checkpoints/<step:012d>.json`` names a checkpoint: ``checkpoints/1.json`` is a
    foreign file (see :func:`misnamed_manifest`), never read as one.
    """
    match = _MANIFEST_NAME.match(path)
    if match is None or len(match.group(1)) > 20:
        return None
    step = int(match.group(1))
    return step if manifest_path(step) == path else None


def misnamed_manifest(path: str) -> str | None:
    """For a file under ``checkpoints/`` named like a manifest but not canonically (such as
    ``checkpoints/1.json``), the canonical name it would need; else ``None``."""
    match = _MANIFEST_NAME.match(path)
    if match is None or manifest_step(path) is not None:
        return None
    digits = match.group(1).lstrip("0") or "0"
    return manifest_path(int(digits)) if len(digits) <= 20 else None


def object_path(oid: str) -> str:
    return f"{OBJECTS}/{oid[:2]}/{oid}"


def object_dir(oid: str) -> str:
    return f"{OBJECTS}/{oid[:2]}"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of ``tensor``'s values in C order, copying only when needed."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous().reshape(-1)
    return byte_view(t.view(torch.uint8))


def byte_view(flat_u8: torch.Tensor) -> memoryview:
    """A writable byte view sharing memory with a flat uint8 CPU tensor."""
    array: Any = flat_u8.numpy()
    return memoryview(array).cast("B")


def object_id(raw: memoryview) -> str:
    """The content address (BLAKE3 hex digest) of raw tensor bytes."""
    # fan out over all cores only on the caller's (training) thread: a background save
    # hashing with every core would take them from training
    wide = len(raw) > 1 << 24 and threading.current_thread() is threading.main_thread()
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if wide else blake3.blake3()
    hasher.update(raw)
    return str(hasher.hexdigest())
