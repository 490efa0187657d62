"""What a manifest holds: the data model of the checkpoint format, and its closed sets.

:class:`Manifest` describes one committed checkpoint; :class:`TensorEntry`, :class:`Shard`
and :class:`RankView` are its parts. The constants are the format's fixed vocabulary and
limits (its name and version, the dtypes it can store with their sizes, the deepest tree
and longest delta chain a reader accepts), shared by the writer, the reader and
:mod:`ckptwise.store.manifest_check`. Import these names from :mod:`ckptwise.store.manifest`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckptwise.errors import SnapshotError
from ckptwise.store.codecs import LOSSY, RAW

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "DIGEST_VERSION",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZES",
    "MAX_CHAIN",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "RankView",
    "Shard",
    "TensorEntry",
    "dtype_name",
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
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype :attr:`dtype` names."""
        return DTYPES[self.dtype]

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
