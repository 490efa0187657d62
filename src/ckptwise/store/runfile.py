"""The run record (``run.json``): pins and the last retention decision.

The record is advisory: losing it loses pins and the "kept because" column, never a
checkpoint, so an unreadable record reads as empty.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ckptwise.errors import CheckpointNotFoundError
from ckptwise.store.backend import Backend

__all__ = [
    "RUN_FILE",
    "kept_field",
    "read_kept",
    "read_pins",
    "read_run_state",
    "update_run_state",
    "write_run_state",
]

log = logging.getLogger("ckptwise")

RUN_FILE = "run.json"
_FORMAT = {"format": "ckptwise.run", "version": 1}


def read_run_state(backend: Backend) -> dict[str, Any]:
    """The run record's fields; empty when it is absent or unreadable."""
    try:
        data = json.loads(backend.read_bytes(RUN_FILE))
    except CheckpointNotFoundError:
        return {}
    except ValueError as exc:  # not JSON, or not UTF-8
        log.warning("ignoring unreadable %s: %s", RUN_FILE, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_run_state(backend: Backend, state: Mapping[str, Any]) -> None:
    """Atomically replace the run record."""
    doc = {**_FORMAT, **state}
    backend.write_atomic(RUN_FILE, [json.dumps(doc, indent=1).encode()])


def update_run_state(backend: Backend, **fields: Any) -> None:
    """Replace some fields of the run record, keeping the others."""
    write_run_state(backend, {**read_run_state(backend), **fields})


def read_pins(backend: Backend) -> set[int]:
    """The pinned steps (malformed entries are ignored)."""
    pins = read_run_state(backend).get("pins", [])
    if not isinstance(pins, list):
        return set()
    return {p for p in pins if isinstance(p, int) and not isinstance(p, bool)}


def read_kept(backend: Backend) -> dict[int, list[str]]:
    """Why each step was kept, as the writer's last retention decision recorded it."""
    kept = read_run_state(backend).get("kept", {})
    if not isinstance(kept, dict):
        return {}
    return {
        int(step): [str(r) for r in why]
        for step, why in kept.items()
        if str(step).isdigit() and isinstance(why, list)
    }


def kept_field(kept: Mapping[int, Iterable[str]]) -> dict[str, list[str]]:
    """The ``kept`` field of the record for a retention decision."""
    return {str(step): list(reasons) for step, reasons in kept.items()}
