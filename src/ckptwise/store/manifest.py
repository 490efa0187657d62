"""The manifest: the JSON document whose presence makes a checkpoint exist.

A manifest lists every tensor of a checkpoint (its object id, dtype, shape and codec), the
JSON tree that puts the tensors back into a training state, the step, time, metrics and the
reasons it was saved. Reading validates everything a manifest says before it is trusted:
object ids are hex digests (never paths), dtypes and codecs come from closed sets, and sizes
must agree with shapes. ``docs/FORMAT.md`` describes the format in full.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptwise.errors import FormatError, SnapshotError
from ckptwise.store.codecs import DELTA, LOSSY, RAW

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Manifest",
    "RankView",
    "Shard",
    "TensorEntry",
    "decode_manifest",
    "dtype_name",
    "encode_manifest",
]

FORMAT_NAME = "ckptwise.checkpoint"
#: The newest format this build reads and writes. Version 2 adds what multi-process
#: checkpoints need (``ranks``, ``shard``); a one-process checkpoint is still written as 1.
FORMAT_VERSION = 2
#: The longest delta chain a manifest may describe (readers refuse longer ones).
MAX_CHAIN = 64

#: Every dtype the format can hold, by its stable on-disk name.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)
_NAMES = {v: k for k, v in DTYPES.items()}

_OBJECT_ID = re.compile(r"^[0-9a-f]{64}$")


def dtype_name(dtype: torch.dtype) -> str:
    """The on-disk name of ``dtype``; :class:`SnapshotError` for dtypes the format lacks."""
    try:
        return _NAMES[dtype]
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
    version: int = 1

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


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialise ``manifest`` as UTF-8 JSON (non-finite metrics become ``null``)."""
    doc = {
        "format": FORMAT_NAME,
        "version": max(manifest.version, 2 if manifest.ranks else 1),
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
    return json.dumps(doc, indent=1, allow_nan=False).encode()


def _fail(where: str, problem: str) -> FormatError:
    return FormatError(f"manifest {where} is malformed: {problem}")


def _int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"{what} must be a non-negative integer, got {value!r}")
    return value


def _entry(name: Any, raw: Any, where: str, codecs: frozenset[str]) -> TensorEntry:
    if not isinstance(name, str) or not name:
        raise _fail(where, f"tensor name {name!r} is not a non-empty string")
    if not isinstance(raw, dict):
        raise _fail(where, f"entry for tensor {name!r} is not an object")
    obj = raw.get("object")
    if not isinstance(obj, str) or not _OBJECT_ID.match(obj):
        raise _fail(where, f"tensor {name!r} has object id {obj!r}, not a 64-digit hex digest")
    dtype = raw.get("dtype")
    if dtype not in DTYPES:
        raise _fail(where, f"tensor {name!r} has unknown dtype {dtype!r}")
    shape = raw.get("shape")
    if not isinstance(shape, list):
        raise _fail(where, f"tensor {name!r} has shape {shape!r}, not a list")
    dims = tuple(_int(d, f"a dimension of {name!r}", where) for d in shape)
    nbytes = _int(raw.get("nbytes"), f"nbytes of {name!r}", where)
    expected = math.prod(dims) * DTYPES[dtype].itemsize
    if nbytes != expected:
        raise _fail(where, f"tensor {name!r} says {nbytes} bytes but its shape needs {expected}")
    codec = raw.get("codec", RAW)
    if codec not in codecs:
        raise FormatError(
            f"manifest {where}: tensor {name!r} uses codec {codec!r}, which this version of "
            f"ckptwise does not know ({', '.join(sorted(codecs))}); upgrade ckptwise to read it"
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
    if not isinstance(shape, list) or not isinstance(offsets, list):
        raise _fail(where, f"tensor {name!r}: shard shape and offsets must be lists")
    whole = tuple(_int(d, f"a shard dimension of {name!r}", where) for d in shape)
    at = tuple(_int(d, f"a shard offset of {name!r}", where) for d in offsets)
    if not (len(whole) == len(at) == len(dims)) or any(
        o + d > w for o, d, w in zip(at, dims, whole, strict=True)
    ):
        raise _fail(where, f"tensor {name!r}: its shard does not fit the whole tensor")
    return Shard(whole, at)


def _rank_view(raw: Any, index: int, where: str, codecs: frozenset[str]) -> RankView:
    what = f"ranks[{index}]"
    if not isinstance(raw, dict):
        raise _fail(where, f"{what} is not an object")
    tensors, tree = raw.get("tensors", {}), raw.get("tree", {})
    absent, tree_absent = raw.get("absent", []), raw.get("tree_absent", [])
    if not isinstance(tensors, dict) or not isinstance(tree, dict):
        raise _fail(where, f"{what}: 'tensors' and 'tree' must be objects")
    for names in (absent, tree_absent):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _fail(where, f"{what}: 'absent' and 'tree_absent' must be lists of names")
    return RankView(
        tensors={n: _entry(n, e, where, codecs) for n, e in tensors.items()},
        absent=tuple(absent),
        tree=tree,
        tree_absent=tuple(tree_absent),
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
            raise _fail(where, f"tensor {name!r}: base {i} has object id {oid!r}")
        last = i == len(raw) - 1
        if codec not in codecs or (codec == DELTA) == last:
            raise _fail(where, f"tensor {name!r}: base {i} has codec {codec!r}")
        out.append((oid, codec, _int(stored, f"stored bytes of base {i} of {name!r}", where)))
    return tuple(out)


def decode_manifest(data: bytes, *, where: str, codecs: frozenset[str]) -> Manifest:
    """Parse and validate a manifest; :class:`FormatError` names what is wrong.

    ``where`` names the file in messages; ``codecs`` is the set of codec names this build
    can decode, so a manifest from a newer release fails clearly instead of mis-decoding.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(where, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise _fail(where, f"the 'format' field is not {FORMAT_NAME!r}")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise _fail(where, f"version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"manifest {where} has format version {version}, newer than this ckptwise reads "
            f"({FORMAT_VERSION}); upgrade ckptwise to read it"
        )
    step = _int(doc.get("step"), "step", where)
    time = doc.get("time")
    if isinstance(time, bool) or not isinstance(time, (int, float)):
        raise _fail(where, f"time {time!r} is not a number")
    tensors_raw = doc.get("tensors")
    if not isinstance(tensors_raw, dict):
        raise _fail(where, "'tensors' is not an object")
    metrics_raw = doc.get("metrics", {})
    if not isinstance(metrics_raw, dict):
        raise _fail(where, "'metrics' is not an object")
    metrics: dict[str, float] = {}
    for key, value in metrics_raw.items():
        if value is None:
            metrics[key] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
        else:
            raise _fail(where, f"metric {key!r} has value {value!r}, not a number")
    reasons = doc.get("reasons", [])
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise _fail(where, "'reasons' is not a list of strings")
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise _fail(where, "'extra' is not an object")
    ranks = doc.get("ranks", [])
    if not isinstance(ranks, list):
        raise _fail(where, "'ranks' is not a list")
    return Manifest(
        step=step,
        time=float(time),
        tensors={n: _entry(n, e, where, codecs) for n, e in tensors_raw.items()},
        tree=doc.get("tree"),
        metrics=metrics,
        reasons=tuple(reasons),
        extra=extra,
        written_bytes=_int(doc.get("written_bytes", 0), "written_bytes", where),
        ranks=tuple(_rank_view(v, i, where, codecs) for i, v in enumerate(ranks)),
        version=version,
    )
