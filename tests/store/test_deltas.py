"""Delta chains: XOR against the previous checkpoint, bounded by keyframes, exact on restore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptwise as cw
from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store.codecs import DELTA
from ckptwise.store.layout import object_path
from ckptwise.store.manifest import DTYPES


def drift(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """fp32 weights nudged a little each step, as a slow optimizer would."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 256, generator=g) * 0.02
    out = []
    for _ in range(steps):
        w = w + torch.randn(w.shape, generator=g) * 1e-5 * (torch.rand(w.shape, generator=g) < 0.1)
        out.append(w.clone())
    return out


def test_chains_stay_within_the_keyframe_interval_and_restore_exactly(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=4)
    values = drift(10)
    for step, w in enumerate(values, start=1):
        store.commit(step, {"w": w})
    entries = [store.manifest(s).tensors["w"] for s in range(1, 11)]
    assert [len(e.bases) for e in entries] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert entries[1].codec == DELTA
    assert entries[1].stored_bytes < 0.7 * entries[0].stored_bytes
    fresh = CheckpointStore(LocalBackend(tmp_path))
    for step, w in enumerate(values, start=1):
        before = fresh.reads
        assert torch.equal(fresh.load_tensors(step)["w"], w)
        assert fresh.reads - before <= 4  # at most K objects per tensor


def test_bases_outlive_the_checkpoints_that_stored_them(tmp_path: Path) -> None:
    values = drift(6)
    with cw.CheckpointManager(
        tmp_path, save=cw.every(1), keep=cw.keep_last(1), codec="bytegroup", deltas=8, rng=False
    ) as manager:
        for step, w in enumerate(values, start=1):
            manager.step(step, {"w": w})
        manager.wait()
        assert [c.step for c in manager.run.checkpoints()] == [6]
        entry = manager.run.manifest(6).tensors["w"]
        assert len(entry.bases) == 5
        assert manager.run.verify() == []
    state = {"w": torch.empty(256, 256)}
    assert cw.open_run(tmp_path).restore(state) == 6
    assert torch.equal(state["w"], values[-1])
    on_disk = {p.name for p in (tmp_path / "objects").rglob("*") if p.is_file()}
    assert on_disk == {entry.object, *(b[0] for b in entry.bases)}  # nothing more, nothing less


def test_a_damaged_base_fails_every_checkpoint_built_on_it(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=8)
    for step, w in enumerate(drift(3), start=1):
        store.commit(step, {"w": w})
    keyframe = store.manifest(1).tensors["w"].object
    path = tmp_path / object_path(keyframe)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = {p.step: p.message for p in CheckpointStore(LocalBackend(tmp_path)).verify()}
    assert sorted(s for s in problems if s is not None) == [1, 2, 3]
    assert keyframe in problems[3]


def test_random_weights_are_stored_whole_when_a_delta_would_not_pay(tmp_path: Path) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=4)
    store.commit(1, {"w": torch.randn(128, 128)})
    store.commit(2, {"w": torch.randn(128, 128)})
    entry = store.manifest(2).tensors["w"]
    assert entry.codec == "bytegroup"
    assert entry.bases == ()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    flips=st.lists(st.integers(0, 10**6), max_size=5),
    data=st.data(),
)
def test_any_dtype_round_trips_through_a_chain(
    tmp_path_factory: pytest.TempPathFactory,
    dtype: str,
    shape: list[int],
    flips: list[int],
    data: st.DataObject,
) -> None:
    torch_dtype = DTYPES[dtype]
    n = int(torch.tensor(shape).prod()) * torch_dtype.itemsize
    first = bytearray(data.draw(st.binary(min_size=n, max_size=n)))
    root = tmp_path_factory.mktemp("chain")
    store = CheckpointStore(LocalBackend(root), codec="bytegroup", deltas=3)
    values: list[bytes] = []
    current = first
    for step in range(1, 5):
        current = bytearray(current)
        for f in flips:
            current[f % n] ^= 1 << (f % 8)  # a few bits change per step: NaN, Inf, denormals...
        values.append(bytes(current))
        tensor = torch.frombuffer(current, dtype=torch.uint8).view(torch_dtype).reshape(shape)
        store.commit(step, {"t": tensor})
    fresh = CheckpointStore(LocalBackend(root))
    for step, expected in enumerate(values, start=1):
        back = fresh.load_tensors(step)["t"]
        assert back.dtype == torch_dtype
        assert bytes(back.reshape(-1).view(torch.uint8).numpy()) == expected


def test_same_bytes_under_another_dtype_reuse_a_delta_object(tmp_path: Path) -> None:
    """Dedup is by content: a delta grouped as fp32 may be listed later as int16 bytes."""
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=4)
    values = drift(2)
    store.commit(1, {"w": values[0]})
    store.commit(2, {"w": values[1]})
    assert store.manifest(2).tensors["w"].codec == DELTA
    as_int16 = values[1].view(torch.int16)
    store.commit(3, {"same_bytes": as_int16})
    entry = store.manifest(3).tensors["same_bytes"]
    assert entry.object == store.manifest(2).tensors["w"].object
    fresh = CheckpointStore(LocalBackend(tmp_path))
    assert torch.equal(fresh.load_tensors(3)["same_bytes"], as_int16)
    assert fresh.verify() == []


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_deltas_with_a_codec_that_cannot_store_them_are_refused(tmp_path: Path, codec: str) -> None:
    with pytest.raises(cw.ConfigError, match=r"deltas=4 needs codec='bytegroup' or 'auto'"):
        CheckpointStore(LocalBackend(tmp_path), codec=codec, deltas=4)


def test_auto_tries_deltas_for_float_weights_whatever_their_keyframe_codec(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(LocalBackend(tmp_path), codec="auto", deltas=4)
    values = drift(3)
    for step, w in enumerate(values, start=1):
        # small and integer tensors are never compressed by auto, so never tried as deltas
        store.commit(step, {"w": w, "small": w[0].clone(), "ids": torch.arange(1 << 14) + step})
    first, second = (store.manifest(s).tensors for s in (1, 2))
    assert first["w"].codec == "raw"  # a fast local disk: auto stores keyframes raw
    assert second["w"].codec == DELTA
    assert second["w"].bases == ((first["w"].object, "raw", first["w"].stored_bytes),)
    assert second["w"].stored_bytes < 0.5 * first["w"].nbytes
    assert second["w"].note.startswith("delta against the previous checkpoint")
    assert (second["small"].codec, second["ids"].codec) == ("raw", "raw")
    fresh = CheckpointStore(LocalBackend(tmp_path))
    for step, w in enumerate(values, start=1):
        assert torch.equal(fresh.load_tensors(step)["w"], w)
    assert fresh.verify() == []


def test_delta_sizes_do_not_count_as_the_codecs_ratio(tmp_path: Path) -> None:
    """The planner weighs storing an object whole; a delta's ratio says nothing of that."""
    store = CheckpointStore(LocalBackend(tmp_path), codec="bytegroup", deltas=4)
    for step, w in enumerate(drift(3), start=1):
        store.commit(step, {"w": w})
    assert store.manifest(3).tensors["w"].codec == DELTA
    assert 1.0 < store.planner.ratios[4] < 1.5  # fp32 weights stored whole: about 1.2x
