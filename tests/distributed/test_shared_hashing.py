"""The replicated part of a state is hashed about once across ranks, and a replica that
differs is still saved as it is (real ``torchrun``, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptwise.distributed.save import (
    SHARED_MIN_BYTES,
    _hashers,
    _Listing,
    _Report,
    _trust,
    fingerprint,
)
from ckptwise.store import ObjectUse
from torchrun_job import run_job

BIG = SHARED_MIN_BYTES // 4  # float32 elements of the smallest shared tensor

SCRIPT = """
import json, sys, torch, torch.distributed as dist, ckptwise as cw
from ckptwise.store import CheckpointStore
dist.init_process_group("gloo")
run, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rank = dist.get_rank()
hashed = []
real_plan = CheckpointStore.plan
def counting_plan(store, tensors, **options):
    hashed.extend(tensors)
    return real_plan(store, tensors, **options)
CheckpointStore.plan = counting_plan
g = torch.Generator().manual_seed(0)  # the same "replicated" values on every rank
n = BIG_N
state = {
    "a": torch.randn(n, generator=g), "b": torch.randn(2 * n, generator=g),
    "c": torch.randn(n, generator=g), "d": torch.randn(3 * n, generator=g),
    "diverged": torch.randn(n, generator=g), "small": torch.randn(100, generator=g),
    "own": torch.full((n,), float(rank)),
}
if rank == 1:
    state["diverged"][n // 2 + 3] += 1.0  # one element, away from the sampled pages
manager = cw.CheckpointManager(run, save=cw.every(1), rng=False, async_save=mode == "async")
manager.step(1, state)
manager.wait()
fresh = {k: torch.zeros_like(v) for k, v in state.items()}
manager.restore(fresh, step=1)
manager.close()
record = {
    "hashed": sorted(hashed),
    "restored": all(torch.equal(fresh[k], state[k]) for k in state),
}
with open(f"{out}.{rank}", "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
""".replace("BIG_N", str(BIG))


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_each_rank_hashes_its_share_and_a_differing_replica_keeps_its_own_bytes(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    run_job(script, str(tmp_path / "run"), str(out), mode)
    records = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["restored"]  # rank 1's one changed element included
    hashed = [set(r["hashed"]) for r in records]
    shared = {"a", "b", "c", "d", "diverged"}
    # each shared tensor hashed by one rank only, except that one rank hashed its own
    # "diverged" again when the fingerprints differed; small ones, and "own" (whose pages
    # differ), by both
    assert (hashed[0] & hashed[1]) - {"small", "own"} == {"diverged"}
    assert (hashed[0] | hashed[1]) >= shared
    assert {"small", "own"} <= hashed[0] & hashed[1]
    sizes = {"a": 1, "b": 2, "c": 1, "d": 3, "diverged": 1}
    loads = [sum(sizes[n] for n in shared & h) for h in hashed]
    assert min(loads) >= 3  # the 8 units split about evenly (plus the re-hash)


def listing(step: int, **held: int) -> _Listing:
    return _Listing(
        step, {n: ("torch.float32", (size,), 4 * size, "p") for n, size in held.items()}
    )


def test_shared_tensors_are_those_every_rank_holds_alike_and_large() -> None:
    hashers = _hashers(
        [
            listing(3, a=BIG, b=2 * BIG, mine=BIG, part=BIG),
            listing(3, a=BIG, b=2 * BIG, other=BIG),
            _Listing(
                3,
                {
                    **listing(3, a=BIG, b=2 * BIG).tensors,
                    "part": ("torch.float32", (BIG,), 4 * BIG, "q"),
                },
            ),
        ]
    )
    assert set(hashers) == {"a", "b"}  # held by all alike; "part"'s pages differ
    assert hashers["b"] != hashers["a"]  # balanced
    shapes = [listing(3, a=BIG), _Listing(3, {"a": ("torch.float32", (2, BIG // 2), 4 * BIG, "p")})]
    assert _hashers(shapes) == {}  # another shape: each rank hashes its own


def test_ranks_saving_different_steps_are_refused() -> None:
    with pytest.raises(Exception, match="different steps"):
        _hashers([listing(3, a=BIG), listing(4, a=BIG)])


def test_a_matching_fingerprint_takes_the_hashers_object_and_another_is_hashed_again() -> None:
    def report(names: dict[str, str], prints: dict[str, str]) -> _Report:
        uses: dict[str, ObjectUse] = {n: (oid, "float32", (4,)) for n, oid in names.items()}
        return _Report(1, uses, {}, {}, {}, prints)

    reports = [
        report({"a": "oa"}, {"a": "pa", "b": "pb"}),
        report({"b": "ob"}, {"a": "pa", "b": "other"}),
    ]
    rehash = _trust(reports, {"a": 0, "b": 1})
    assert rehash == [{"b"}, set()]  # rank 0's b differs from rank 1's: rank 0 hashes it
    assert reports[1].names["a"] == ("oa", "float32", (4,))  # rank 1 trusts rank 0's a
    assert "b" not in reports[0].names


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3 * 16 * 4096 // 4),
    at=st.integers(0, 10**9),
    bit=st.integers(0, 31),
)
def test_a_fingerprint_sees_any_one_changed_bit(size: int, at: int, bit: int) -> None:
    values = torch.arange(size, dtype=torch.int32)
    changed = values.clone()
    changed[at % size] ^= 1 << bit
    assert fingerprint(values) == fingerprint(values.clone())
    assert fingerprint(values) != fingerprint(changed)
