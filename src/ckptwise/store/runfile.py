"""Pins (``RUN/pins/<step>``), the retention handshake (``RUN/pruning/<step>``) and the
advisory run record (``run.json``).

A pin is one file of its own, created and deleted whole, so pinning never rewrites a file
the writer also writes. Pinning and the writer's retention meet in a handshake that needs
only read-after-write consistency (local disks, S3), no lock:

- the writer writes a tombstone ``pruning/<step>`` for every step it wants to delete,
  re-reads those steps' pins, deletes only the unpinned ones, then removes the tombstones;
- :func:`pin` writes the pin, then reads the tombstone and the manifest: a tombstone or a
  missing manifest means the writer may not have seen the pin, so the pin is taken back
  and the call fails.

Whichever of the two writes last sees the other's file, so a step :func:`pin` reported
pinned is never deleted. Every check reads the file itself (a GET on object stores), never
a listing, which fsspec may answer from a cache.

``run.json`` is advisory: it holds the writer's last retention decision (``kept``) and,
from older versions, ``pins`` (still read; the writer moves them into pin files). A bad
record is reported once, read as empty and rewritten at the writer's next prune; failing
to write it is a warning, never an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ckptwise.errors import CheckpointError, CheckpointNotFoundError, StorageError
from ckptwise.store.backend import Backend
from ckptwise.store.layout import PINS, PRUNING, RUN_FILE, manifest_path
from ckptwise.store.local import LocalBackend

__all__ = [
    "clear_tombstones",
    "delete_unpinned",
    "kept_field",
    "pin",
    "pin_path",
    "read_fresh",
    "read_kept",
    "read_pins",
    "read_run_state",
    "record_kept",
    "unpin",
    "update_run_state",
    "write_run_state",
]

log = logging.getLogger("ckptwise")

_FORMAT = {"format": "ckptwise.run", "version": 1}
_STEP_NAME = re.compile(r"^[0-9]{1,20}$")

# (run url, what) pairs already warned about; cleared when that thing works again, so a
# broken record costs one warning, not one per step
_warned: set[tuple[str, str]] = set()


def _warn_once(backend: Backend, what: str, message: str, *args: object) -> None:
    if (backend.url, what) not in _warned:
        _warned.add((backend.url, what))
        log.warning(message, *args)


def _recovered(backend: Backend, what: str) -> None:
    _warned.discard((backend.url, what))


def pin_path(step: int) -> str:
    return f"{PINS}/{step:012d}"


def _tombstone_path(step: int) -> str:
    return f"{PRUNING}/{step:012d}"


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: The largest pin, tombstone, lock or run record read: they hold a few hundred bytes, and
#: a planted huge file must not be read into memory.
MAX_RECORD_BYTES = 1 << 20


def read_fresh(backend: Backend, path: str, *, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The small file's bytes as the store holds them now, or ``None`` when it does not
    exist (every backend read bypasses listing caches, see :class:`FsspecBackend`).

    Raises:
        StorageError: the file is larger than ``limit`` bytes (nothing is read).
    """
    try:
        size = backend.size(path)
        if size > limit:
            raise StorageError(
                f"{backend.url}/{path} holds {size} bytes, more than the {limit} a ckptwise "
                "record can; it was not written by ckptwise: remove it"
            )
        return backend.read_bytes(path)
    except CheckpointNotFoundError:
        return None


# -- run.json ------------------------------------------------------------------------------


def _valid_pins(value: Any) -> bool:
    return isinstance(value, list) and all(_is_step(p) for p in value)


def _valid_kept(value: Any) -> bool:
    return isinstance(value, dict) and all(
        _STEP_NAME.match(k) and isinstance(v, list) and all(isinstance(r, str) for r in v)
        for k, v in value.items()
    )


def _special_file(backend: Backend) -> str | None:
    """What a local ``run.json`` is when it is not a plain file (reading a FIFO would hang)."""
    if not isinstance(backend, LocalBackend):
        return None
    try:
        mode = os.stat(os.path.join(backend.root, RUN_FILE)).st_mode
    except OSError:
        return None  # absent, or the read below reports it
    return None if stat.S_ISREG(mode) else "a folder" if stat.S_ISDIR(mode) else "not a file"


def read_run_state(backend: Backend) -> dict[str, Any]:
    """The run record's fields; empty (after one warning) when it is absent or unreadable.

    Fields of the wrong type are dropped, with the same one warning.
    """
    try:
        special = _special_file(backend)
        if special is not None:
            raise StorageError(f"it is {special}")
        raw = read_fresh(backend, RUN_FILE)
        if raw is None:
            return {}
        data = json.loads(raw)
    except (StorageError, ValueError, RecursionError) as exc:
        # ValueError: not JSON or not UTF-8; RecursionError: nested too deep to parse
        _warn_once(
            backend,
            "read",
            "ignoring the unreadable run record %s/%s (%s): it only says why checkpoints "
            "were kept; a writer replaces it at its next prune",
            backend.url,
            RUN_FILE,
            f"{type(exc).__name__}: {str(exc)[:200]}",
        )
        return {}
    if not isinstance(data, dict):
        _warn_once(
            backend,
            "read",
            "ignoring the run record %s/%s: it holds a JSON %s, not an object; a writer "
            "replaces it at its next prune",
            backend.url,
            RUN_FILE,
            type(data).__name__,
        )
        return {}
    checks = (("pins", _valid_pins), ("kept", _valid_kept))
    bad = [name for name, valid in checks if name in data and not valid(data[name])]
    if bad:
        _warn_once(
            backend,
            "read",
            "ignoring the malformed field(s) %s of the run record %s/%s; a writer replaces "
            "the record at its next prune",
            ", ".join(bad),
            backend.url,
            RUN_FILE,
        )
        return {k: v for k, v in data.items() if k not in bad}
    _recovered(backend, "read")
    return data


def write_run_state(backend: Backend, state: Mapping[str, Any]) -> None:
    """Atomically replace the run record; raises :class:`StorageError`."""
    doc = {**_FORMAT, **state}
    backend.write_atomic(RUN_FILE, [json.dumps(doc, indent=1).encode()])


def update_run_state(backend: Backend, **fields: Any) -> None:
    """Replace some fields of the run record, keeping the others."""
    write_run_state(backend, {**read_run_state(backend), **fields})


def _legacy_pins(state: Mapping[str, Any]) -> set[int]:
    pins = state.get("pins", [])
    return set(pins) if _valid_pins(pins) else set()


def read_kept(backend: Backend) -> dict[int, list[str]]:
    """Why each step was kept, as the writer's last retention decision recorded it."""
    kept = read_run_state(backend).get("kept", {})
    return {int(step): list(why) for step, why in kept.items()} if _valid_kept(kept) else {}


def kept_field(kept: Mapping[int, Iterable[str]]) -> dict[str, list[str]]:
    """The ``kept`` field of the record for a retention decision."""
    return {str(step): list(reasons) for step, reasons in kept.items()}


def record_kept(backend: Backend, kept: Mapping[int, Iterable[str]]) -> None:
    """Write the writer's retention decision into ``run.json``; never raises.

    Pins an older version kept in the record move into pin files first. A record that
    could not be read is replaced (repaired); one that cannot be written costs a warning.
    """
    state = read_run_state(backend)
    legacy = _legacy_pins(state)
    try:
        for step in sorted(legacy):
            if read_fresh(backend, pin_path(step)) is None:
                _write_pin(backend, step, uuid.uuid4().hex)
        fields = {k: v for k, v in state.items() if k not in ("format", "version", "pins")}
        write_run_state(backend, {**fields, "kept": kept_field(kept)})
    except StorageError as exc:
        _warn_once(
            backend,
            "write",
            "could not write the run record %s/%s (%s); training and retention go on, "
            "only `ckptwise ls`'s 'kept because' column is stale. Check the folder's "
            "permissions, or remove whatever is in the way",
            backend.url,
            RUN_FILE,
            exc,
        )
        return
    _recovered(backend, "write")


# -- pins ----------------------------------------------------------------------------------


def _pin_files(backend: Backend) -> set[int]:
    steps = set()
    for path in backend.list_files(PINS):
        name = path.rsplit("/", 1)[-1]
        if path == f"{PINS}/{name}" and _STEP_NAME.match(name):
            steps.add(int(name))
    return steps


def read_pins(backend: Backend) -> set[int]:
    """The pinned steps: the pin files, and pins an older version kept in ``run.json``."""
    return _pin_files(backend) | _legacy_pins(read_run_state(backend))


def _write_pin(backend: Backend, step: int, token: str) -> None:
    backend.write_atomic(pin_path(step), [json.dumps({"step": step, "token": token}).encode()])
    backend.sync_dirs([PINS])


def _pin_token(data: bytes | None) -> str | None:
    try:
        doc = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    token = doc.get("token") if isinstance(doc, dict) else None
    return token if isinstance(token, str) else None


def pin(backend: Backend, step: int) -> None:
    """Pin ``step`` so no writer deletes it, until :func:`unpin`.

    Raises:
        CheckpointNotFoundError: ``step`` has no checkpoint, or the writer's retention is
            deleting it right now (the pin is taken back; pin a newer step).
    """
    if not _is_step(step):
        raise CheckpointNotFoundError(f"step {step!r} is not a step number; pin a step >= 0")
    if not backend.exists(manifest_path(step)):
        raise CheckpointNotFoundError(
            f"no committed checkpoint at step {step} in {backend.url}: nothing to pin "
            "(`ckptwise ls` lists the steps)"
        )
    if read_fresh(backend, pin_path(step)) is not None:
        return  # already pinned; rewriting it could only race another pinner
    token = uuid.uuid4().hex
    _write_pin(backend, step, token)
    if read_fresh(backend, _tombstone_path(step)) is None and backend.exists(manifest_path(step)):
        return
    # the writer may have decided to delete the step before it could see the pin
    if _pin_token(read_fresh(backend, pin_path(step))) == token:
        backend.delete(pin_path(step))
    raise CheckpointNotFoundError(
        f"step {step} of {backend.url} is being deleted by the writer's retention, so it "
        "cannot be pinned any more; pin a newer step"
    )


def unpin(backend: Backend, step: int) -> None:
    """Let the retention policy decide about ``step`` again (at the writer's next prune)."""
    state = read_run_state(backend)
    legacy = _legacy_pins(state)
    if step in legacy:
        write_run_state(backend, {**state, "pins": sorted(legacy - {step})})
    backend.delete(pin_path(step))
    backend.sync_dirs([PINS])


# -- the writer's side of the handshake ----------------------------------------------------


def delete_unpinned(
    backend: Backend, steps: Iterable[int], delete: Callable[[list[int]], None]
) -> set[int]:
    """Delete those of ``steps`` no one has pinned (through ``delete``); returns the pinned.

    Only the run's one writer calls this. Raises :class:`StorageError` when a tombstone
    cannot be written (then nothing is deleted).
    """
    doomed = sorted(set(steps))
    if not doomed:
        return set()
    written: list[int] = []
    try:
        for step in doomed:
            backend.write_atomic(_tombstone_path(step), [b"{}"], sync=False)
            written.append(step)
        legacy = _legacy_pins(read_run_state(backend))
        pinned = {s for s in doomed if s in legacy or _pinned(backend, s)}
        delete([s for s in doomed if s not in pinned])
    finally:
        _remove_tombstones(backend, written)
    return pinned


def _pinned(backend: Backend, step: int) -> bool:
    try:
        return read_fresh(backend, pin_path(step)) is not None
    except CheckpointError as exc:  # a pin we cannot read still counts
        log.warning("treating step %d as pinned: %s", step, exc)
        return True


def _remove_tombstones(backend: Backend, steps: Iterable[int]) -> None:
    for step in steps:
        try:
            backend.delete(_tombstone_path(step))
        except StorageError as exc:
            # a leftover tombstone only makes pinning that step fail until the next writer
            _warn_once(backend, "tombstone", "could not remove a retention marker: %s", exc)


def clear_tombstones(backend: Backend) -> None:
    """Remove the tombstones a crashed writer left (the run's new writer calls this)."""
    try:
        leftovers = backend.list_files(PRUNING)
    except StorageError as exc:
        _warn_once(backend, "tombstone", "could not list leftover retention markers: %s", exc)
        return
    for path in leftovers:
        name = path.rsplit("/", 1)[-1]
        if _STEP_NAME.match(name):
            _remove_tombstones(backend, [int(name)])
