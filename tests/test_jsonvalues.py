"""The one tagged-JSON codec: values beyond JSON round-trip through plain JSON text, the
nodes of older writers still read, and nothing unknown is ever pickled or guessed."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptwise.errors import CorruptCheckpointError, SnapshotError
from ckptwise.jsonvalues import TAG, Decode, Encode, ValueType, decode_value, encode_value


def round_trip(value: Any, **options: Any) -> Any:
    text = json.dumps(encode_value(value, "x", **options), allow_nan=False)
    return decode_value(json.loads(text), "x", **options)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
keys = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        | st.dictionaries(keys, inner, max_size=3)
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Equality with NaN equal to itself and types compared (``True`` is not ``1``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@given(values)
def test_values_round_trip_through_json_text(value: Any) -> None:
    assert same(round_trip(value), value)


def test_nodes_are_tagged_with_the_callers_key() -> None:
    value = {"f": math.inf, "t": (1, 2), 3: "three"}
    assert encode_value(value, "x") == {
        TAG: "dict",
        "items": [
            ["f", {TAG: "float", "value": "inf"}],
            ["t", {TAG: "tuple", "items": [1, 2]}],
            [3, "three"],
        ],
    }
    assert encode_value((math.nan,), "x", tag="__other__") == {
        "__other__": "tuple",
        "items": [{"__other__": "float", "value": "nan"}],
    }
    # a dict that holds the tag key is data, not a node
    assert round_trip({TAG: "tuple", "items": []}) == {TAG: "tuple", "items": []}


class Meters(int):
    """An int subclass, to show that a caller's type is asked before the built-in ones."""


METERS = ValueType(
    "meters",
    lambda v: isinstance(v, Meters),
    lambda v, path, encode: {"value": int(v)},
    lambda fields, where, decode: Meters(fields["value"]),
)


def test_a_callers_type_comes_before_the_built_in_ones() -> None:
    assert encode_value([Meters(3)], "x", types=[METERS]) == [{TAG: "meters", "value": 3}]
    back = round_trip({"d": Meters(3)}, types=[METERS])
    assert type(back["d"]) is Meters
    assert back == {"d": 3}


def test_nested_values_of_a_callers_type_are_encoded_too() -> None:
    pair = ValueType(
        "pair",
        lambda v: isinstance(v, complex),
        lambda v, path, encode: {"value": encode((v.real, v.imag), path)},
        lambda fields, where, decode: complex(*decode(fields["value"], where)),
    )
    assert round_trip([complex(1, math.inf)], types=[pair]) == [complex(1, math.inf)]


def test_kept_values_pass_through_both_ways() -> None:
    marker = object()
    assert encode_value({"m": marker}, "x", keep=(object,))["m"] is marker
    assert decode_value({"m": marker}, "x", keep=(object,))["m"] is marker


def test_the_payload_older_writers_spelled_v_still_reads() -> None:
    old = {"__deepspeed__": "float", "v": "-inf"}
    assert decode_value(old, "x", tag="__deepspeed__") == -math.inf
    assert decode_value({TAG: "meters", "v": 5}, "x", types=[METERS]) == 5


@pytest.mark.parametrize(
    ("node", "pattern"),
    [
        ({TAG: "pickle", "value": "gASV"}, r"x: unknown node type 'pickle'.*newer ckptwise"),
        ({TAG: "float", "value": "1e999"}, r"bad float literal '1e999'"),
        ({TAG: "dict", "items": [[1]]}, r"bad dict item \[1\]"),
        ({TAG: "meters"}, r"x: malformed 'meters' node"),
        ({TAG: "tuple", "items": 5}, r"x: malformed 'tuple' node"),
        ([1, object()], r"unexpected node"),
    ],
)
def test_bad_nodes_are_corrupt_checkpoints(node: Any, pattern: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=pattern):
        decode_value(node, "x", types=[METERS])


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ({"fn": len}, r"x/fn: cannot save a value of type builtins.builtin_function"),
        ({(1, 2): 3}, r"x: dict key \(1, 2\) of type tuple"),
        ({1.5j}, r"cannot save a value of type builtins.set"),
    ],
)
def test_unknown_values_are_refused_not_pickled(value: Any, pattern: str) -> None:
    with pytest.raises(SnapshotError, match=pattern):
        encode_value(value, "x")


def test_the_callbacks_have_the_documented_shapes() -> None:
    def to_json(value: Any, path: str, encode: Encode) -> dict[str, Any]:
        return {"value": encode(list(value), path)}

    def from_json(fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        return frozenset(decode(fields["value"], where))

    frozen = ValueType("frozenset", lambda v: isinstance(v, frozenset), to_json, from_json)
    assert round_trip(frozenset({1, 2}), types=[frozen]) == frozenset({1, 2})
