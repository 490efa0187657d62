"""Per-rank views and sharded chunks (added in format version 2) survive encode and decode."""

from __future__ import annotations

import pytest

from ckptwise.errors import SnapshotError
from ckptwise.store.codecs import readable
from ckptwise.store.manifest import (
    Manifest,
    RankView,
    Shard,
    TensorEntry,
    decode_manifest,
    encode_manifest,
)

OID = "ab" * 32
OTHER = "cd" * 32


def entry(oid: str, shape: tuple[int, ...], shard: Shard | None = None) -> TensorEntry:
    nbytes = 4
    for n in shape:
        nbytes *= n
    return TensorEntry(
        object=oid, dtype="float32", shape=shape, nbytes=nbytes, stored_bytes=nbytes, shard=shard
    )


def test_views_and_shards_round_trip() -> None:
    manifest = Manifest(
        step=3,
        time=1.0,
        tensors={"w": entry(OID, (2, 4), Shard((4, 4), (0, 0))), "b": entry(OID, (2, 4))},
        tree={"model": {"kind": "value", "value": 1}, "rng": {"kind": "value", "value": 0}},
        ranks=(
            RankView(
                tensors={"w": entry(OTHER, (2, 4), Shard((4, 4), (2, 0)))},
                absent=("b",),
                tree={"rng": {"kind": "value", "value": 1}},
            ),
        ),
    )
    data = encode_manifest(manifest)
    back = decode_manifest(data, where="m", codecs=readable())
    assert back.world_size == 2
    assert back.view(1) == {"w": entry(OTHER, (2, 4), Shard((4, 4), (2, 0)))}
    assert back.tree_of(1) == {
        "model": {"kind": "value", "value": 1},
        "rng": {"kind": "value", "value": 1},
    }
    assert back.view(0) == dict(manifest.tensors)
    assert {e.object for e in back.entries()} == {OID, OTHER}
    assert b'"version":3' in data  # every manifest is written in the newest format


def test_a_one_process_manifest_has_no_ranks() -> None:
    manifest = Manifest(step=1, time=0.0, tensors={"b": entry(OID, (1,))})
    data = encode_manifest(manifest)
    assert b'"ranks"' not in data
    assert decode_manifest(data, where="m", codecs=readable()).world_size == 1


def test_a_shard_outside_its_tensor_is_refused() -> None:
    manifest = Manifest(step=1, time=0.0, tensors={"w": entry(OID, (3, 4), Shard((4, 4), (2, 0)))})
    with pytest.raises(SnapshotError, match="does not fit the whole tensor"):
        encode_manifest(manifest)  # what a reader would refuse is never written
