"""DeepSpeed's own types in its checkpoints through the shared tagged-JSON codec, and the
nodes written before it (payload ``"v"``)."""

from __future__ import annotations

import collections
import json
import math
from typing import Any

import pytest
import torch

from ckptwise.errors import CorruptCheckpointError, SnapshotError

pytest.importorskip("deepspeed")

from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from ckptwise.integrations.transformers.deepspeed import _from_plain, _to_plain


def test_deepspeed_values_round_trip_through_json_with_tensors_left_in_place() -> None:
    tensor = torch.arange(3.0)
    scaler = DynamicLossScaler(
        init_scale=2.0**8,
        scale_window=100,
        min_scale=1.0,
        delayed_shift=2,
        consecutive_hysteresis=False,
    )
    value = {
        "stage": ZeroStageEnum(3),
        "shapes": [collections.OrderedDict([("b", torch.Size([2, 3])), ("a", torch.Size([]))])],
        "dtype": torch.bfloat16,
        "address": fragment_address(numel=4, start=8),
        "scaler": scaler,
        "groups": collections.OrderedDict([(0, [1, 2]), (1, (3, math.inf))]),
        "w": tensor,
    }
    plain = _to_plain(value, "mp_rank_00_model_states.pt")
    assert plain["w"] is tensor  # the snapshot stores it
    del plain["w"]
    text = json.dumps(plain, allow_nan=False)
    assert "__ckptwise__" not in text  # plain data to the snapshot
    back = _from_plain(json.loads(text), "f")
    assert type(back["stage"]) is ZeroStageEnum
    assert back["stage"] == 3
    assert back["shapes"] == [collections.OrderedDict(b=torch.Size([2, 3]), a=torch.Size([]))]
    assert list(back["shapes"][0]) == ["b", "a"]
    assert back["dtype"] is torch.bfloat16
    assert back["address"] == fragment_address(numel=4, start=8)
    assert type(back["scaler"]) is DynamicLossScaler
    assert vars(back["scaler"]) == vars(scaler)
    assert back["groups"] == collections.OrderedDict([(0, [1, 2]), (1, (3, math.inf))])
    assert isinstance(back["groups"], collections.OrderedDict)


def test_nodes_written_before_the_shared_codec_still_read() -> None:
    old: dict[str, Any] = {
        "size": {"__deepspeed__": "Size", "v": [2, 3]},
        "stage": {"__deepspeed__": "ZeroStageEnum", "v": 2},
        "dtype": {"__deepspeed__": "dtype", "v": "float16"},
        "address": {"__deepspeed__": "fragment_address", "v": [4, 8]},
        "loss": {"__deepspeed__": "float", "v": "nan"},
        "od": {"__deepspeed__": "OrderedDict", "dict": {"z": 1, "a": 2}},
    }
    back = _from_plain(old, "f")
    assert back["size"] == torch.Size([2, 3])
    assert back["stage"] == ZeroStageEnum(2)
    assert back["dtype"] is torch.float16
    assert back["address"] == fragment_address(numel=4, start=8)
    assert math.isnan(back["loss"])
    assert list(back["od"].items()) == [("z", 1), ("a", 2)]


def test_unknown_and_malformed_values_are_refused() -> None:
    with pytest.raises(SnapshotError, match="this DeepSpeed version is not supported yet"):
        _to_plain({"x": object()}, "f")
    with pytest.raises(CorruptCheckpointError, match="malformed 'dtype'"):
        _from_plain({"__deepspeed__": "dtype", "value": "Tensor"}, "f")
    with pytest.raises(CorruptCheckpointError, match="unknown node type 'pickle'"):
        _from_plain({"__deepspeed__": "pickle", "value": ""}, "f")
