"""The manifest: the JSON document whose presence makes a checkpoint exist.

A manifest lists every tensor of a checkpoint (its object id, dtype, shape and codec), the
JSON tree that puts the tensors back into a training state, the step, time, metrics and the
reasons it was saved. Reading validates everything a manifest says before it is trusted:
its digest (a BLAKE3 checksum of its canonical JSON, from format version 3), object ids are
hex digests (never paths), dtypes and codecs come from closed sets, sizes must agree with
shapes, the state tree is well formed and names only tensors the manifest lists, and every
number fits what reads it. Whatever is wrong raises :class:`FormatError` (or
:class:`CorruptCheckpointError` for a failed checksum) naming the file and the field.
``docs/FORMAT.md`` describes the format in full.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import blake3

from ckptwise.errors import CorruptCheckpointError, FormatError, SnapshotError
from ckptwise.store.backend import Backend
from ckptwise.store.codecs import DELTA, LOSSY, RAW, readable

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZES",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "RankView",
    "Shard",
    "TensorEntry",
    "decode_manifest",
    "dtype_name",
    "encode_manifest",
    "load_manifest",
    "manifest_digest",
]

FORMAT_NAME = "ckptwise.checkpoint"
#: The format this build writes (and the newest it reads). Version 2 added what
#: multi-process checkpoints need (``ranks``, ``shard``); version 3 adds ``digest``, a
#: checksum of the whole manifest. Versions 1 and 2 (no digest) are still read.
FORMAT_VERSION = 3
#: The first format version whose manifests must carry a ``digest``.
DIGEST_VERSION = 3
#: The longest delta chain a manifest may describe (readers refuse longer ones).
MAX_CHAIN = 64
#: The largest manifest file a reader accepts; a larger one is refused before it is read.
MAX_MANIFEST_BYTES = 64 * 2**20
#: How deeply a state tree (or ``extra``) may nest; deeper ones are refused on save and read.
MAX_DEPTH = 100
_DIGEST = "blake3:"
#: the snapshot layer's tag of a typed node in the state tree (see docs/FORMAT.md)
_TAG = "__ckptwise__"
#: Unix times a manifest may hold: what ``datetime`` represents (years 1 to 9999)
_TIMES = (-62_135_596_800.0, 253_402_300_799.0)
#: numpy scalar dtypes a tree may name (bool, ints, floats, complex, unicode)
_NP_SCALAR = re.compile(r"^[<>|=]?(b1|[iu][1248]|f(2|4|8|16)|c(8|16|32)|U[0-9]{1,6})$")

#: Every dtype the format can hold, by its stable on-disk name, with its size in bytes.
#: Reading a manifest needs only this table, so listing a run never imports torch.
ITEMSIZES: Mapping[str, int] = MappingProxyType(
    {
        "float64": 8,
        "float32": 4,
        "float16": 2,
        "bfloat16": 2,
        "complex64": 8,
        "complex128": 16,
        "int64": 8,
        "int32": 4,
        "int16": 2,
        "int8": 1,
        "uint8": 1,
        "bool": 1,
        "float8_e4m3fn": 1,
        "float8_e5m2": 1,
        "uint16": 2,
        "uint32": 4,
        "uint64": 8,
    }
)


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """The torch dtype of each name in :data:`ITEMSIZES` that this torch has, looked up on
    first use (importing torch takes seconds)."""

    @functools.cached_property
    def _table(self) -> dict[str, torch.dtype]:
        return {name: getattr(torch, name) for name in ITEMSIZES if hasattr(torch, name)}

    def __getitem__(self, name: str) -> torch.dtype:
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


#: The torch dtype of every on-disk dtype name.
DTYPES: Mapping[str, torch.dtype] = _TorchDtypes()


@functools.cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in DTYPES.items()}


_OBJECT_ID = re.compile(r"^[0-9a-f]{64}$")


def dtype_name(dtype: torch.dtype) -> str:
    """The on-disk name of ``dtype``; :class:`SnapshotError` for dtypes the format lacks."""
    try:
        return _dtype_names()[dtype]
    except KeyError:
        raise SnapshotError(
            f"tensors of dtype {dtype} cannot be stored; convert them to one of "
            f"{', '.join(sorted(DTYPES))} first"
        ) from None


@dataclass(frozen=True)
class Shard:
    """Where a tensor entry's values sit in a larger tensor sharded across ranks (the local
    chunk of a ``DTensor``): the whole tensor's shape and this chunk's offsets in it."""

    shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "offsets": list(self.offsets)}


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """One tensor of a checkpoint and the object that holds its bytes.

    ``object`` is the BLAKE3 digest of the tensor's raw little-endian bytes (C order), which
    is both its address in the store and the checksum checked on every load.
    """

    object: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    codec: str = RAW
    stored_bytes: int = 0
    #: why the codec was chosen (optional; written only when there is something to say)
    note: str = ""
    #: for a delta (codec ``xor-bytegroup``): the objects it builds on, nearest first, each as
    #: (object id, codec, stored bytes); the last is a keyframe stored whole
    bases: tuple[tuple[str, str, int], ...] = ()
    #: for a chunk of a tensor sharded across ranks: where it sits in the whole tensor
    shard: Shard | None = None

    @property
    def lossy(self) -> bool:
        """Whether the object holds an approximation of the tensor (an archive's q8 copy)."""
        return self.codec in LOSSY

    def ancestor(self, index: int) -> TensorEntry:
        """The entry of ``bases[index]``, as a tensor entry of the same dtype and shape."""
        oid, codec, stored = self.bases[index]
        return TensorEntry(
            object=oid,
            dtype=self.dtype,
            shape=self.shape,
            nbytes=self.nbytes,
            codec=codec,
            stored_bytes=stored,
            bases=self.bases[index + 1 :],
            shard=self.shard,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "object": self.object,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "codec": self.codec,
            "stored_bytes": self.stored_bytes,
        }
        if self.note:
            doc["note"] = self.note
        if self.bases:
            doc["bases"] = [list(b) for b in self.bases]
        if self.shard is not None:
            doc["shard"] = self.shard.to_json()
        return doc


@dataclass(frozen=True, kw_only=True)
class RankView:
    """What one rank > 0 of a multi-process checkpoint holds, as differences from rank 0:
    tensors that differ or that rank 0 lacks, rank 0's tensor names it lacks, and the same
    for the top-level entries of the state tree."""

    tensors: Mapping[str, TensorEntry] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    tree: Mapping[str, Any] = field(default_factory=dict)
    tree_absent: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": {name: e.to_json() for name, e in self.tensors.items()},
            "absent": list(self.absent),
            "tree": dict(self.tree),
            "tree_absent": list(self.tree_absent),
        }


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A committed checkpoint's full description.

    ``tree`` is the snapshot layer's JSON encoding of the state; ``extra`` holds the
    manager's bookkeeping (metric history, data position, ...). ``written_bytes`` counts the
    object bytes this checkpoint added to the store when it was committed.
    """

    step: int
    time: float
    tensors: Mapping[str, TensorEntry]
    tree: Any = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    written_bytes: int = 0
    #: ranks 1.. of a multi-process checkpoint (``tensors`` and ``tree`` are rank 0's)
    ranks: tuple[RankView, ...] = ()
    #: the format version of the file it was read from (what this build writes when new)
    version: int = FORMAT_VERSION

    @property
    def world_size(self) -> int:
        """How many processes saved this checkpoint."""
        return 1 + len(self.ranks)

    def view(self, rank: int) -> dict[str, TensorEntry]:
        """The tensors rank ``rank`` saved, by name."""
        if rank == 0:
            return dict(self.tensors)
        other = self.ranks[rank - 1]
        out = {n: e for n, e in self.tensors.items() if n not in other.absent}
        out.update(other.tensors)
        return out

    def tree_of(self, rank: int) -> dict[str, Any]:
        """The state tree rank ``rank`` saved."""
        tree = dict(self.tree or {})
        if rank == 0:
            return tree
        other = self.ranks[rank - 1]
        out = {k: v for k, v in tree.items() if k not in other.tree_absent}
        out.update(other.tree)
        return out

    def entries(self) -> Iterator[TensorEntry]:
        """Rank 0's tensor entries and each other rank's own (replicated ones once)."""
        yield from self.tensors.values()
        for other in self.ranks:
            yield from other.tensors.values()

    @property
    def logical_bytes(self) -> int:
        """Sum of the raw sizes of rank 0's tensors and of each other rank's own (the ones
        that differ from rank 0's): what the checkpoint holds, replicated state counted once."""
        return sum(e.nbytes for e in self.entries())


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """The ``digest`` of a manifest document (given without its ``digest`` field): BLAKE3
    of its canonical JSON (keys sorted, no whitespace, non-ASCII characters escaped)."""
    return _DIGEST + blake3.blake3(_canonical(doc).encode("ascii")).hexdigest()


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialise ``manifest`` as UTF-8 JSON with its digest (non-finite metrics become
    ``null``), always in the newest format.

    What it writes is first validated as a reader validates it, so every manifest written
    reads back; a manifest that could not (a state tree nested deeper than
    :data:`MAX_DEPTH`, a value JSON cannot hold, ...) raises :class:`SnapshotError` and
    nothing is written.
    """
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": manifest.step,
        "time": manifest.time,
        "reasons": list(manifest.reasons),
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in manifest.metrics.items()},
        "written_bytes": manifest.written_bytes,
        "tensors": {name: e.to_json() for name, e in manifest.tensors.items()},
        "tree": manifest.tree,
        "extra": dict(manifest.extra),
    }
    if manifest.ranks:
        doc["ranks"] = [view.to_json() for view in manifest.ranks]
    where = f"of step {manifest.step}"
    try:
        # validation also proves the document plain JSON (string keys, lists, finite
        # floats), so a reader's parse of it hashes to the same canonical bytes
        _from_doc(doc, where=where, codecs=readable())
        digest = manifest_digest(doc)
        # keys in their own order (a state dict's order is the user's), the digest first
        text = json.dumps({"digest": digest, **doc}, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SnapshotError(
            f"the manifest {where} cannot be written ({exc}); the state must hold only "
            f"JSON values, tensors and objects with state_dict(), nested at most {MAX_DEPTH} "
            "deep"
        ) from exc
    if len(text) > MAX_MANIFEST_BYTES:
        raise SnapshotError(
            f"the manifest {where} would take {len(text)} bytes, more than a reader accepts "
            f"(MAX_MANIFEST_BYTES = {MAX_MANIFEST_BYTES}); keep large values in tensors"
        )
    return text.encode()


def load_manifest(backend: Backend, path: str) -> Manifest:
    """Read and validate the manifest at ``path``, refusing a file larger than
    :data:`MAX_MANIFEST_BYTES` (or a FIFO, link or device) before reading it.

    Raises :class:`~ckptwise.errors.CheckpointNotFoundError` when it is gone, a
    :class:`CorruptCheckpointError` when it is not a valid manifest.
    """
    for _ in range(3):
        size = backend.size(path)
        if size > MAX_MANIFEST_BYTES:
            raise FormatError(
                f"manifest {path} holds {size} bytes, more than a manifest may "
                f"(MAX_MANIFEST_BYTES = {MAX_MANIFEST_BYTES}); it is not a ckptwise manifest: "
                "move it out of the run"
            )
        buffer = bytearray(size + 1)
        if backend.read_into(path, memoryview(buffer)) == size:
            return decode_manifest(bytes(buffer[:size]), where=path, codecs=readable())
        # replaced between the size and the read (a step saved again): read the new one
    raise CorruptCheckpointError(f"manifest {path} keeps changing while it is read")


def _fail(where: str, problem: str) -> FormatError:
    return FormatError(f"manifest {where} is malformed: {problem}")


def _int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"{what} must be a non-negative integer, got {_short(value)}")
    return value


def _float(value: Any, what: str, where: str) -> float:
    """A JSON number as a finite float (an integer too large for one is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"{what} is {_short(value)}, not a number")
    try:
        number = float(value)
    except OverflowError:
        raise _fail(where, f"{what} is {_short(value)}, too large for a float") from None
    if not math.isfinite(number):
        raise _fail(where, f"{what} is not finite")
    return number


def _time(value: Any, what: str, where: str) -> float:
    number = _float(value, what, where)
    if not _TIMES[0] <= number <= _TIMES[1]:
        raise _fail(where, f"{what} {number!r} is not a Unix time of the years 1 to 9999")
    return number


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a malformed field may be huge."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**50 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(name: Any, raw: Any, where: str, codecs: frozenset[str]) -> TensorEntry:
    if not isinstance(name, str) or not name:
        raise _fail(where, f"tensor name {_short(name)} is not a non-empty string")
    if not isinstance(raw, dict):
        raise _fail(where, f"entry for tensor {name!r} is not an object")
    obj = raw.get("object")
    if not isinstance(obj, str) or not _OBJECT_ID.match(obj):
        raise _fail(
            where, f"tensor {name!r} has object id {_short(obj)}, not a 64-digit hex digest"
        )
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise _fail(where, f"tensor {name!r} has unknown dtype {_short(dtype)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > 64:
        raise _fail(where, f"tensor {name!r} has shape {_short(shape)}, not a list of dimensions")
    dims = tuple(_int(d, f"a dimension of {name!r}", where) for d in shape)
    nbytes = _int(raw.get("nbytes"), f"nbytes of {name!r}", where)
    expected = math.prod(dims) * ITEMSIZES[dtype]
    if nbytes != expected:
        raise _fail(where, f"tensor {name!r} says {nbytes} bytes but its shape needs {expected}")
    codec = raw.get("codec", RAW)
    if not isinstance(codec, str) or codec not in codecs:
        raise FormatError(
            f"manifest {where}: tensor {name!r} uses codec {_short(codec)}, which this version "
            f"of ckptwise does not know ({', '.join(sorted(codecs))}); upgrade ckptwise to "
            "read it"
        )
    stored = _int(raw.get("stored_bytes", nbytes), f"stored_bytes of {name!r}", where)
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise _fail(where, f"tensor {name!r} has a note that is not a string")
    bases = _bases(raw.get("bases", []), name, where, codecs)
    if (codec == DELTA) != bool(bases):
        raise _fail(where, f"tensor {name!r}: codec {codec!r} does not match its bases")
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
        raise _fail(where, f"tensor {name!r} has a shard that is not an object")
    shape, offsets = raw.get("shape"), raw.get("offsets")
    if not (isinstance(shape, list) and isinstance(offsets, list)) or not (
        len(shape) == len(offsets) == len(dims)
    ):
        raise _fail(where, f"tensor {name!r}: shard shape and offsets must be lists of its rank")
    whole = tuple(_int(d, f"a shard dimension of {name!r}", where) for d in shape)
    at = tuple(_int(d, f"a shard offset of {name!r}", where) for d in offsets)
    if any(o + d > w for o, d, w in zip(at, dims, whole, strict=True)):
        raise _fail(where, f"tensor {name!r}: its shard does not fit the whole tensor")
    return Shard(whole, at)


def _names(raw: Any, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise _fail(where, f"{what} must be a list of names")
    return tuple(raw)


def _rank_view(raw: Any, index: int, where: str, codecs: frozenset[str]) -> RankView:
    what = f"ranks[{index}]"
    if not isinstance(raw, dict):
        raise _fail(where, f"{what} is not an object")
    tensors, tree = raw.get("tensors", {}), raw.get("tree", {})
    if not isinstance(tensors, dict) or not isinstance(tree, dict):
        raise _fail(where, f"{what}: 'tensors' and 'tree' must be objects")
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
        raise _fail(where, f"tensor {name!r} has bases that are not a list of at most {MAX_CHAIN}")
    out = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 3):
            raise _fail(where, f"tensor {name!r}: base {i} is not [object, codec, stored_bytes]")
        oid, codec, stored = item
        if not isinstance(oid, str) or not _OBJECT_ID.match(oid):
            raise _fail(where, f"tensor {name!r}: base {i} has object id {_short(oid)}")
        last = i == len(raw) - 1
        if not isinstance(codec, str) or codec not in codecs or (codec == DELTA) == last:
            raise _fail(where, f"tensor {name!r}: base {i} has codec {_short(codec)}")
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
            raise _fail(where, f"{what} nests deeper than {MAX_DEPTH} levels (MAX_DEPTH)")
        if value is None or isinstance(value, (bool, int, str)):
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _fail(where, f"{what} holds {value!r}, which JSON cannot")
            continue
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _fail(where, f"{what} holds {_short(value)}, which is not JSON")
        tag = value.get(_TAG)
        if tag is None:
            stack.extend((v, depth + 1) for v in value.values())
        elif tag in ("tensor", "ndarray"):
            name = value.get("name")
            if not isinstance(name, str):
                raise _fail(where, f"{what} names tensor {_short(name)}, not a string")
            refs.append((name, tag == "ndarray"))
        elif tag == "float":
            if value.get("value") not in ("nan", "inf", "-inf"):
                raise _fail(where, f"{what} has float literal {_short(value.get('value'))}")
        elif tag == "npscalar":
            dtype, scalar = value.get("dtype"), value.get("value")
            if not isinstance(dtype, str) or not _NP_SCALAR.match(dtype):
                raise _fail(where, f"{what} has numpy scalar dtype {_short(dtype)}")
            if not _scalar_key(scalar):
                raise _fail(where, f"{what} has numpy scalar value {_short(scalar)}")
        elif tag == "tuple":
            items = value.get("items")
            if not isinstance(items, list):
                raise _fail(where, f"{what} has a tuple whose items are not a list")
            stack.extend((v, depth + 1) for v in items)
        elif tag == "dict":
            items = value.get("items")
            if not isinstance(items, list):
                raise _fail(where, f"{what} has a dict whose items are not a list")
            for pair in items:
                if not (isinstance(pair, list) and len(pair) == 2 and _scalar_key(pair[0])):
                    raise _fail(where, f"{what} has dict item {_short(pair)}, not [key, value]")
                stack.append((pair[1], depth + 1))
        else:
            raise FormatError(
                f"manifest {where}: {what} holds a node of type {_short(tag)}, which this "
                "version of ckptwise does not know; upgrade ckptwise to read it"
            )
    return refs


def _tree(raw: Any, what: str, where: str) -> dict[str, _Refs]:
    """Check a state tree (top-level entries by key); each entry's tensor references."""
    if not isinstance(raw, dict):
        raise _fail(where, f"{what} is not an object")
    refs: dict[str, _Refs] = {}
    for key, entry in raw.items():
        if not isinstance(key, str) or not key:
            raise _fail(where, f"{what} has key {_short(key)}, not a non-empty string")
        kind = entry.get("kind") if isinstance(entry, dict) else None
        field_ = (
            {"stateful": "state", "value": "value"}.get(kind) if isinstance(kind, str) else None
        )
        if field_ is None or field_ not in entry:
            raise _fail(
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
                raise _fail(where, f"{what}[{key!r}] names tensor {name!r}, which it lacks")
            if as_array and entry.dtype not in _NUMPY_DTYPES:
                raise _fail(
                    where, f"{what}[{key!r}]: tensor {name!r} of {entry.dtype} is no numpy array"
                )


def _plain(node: Any, what: str, where: str) -> None:
    """Refuse anything but plain JSON (string keys, finite floats), nested at most
    :data:`MAX_DEPTH` deep."""
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _fail(where, f"{what} nests deeper than {MAX_DEPTH} levels (MAX_DEPTH)")
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif not (
            value is None
            or isinstance(value, (bool, int, str))
            or (isinstance(value, float) and math.isfinite(value))
        ):
            raise _fail(where, f"{what} holds {_short(value)}, which is not JSON")


def _extra(raw: Any, where: str) -> dict[str, Any]:
    """Check ``extra``, and the manager's bookkeeping in it, field by field."""
    if not isinstance(raw, dict):
        raise _fail(where, "'extra' is not an object")
    _plain(raw, "'extra'", where)
    history = raw.get("metric_history", {})
    if not isinstance(history, dict):
        raise _fail(where, "extra.metric_history is not an object")
    for metric, stats in history.items():
        what = f"extra.metric_history[{metric!r}]"
        if not isinstance(stats, dict):
            raise _fail(where, f"{what} is not an object")
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
        raise _fail(where, "extra.marks is not an object")
    for reason, mark in marks.items():
        what = f"extra.marks[{reason!r}]"
        if not isinstance(mark, dict):
            raise _fail(where, f"{what} is not an object")
        _int(mark.get("step"), f"{what}.step", where)
        _time(mark.get("time"), f"{what}.time", where)
        counts = mark.get("counts", {})
        if not isinstance(counts, dict):
            raise _fail(where, f"{what}.counts is not an object")
        for metric, count in counts.items():
            _int(count, f"{what}.counts[{metric!r}]", where)
    costs = raw.get("save_costs", [])
    if not isinstance(costs, list):
        raise _fail(where, "extra.save_costs is not a list")
    for i, cost in enumerate(costs):
        if not 0 <= _float(cost, f"extra.save_costs[{i}]", where) <= 1e9:
            raise _fail(where, f"extra.save_costs[{i}] is not a duration in seconds")
    return raw


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed (strict JSON)")


def decode_manifest(data: bytes, *, where: str, codecs: frozenset[str]) -> Manifest:
    """Parse, check the digest of, and validate a manifest; :class:`FormatError` names the
    field that is wrong, :class:`CorruptCheckpointError` a digest that does not match.

    ``where`` names the file in messages; ``codecs`` is the set of codec names this build
    can decode, so a manifest from a newer release fails clearly instead of mis-decoding.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(
            f"manifest {where} holds {len(data)} bytes, more than a manifest may "
            f"(MAX_MANIFEST_BYTES = {MAX_MANIFEST_BYTES})"
        )
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(where, f"not UTF-8 text ({exc})") from exc
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise _fail(where, "not valid JSON (nested too deeply to parse)") from None
    except ValueError as exc:
        raise _fail(where, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _fail(where, f"the 'format' field is not {FORMAT_NAME!r}")
    digest = doc.pop("digest", None)
    version = _version(doc, where)
    if digest is not None or version >= DIGEST_VERSION:
        if not isinstance(digest, str) or not digest.startswith(_DIGEST):
            raise _fail(
                where,
                f"'digest' is {_short(digest)}, not 'blake3:<hex>' (format version {version} "
                "manifests carry one)",
            )
        try:
            actual = manifest_digest(doc)
        except (ValueError, RecursionError) as exc:
            raise _fail(where, f"cannot be checksummed ({exc})") from None
        if digest != actual:
            raise CorruptCheckpointError(
                f"manifest {where} fails its checksum: 'digest' says {_short(digest)}, its "
                f"content hashes to {actual}, so it changed after it was written. ckptwise "
                "skips it (restores fall back to an older checkpoint); put back an intact "
                "copy, or delete it"
            )
    return _from_doc(doc, where=where, codecs=codecs)


def _version(doc: dict[str, Any], where: str) -> int:
    if doc.get("format") != FORMAT_NAME:
        raise _fail(where, f"the 'format' field is not {FORMAT_NAME!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(where, f"version {_short(version)} is not a positive integer")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"manifest {where} has format version {_short(version)}, newer than this ckptwise "
            f"reads ({FORMAT_VERSION}); upgrade ckptwise to read it"
        )
    return version


def _from_doc(doc: dict[str, Any], *, where: str, codecs: frozenset[str]) -> Manifest:
    """The manifest a parsed document (without its digest) describes, validated."""
    version = _version(doc, where)
    step = _int(doc.get("step"), "step", where)
    time = _time(doc.get("time"), "time", where)
    tensors_raw = doc.get("tensors")
    if not isinstance(tensors_raw, dict):
        raise _fail(where, "'tensors' is not an object")
    metrics_raw = doc.get("metrics", {})
    if not isinstance(metrics_raw, dict):
        raise _fail(where, "'metrics' is not an object")
    metrics: dict[str, float] = {}
    for key, value in metrics_raw.items():
        if not isinstance(key, str):
            raise _fail(where, f"metric name {_short(key)} is not a string")
        if value is None:
            metrics[key] = math.nan
        else:
            metrics[key] = _float(value, f"metric {key!r}", where)
    reasons = doc.get("reasons", [])
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise _fail(where, "'reasons' is not a list of strings")
    extra = _extra(doc.get("extra", {}), where)
    ranks_raw = doc.get("ranks", [])
    if not isinstance(ranks_raw, list):
        raise _fail(where, "'ranks' is not a list")
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
        raise _fail(where, "ranks hold tree entries but the manifest has no 'tree'")
    return manifest
