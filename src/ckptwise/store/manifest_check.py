"""Field-by-field validation of an untrusted manifest document.

:func:`manifest_from_doc` turns a parsed manifest (JSON already parsed, digest already
checked) into a :class:`~ckptwise.store.manifest.Manifest` only if every field holds what
the format allows: object ids are hex digests (never paths), dtypes and codecs come from
closed sets, sizes agree with shapes, the state tree is well formed and names only tensors
the manifest lists, and every number fits what reads it. Anything else raises
:class:`~ckptwise.errors.FormatError` naming the file and the field. The writer runs the
same checks on what it is about to write, so every manifest written reads back.

It is long because it checks every field of the format, one small function per field; it is
the one place that says what a manifest may hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ckptwise.errors import FormatError
from ckptwise.store.codecs import DELTA, RAW
from ckptwise.store.manifest_types import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ITEMSIZES,
    MAX_CHAIN,
    MAX_DEPTH,
    Manifest,
    RankView,
    Shard,
    TensorEntry,
)

__all__ = ["check_version", "malformed", "manifest_from_doc", "short_repr"]

#: the snapshot layer's tag of a typed node in the state tree (see docs/FORMAT.md)
_TAG = "__ckptwise__"
#: Unix times a manifest may hold: what ``datetime`` represents (years 1 to 9999)
_TIMES = (-62_135_596_800.0, 253_402_300_799.0)
#: numpy scalar dtypes a tree may name (bool, ints, floats, complex, unicode)
_NP_SCALAR = re.compile(r"^[<>|=]?(b1|[iu][1248]|f(2|4|8|16)|c(8|16|32)|U[0-9]{1,6})$")
_OBJECT_ID = re.compile(r"^[0-9a-f]{64}$")


def malformed(where: str, problem: str) -> FormatError:
    """The error for a manifest (``where`` names its file) with ``problem`` in a field."""
    return FormatError(f"manifest {where} is malformed: {problem}")


def _int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise malformed(where, f"{what} must be a non-negative integer, got {short_repr(value)}")
    return value


def _float(value: Any, what: str, where: str) -> float:
    """A JSON number as a finite float (an integer too large for one is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise malformed(where, f"{what} is {short_repr(value)}, not a number")
    try:
        number = float(value)
    except OverflowError:
        raise malformed(where, f"{what} is {short_repr(value)}, too large for a float") from None
    if not math.isfinite(number):
        raise malformed(where, f"{what} is not finite")
    return number


def _time(value: Any, what: str, where: str) -> float:
    number = _float(value, what, where)
    if not _TIMES[0] <= number <= _TIMES[1]:
        raise malformed(where, f"{what} {number!r} is not a Unix time of the years 1 to 9999")
    return number


def short_repr(value: Any) -> str:
    """``repr(value)``, cut short: a malformed field may be huge."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**50 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(name: Any, raw: Any, where: str, codecs: frozenset[str]) -> TensorEntry:
    if not isinstance(name, str) or not name:
        raise malformed(where, f"tensor name {short_repr(name)} is not a non-empty string")
    if not isinstance(raw, dict):
        raise malformed(where, f"entry for tensor {name!r} is not an object")
    obj = raw.get("object")
    if not isinstance(obj, str) or not _OBJECT_ID.match(obj):
        raise malformed(
            where, f"tensor {name!r} has object id {short_repr(obj)}, not a 64-digit hex digest"
        )
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise malformed(where, f"tensor {name!r} has unknown dtype {short_repr(dtype)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > 64:
        raise malformed(
            where, f"tensor {name!r} has shape {short_repr(shape)}, not a list of dimensions"
        )
    dims = tuple(_int(d, f"a dimension of {name!r}", where) for d in shape)
    nbytes = _int(raw.get("nbytes"), f"nbytes of {name!r}", where)
    expected = math.prod(dims) * ITEMSIZES[dtype]
    if nbytes != expected:
        raise malformed(
            where, f"tensor {name!r} says {nbytes} bytes but its shape needs {expected}"
        )
    codec = raw.get("codec", RAW)
    if not isinstance(codec, str) or codec not in codecs:
        raise FormatError(
            f"manifest {where}: tensor {name!r} uses codec {short_repr(codec)}, which this version "
            f"of ckptwise does not know ({', '.join(sorted(codecs))}); upgrade ckptwise to "
            "read it"
        )
    stored = _int(raw.get("stored_bytes", nbytes), f"stored_bytes of {name!r}", where)
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise malformed(where, f"tensor {name!r} has a note that is not a string")
    bases = _bases(raw.get("bases", []), name, where, codecs)
    if (codec == DELTA) != bool(bases):
        raise malformed(where, f"tensor {name!r}: codec {codec!r} does not match its bases")
    shard = _shard(raw.get("shard"), name, dims, where)
    return TensorEntry(
        object=obj,
        dtype=dtype,
        shape=dims,
        nbytes=nbytes,
        codec=codec,
        stored_bytes=stored,
        note=note,
        bases=bases,
        shard=shard,
    )


def _shard(raw: Any, name: str, dims: tuple[int, ...], where: str) -> Shard | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise malformed(where, f"tensor {name!r} has a shard that is not an object")
    shape, offsets = raw.get("shape"), raw.get("offsets")
    if not (isinstance(shape, list) and isinstance(offsets, list)) or not (
        len(shape) == len(offsets) == len(dims)
    ):
        raise malformed(
            where, f"tensor {name!r}: shard shape and offsets must be lists of its rank"
        )
    whole = tuple(_int(d, f"a shard dimension of {name!r}", where) for d in shape)
    at = tuple(_int(d, f"a shard offset of {name!r}", where) for d in offsets)
    if any(o + d > w for o, d, w in zip(at, dims, whole, strict=True)):
        raise malformed(where, f"tensor {name!r}: its shard does not fit the whole tensor")
    return Shard(whole, at)


def _names(raw: Any, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise malformed(where, f"{what} must be a list of names")
    return tuple(raw)


def _rank_view(raw: Any, index: int, where: str, codecs: frozenset[str]) -> RankView:
    what = f"ranks[{index}]"
    if not isinstance(raw, dict):
        raise malformed(where, f"{what} is not an object")
    tensors, tree = raw.get("tensors", {}), raw.get("tree", {})
    if not isinstance(tensors, dict) or not isinstance(tree, dict):
        raise malformed(where, f"{what}: 'tensors' and 'tree' must be objects")
    return RankView(
        tensors={n: _entry(n, e, where, codecs) for n, e in tensors.items()},
        absent=_names(raw.get("absent", []), f"{what}.absent", where),
        tree=tree,
        tree_absent=_names(raw.get("tree_absent", []), f"{what}.tree_absent", where),
    )


def _bases(
    raw: Any, name: str, where: str, codecs: frozenset[str]
) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(raw, list) or len(raw) > MAX_CHAIN:
        raise malformed(
            where, f"tensor {name!r} has bases that are not a list of at most {MAX_CHAIN}"
        )
    out = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 3):
            raise malformed(
                where, f"tensor {name!r}: base {i} is not [object, codec, stored_bytes]"
            )
        oid, codec, stored = item
        if not isinstance(oid, str) or not _OBJECT_ID.match(oid):
            raise malformed(where, f"tensor {name!r}: base {i} has object id {short_repr(oid)}")
        last = i == len(raw) - 1
        if not isinstance(codec, str) or codec not in codecs or (codec == DELTA) == last:
            raise malformed(where, f"tensor {name!r}: base {i} has codec {short_repr(codec)}")
        out.append((oid, codec, _int(stored, f"stored bytes of base {i} of {name!r}", where)))
    return tuple(out)


#: tensor names a state tree refers to, each with whether it is read back as a numpy array
_Refs = list[tuple[str, bool]]
#: dtypes numpy has (an ``ndarray`` node's tensor must have one)
_NUMPY_DTYPES = frozenset(ITEMSIZES) - {"bfloat16", "float8_e4m3fn", "float8_e5m2"}


def _scalar_key(node: Any) -> bool:
    """Whether ``node`` decodes to a dict key the snapshot layer writes (a JSON scalar or a
    non-finite float)."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return True
    return isinstance(node, dict) and node.get(_TAG) == "float"


def _tree_refs(node: Any, what: str, where: str) -> _Refs:
    """Check a state tree node (see docs/FORMAT.md), iteratively, at most :data:`MAX_DEPTH`
    deep; the tensors it refers to."""
    refs: _Refs = []
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise malformed(where, f"{what} nests deeper than {MAX_DEPTH} levels (MAX_DEPTH)")
        if value is None or isinstance(value, (bool, int, str)):
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                raise malformed(where, f"{what} holds {value!r}, which JSON cannot")
            continue
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise malformed(where, f"{what} holds {short_repr(value)}, which is not JSON")
        tag = value.get(_TAG)
        if tag is None:
            stack.extend((v, depth + 1) for v in value.values())
        elif tag in ("tensor", "ndarray"):
            name = value.get("name")
            if not isinstance(name, str):
                raise malformed(where, f"{what} names tensor {short_repr(name)}, not a string")
            refs.append((name, tag == "ndarray"))
        elif tag == "float":
            if value.get("value") not in ("nan", "inf", "-inf"):
                raise malformed(where, f"{what} has float literal {short_repr(value.get('value'))}")
        elif tag == "npscalar":
            dtype, scalar = value.get("dtype"), value.get("value")
            if not isinstance(dtype, str) or not _NP_SCALAR.match(dtype):
                raise malformed(where, f"{what} has numpy scalar dtype {short_repr(dtype)}")
            if not _scalar_key(scalar):
                raise malformed(where, f"{what} has numpy scalar value {short_repr(scalar)}")
        elif tag == "tuple":
            items = value.get("items")
            if not isinstance(items, list):
                raise malformed(where, f"{what} has a tuple whose items are not a list")
            stack.extend((v, depth + 1) for v in items)
        elif tag == "dict":
            items = value.get("items")
            if not isinstance(items, list):
                raise malformed(where, f"{what} has a dict whose items are not a list")
            for pair in items:
                if not (isinstance(pair, list) and len(pair) == 2 and _scalar_key(pair[0])):
                    raise malformed(
                        where, f"{what} has dict item {short_repr(pair)}, not [key, value]"
                    )
                stack.append((pair[1], depth + 1))
        else:
            raise FormatError(
                f"manifest {where}: {what} holds a node of type {short_repr(tag)}, which this "
                "version of ckptwise does not know; upgrade ckptwise to read it"
            )
    return refs


def _tree(raw: Any, what: str, where: str) -> dict[str, _Refs]:
    """Check a state tree (top-level entries by key); each entry's tensor references."""
    if not isinstance(raw, dict):
        raise malformed(where, f"{what} is not an object")
    refs: dict[str, _Refs] = {}
    for key, entry in raw.items():
        if not isinstance(key, str) or not key:
            raise malformed(where, f"{what} has key {short_repr(key)}, not a non-empty string")
        kind = entry.get("kind") if isinstance(entry, dict) else None
        field_ = (
            {"stateful": "state", "value": "value"}.get(kind) if isinstance(kind, str) else None
        )
        if field_ is None or field_ not in entry:
            raise malformed(
                where,
                f"{what}[{key!r}] is not {{'kind': 'stateful', 'state': ...}} or "
                "{'kind': 'value', 'value': ...}",
            )
        refs[key] = _tree_refs(entry[field_], f"{what}[{key!r}]", where)
    return refs


def _check_refs(
    refs: dict[str, _Refs], tensors: Mapping[str, TensorEntry], what: str, where: str
) -> None:
    for key, names in refs.items():
        for name, as_array in names:
            entry = tensors.get(name)
            if entry is None:
                raise malformed(where, f"{what}[{key!r}] names tensor {name!r}, which it lacks")
            if as_array and entry.dtype not in _NUMPY_DTYPES:
                raise malformed(
                    where, f"{what}[{key!r}]: tensor {name!r} of {entry.dtype} is no numpy array"
                )


def _plain(node: Any, what: str, where: str) -> None:
    """Refuse anything but plain JSON (string keys, finite floats), nested at most
    :data:`MAX_DEPTH` deep."""
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise malformed(where, f"{what} nests deeper than {MAX_DEPTH} levels (MAX_DEPTH)")
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif not (
            value is None
            or isinstance(value, (bool, int, str))
            or (isinstance(value, float) and math.isfinite(value))
        ):
            raise malformed(where, f"{what} holds {short_repr(value)}, which is not JSON")


def _extra(raw: Any, where: str) -> dict[str, Any]:
    """Check ``extra``, and the manager's bookkeeping in it, field by field."""
    if not isinstance(raw, dict):
        raise malformed(where, "'extra' is not an object")
    _plain(raw, "'extra'", where)
    history = raw.get("metric_history", {})
    if not isinstance(history, dict):
        raise malformed(where, "extra.metric_history is not an object")
    for metric, stats in history.items():
        what = f"extra.metric_history[{metric!r}]"
        if not isinstance(stats, dict):
            raise malformed(where, f"{what} is not an object")
        for key in ("count", "last_step"):
            _int(stats.get(key), f"{what}.{key}", where)
        for key in ("min_step", "max_step"):
            if stats.get(key) is not None:
                _int(stats[key], f"{what}.{key}", where)
        for key in ("last", "min", "max"):
            if stats.get(key) is not None:
                _float(stats[key], f"{what}.{key}", where)
    marks = raw.get("marks", {})
    if not isinstance(marks, dict):
        raise malformed(where, "extra.marks is not an object")
    for reason, mark in marks.items():
        what = f"extra.marks[{reason!r}]"
        if not isinstance(mark, dict):
            raise malformed(where, f"{what} is not an object")
        _int(mark.get("step"), f"{what}.step", where)
        _time(mark.get("time"), f"{what}.time", where)
        counts = mark.get("counts", {})
        if not isinstance(counts, dict):
            raise malformed(where, f"{what}.counts is not an object")
        for metric, count in counts.items():
            _int(count, f"{what}.counts[{metric!r}]", where)
    costs = raw.get("save_costs", [])
    if not isinstance(costs, list):
        raise malformed(where, "extra.save_costs is not a list")
    for i, cost in enumerate(costs):
        if not 0 <= _float(cost, f"extra.save_costs[{i}]", where) <= 1e9:
            raise malformed(where, f"extra.save_costs[{i}] is not a duration in seconds")
    return raw


def check_version(doc: dict[str, Any], where: str) -> int:
    """The format version of a parsed manifest, one this build reads (a newer one raises
    :class:`FormatError` saying to upgrade)."""
    if doc.get("format") != FORMAT_NAME:
        raise malformed(where, f"the 'format' field is not {FORMAT_NAME!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise malformed(where, f"version {short_repr(version)} is not a positive integer")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"manifest {where} has format version {short_repr(version)}, newer than this ckptwise "
            f"reads ({FORMAT_VERSION}); upgrade ckptwise to read it"
        )
    return version


def manifest_from_doc(doc: dict[str, Any], *, where: str, codecs: frozenset[str]) -> Manifest:
    """The manifest a parsed document (without its digest) describes, validated."""
    version = check_version(doc, where)
    step = _int(doc.get("step"), "step", where)
    time = _time(doc.get("time"), "time", where)
    tensors_raw = doc.get("tensors")
    if not isinstance(tensors_raw, dict):
        raise malformed(where, "'tensors' is not an object")
    metrics_raw = doc.get("metrics", {})
    if not isinstance(metrics_raw, dict):
        raise malformed(where, "'metrics' is not an object")
    metrics: dict[str, float] = {}
    for key, value in metrics_raw.items():
        if not isinstance(key, str):
            raise malformed(where, f"metric name {short_repr(key)} is not a string")
        if value is None:
            metrics[key] = math.nan
        else:
            metrics[key] = _float(value, f"metric {key!r}", where)
    reasons = doc.get("reasons", [])
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise malformed(where, "'reasons' is not a list of strings")
    extra = _extra(doc.get("extra", {}), where)
    ranks_raw = doc.get("ranks", [])
    if not isinstance(ranks_raw, list):
        raise malformed(where, "'ranks' is not a list")
    tensors = {n: _entry(n, e, where, codecs) for n, e in tensors_raw.items()}
    ranks = tuple(_rank_view(v, i, where, codecs) for i, v in enumerate(ranks_raw))
    tree = doc.get("tree")
    manifest = Manifest(
        step=step,
        time=time,
        tensors=tensors,
        tree=tree,
        metrics=metrics,
        reasons=tuple(reasons),
        extra=extra,
        written_bytes=_int(doc.get("written_bytes", 0), "written_bytes", where),
        ranks=ranks,
        version=version,
    )
    if tree is not None:
        refs = _tree(tree, "tree", where)
        _check_refs(refs, tensors, "tree", where)
        for r, other in enumerate(ranks, 1):
            own = _tree(other.tree, f"ranks[{r - 1}].tree", where)
            seen = {k: v for k, v in refs.items() if k not in other.tree_absent} | own
            _check_refs(seen, manifest.view(r), f"the tree of rank {r}", where)
    elif any(other.tree for other in ranks):
        raise malformed(where, "ranks hold tree entries but the manifest has no 'tree'")
    return manifest
