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

import ckptwise as cw
from ckptwise.errors import FormatError
from ckptwise.snapshot import capture
from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store.index import read_manifest
from ckptwise.store.manifest import FORMAT_VERSION

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
    shutil.copytree(golden, tmp_path / "run")  # a manager cleans and locks what it opens
    manager = cw.CheckpointManager(tmp_path / "run")
    assert [c.step for c in manager.checkpoints()] == [7]
    assert manager.run.verify() == []
    loaded = manager.run.load(7)
    expected = golden_state()
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert loaded["model"]["b"].dtype == torch.bfloat16
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.tensor([0.5, 0.25]))
    assert loaded["epoch"] == 2
    assert math.isinf(loaded["best"])
    info = manager.checkpoints()[0]
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
