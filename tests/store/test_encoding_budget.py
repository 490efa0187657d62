"""Encoding large objects holds a bounded amount of memory at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.store import commit as commit_module


def test_objects_encode_within_the_byte_budget_and_a_larger_one_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commit_module, "ENCODING_BYTES", 3 * 2**20)
    held = 0
    peak = 0
    lock = threading.Lock()
    real = commit_module.Committer._encode

    def counting(self: commit_module.Committer, oid: str, job: commit_module.NewObject) -> object:
        nonlocal held, peak
        with lock:
            held += len(job.raw)
            peak = max(peak, held)
        try:
            time.sleep(0.05)  # long enough for the other writers to try to start
            return real(self, oid, job)
        finally:
            with lock:
                held -= len(job.raw)

    monkeypatch.setattr(commit_module.Committer, "_encode", counting)
    state = {f"w{i}": torch.randn(2**18) for i in range(6)}  # 1 MiB each
    state["big"] = torch.randn(2**20)  # 4 MiB: over the cap, encodes alone
    with cw.CheckpointManager(tmp_path, save=cw.never(), codec="bytegroup", rng=False) as m:
        m.save(1, state)
    assert peak <= 4 * 2**20  # never the big one beside another, never over 3 MiB else
    assert cw.open_run(tmp_path).verify() == []
    restored = cw.open_run(tmp_path).load(1)
    assert all(torch.equal(restored[k], v) for k, v in state.items())
