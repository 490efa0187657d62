"""The decider's watch on request files: through the run's store, or request files over a
bare backend."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import ckptwise as cw
from ckptwise.decide.decider import Decider
from ckptwise.policy import full
from ckptwise.store import LocalBackend, RequestFiles, open_store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_request_file_in_the_stores_run_folder_asks_for_a_save(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    decider = Decider(cw.on_file(), full(), lambda: NOW, watch=store)
    try:
        assert not decider.decide(1, {}, final=False).decision.save
        (tmp_path / "SAVE_NOW").touch()
        assert decider.decide(2, {}, final=False).decision.save
    finally:
        decider.close()


def test_request_files_over_a_bare_backend_are_watched(tmp_path: Path) -> None:
    decider = Decider(cw.on_file(), full(), lambda: NOW, watch=RequestFiles(LocalBackend(tmp_path)))
    try:
        (tmp_path / "SAVE_NOW").touch()
        assert decider.decide(1, {}, final=False).decision.save
    finally:
        decider.close()


def test_a_reader_watches_nothing(tmp_path: Path) -> None:
    decider = Decider(cw.on_file(), full(), lambda: NOW, watch=None)
    try:
        (tmp_path / "SAVE_NOW").touch()
        assert decider.monitor is None
        assert not decider.decide(1, {}, final=False).decision.save
    finally:
        decider.close()
