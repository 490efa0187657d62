"""A checkpoint of one kind of optimizer is refused by another kind, before anything is loaded.

AdamW's state once restored into ``SGD(momentum=0.9)`` without a word, and the SGD's next
``step()`` raised ``KeyError: 'momentum'``. The fit check compares the optimizer's class
(recorded in the saved tree) and, where the classes differ or a checkpoint written before
the class was recorded has none, the hyper-parameter names of each parameter group.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptwise as cw

# the module, which the package's function of the same name hides
capture_module = importlib.import_module("ckptwise.snapshot.capture")


def _trained_adamw(root: Path) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    with cw.CheckpointManager(root, save=cw.every(1), async_save=False) as manager:
        manager.step(1, {"model": model, "optimizer": opt})
    return model


def _sgd(model: nn.Linear) -> torch.optim.SGD:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    sgd.step()
    return sgd


def _optimizer_bits(opt: torch.optim.Optimizer) -> tuple[str, list[Any]]:
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for s in opt.state.values()
    ]
    return repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]), state


def _unchanged(before: tuple[str, list[Any]], after: tuple[str, list[Any]]) -> bool:
    if before[0] != after[0] or len(before[1]) != len(after[1]):
        return False
    for a, b in zip(before[1], after[1], strict=True):
        if a.keys() != b.keys():
            return False
        for k in a:
            same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
            if not same:
                return False
    return True


def test_the_class_of_an_optimizer_is_recorded_beside_its_state(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _trained_adamw(root)
    manifest = json.loads(next((root / "checkpoints").glob("*.json")).read_text())
    assert manifest["tree"]["optimizer"]["class"] == "AdamW"
    assert "class" not in manifest["tree"]["model"]


@pytest.mark.parametrize("recorded", [True, False], ids=["class recorded", "older checkpoint"])
def test_adamw_into_sgd_is_refused_and_the_sgd_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    root = tmp_path / "run"
    if not recorded:  # as written before the class was recorded
        monkeypatch.setattr(capture_module, "optimizer_class", lambda value: None)
    saved = _trained_adamw(root)
    monkeypatch.undo()
    model = copy.deepcopy(saved)
    sgd = _sgd(model)
    before = _optimizer_bits(sgd)
    weights = model.weight.detach().clone()
    with pytest.raises(cw.ConfigError) as caught:
        cw.open_run(root).restore({"model": model, "optimizer": sgd})
    message = str(caught.value)
    if recorded:
        assert "saved from AdamW, the live optimizer is SGD" in message
        assert "build an AdamW optimizer to restore into" in message
    assert "'momentum'" in message  # the hyper-parameter names that differ
    assert "build " in message
    assert "leave 'optimizer' out of the state" in message
    assert _unchanged(before, _optimizer_bits(sgd))
    assert torch.equal(model.weight, weights)  # nothing loaded, the model neither
    model(torch.randn(3, 8)).sum().backward()
    sgd.step()  # still a working SGD
    with pytest.warns(cw.RestoreWarning, match="also holds 'optimizer'"):  # the way out
        assert cw.open_run(root).restore({"model": model}, strict=False) == 1


def test_adamw_into_adamw_restores(tmp_path: Path) -> None:
    root = tmp_path / "run"
    saved = _trained_adamw(root)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert cw.open_run(root).restore({"model": model, "optimizer": opt}) == 1
    assert torch.equal(model.weight, saved.weight)
    assert opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
