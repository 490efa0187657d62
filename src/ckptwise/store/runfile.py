"""The run record (``run.json``): pins and the last retention decision.

The record is advisory: losing it loses pins and the "kept because" column, never a
checkpoint, so an unreadable record reads as empty.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from ckptwise.errors import CheckpointNotFoundError
from ckptwise.store.backend import Backend

__all__ = ["RUN_FILE", "read_run_state", "write_run_state"]

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
