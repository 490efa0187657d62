"""The codec planner compresses exactly where it makes a save faster, and says why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.store import CheckpointStore, LocalBackend, open_backend
from ckptwise.store.planner import (
    MAX_PARALLEL,
    CodecPlanner,
    idle_cores,
    measure_encode_rate,
)

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
        # a remote store is not assumed slow: its first save measures it too
        (CodecPlanner(mode="auto", remote=True), torch.bfloat16, BIG, "raw", "first save"),
        # a disk writing 800 MB/s against 2 cores encoding 300 MB/s each: compressing is slower
        (
            auto(write_rate=800 * MB, encode_rate=300 * MB),
            torch.bfloat16,
            BIG,
            "raw",
            "would not make the save clearly faster",
        ),
        # 5 % faster by the numbers is within their noise: raw
        (
            auto(write_rate=300 * MB, encode_rate=300 * MB / 0.95 / 2, parallel=2),
            torch.bfloat16,
            BIG,
            "raw",
            "would not make the save clearly faster",
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
        (auto(write_rate=700 * MB, encode_rate=300 * MB), torch.float32, BIG, "raw", "would not"),
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


def test_auto_on_a_slow_store_compresses_float_weights_and_records_why() -> None:
    store = CheckpointStore(open_backend(f"memory://planner-{os.getpid()}"), codec="auto")
    # as a first save to a slow store, and a calibration on two idle cores, measure
    store.planner.observed_write(20_000_000, 1.0)
    store.planner.encode_rate, store.planner.parallel = 300 * MB, 2
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


class Calibration:
    """A calibration that counts its calls and reports a fixed encode rate."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.rate


def test_the_encode_rate_is_measured_on_this_machine_before_the_first_compression() -> None:
    """The issue's case: a busy machine encodes slower than any fixed guess; the planner
    measures first and stays raw."""
    busy = Calibration(40 * MB)  # what a loaded core encodes
    planner = CodecPlanner(mode="auto", parallel=2, calibrate=busy)
    assert planner.choose(torch.bfloat16, BIG)[0] == "raw"  # first save: no rates at all
    assert busy.calls == 0
    planner.observed_write(300_000_000, 1.0)  # the first commit measured the disk
    codec, why = planner.choose(torch.bfloat16, BIG)
    assert (codec, busy.calls) == ("raw", 1)
    assert "encodes 40 MB/s per core x 2" in why
    planner.choose(torch.float32, BIG)
    assert busy.calls == 1  # measured once; compressed objects refine it
    idle = CodecPlanner(mode="auto", parallel=4, calibrate=Calibration(400 * MB))
    idle.observed_write(300_000_000, 1.0)
    assert idle.choose(torch.bfloat16, BIG)[0] == "bytegroup"


def test_the_calibration_measures_the_real_codec() -> None:
    rate = measure_encode_rate(1 << 20)
    assert 1 * MB < rate < 100_000 * MB


def test_idle_cores_are_at_least_one_and_at_most_this_process_may_use() -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= idle_cores() <= (usable or 1)


def test_cores_are_counted_again_at_every_commit_unless_given() -> None:
    counted = CodecPlanner(mode="auto")
    assert 1 <= counted.cores <= MAX_PARALLEL
    counted.observed_write(300_000_000, 1.0)
    assert counted.parallel is None  # counted again when next needed
    fixed = CodecPlanner(mode="auto", parallel=3)
    fixed.observed_write(300_000_000, 1.0)
    assert fixed.cores == 3


def test_a_save_to_a_fast_disk_never_compresses_on_a_guess(tmp_path: Path) -> None:
    """End to end on the real store: the first save is raw, and later ones compress only if
    this machine's measured rates say it pays by the margin."""
    store = CheckpointStore(LocalBackend(tmp_path), codec="auto")
    weights = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)
    store.commit(1, {"w": weights})
    assert store.manifest(1).tensors["w"].codec == "raw"
    planner = store.planner
    assert planner.write_rate is not None
    store.commit(2, {"w": weights + 1})
    entry = store.manifest(2).tensors["w"]
    assert planner.encode_rate is not None  # measured here, not assumed
    assert "MB/s per core x" in entry.note
    assert entry.codec == ("bytegroup" if entry.note.startswith("pays") else "raw")
    assert torch.equal(store.load_tensors(2)["w"], weights + 1)
