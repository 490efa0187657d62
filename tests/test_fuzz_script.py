"""scripts/fuzz_store.py: mutated copies of real runs read back cleanly, and its checks can
fail."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ckptwise.store import reader
from ckptwise.store.layout import object_id

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_store.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_store", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_store"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


fuzz = _load_script()


def test_two_hundred_mutated_runs_fail_only_with_checkpoint_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert fuzz.main(["--count", "200", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "200 cases, seed 3: 0 failure(s)" in out
    for kind in ("forged:", "bytes:", "json:"):
        assert kind in out


def test_what_counts_as_a_failure() -> None:
    assert fuzz.bad("ESCAPED: TypeError: x", "bytes:flip")
    assert fuzz.bad("HANG", "json:nest")
    assert fuzz.bad("SILENT: tensors differ", "bytes:flip")
    assert fuzz.bad("SILENT: tree differs", "json:value")
    # a forged manifest may describe other data consistently: nothing can tell
    assert not fuzz.bad("SILENT: tree differs", "forged:value")
    assert not fuzz.bad("CorruptCheckpointError", "bytes:flip")


def test_it_catches_silent_corruption_when_checksums_are_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = fuzz.build(tmp_path / "pristine")
    pristine = runs["raw"]
    copy = tmp_path / "case"
    shutil.copytree(pristine.root, copy)
    newest = fuzz.cw.open_run(copy).manifest(3)
    entry = newest.tensors["model/0.weight"]
    path = copy / "objects" / entry.object[:2] / entry.object
    data = bytearray(path.read_bytes())
    data[0] ^= 0x40
    path.write_bytes(bytes(data))
    assert fuzz.classify(pristine, copy) == "ok, detected, restored an older step"
    damaged = object_id(memoryview(bytes(data)))
    # a reader that takes the damaged bytes for the object's
    monkeypatch.setattr(
        reader, "object_id", lambda v: entry.object if object_id(v) == damaged else object_id(v)
    )
    assert fuzz.classify(pristine, copy) == "SILENT: tensors differ"


def test_it_catches_exceptions_that_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = fuzz.build(tmp_path / "pristine")

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(reader.Reader, "verify", broken)
    assert fuzz.classify(runs["zstd"], runs["zstd"].root).startswith("ESCAPED: KeyError")
