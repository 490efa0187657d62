"""The one tagged-JSON codec for every value that is not a tensor: no pickle, ever.

JSON holds ``None``, ``bool``, ``int``, ``str``, finite floats, lists and dicts with str keys
as they are. The rest becomes a *tagged node*, a dict whose tag key names its type:

- ``{TAG: "float", "value": "nan"}`` (also ``"inf"``, ``"-inf"``);
- ``{TAG: "tuple", "items": [...]}``;
- ``{TAG: "dict", "items": [[key, value], ...]}`` for keys that are not all str (keys are
  ``None``, ``bool``, ``int``, ``float`` or ``str``), or a dict that holds the tag key;
- a type its caller allows through a :class:`ValueType` (the snapshot's tensors, numpy
  arrays and scalars; DeepSpeed's sizes, enums and loss scalers).

:func:`encode_value` writes these nodes and :func:`decode_value` reads them back. The
snapshot's tree uses the tag key :data:`TAG`. A document that the snapshot then stores as
plain JSON uses its own tag key, so that its nodes stay data to the snapshot: the DeepSpeed
adapter's files, which ``Run.read`` gives back as JSON without importing DeepSpeed, use
``"__deepspeed__"``. Nodes written before this codec spelled their payload ``"v"``;
:func:`decode_value` reads it as ``"value"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptwise.errors import CorruptCheckpointError, SnapshotError

__all__ = ["TAG", "Decode", "Encode", "ValueType", "decode_value", "encode_value"]

#: the tag key of the snapshot's tree
TAG = "__ckptwise__"
#: ``encode(value, path)``: the node of a value inside a tagged value
Encode = Callable[[Any, str], Any]
#: ``decode(node, where)``: the value of a node inside a tagged node
Decode = Callable[[Any, str], Any]
_FLOATS = ("nan", "inf", "-inf")


@dataclass(frozen=True)
class ValueType:
    """A type beyond JSON that one user of the codec allows.

    ``matches`` is asked before the built-in types (so an ``int`` subclass can have its own
    tag); ``to_json(value, path, encode)`` returns the node's fields besides the tag,
    ``from_json(fields, where, decode)`` the value (fields are untrusted: raise
    ``KeyError``, ``TypeError`` or ``ValueError`` on a malformed node, which
    :func:`decode_value` reports as a :class:`~ckptwise.CorruptCheckpointError`).
    """

    tag: str
    matches: Callable[[Any], bool]
    to_json: Callable[[Any, str, Encode], dict[str, Any]]
    from_json: Callable[[Mapping[str, Any], str, Decode], Any]


def encode_value(
    value: Any,
    path: str,
    *,
    types: Sequence[ValueType] = (),
    keep: tuple[type, ...] = (),
    tag: str = TAG,
) -> Any:
    """``value`` as JSON with tagged nodes; instances of ``keep`` are left as they are.

    ``path`` names where the value sits (``model/layer/0``), for errors.

    Raises:
        SnapshotError: a value of a type the codec does not know (never pickled), or a dict
            key that is no ``None``/``bool``/``int``/``float``/``str``.
    """

    def encode(value: Any, path: str) -> Any:
        for kind in types:
            if kind.matches(value):
                return {tag: kind.tag, **kind.to_json(value, path, encode)}
        if value is None or isinstance(value, (bool, int, str, *keep)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {tag: "float", "value": repr(value)}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and tag not in value:
                return {k: encode(v, f"{path}/{k}") for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise SnapshotError(
                        f"{path}: dict key {k!r} of type {type(k).__name__} cannot be saved; "
                        "use str, int, float, bool or None keys"
                    )
                items.append([encode(k, path), encode(v, f"{path}/{k}")])
            return {tag: "dict", "items": items}
        if isinstance(value, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {tag: "tuple", "items": [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        raise SnapshotError(
            f"{path}: cannot save a value of type {type(value).__module__}."
            f"{type(value).__qualname__} without pickling it; give the object "
            "state_dict()/load_state_dict() methods that return tensors and JSON values, or "
            "leave it out of the state"
        )

    return encode(value, path)


def decode_value(
    node: Any,
    where: str,
    *,
    types: Sequence[ValueType] = (),
    keep: tuple[type, ...] = (),
    tag: str = TAG,
) -> Any:
    """The value :func:`encode_value` encoded as ``node`` (with the same ``types``, ``keep``
    and ``tag``); only the tags it writes are accepted.

    Raises:
        CorruptCheckpointError: a node of an unknown tag (perhaps from a newer ckptwise), a
            malformed node, or a value that JSON cannot hold.
    """
    by_tag = {kind.tag: kind for kind in types}

    def decode(node: Any, where: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str, *keep)):
            return node
        if isinstance(node, list):
            return [decode(v, where) for v in node]
        if not isinstance(node, Mapping):
            raise CorruptCheckpointError(f"{where}: unexpected node {node!r} in the state tree")
        kind = node.get(tag)
        if kind is None:
            return {k: decode(v, f"{where}/{k}") for k, v in node.items()}
        fields = {("value" if k == "v" else k): v for k, v in node.items() if k != tag}
        try:
            return _decode_tagged(kind, fields, where, by_tag, decode)
        except CorruptCheckpointError:  # a ValueError too, already precise
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed {kind!r} node {node!r}") from exc

    return decode(node, where)


def _decode_tagged(
    kind: object,
    fields: Mapping[str, Any],
    where: str,
    types: Mapping[str, ValueType],
    decode: Decode,
) -> Any:
    if isinstance(kind, str) and kind in types:
        return types[kind].from_json(fields, where, decode)
    if kind == "float":
        text = fields.get("value")
        if text not in _FLOATS:
            raise CorruptCheckpointError(f"{where}: bad float literal {text!r}")
        return float(text)
    if kind == "tuple":
        return tuple(decode(v, where) for v in fields.get("items", []))
    if kind == "dict":
        out = {}
        for pair in fields.get("items", []):
            if not isinstance(pair, list) or len(pair) != 2:
                raise CorruptCheckpointError(f"{where}: bad dict item {pair!r}")
            out[decode(pair[0], where)] = decode(pair[1], f"{where}/{pair[0]}")
        return out
    raise CorruptCheckpointError(
        f"{where}: unknown node type {kind!r}; it may be written by a newer ckptwise"
    )
