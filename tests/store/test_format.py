"""Golden files for the on-disk format, and validation of everything a manifest says.

``golden/run_v1`` was written by format version 1 (no digest) and must stay readable;
``golden/run_v3`` is what this version writes. Set ``CKPTWISE_REGENERATE_GOLDEN=1`` to
rewrite ``golden/run_v3`` after a deliberate format change (and bump ``FORMAT_VERSION``,
adding a golden run of the new version: old golden runs must stay readable).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptwise as cw
from ckptwise.errors import CorruptCheckpointError, FormatError, SnapshotError
from ckptwise.snapshot import capture
from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store.codecs import readable
from ckptwise.store.index import read_manifest
from ckptwise.store.manifest import (
    FORMAT_VERSION,
    Manifest,
    TensorEntry,
    decode_manifest,
    encode_manifest,
    manifest_digest,
)

GOLDEN = Path(__file__).with_name("golden") / "run_v1"
GOLDEN_V3 = Path(__file__).with_name("golden") / "run_v3"
MANIFEST = "checkpoints/000000000007.json"


def golden_state() -> dict[str, Any]:
    return {
        "model": {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.tensor([1.0, -2.5], dtype=torch.bfloat16),
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([0.5, 0.25])}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
        },
        "epoch": 2,
        "best": float("inf"),
    }


def write_golden(root: Path) -> None:
    snap = capture(golden_state())
    CheckpointStore(LocalBackend(root)).commit(
        7,
        snap.tensors,
        tree=snap.tree,
        metrics={"eval_loss": 0.25},
        reasons=("every(7)",),
        time=1_700_000_000.0,
    )


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_writing_the_golden_state_gives_the_golden_bytes(tmp_path: Path) -> None:
    if os.environ.get("CKPTWISE_REGENERATE_GOLDEN"):
        shutil.rmtree(GOLDEN_V3, ignore_errors=True)
        write_golden(GOLDEN_V3)
    write_golden(tmp_path)
    assert files(tmp_path) == files(GOLDEN_V3)
    # the tensors' bytes have not changed since version 1, only the manifest
    objects = {k: v for k, v in files(GOLDEN).items() if k.startswith("objects/")}
    assert {k: v for k, v in files(tmp_path).items() if k.startswith("objects/")} == objects


@pytest.mark.parametrize("golden", [GOLDEN, GOLDEN_V3], ids=["v1", "v3"])
def test_the_golden_run_reads_back(golden: Path, tmp_path: Path) -> None:
    shutil.copytree(golden, tmp_path / "run")  # never touch the golden files themselves
    run = cw.open_run(tmp_path / "run")
    assert [c.step for c in run.checkpoints()] == [7]
    assert run.verify() == []
    loaded = run.load(7)
    expected = golden_state()
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert loaded["model"]["b"].dtype == torch.bfloat16
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.tensor([0.5, 0.25]))
    assert loaded["epoch"] == 2
    assert math.isinf(loaded["best"])
    info = run.checkpoints()[0]
    assert info.metrics == {"eval_loss": 0.25}
    assert info.reasons == ("every(7)",)


def test_golden_manifests_are_readable_json_with_a_version() -> None:
    old = json.loads((GOLDEN / MANIFEST).read_text())
    assert old["format"] == "ckptwise.checkpoint"
    assert old["version"] == 1
    assert "digest" not in old
    new = json.loads((GOLDEN_V3 / MANIFEST).read_text())
    assert new["version"] == FORMAT_VERSION == 3
    assert new["tensors"]["model/w"]["dtype"] == "float32"
    assert new["tensors"]["model/w"]["shape"] == [2, 3]
    # the digest is BLAKE3 of the canonical JSON of everything else
    digest = new.pop("digest")
    canonical = json.dumps(new, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert digest == "blake3:" + blake3.blake3(canonical.encode()).hexdigest()
    assert {k: v for k, v in new.items() if k != "version"} == {
        k: v for k, v in old.items() if k != "version"
    }


def _mutate(doc: dict[str, Any], path: list[str], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["version"], 99, "newer than this ckptwise reads"),
        (["format"], "something", "'format' field"),
        (["step"], -1, "step must be a non-negative integer"),
        (["tensors", "model/w", "object"], "../../../etc/passwd", "not a 64-digit hex digest"),
        (["tensors", "model/w", "object"], "A" * 64, "not a 64-digit hex digest"),
        (["tensors", "model/w", "codec"], "brotli9", "upgrade ckptwise"),
        (["tensors", "model/w", "dtype"], "float128", "unknown dtype"),
        (["tensors", "model/w", "nbytes"], 4, "shape needs 24"),
        (["tensors", "model/w", "shape"], [2, -3], "non-negative integer"),
        (["metrics"], {"loss": "low"}, "not a number"),
    ],
)
def test_malformed_manifests_are_rejected_with_a_clear_error(
    tmp_path: Path, path: list[str], value: Any, message: str
) -> None:
    shutil.copytree(GOLDEN, tmp_path / "run")
    manifest = tmp_path / "run" / MANIFEST
    doc = json.loads(manifest.read_text())
    _mutate(doc, path, value)
    manifest.write_text(json.dumps(doc))
    store = CheckpointStore(LocalBackend(tmp_path / "run"))
    assert store.steps() == []
    (reason,) = store.broken.values()
    assert message in reason
    with pytest.raises(FormatError, match=r"malformed|newer|upgrade"):
        read_manifest(store.backend, MANIFEST)


def test_manifest_whose_name_and_step_disagree_is_not_trusted(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "run")
    (tmp_path / "run" / MANIFEST).rename(tmp_path / "run" / "checkpoints" / "000000000008.json")
    store = CheckpointStore(LocalBackend(tmp_path / "run"))
    assert store.steps() == []
    assert "says step 7" in next(iter(store.broken.values()))


CODEC_GOLDEN = Path(__file__).with_name("golden") / "codecs_v1"


def codec_golden_values() -> list[dict[str, torch.Tensor]]:
    """Three steps of known tensors: bf16 and fp32 weights that drift a little, and ints."""
    base = (torch.arange(4096, dtype=torch.float32).reshape(64, 64) - 2048) / 4096
    steps = []
    for step in range(3):
        w = base + step * 1e-3 * (torch.arange(4096).reshape(64, 64) % 7 == 0)
        steps.append({"w32": w, "w16": w.to(torch.bfloat16), "ids": torch.arange(300) * step})
    return steps


def write_codec_golden(root: Path) -> None:
    for codec, deltas in (("bytegroup", 4), ("zstd", None)):
        store = CheckpointStore(LocalBackend(root / codec), codec=codec, deltas=deltas)
        for step, tensors in enumerate(codec_golden_values(), start=1):
            store.commit(step, tensors, time=1_700_000_000.0 + step)


def test_objects_written_by_every_codec_decode_to_known_bytes() -> None:
    """Compressed bytes may differ between zstd releases; what they decode to may not."""
    if os.environ.get("CKPTWISE_REGENERATE_GOLDEN"):
        shutil.rmtree(CODEC_GOLDEN, ignore_errors=True)
        write_codec_golden(CODEC_GOLDEN)
    expected = codec_golden_values()
    seen_codecs = set()
    for codec in ("bytegroup", "zstd"):
        store = CheckpointStore(LocalBackend(CODEC_GOLDEN / codec))
        assert store.steps() == [1, 2, 3]
        for step in (1, 2, 3):
            seen_codecs |= {e.codec for e in store.manifest(step).tensors.values()}
            loaded = store.load_tensors(step)
            for name, tensor in expected[step - 1].items():
                assert loaded[name].dtype == tensor.dtype
                assert torch.equal(loaded[name], tensor), (codec, step, name)
    assert seen_codecs == {"bytegroup", "zstd", "xor-bytegroup"}


def _resign(doc: dict[str, Any]) -> dict[str, Any]:
    doc.pop("digest", None)
    return {**doc, "digest": manifest_digest(doc)}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["tensors", "model/w", "dtype"], "int32"),  # same item size: only the digest can tell
        (["tree", "optimizer", "value", "param_groups", 0, "lr"], 0.1),
    ],
)
def test_an_edited_manifest_fails_its_digest_and_an_older_one_restores(
    tmp_path: Path, path: list[Any], value: Any
) -> None:
    root = tmp_path / "run"
    shutil.copytree(GOLDEN_V3, root)
    older = capture(golden_state())
    CheckpointStore(LocalBackend(root)).commit(3, older.tensors, tree=older.tree, time=1.0)
    manifest = root / MANIFEST
    doc = json.loads(manifest.read_text())
    _mutate(doc, path, value)
    manifest.write_text(json.dumps(doc))
    run = cw.open_run(root)
    assert run.steps() == [3]
    (reason,) = run.unreadable.values()
    assert f"manifest {MANIFEST} fails its checksum" in reason
    (problem,) = run.verify()
    assert "fails its checksum" in str(problem)
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        decode_manifest(manifest.read_bytes(), where=MANIFEST, codecs=readable())
    state = golden_state()
    with pytest.warns(cw.RestoreWarning):
        assert run.restore(state, strict=False) == 3


def test_a_version_3_manifest_without_its_digest_is_refused(tmp_path: Path) -> None:
    doc = json.loads((GOLDEN_V3 / MANIFEST).read_text())
    del doc["digest"]
    with pytest.raises(FormatError, match="'digest' is None"):
        decode_manifest(json.dumps(doc).encode(), where=MANIFEST, codecs=readable())


def _deep(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["metrics"], {"loss": 10**400}, "metric 'loss' is a huge integer, too large for a float"),
        (["time"], 10**400, "time is a huge integer"),
        (["time"], 1e300, "not a Unix time"),
        (["tensors", "model/w", "dtype"], ["float32"], "unknown dtype ['float32']"),
        (["tensors", "model/w", "shape"], [1] * 65, "not a list of dimensions"),
        (["tensors", "model/w", "bases"], [["ab" * 32, "raw", 1]] * 65, "at most 64"),
        (["tensors", "model/w", "codec"], ["raw"], "codec ['raw']"),
        (["tree"], [1], "tree is not an object"),
        (["tree", "epoch"], {"kind": "value"}, "tree['epoch'] is not"),
        (["tree", "epoch", "value"], _deep(150), "nests deeper than 100 levels"),
        (["tree", "epoch", "value"], {"__ckptwise__": "tensor", "name": 7}, "names tensor 7"),
        (["tree", "epoch", "value"], {"__ckptwise__": "tensor", "name": "x"}, "which it lacks"),
        (["tree", "epoch", "value"], {"__ckptwise__": "ndarray", "name": "model/b"}, "numpy"),
        (["tree", "epoch", "value"], {"__ckptwise__": "dict", "items": [[[1], 2]]}, "dict item"),
        (["tree", "epoch", "value"], {"__ckptwise__": "npscalar", "dtype": "O"}, "dtype 'O'"),
        (["tree", "epoch", "value"], {"__ckptwise__": "zzz"}, "upgrade ckptwise"),
        (["extra"], {"metric_history": {"loss": {"count": "x"}}}, "metric_history['loss'].count"),
        (["extra"], {"metric_history": []}, "extra.metric_history is not an object"),
        (["extra"], {"marks": {"every(1)": {"step": 1, "time": 1e300}}}, "marks['every(1)'].time"),
        (["extra"], {"save_costs": [1e300]}, "extra.save_costs[0]"),
        (["extra"], {"x": _deep(150)}, "'extra' nests deeper"),
        (["ranks"], [{"tensors": [], "tree": {}}], "ranks[0]: 'tensors'"),
    ],
)
def test_forged_manifests_are_refused_field_by_field(
    tmp_path: Path, path: list[Any], value: Any, message: str
) -> None:
    """Edits whose digest was recomputed (a buggy or hostile writer): the validators behind
    the digest name the file and the field."""
    shutil.copytree(GOLDEN_V3, tmp_path / "run")
    manifest = tmp_path / "run" / MANIFEST
    doc = json.loads(manifest.read_text())
    _mutate(doc, path, value)
    manifest.write_text(json.dumps(_resign(doc)))
    store = CheckpointStore(LocalBackend(tmp_path / "run"))
    assert store.steps() == []
    (reason,) = store.broken.values()
    assert reason.startswith(f"manifest {MANIFEST}")
    assert message in reason


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[" * 100_000, "not valid JSON"),
        (b'{"format": "\xff"}', "not UTF-8"),
        (b'{"format": NaN}', "NaN is not allowed"),
        ('{"format": "ckptwise.checkpoint"}'.encode("utf-16"), "not UTF-8"),
        (b"\x80\x04\x95" + b"pickle", "not UTF-8"),
    ],
)
def test_unparseable_manifests_are_format_errors(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        decode_manifest(data, where=MANIFEST, codecs=readable())


def test_a_non_canonical_name_is_never_read_as_a_checkpoint(tmp_path: Path) -> None:
    """#14: ``checkpoints/1.json`` used to be read (and its objects pruned from under it)."""
    shutil.copytree(GOLDEN_V3, tmp_path / "run")
    (tmp_path / "run" / MANIFEST).rename(tmp_path / "run" / "checkpoints" / "7.json")
    store = CheckpointStore(LocalBackend(tmp_path / "run"))
    assert store.steps() == []
    assert store.broken == {
        "checkpoints/7.json": "not read: a manifest's name is its step in 12 digits; if it is a "
        "checkpoint, rename it to 000000000007.json"
    }
    assert store.collect_garbage() == 0  # its objects are kept for the rename
    assert len(store.backend.list_files("objects")) == 4
    (tmp_path / "run" / "checkpoints" / "7.json").rename(tmp_path / "run" / MANIFEST)
    store.refresh()
    assert store.steps() == [7]


@pytest.mark.parametrize("name", ["0000000000007.json", "7.JSON", "\u0667.json", "x7.json"])
def test_other_names_are_foreign_files(tmp_path: Path, name: str) -> None:
    shutil.copytree(GOLDEN_V3, tmp_path / "run")
    shutil.copy(tmp_path / "run" / MANIFEST, tmp_path / "run" / "checkpoints" / name)
    store = CheckpointStore(LocalBackend(tmp_path / "run"))
    assert store.steps() == [7]
    if name == "0000000000007.json":  # 13 digits: named like a manifest, not canonically
        assert "rename it to 000000000007.json" in store.broken[f"checkpoints/{name}"]
    else:
        assert store.broken == {}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    value=json_values,
    metrics=st.dictionaries(st.text(), st.floats(width=64), max_size=4),
    time=st.floats(min_value=-1e10, max_value=2.5e11),
    name=st.text(min_size=1),
)
def test_whatever_encode_writes_decodes_to_the_same_manifest(
    value: Any, metrics: dict[str, float], time: float, name: str
) -> None:
    entry = TensorEntry(object="ab" * 32, dtype="float32", shape=(2,), nbytes=8, stored_bytes=8)
    manifest = Manifest(
        step=5,
        time=time,
        tensors={name: entry},
        tree={
            "v": {"kind": "value", "value": value},
            "t": {"kind": "value", "value": {"__ckptwise__": "tensor", "name": name}},
        },
        metrics=metrics,
        extra={"anything": value},
    )
    back = decode_manifest(encode_manifest(manifest), where="m", codecs=readable())
    assert back.version == FORMAT_VERSION
    assert back.tree == manifest.tree
    assert json.dumps(back.tree) == json.dumps(manifest.tree)  # keys keep their order
    assert back.extra == manifest.extra
    assert back.tensors == manifest.tensors
    assert back.time == manifest.time
    expected = {k: v if math.isfinite(v) else math.nan for k, v in metrics.items()}
    assert back.metrics.keys() == expected.keys()
    for key, number in expected.items():
        assert back.metrics[key] == number or (math.isnan(number) and math.isnan(back.metrics[key]))


def test_a_state_nested_too_deep_is_refused_on_save(tmp_path: Path) -> None:
    snap = capture({"config": _deep(150)})
    store = CheckpointStore(LocalBackend(tmp_path))
    with pytest.raises(SnapshotError, match="nests deeper than 100 levels"):
        store.commit(1, snap.tensors, tree=snap.tree)
    assert store.steps() == []
    assert not (tmp_path / "checkpoints" / "000000000001.json").exists()


def test_the_run_record_keeps_its_format_tag(tmp_path: Path) -> None:
    """``run.json`` is part of the format (docs/FORMAT.md): its tag never follows a rename of
    the module that reads it."""
    store = CheckpointStore(LocalBackend(tmp_path))
    store.record_kept({3: ["newest"]})
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["format"] == "ckptwise.run"
    assert record["version"] == 1
    assert record["kept"] == {"3": ["newest"]}
