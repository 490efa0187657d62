"""The opt-in lossy archive: quantized optimizer moments, reported error, verifiable copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.store.codecs import Q8_CODEC
from tiny_state import make_state, train_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_q8_decodes_close_to_the_input_and_exactly_the_same_twice(dtype: torch.dtype) -> None:
    values = (torch.randn(1000) * 3).to(dtype)
    quantized = Q8_CODEC.quantize(values)
    out = bytearray(values.numel() * values.element_size())
    Q8_CODEC.decode(quantized.stored, memoryview(out), itemsize=values.element_size())
    back = torch.frombuffer(out, dtype=dtype)
    assert (back.double() - values.double()).abs().max() <= values.double().abs().max() / 127 + 0.05
    assert bytes(quantized.decoded) == out
    assert quantized.note.startswith("lossy q8: max abs error")


def test_archive_quantizes_optimizer_state_only_and_reports_the_error(tmp_path: Path) -> None:
    state = make_state(128)
    for _ in range(3):
        train_step(state, 128)
    with cw.CheckpointManager(tmp_path / "run", save=cw.every(1), rng=False) as manager:
        manager.step(3, state)
        info = manager.run.archive(3, tmp_path / "archive")
        original = manager.run.manifest(3)
    copy = cw.open_run(tmp_path / "archive")
    assert copy.verify() == []
    entries = copy.manifest(3).tensors
    moments = [n for n in entries if n.startswith("optimizer/") and "exp_avg" in n]
    assert moments
    for name in moments:
        if entries[name].shape == (1,):  # the head's bias: one element is copied exactly
            assert entries[name].codec != "q8"
            continue
        assert entries[name].codec == "q8"
        assert entries[name].note.startswith("lossy q8: max abs error")
    assert all(e.codec != "q8" for n, e in entries.items() if n.startswith("model/"))
    loaded, exact = copy.load(3), cw.open_run(tmp_path / "run").load(3)
    for name, tensor in exact["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    moment = exact["optimizer"]["state"][0]["exp_avg"]
    approx = loaded["optimizer"]["state"][0]["exp_avg"]
    assert not torch.equal(approx, moment)
    assert torch.allclose(approx, moment, atol=moment.abs().max().item() / 100)
    assert info.new_bytes < sum(e.stored_bytes for e in original.tensors.values())
    fresh = make_state(128, seed=4)
    assert copy.restore(fresh) == 3  # an archive still restores, with approximate moments
    with pytest.raises(cw.CheckpointError, match="already holds checkpoints"):
        cw.open_run(tmp_path / "run").archive(3, tmp_path / "archive")


def test_lossy_codecs_are_never_a_run_codec(tmp_path: Path) -> None:
    with pytest.raises(cw.ConfigError, match="codec='q8' is unknown"):
        cw.CheckpointManager(tmp_path, save=cw.every(1), codec="q8")


def test_archive_quantizes_only_float_tensors_of_more_than_one_element(tmp_path: Path) -> None:
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    for param_state in opt.state.values():
        param_state["step"] = torch.tensor(1017.0)  # q8 would give it back as 1017.00006
    state = {
        "model": model,
        "optimizer": opt,
        "extra": {"seen": torch.tensor([3, 4]), "scale": torch.tensor([0.1]), "n": torch.tensor(7)},
    }
    with cw.CheckpointManager(tmp_path / "run", save=cw.every(1), rng=False) as manager:
        manager.step(1, state)
        manager.run.archive(1, tmp_path / "archive", lossy=("optimizer/", "extra/"))
    copy = cw.open_run(tmp_path / "archive")
    entries = copy.manifest(1).tensors
    steps = [n for n in entries if n.startswith("optimizer/") and n.endswith("/step")]
    assert steps
    assert all(entries[n].codec != "q8" for n in steps)
    assert [n for n, e in entries.items() if e.codec == "q8"] == [
        n for n in entries if n.startswith("optimizer/") and "exp_avg" in n
    ]
    loaded = copy.load(1)
    for param_state in loaded["optimizer"]["state"].values():
        assert param_state["step"].item() == 1017.0
    assert torch.equal(loaded["extra"]["seen"], torch.tensor([3, 4]))
    assert torch.equal(loaded["extra"]["scale"], torch.tensor([0.1]))
    assert torch.equal(loaded["extra"]["n"], torch.tensor(7))
