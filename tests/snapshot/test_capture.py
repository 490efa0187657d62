"""Capturing a state as tensors + JSON and loading it back, without pickle."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptwise as cw
from ckptwise.snapshot import RngState, apply, capture, check_fits, rebuild, tensor_names


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    snap = capture(state)
    tree = json.loads(json.dumps(snap.tree, allow_nan=False))  # the tree is strict JSON
    tensors = {k: v.clone() for k, v in snap.tensors.items()}
    return {k: rebuild(tree, tensors, k) for k in tree}


def test_values_keep_their_types() -> None:
    value = {
        "ints": {0: "a", 1: "b", -3: None},
        "mixed": {1.5: True, "s": (1, 2.5, "x")},
        "floats": [math.inf, -math.inf, 0.1],
        "tag": {"__ckptwise__": "not a tag"},
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "npscalar": np.float32(1.25),
        "nested": [[{"deep": (None,)}]],
    }
    back = round_trip({"v": value})["v"]
    assert back["ints"] == {0: "a", 1: "b", -3: None}
    assert back["mixed"] == {1.5: True, "s": (1, 2.5, "x")}
    assert back["floats"] == [math.inf, -math.inf, 0.1]
    assert back["tag"] == {"__ckptwise__": "not a tag"}
    assert isinstance(back["np"], np.ndarray)
    assert back["np"].dtype == np.int16
    assert (back["np"] == value["np"]).all()
    assert type(back["npscalar"]) is np.float32
    assert back["npscalar"] == np.float32(1.25)
    assert back["nested"] == [[{"deep": (None,)}]]


def test_nan_survives() -> None:
    assert math.isnan(round_trip({"x": math.nan})["x"])


def test_optimizer_state_with_int_keys_round_trips() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    snap = capture({"optimizer": opt})
    assert set(snap.tensors) == {
        "optimizer/state/0/step",
        "optimizer/state/0/exp_avg",
        "optimizer/state/0/exp_avg_sq",
        "optimizer/state/1/step",
        "optimizer/state/1/exp_avg",
        "optimizer/state/1/exp_avg_sq",
    }
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    apply({"optimizer": fresh}, snap.tree, snap.tensors)
    assert str(fresh.state_dict()) == str(opt.state_dict())


def test_colliding_paths_get_distinct_names() -> None:
    snap = capture({"a": {"b/c": torch.zeros(1), "b": {"c": torch.ones(1)}}})
    assert sorted(snap.tensors) == ["a/b/c", "a/b/c#2"]
    back = round_trip({"a": {"b/c": torch.zeros(1), "b": {"c": torch.ones(1)}}})
    assert torch.equal(back["a"]["b"]["c"], torch.ones(1))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"cfg": {"fn": len}}, r"cfg/fn: cannot save a value of type builtins.builtin_function"),
        ({"x": [object()]}, r"x/0: cannot save"),
        ({"x": {(1, 2): 3}}, r"x: dict key \(1, 2\) of type tuple"),
        ({"x": torch.zeros(3).to_sparse()}, r"x: .*sparse"),
        ({"a/b": 1}, r"state keys must be non-empty strings without '/'"),
        ({"x": np.array(["a"])}, r"numpy arrays of dtype <U1"),
    ],
)
def test_unsaveable_values_are_named(state: dict[str, Any], message: str) -> None:
    with pytest.raises(cw.SnapshotError, match=message):
        capture(state)


def test_rng_state_restores_every_generator() -> None:
    rng = RngState()
    saved = round_trip({"rng": rng})["rng"]
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    rng.load_state_dict(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_stateful_mismatch_is_reported() -> None:
    snap = capture({"model": torch.nn.Linear(2, 2)})
    with pytest.raises(cw.CheckpointError, match="now holds a int"):
        apply({"model": 3}, snap.tree, snap.tensors)


class _Picky:
    """A stateful object of the user's own that refuses some states."""

    def __init__(self, size: int) -> None:
        self.size = size

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise RuntimeError(f"size {state['size']} saved, this one has {self.size}")


def test_an_object_that_refuses_its_saved_state_is_a_config_error_naming_it(
    tmp_path: Path,
) -> None:
    with cw.CheckpointManager(tmp_path, save=cw.every(1)) as m:
        m.save(1, {"picky": _Picky(4)})
    with pytest.raises(cw.ConfigError, match="'picky' \\(_Picky\\) refused") as err:
        cw.open_run(tmp_path).restore({"picky": _Picky(8)})
    assert "size 4 saved, this one has 8" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_a_module_that_does_not_fit_is_refused_before_anything_is_loaded() -> None:
    snap = capture({"model": torch.nn.Linear(4, 2), "ema": torch.ones(2)})
    model, ema = torch.nn.Linear(8, 2), torch.zeros(2)
    weight = model.weight.detach().clone()
    with pytest.raises(cw.ConfigError, match=r"'weight' saved as \(2, 4\) float32") as err:
        apply({"ema": ema, "model": model}, snap.tree, snap.tensors, where="here")
    assert str(err.value).startswith("here does not fit the state passed to restore")
    assert torch.equal(ema, torch.zeros(2))  # the entry before it was not loaded either
    assert torch.equal(model.weight, weight)


def test_the_check_needs_only_shapes_and_dtypes() -> None:
    snap = capture({"model": torch.nn.Linear(4, 2), "noise": np.zeros(3, dtype=np.float32)})
    meta = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in snap.tensors.items()}
    check_fits({"model": torch.nn.Linear(4, 2), "noise": None}, snap.tree, meta)
    with pytest.raises(cw.ConfigError, match=r"'bias' saved as \(2,\) float32.*float64"):
        check_fits({"model": torch.nn.Linear(4, 2).double()}, snap.tree, meta)
    assert tensor_names(snap.tree, ["model"]) == {"model/weight", "model/bias"}
