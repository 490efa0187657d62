"""Restoring into a live state: all or nothing, subsets named, a missing run said aloud, and
the RNG states left alone by a read for evaluation."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ckptwise as cw
from ckptwise.store.layout import object_path
from tiny_state import Tiny, make_state, train_step

Reader = Callable[[Path, dict[str, Any]], int]


def _with_manager(root: Path, state: dict[str, Any]) -> int:
    """Resuming training: the manager's restore (RNG states restored too)."""
    with cw.CheckpointManager(root, save=cw.never()) as manager:
        return manager.restore(state)


def _with_run(root: Path, state: dict[str, Any]) -> int:
    """Reading for evaluation, RNG states asked for."""
    return cw.open_run(root).restore(state, rng=True)


READERS = [pytest.param(_with_manager, id="manager"), pytest.param(_with_run, id="run")]


def _saved_run(root: Path) -> dict[str, Any]:
    """Step 3 of a trained tiny model, its optimizer (with state), scheduler, an EMA tensor
    and a data position; returns that state."""
    state = make_state()
    state["ema"] = torch.arange(2.0)
    state["data"] = {"epoch": 1, "index": 40}
    with cw.CheckpointManager(root, save=cw.every(1), keep=cw.keep_all()) as manager:
        for step in (1, 2, 3):
            train_step(state)
            manager.step(step, state)
    return state


@pytest.fixture(scope="module")
def saved_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run written once for the tests that only read it."""
    root = tmp_path_factory.mktemp("saved") / "run"
    _saved_run(root)
    return root


def _bits(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return str(tensor.dtype), tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes()


def _fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """Every bit of a state: tensors, optimizer state and groups, other objects' state dicts,
    and the process's RNG states."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            out[key] = {n: _bits(t) for n, t in value.state_dict().items()}
        elif isinstance(value, torch.optim.Optimizer):
            per_param = {
                (g, i): {k: _bits(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for g, group in enumerate(value.param_groups)
                for i, p in enumerate(group["params"])
                for s in [value.state.get(p, {})]
            }
            groups = [{k: v for k, v in g.items() if k != "params"} for g in value.param_groups]
            params = [_bits(p) for g in value.param_groups for p in g["params"]]
            out[key] = (per_param, repr(groups), params)
        elif isinstance(value, torch.Tensor):
            out[key] = (_bits(value), id(value))
        elif hasattr(value, "state_dict"):
            out[key] = repr(value.state_dict())
        else:
            out[key] = repr(value)
    out["rng"] = (
        _bits(torch.get_rng_state()),
        random.getstate(),
        repr(np.random.get_state(legacy=False)),
    )
    return out


def _adam(model: nn.Module, *, trained: bool) -> dict[str, Any]:
    """``model`` with an Adam and a scheduler over it, stepped once when ``trained``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if trained:  # one step on inputs of the model's own width and dtype
        first = next(model.parameters())
        model(torch.randn(4, first.shape[1], dtype=first.dtype)).pow(2).mean().backward()
        opt.step()
        scheduler.step()
    # the optimizer first: loaded before the model, as the half-restored state was
    return {
        "optimizer": opt,
        "model": model,
        "scheduler": scheduler,
        "ema": torch.zeros(2),
        "data": {},
    }


def _bigger_head() -> nn.Module:
    model = Tiny()
    model.head = nn.Linear(32, 2)  # the backbone fits, and would have been read into
    return model


def _extra_buffer() -> nn.Module:
    model = Tiny()
    model.register_buffer("scale", torch.ones(3))
    return model


def _no_head_bias() -> nn.Module:
    model = Tiny()
    model.head = nn.Linear(32, 1, bias=False)
    return model


def _shape(trained: bool) -> dict[str, Any]:
    return _adam(_bigger_head(), trained=trained)


def _dtype(trained: bool) -> dict[str, Any]:
    return _adam(Tiny().double(), trained=trained)


def _missing_key(trained: bool) -> dict[str, Any]:
    return _adam(_extra_buffer(), trained=trained)


def _extra_key(trained: bool) -> dict[str, Any]:
    return _adam(_no_head_bias(), trained=trained)


def _optimizer_of_another_model(trained: bool) -> dict[str, Any]:
    state = _adam(Tiny(16), trained=trained)
    state["model"] = Tiny()  # the model fits; only the optimizer is another model's
    return state


def _another_optimizer(trained: bool) -> dict[str, Any]:
    state = _adam(Tiny(), trained=trained)
    opt = torch.optim.SGD(state["model"].parameters(), lr=1e-2, momentum=0.9)
    if trained:
        state["model"](torch.randn(4, 32)).pow(2).mean().backward()
        opt.step()
    state["optimizer"] = opt
    state["scheduler"] = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return state


def _plain_tensor(trained: bool) -> dict[str, Any]:
    state = _adam(Tiny(), trained=trained)
    state["ema"] = torch.zeros(3)
    return state


def _missing_entry(trained: bool) -> dict[str, Any]:
    state = _adam(Tiny(), trained=trained)
    state["teacher"] = Tiny()
    return state


def _not_stateful_now(trained: bool) -> dict[str, Any]:
    state = _adam(Tiny(), trained=trained)
    state["scheduler"] = 3
    return state


MISMATCHES: list[tuple[str, Callable[[bool], dict[str, Any]], str]] = [
    ("shape", _shape, r"'model' \(Tiny\): 'head.weight' saved as \(1, 32\) float32, the live "
     r"one is \(2, 32\) float32"),
    ("dtype", _dtype, r"'head.bias' saved as \(1,\) float32, the live one is \(1,\) float64"),
    ("missing key", _missing_key, r"'model' \(Tiny\): the checkpoint lacks 'scale'"),
    ("extra key", _extra_key, r"the checkpoint has 'head.bias', which the live one lacks"),
    ("optimizer of another model", _optimizer_of_another_model,
     r"'optimizer' \(Adam\): the state of parameter 0 \(group 0, shape \(16, 16\)\) is "
     r"shaped for another parameter \(exp_avg \(32, 32\), exp_avg_sq \(32, 32\)\)"),
    ("another kind of optimizer", _another_optimizer,
     r"'optimizer' \(SGD\): saved from Adam, the live optimizer is SGD: build an Adam "
     r"optimizer to restore into, or leave 'optimizer' out of the state"),
    ("plain tensor", _plain_tensor, r"'ema': saved as \(2,\) float32, the live tensor is \(3,\)"),
    ("missing entry", _missing_entry, r"no entry for 'teacher'.*strict=False"),
    ("not stateful now", _not_stateful_now, r"'scheduler' was saved from an object with "
     r"load_state_dict\(\), but the state now holds a int"),
]  # fmt: skip


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("kind", "build", "expected"), MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_a_state_that_does_not_fit_is_refused_and_left_bit_identical(
    saved_root: Path,
    reader: Reader,
    trained: bool,
    kind: str,
    build: Callable[[bool], dict[str, Any]],
    expected: str,
) -> None:
    live = build(trained)
    torch.manual_seed(1234)  # an RNG state unlike the saved one
    before = _fingerprint(live)
    with pytest.raises(cw.ConfigError) as err:
        reader(saved_root, live)
    assert _fingerprint(live) == before, f"{kind}: the failed restore changed the state"
    message = str(err.value)
    assert f"checkpoint at step 3 of {saved_root}" in message
    assert re.search(expected, message), message
    assert "left unchanged" in message
    assert "Build each object as the one that was saved" in message


def test_every_mismatch_is_named_in_one_error(saved_root: Path) -> None:
    """The issue's case: an optimizer for a bigger model, restored before the model."""
    bigger = Tiny(64)
    optimizer = torch.optim.Adam(bigger.parameters())
    live: dict[str, Any] = {"optimizer": optimizer, "model": bigger}
    with pytest.raises(cw.ConfigError) as err:
        cw.open_run(saved_root).restore(live, strict=False)
    message = str(err.value)
    assert "'model' (Tiny): 'backbone.0.weight' saved as (32, 32) float32" in message
    assert "'optimizer' (Adam): the state of parameter 0 (group 0, shape (64, 64))" in message
    assert "'optimizer' (Adam): the state of parameter 4 (group 0, shape (1, 64))" in message
    optimizer.zero_grad()
    bigger(torch.randn(2, 64)).sum().backward()
    optimizer.step()  # still the optimizer it was: it steps


def test_a_state_that_fits_restores_every_part(tmp_path: Path) -> None:
    saved = _saved_run(tmp_path)
    live = _adam(Tiny(), trained=True)
    live["ema"], live["data"] = torch.zeros(2), None
    assert cw.open_run(tmp_path).restore(live, rng=True) == 3
    for key in ("model", "optimizer", "scheduler"):
        assert str(live[key].state_dict()) == str(saved[key].state_dict())
    assert torch.equal(live["ema"], saved["ema"])
    assert live["data"] == saved["data"]


def test_a_subset_restore_names_what_it_left_out_and_reads_only_what_it_needs(
    tmp_path: Path,
) -> None:
    saved = _saved_run(tmp_path)
    run = cw.open_run(tmp_path)
    moment = run.manifest(3).tensors["optimizer/state/0/exp_avg"].object
    (tmp_path / object_path(moment)).write_bytes(b"\0" * 4)  # damage what the model needs not
    model = Tiny()
    with pytest.warns(cw.RestoreWarning) as caught:
        assert run.restore({"model": model}) == 3
    (warning,) = [str(w.message) for w in caught]
    assert "'optimizer', 'scheduler', 'ema', 'data', which were not restored" in warning
    assert "__rng__" not in warning
    for name, tensor in saved["model"].state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    with pytest.raises(cw.ConfigError, match=r"no entry for 'teacher'.*strict=False"):
        run.restore({"model": Tiny(), "teacher": Tiny()})


def test_a_missing_run_can_be_required_and_names_the_run_one_folder_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output_dir = tmp_path / "hf_out"
    _saved_run(output_dir / "ckptwise")
    state = make_state()
    caplog.set_level(logging.INFO, logger="ckptwise")
    assert cw.open_run(tmp_path / "typo").restore(state) == 0  # the default: start afresh
    assert f"nothing to restore: {tmp_path / 'typo'} holds no ckptwise run" in caplog.text
    with pytest.raises(cw.CheckpointNotFoundError, match="missing='start'") as err:
        cw.open_run(tmp_path / "typo").restore(state, missing="error")
    assert f"{tmp_path / 'typo'} holds no ckptwise run" in str(err.value)
    with pytest.raises(cw.CheckpointNotFoundError) as err:
        cw.open_run(output_dir).restore(state, missing="error")
    assert f"did you mean {output_dir / 'ckptwise'}?" in str(err.value)
    with (
        cw.CheckpointManager(tmp_path / "new", save=cw.every(1)) as manager,
        pytest.raises(cw.CheckpointNotFoundError, match="has no committed checkpoint"),
    ):
        manager.restore(state, missing="error")
    caplog.clear()
    with pytest.warns(cw.RestoreWarning, match="'ema', 'data', which were not restored"):
        assert cw.open_run(output_dir / "ckptwise").restore(state, missing="error") == 3
    assert f"restoring step 3 of {output_dir / 'ckptwise'}: 'model', 'optimizer'" in caplog.text
    assert "restored step 3:" in caplog.text
    with pytest.raises(cw.ConfigError, match="missing= must be 'start'"):
        cw.open_run(output_dir).restore(state, missing="raise")  # type: ignore[arg-type]


def test_a_run_of_weights_only_checkpoints_is_no_silent_fresh_start(tmp_path: Path) -> None:
    with cw.CheckpointManager(tmp_path, save=cw.every(1)) as manager:
        manager.save(1, make_state(), variant=cw.weights_only())
    with pytest.warns(cw.RestoreWarning, match=r"only weights-only checkpoints \(steps 1\)"):
        assert cw.open_run(tmp_path).restore(make_state()) == 0
    with pytest.raises(cw.CheckpointNotFoundError, match="cannot resume training"):
        cw.open_run(tmp_path).restore(make_state(), missing="error")


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_a_read_for_evaluation_leaves_the_rng_states_alone_unless_asked(
    tmp_path: Path,
) -> None:
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    with cw.CheckpointManager(tmp_path, save=cw.every(1)) as manager:
        manager.step(1, {"w": torch.ones(2)})
    after_save = _draws()  # what the saved RNG states draw next

    def reseeded() -> tuple[float, float, float]:
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
        untouched = _draws()
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
        return untouched

    untouched = reseeded()
    cw.open_run(tmp_path).restore({"w": torch.zeros(2)})
    assert _draws() == untouched
    reseeded()
    cw.open_run(tmp_path).restore({"w": torch.zeros(2)}, rng=True)
    assert _draws() == after_save
    reseeded()
    with cw.CheckpointManager(tmp_path, save=cw.never()) as manager:
        manager.restore({"w": torch.zeros(2)})  # resuming training
    assert _draws() == after_save
