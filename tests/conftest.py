"""Shared fixtures; the tiny model and state they use live in :mod:`tiny_state`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import ckptwise as cw


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def manager(run_dir: Path) -> Iterator[cw.CheckpointManager]:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_all()) as m:
        yield m
