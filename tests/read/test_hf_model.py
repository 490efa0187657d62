"""The model a checkpoint records for export (``hf_model``), read back and exported under
each dtype policy; records from a damaged or newer store are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptwise as cw
from ckptwise.errors import CorruptCheckpointError, FormatError
from ckptwise.read.formats import read_model_folder
from ckptwise.read.hf_model import (
    HF_MODEL_KEY,
    HfModelRecord,
    cast_weights,
    export_dtype,
    write_model_folder,
)

RECORD = HfModelRecord(
    config={"model_type": "tiny", "architectures": ["Tiny"], "hidden_size": 4},
    dtype="bfloat16",
    dtypes={"norm.weight": "float32"},
    files={"tokenizer.json": b'{"version": "1.0"}', "chat_template.jinja": b""},
)


def _weights() -> dict[str, torch.Tensor]:
    """As DeepSpeed's zero_to_fp32 gives a bf16 run: trained fp32 masters, frozen bf16."""
    return {
        "proj.weight": torch.linspace(-1, 1, 12).reshape(3, 4) / 3,  # fp32, not bf16-exact
        "embed.weight": torch.randn(5, 4).to(torch.bfloat16),
        "norm.weight": torch.full((4,), 1 / 3),
        "steps": torch.arange(3),
    }


def _save(run_dir: Path, steps: int = 2) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in range(1, steps + 1):
            manager.step(step, {"model": _weights(), HF_MODEL_KEY: RECORD.to_value()})


def test_the_record_reads_back_and_its_files_are_stored_once(run_dir: Path) -> None:
    torch.manual_seed(0)
    _save(run_dir)
    run = cw.open_run(run_dir)
    assert run.hf_model(1) == RECORD
    tree = run.manifest(2).tree[HF_MODEL_KEY]["value"]
    assert tree["config"] == RECORD.config  # plain JSON in the manifest, readable as is
    files = [n for n in run.manifest(2).tensors if n.startswith(f"{HF_MODEL_KEY}/files/")]
    assert sorted(files) == ["hf_model/files/chat_template.jinja", "hf_model/files/tokenizer.json"]
    assert run.first_stored(2)["hf_model/files/tokenizer.json"] == 1  # dedup: written once


def test_a_checkpoint_without_a_record_has_none(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        manager.step(1, {"model": _weights()})
    assert cw.open_run(run_dir).hf_model(1) is None


def test_export_as_trained_writes_the_folder_from_pretrained_loads_as_trained(
    run_dir: Path, tmp_path: Path
) -> None:
    _save(run_dir, steps=1)
    run = cw.open_run(run_dir)
    out = tmp_path / "out"
    path = run.export(1, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (out / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'
    config = json.loads((out / "config.json").read_text())
    assert config == {**RECORD.config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    weights, stored = load_file(str(path)), _weights()
    assert {k: v.dtype for k, v in weights.items()} == {
        "proj.weight": torch.bfloat16,  # the fp32 master, rounded as DeepSpeed rounds it
        "embed.weight": torch.bfloat16,
        "norm.weight": torch.float32,  # the model held it in fp32
        "steps": torch.int64,  # never cast
    }
    assert torch.equal(weights["proj.weight"], stored["proj.weight"].to(torch.bfloat16))
    assert torch.equal(weights["norm.weight"], stored["norm.weight"])


@pytest.mark.parametrize(
    ("policy", "dtype"),
    [("fp32", torch.float32), ("float16", torch.float16), ("bf16", torch.bfloat16)],
)
def test_a_chosen_dtype_casts_every_float_tensor_and_the_config_says_so(
    run_dir: Path, tmp_path: Path, policy: str, dtype: torch.dtype
) -> None:
    _save(run_dir, steps=1)
    out = tmp_path / policy
    weights = load_file(str(cw.open_run(run_dir).export(1, out, dtype=policy)))
    assert {v.dtype for k, v in weights.items() if k != "steps"} == {dtype}
    assert torch.equal(weights["proj.weight"], _weights()["proj.weight"].to(dtype))
    name = str(dtype).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["dtype"] == name


def test_layout_safetensors_writes_the_weights_alone(run_dir: Path, tmp_path: Path) -> None:
    _save(run_dir, steps=1)
    cw.open_run(run_dir).export(1, tmp_path / "out", layout="safetensors")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.safetensors"]


def test_the_exported_weights_are_as_readable_as_the_files_beside_them(
    run_dir: Path, tmp_path: Path
) -> None:
    """Another user or a serving container reads the export (safetensors 0.8 alone would
    leave the weights at mode 0600)."""
    _save(run_dir, steps=1)
    out = tmp_path / "out"
    cw.open_run(run_dir).export(1, out)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    assert modes["model.safetensors"] & 0o044  # readable by others under the usual umask


def test_config_from_goes_over_the_recorded_files_with_the_exported_dtype(
    run_dir: Path, tmp_path: Path
) -> None:
    _save(run_dir, steps=1)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "base", "torch_dtype": "float32"}')
    (base / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    cw.open_run(run_dir).export(1, out, config_from=base)
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "base", "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    assert (out / "tokenizer.json").read_text() == "{}"


def test_without_a_record_as_trained_keeps_the_stored_dtypes() -> None:
    weights = _weights()
    cast, main = cast_weights(weights, dtype=None, record=None)
    assert main is None  # mixed: no one dtype to put in config.json
    assert all(cast[k] is weights[k] for k in weights)
    _, main = cast_weights({"w": torch.zeros(2, dtype=torch.float16)}, dtype=None, record=None)
    assert main == "float16"


def test_without_a_record_the_folder_says_the_stored_dtypes_are_mixed(tmp_path: Path) -> None:
    done = write_model_folder(_weights(), tmp_path / "out", record=None, layout="hf")
    assert done.files == ("model.safetensors",)
    assert done.dtype is None
    assert done.mixed == {"bfloat16": 1, "float32": 2}


def test_an_unknown_dtype_policy_names_the_choices() -> None:
    with pytest.raises(cw.ConfigError, match=r"as-trained, bf16, fp16, fp32, got 'int8'"):
        export_dtype("int8")
    assert export_dtype("as-trained") is None
    assert export_dtype("bf16") is torch.bfloat16


def _value(**changes: Any) -> dict[str, Any]:
    return {**RECORD.to_value(), **changes}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "is not a mapping"),
        (_value(version=None), "has no valid version"),
        (_value(config="x"), "has no config mapping"),
        (_value(dtype="int8"), "names the dtype 'int8'"),
        (_value(dtypes={"w": "int64"}), "malformed per-tensor dtypes"),
        (_value(files={"../config.json": torch.zeros(1, dtype=torch.uint8)}), "'../config.json'"),
        (_value(files={"config.json": torch.zeros(1, dtype=torch.uint8)}), "'config.json'"),
        (_value(files={"/etc/x": torch.zeros(1, dtype=torch.uint8)}), "'/etc/x'"),
        (_value(files={"model.safetensors": torch.zeros(1, dtype=torch.uint8)}), "model.safe"),
        (_value(files={"a.json": torch.zeros(1)}), "as something other than bytes"),
    ],
)
def test_a_malformed_record_is_refused(value: Any, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        HfModelRecord.from_value(value, "checkpoint at step 1")


def test_a_record_from_a_newer_ckptwise_says_to_upgrade() -> None:
    with pytest.raises(FormatError, match=r"upgrade ckptwise"):
        HfModelRecord.from_value(_value(version=3), "checkpoint at step 1")


TRAINABLE = dataclasses.replace(RECORD, trainable_only=True)


def test_a_trained_only_record_is_version_2_so_older_readers_refuse_it() -> None:
    assert RECORD.to_value()["version"] == 1  # the others stay readable by older readers
    value = TRAINABLE.to_value()
    assert value["version"] == 2
    assert value["trainable_only"] is True
    assert HfModelRecord.from_value(value, "step 1") == TRAINABLE
    with pytest.raises(CorruptCheckpointError, match=r"trainable_only 'yes'"):
        HfModelRecord.from_value({**value, "trainable_only": "yes"}, "step 1")


def _trained_only(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k == "proj.weight"}


def test_a_trained_only_checkpoint_is_not_exported_without_its_frozen_weights(
    tmp_path: Path,
) -> None:
    with pytest.raises(cw.CheckpointError, match=r"step 7 holds the trained weights only.*--base"):
        write_model_folder(_trained_only(_weights()), tmp_path / "out", record=TRAINABLE, step=7)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_base_supplies_the_tensors_the_checkpoint_lacks(tmp_path: Path, sharded: bool) -> None:
    torch.manual_seed(0)
    trained, initial = _weights(), _weights()  # the base: the model before fine-tuning
    base = tmp_path / "base"
    base.mkdir()
    if sharded:  # as save_pretrained shards a large model
        names = sorted(initial)
        halves = {
            "model-00001-of-00002.safetensors": names[:2],
            "model-00002-of-00002.safetensors": names[2:],
        }
        for shard, held in halves.items():
            save_file({n: initial[n] for n in held}, str(base / shard))
        weight_map = {n: shard for shard, held in halves.items() for n in held}
        (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(initial, str(base / "model.safetensors"))
    out = write_model_folder(
        _trained_only(trained), tmp_path / "out", record=TRAINABLE, base=base, step=7
    )
    written = load_file(str(out.path))
    assert written.keys() == trained.keys()
    assert torch.equal(written["proj.weight"], trained["proj.weight"].bfloat16())  # trained
    for name in ("embed.weight", "norm.weight", "steps"):  # from the base, as trained casts
        dtype = {"norm.weight": torch.float32, "steps": torch.int64}.get(name, torch.bfloat16)
        assert torch.equal(written[name], initial[name].to(dtype)), name


def test_run_export_takes_base_too(run_dir: Path, tmp_path: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        manager.step(1, {"model": _trained_only(_weights()), HF_MODEL_KEY: TRAINABLE.to_value()})
    run = cw.open_run(run_dir)
    with pytest.raises(cw.CheckpointError, match=r"--base MODEL_DIR \(base= in Python\)"):
        run.export(1, tmp_path / "out")
    base = tmp_path / "base"
    base.mkdir()
    save_file(_weights(), str(base / "model.safetensors"))
    path = run.export(1, tmp_path / "out", base=base)
    assert set(load_file(str(path))) == set(_weights())


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, r"holds no model.safetensors.*\.bin weights are not read"),
        ({"pytorch_model.bin": b"x"}, r"holds no model.safetensors"),
        ({"model.safetensors.index.json": b"[1]"}, r"is not a safetensors index"),
        (
            {"model.safetensors.index.json": b'{"weight_map": {"w": "../model.safetensors"}}'},
            r"names the shard '../model.safetensors'",
        ),
    ],
)
def test_a_base_folder_without_safetensors_weights_is_refused(
    tmp_path: Path, files: dict[str, bytes], message: str
) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(cw.ConfigError, match=message):
        read_model_folder(tmp_path)
