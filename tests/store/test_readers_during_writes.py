"""Readers see a consistent run while a writer commits and prunes it.

A writer thread saves every step and keeps the last two (so every save also deletes a
checkpoint and its objects) while this thread opens the run, lists and verifies it over and
over. A checkpoint pruned while it is being verified is no problem; anything else is.
``CKPTWISE_RACE_COUNT`` sets how many steps the writer saves (default 30).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

import ckptwise as cw

COUNT = int(os.environ.get("CKPTWISE_RACE_COUNT", "30"))


def test_verify_and_listing_during_saves_and_prunes_find_no_problem(tmp_path: Path) -> None:
    root = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            manager = cw.CheckpointManager(
                root, save=cw.every(1), keep=cw.keep_last(2), codec="bytegroup", deltas=4
            )
            for step in range(1, COUNT + 1):
                with torch.no_grad():
                    model.weight.add_(0.01)  # new objects (and deltas) every step
                manager.step(step, {"model": model, "step": step})
            manager.close()
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    rounds, verified = 0, set()
    problems: list[str] = []
    while not done.is_set() or rounds == 0:
        run = cw.open_run(root)
        listed = [c.step for c in run.checkpoints()]
        assert listed == sorted(listed)
        problems += [str(p) for p in run.verify()]
        verified |= set(listed)
        rounds += 1
    writer.join()
    assert not failures, failures
    assert problems == []
    final = cw.open_run(root)
    assert final.steps() == [COUNT - 1, COUNT]
    assert final.verify() == []
    assert rounds > 1  # the reader really ran while the writer did
    assert len(verified) > 2
