"""What each rank restores when the number of ranks changed since the save (one process).

A checkpoint of two ranks is put together from two one-process saves: rank 0's state and
rank 1's, whose ``data`` position and torch RNG differ and whose weights and numpy and
Python RNG do not. It is then restored as rank 0 of one process, as rank 1 of two, and as
a rank 2 that did not exist. The real multi-process jobs are in
``tests/integration/test_distributed.py``.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ckptwise as cw
from ckptwise.distributed.restore import plan_rank, rank_differences
from ckptwise.snapshot import RNG_KEY, RngState, capture
from ckptwise.store import Manifest, RankView, Shard, TensorEntry, open_store

STEP = 3
#: each saved rank's data position and torch seed
RANKS = [(10, 100), (20, 101)]


def _saved_state(offset: int, torch_seed: int) -> dict[str, Any]:
    """A rank's state at the save: the weights every rank holds, its own data position,
    and RNG states of which only torch's is seeded per rank."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(torch_seed)
    return {"model": model, "data": {"offset": offset}, RNG_KEY: RngState()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A run holding step ``STEP`` as two ranks would have saved it."""
    root = tmp_path / "run"
    store = open_store(root)
    for step, (offset, seed) in enumerate(RANKS, start=1):
        snap = capture(_saved_state(offset, seed))
        store.commit(step, snap.tensors, tree=snap.tree)
    first, second = store.manifest(1), store.manifest(2)
    assert first.tree is not None
    assert second.tree is not None
    view = RankView(
        tensors={n: e for n, e in second.tensors.items() if first.tensors.get(n) != e},
        tree={k: v for k, v in second.tree.items() if first.tree.get(k) != v},
    )
    store.publish(
        Manifest(step=STEP, time=0.0, tensors=first.tensors, tree=first.tree, ranks=(view,))
    )
    store.delete([1, 2])
    return root


def _fresh() -> dict[str, Any]:
    return {"model": nn.Linear(3, 2), "data": {"offset": -1}}


def _seeded(seed: int) -> tuple[Any, Any, torch.Tensor]:
    """The Python, numpy and torch RNG states right after seeding them with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _live() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _same_numpy(a: Any, b: Any) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_the_checkpoint_says_which_entries_differed_between_the_ranks(root: Path) -> None:
    manifest = cw.open_run(root).manifest(STEP)
    assert manifest.world_size == 2
    assert rank_differences(manifest) == (frozenset({"data", RNG_KEY}), frozenset({"torch"}))


def test_a_new_rank_takes_what_every_rank_held_alike_and_keeps_its_own_per_rank_entries(
    root: Path,
) -> None:
    state = _fresh()
    _, _, own_torch = _seeded(7)
    with pytest.warns(cw.RestoreWarning) as caught:
        assert cw.open_run(root).restore(state, rank=2, rng=True) == STEP
    python, numpy, live_torch = _live()
    saved = _saved_state(*RANKS[0])["model"]
    assert torch.equal(state["model"].weight, saved.weight)
    assert torch.equal(state["model"].bias, saved.bias)
    assert state["data"] == {"offset": -1}  # no saved counterpart: its own
    assert torch.equal(live_torch, own_torch)  # the ranks' differed: its own
    saved_python, saved_numpy, _ = _seeded(1)  # alike on every rank: rank 0's
    assert python == saved_python
    assert _same_numpy(numpy, saved_numpy)
    (warning,) = [str(w.message) for w in caught]
    assert "saved by 2 process(es) and is restored on 3" in warning
    assert "rank 2 did not exist then: it restores rank 0's 'model', which every saved" in warning
    assert "of the entries that differed between the saved ranks it keeps its own 'data'" in warning
    assert "it keeps its own RNG states (torch)" in warning


def test_a_rank_that_existed_restores_its_own_entries(root: Path) -> None:
    state = _fresh()
    _seeded(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cw.open_run(root).restore(state, rank=1, rng=True)
    restored = torch.get_rng_state()
    assert not [w for w in caught if w.category is cw.RestoreWarning]  # as saved: 2 ranks
    assert state["data"] == {"offset": 20}
    _, _, saved = _seeded(RANKS[1][1])
    assert torch.equal(restored, saved)


def test_on_fewer_ranks_rank_0_restores_its_own_and_says_what_no_rank_restores(
    root: Path,
) -> None:
    state = _fresh()
    with pytest.warns(cw.RestoreWarning) as caught:
        cw.open_run(root).restore(state, rng=True)
    assert state["data"] == {"offset": 10}
    (warning,) = [str(w.message) for w in caught]
    assert "saved by 2 process(es) and is restored on 1; rank 0 restores its own state" in warning
    assert "rank(s) 1 ('data', RNG states) are restored by no rank" in warning


def test_an_adapters_values_give_a_new_rank_rank_0s_entries_but_not_rng_that_differed(
    root: Path,
) -> None:
    """Adapters whose framework loads one state on every rank (Lightning's, Trainer's) are
    given rank 0's entries, named when they differed; the RNG states as in a restore."""
    with pytest.warns(cw.RestoreWarning) as caught:
        loaded = cw.open_run(root).read(STEP, full_only=True, rank=2)
    assert loaded is not None
    values = loaded.values(rng=True)
    assert values["data"] == {"offset": 10}
    assert set(values[RNG_KEY]) == {"python", "numpy"}
    (warning,) = [str(w.message) for w in caught]
    assert "it takes rank 0's 'data'" in warning
    assert "it keeps its own RNG states (torch)" in warning


def test_a_new_rank_keeps_the_generators_the_live_ranks_hold_apart(tmp_path: Path) -> None:
    """A checkpoint of one process cannot say which generators were seeded per rank: the
    live ranks can. A new rank takes rank 0's saved state of those alike on every rank now."""
    with cw.CheckpointManager(tmp_path / "run", save=cw.every(1)) as manager:
        manager.step(1, {"w": torch.zeros(2)})
    manifest = cw.open_run(tmp_path / "run").manifest(1)
    assert plan_rank(manifest, 1, now_on=2, alike={"python"}).rng_kept == {"numpy", "torch"}
    assert plan_rank(manifest, 1, now_on=2, alike=None).rng_kept == frozenset()
    assert plan_rank(manifest, 0, now_on=2, alike=set()).rng_kept == frozenset()  # it existed


def test_a_sharded_tensors_chunks_are_no_per_rank_difference() -> None:
    def chunk(oid: str, offset: int) -> TensorEntry:
        shard = Shard((4,), (offset,))
        return TensorEntry(
            object=oid, dtype="float32", shape=(2,), nbytes=8, stored_bytes=8, shard=shard
        )

    tree = {"model": {"kind": "value", "value": 1}}
    manifest = Manifest(
        step=1,
        time=0.0,
        tensors={"model/w": chunk("ab" * 32, 0)},
        tree=tree,
        ranks=(RankView(tensors={"model/w": chunk("cd" * 32, 2)}),),
    )
    assert rank_differences(manifest) == (frozenset(), frozenset())


def test_rng_state_loads_only_the_generators_it_is_given() -> None:
    _, _, torch_before = _seeded(5)
    np.random.seed(9)
    wanted = np.random.get_state()
    np.random.seed(5)
    RngState().load_state_dict({"numpy": wanted})
    assert _same_numpy(np.random.get_state(), wanted)
    assert torch.equal(torch.get_rng_state(), torch_before)


def test_a_trainer_folder_holds_an_rng_file_only_for_every_generator(tmp_path: Path) -> None:
    """``Trainer`` loads an RNG file whole: a new rank given only some generators gets none,
    and keeps its own (Trainer logs that it found no RNG file for the process)."""
    pytest.importorskip("transformers")
    from ckptwise.integrations.transformers.folder import write_rng

    every = RngState().state_dict()
    for name, rng in [("some", {"numpy": every["numpy"]}), ("all", every)]:
        write_rng(tmp_path / name, rng, rank=1, world_size=2)
        assert (tmp_path / name / "rng_state_1.pth").exists() == (name == "all")
