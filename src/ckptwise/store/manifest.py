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
from collections.abc import Mapping
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
    "TensorEntry",
    "decode_manifest",
    "dtype_name",
    "encode_manifest",
]

FORMAT_NAME = "ckptwise.checkpoint"
FORMAT_VERSION = 1
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
        return doc


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
    version: int = FORMAT_VERSION

    @property
    def logical_bytes(self) -> int:
        """Sum of the raw sizes of every tensor."""
        return sum(e.nbytes for e in self.tensors.values())


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialise ``manifest`` as UTF-8 JSON (non-finite metrics become ``null``)."""
    doc = {
        "format": FORMAT_NAME,
        "version": manifest.version,
        "step": manifest.step,
        "time": manifest.time,
        "reasons": list(manifest.reasons),
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in manifest.metrics.items()},
        "written_bytes": manifest.written_bytes,
        "tensors": {name: e.to_json() for name, e in manifest.tensors.items()},
        "tree": manifest.tree,
        "extra": dict(manifest.extra),
    }
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
    return TensorEntry(
        object=obj,
        dtype=dtype,
        shape=dims,
        nbytes=nbytes,
        codec=codec,
        stored_bytes=stored,
        note=note,
        bases=bases,
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
    return Manifest(
        step=step,
        time=float(time),
        tensors={n: _entry(n, e, where, codecs) for n, e in tensors_raw.items()},
        tree=doc.get("tree"),
        metrics=metrics,
        reasons=tuple(reasons),
        extra=extra,
        written_bytes=_int(doc.get("written_bytes", 0), "written_bytes", where),
        version=version,
    )
