"""The asynchronous default stores the state as it was at ``step()``, whatever writes it next.

Each of the first three tests failed before the copy became sound: a numpy array changed in
place, a restore into the live tensors, and a ``.data`` write right after ``step()`` all
leave torch's version counter as it was, and the copier used to trust it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ckptwise as cw
import ckptwise.snapshot.copying as copying


def _state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model[0].requires_grad_(False)  # frozen: no optimizer touches it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return {
        "model": model,
        "optimizer": optimizer,
        "position": np.zeros(10_000, np.int64),
        "counts": torch.zeros(10_000),
    }


def _train(state: dict[str, Any]) -> None:
    state["optimizer"].zero_grad()
    state["model"](torch.randn(4, 32)).pow(2).mean().backward()
    state["optimizer"].step()


def _values(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Clones of everything the checkpoint holds that matters here, as it is now."""
    out = {f"model/{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    out["position"] = torch.from_numpy(state["position"].copy())
    out["counts"] = state["counts"].clone()
    return out


def _saved(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    loaded = cw.open_run(run_dir).load(step)
    out = {f"model/{k}": v for k, v in loaded["model"].items()}
    out["position"] = torch.as_tensor(loaded["position"])
    out["counts"] = loaded["counts"]
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_numpy_array_changed_in_place_is_saved_as_it_is_at_each_step(run_dir: Path) -> None:
    state = _state()
    expected = {}
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in (1, 2, 3):
            state["position"][3] = step  # a data-loader position: a few elements change
            manager.step(step, state)
            expected[step] = _values(state)
        manager.wait()
    for step, values in expected.items():
        _assert_same(_saved(run_dir, step), values)


def test_a_save_after_going_back_holds_the_restored_values(run_dir: Path) -> None:
    state = _state()
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in range(1, 21):
            _train(state)
            state["counts"][3] = step  # a plain tensor entry, a few elements changing
            manager.step(step, state)
        manager.wait()
        assert manager.restore(state, step=10) == 10  # reads into the live tensors
        at_ten = _values(state)
        manager.step(11, state)  # no training in between: step 11 is step 10's state
        manager.wait()
    _assert_same(_saved(run_dir, 11), at_ten)


def test_a_data_write_right_after_step_is_not_in_the_checkpoint(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill = copying._fill

    def slow(target: torch.Tensor, source: torch.Tensor) -> None:
        time.sleep(0.2)  # a copy of a large model outlasts the loop's next line
        fill(target, source)

    monkeypatch.setattr(copying, "_fill", slow)
    state = _state()
    _train(state)
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in (1, 2, 3):
            manager.step(step, state)
            at_step = _values(state)
            for p in state["model"].parameters():
                p.data.clamp_(-0.01, 0.01)  # weight clipping after step(): past the counter
            manager.wait()
            _assert_same(_saved(run_dir, step), at_step)
            _train(state)


def test_the_default_takes_no_deferred_copy_and_defer_copy_needs_a_background_save(
    run_dir: Path,
) -> None:
    state = _state()
    _train(state)
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        manager.step(1, state)
        assert not state["optimizer"]._optimizer_step_pre_hooks  # nothing waits on a copy
        copied, deferred = manager.last_copy
        assert deferred == 0
        assert copied >= sum(t.nbytes for t in state["model"].state_dict().values())
    with pytest.raises(cw.ConfigError, match=r"defer_copy=True .* saves synchronously"):
        cw.CheckpointManager(run_dir, async_save=False, defer_copy=True)


ACTIONS = st.lists(
    st.sampled_from(
        [
            "train",
            "numpy_write",
            "data_write",
            "no_grad_in_place",
            "load_state_dict",
            "restore_older",
            "forward",
        ]
    ),
    max_size=4,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(actions=ACTIONS, saves=st.integers(min_value=2, max_value=3))
def test_no_committed_checkpoint_differs_from_the_state_at_step(
    tmp_path_factory: pytest.TempPathFactory, actions: list[str], saves: int
) -> None:
    """Between ``step()`` and the next one the loop may do anything a loop does: no save
    fails and every committed checkpoint is the state at its ``step()``."""
    run_dir = tmp_path_factory.mktemp("run")
    state = _state()
    other = _state(seed=1)
    expected = {}
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in range(1, saves + 1):
            _train(state)
            manager.step(step, state)
            expected[step] = _values(state)
            for action in actions:
                if action == "train":
                    _train(state)
                elif action == "numpy_write":
                    state["position"][7] += 1
                elif action == "data_write":
                    state["model"][1].weight.data.mul_(0.5)
                    state["model"][0].bias.data[0] += 1.0
                elif action == "no_grad_in_place":
                    with torch.no_grad():
                        state["model"][0].weight.add_(0.25)
                elif action == "load_state_dict":
                    state["model"].load_state_dict(other["model"].state_dict())
                elif action == "restore_older" and step > 1:
                    manager.restore(state, step=1)
                elif action == "forward":
                    state["model"](torch.randn(2, 32))
        manager.wait()
        steps = cw.open_run(run_dir).steps()
    for step in steps:
        _assert_same(_saved(run_dir, step), expected[step])
