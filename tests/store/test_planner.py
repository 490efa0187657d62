"""The codec planner compresses exactly where it makes a save faster, and says why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.store import CheckpointStore, LocalBackend, open_backend
from ckptwise.store.planner import CodecPlanner

MB = 1e6
BIG = 1 << 22


def auto(
    write_rate: float | None = None, encode_rate: float | None = None, parallel: int = 2
) -> CodecPlanner:
    return CodecPlanner(
        mode="auto", write_rate=write_rate, encode_rate=encode_rate, parallel=parallel
    )


@pytest.mark.parametrize(
    ("planner", "dtype", "nbytes", "codec", "why"),
    [
        (CodecPlanner(mode="zstd"), torch.int64, BIG, "zstd", ""),
        (auto(), torch.int64, BIG, "raw", "not a 2-, 4- or 8-byte float"),
        (auto(), torch.bfloat16, 1000, "raw", "smaller than 64 KiB"),
        (auto(), torch.float32, BIG, "raw", "first save"),
        (CodecPlanner(mode="auto", remote=True), torch.bfloat16, BIG, "bytegroup", "pays"),
        # a disk writing 800 MB/s against 2 cores encoding 300 MB/s each: compressing is slower
        (
            auto(write_rate=800 * MB, encode_rate=300 * MB),
            torch.bfloat16,
            BIG,
            "raw",
            "would slow the save",
        ),
        # the same codec against a store writing 100 MB/s: 1.45x fewer bytes to write pays
        (
            auto(write_rate=100 * MB, encode_rate=300 * MB),
            torch.bfloat16,
            BIG,
            "bytegroup",
            "pays: encodes 300 MB/s per core x 2 at 1.45x, store writes 100 MB/s",
        ),
        # with 4 cores the codec outruns an 800 MB/s disk
        (
            auto(write_rate=800 * MB, encode_rate=300 * MB, parallel=4),
            torch.bfloat16,
            BIG,
            "bytegroup",
            "pays",
        ),
        (auto(write_rate=700 * MB, encode_rate=300 * MB), torch.float32, BIG, "raw", "would slow"),
        (
            auto(write_rate=30 * MB, encode_rate=300 * MB, parallel=1),
            torch.float32,
            BIG,
            "bytegroup",
            "pays",
        ),
    ],
)
def test_choices(
    planner: CodecPlanner, dtype: torch.dtype, nbytes: int, codec: str, why: str
) -> None:
    chosen, reason = planner.choose(dtype, nbytes)
    assert chosen == codec
    assert why in reason


def test_measurements_replace_the_guesses() -> None:
    planner = CodecPlanner(mode="auto")
    planner.observed_write(800_000_000, 1.0)
    planner.observed_encode(2, 300_000_000, 200_000_000, 1.0)
    assert planner.write_rate == 800 * MB
    assert planner.encode_rate == 300 * MB
    assert planner.ratios == {2: 1.5}
    planner.observed_write(100, 1.0)  # tiny writes say nothing about the disk
    assert planner.write_rate == 800 * MB


def test_auto_on_a_remote_store_compresses_float_weights_and_records_why() -> None:
    store = CheckpointStore(open_backend(f"memory://planner-{os.getpid()}"), codec="auto")
    weights = (torch.randn(1 << 18) * 0.02).to(torch.bfloat16)
    store.commit(1, {"w": weights, "step": torch.tensor(3)})
    entries = store.manifest(1).tensors
    assert entries["w"].codec == "bytegroup"
    assert entries["w"].note.startswith("pays")
    assert entries["w"].stored_bytes < weights.nbytes / 1.35
    assert entries["step"].codec == "raw"
    assert torch.equal(store.load_tensors(1)["w"], weights)


def test_auto_on_a_local_disk_starts_raw_and_keeps_what_it_measured(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="auto")
    store.commit(1, {"w": torch.randn(1 << 20)})
    assert store.manifest(1).tensors["w"].codec == "raw"
    assert store.planner.write_rate is not None


def test_unknown_codec_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(cw.ConfigError, match="codec='lz4' is unknown; choose 'auto'"):
        cw.CheckpointManager(tmp_path, save=cw.every(1), codec="lz4")
