"""Codecs turn a tensor's raw bytes into the bytes of its stored object, and back.

This module is the one registry of codec names: the manifest names each object's codec, so a
run can mix codecs and old runs stay readable as new codecs are added. Decoding always checks
the output length; the store then checks the content hash. ``docs/FORMAT.md`` gives each
codec's byte layout.

Three kinds of codec, by what encoding needs besides the raw bytes:

- whole-object lossless codecs (:data:`LOSSLESS`: ``raw``, ``zstd``, ``bytegroup``), the
  ones a run stores with (``codec=``), behind the :class:`Codec` protocol;
- the delta codec ``xor-bytegroup`` (:data:`DELTA`), which also needs the raw bytes of the
  object it is a delta against (:class:`XorBytegroupCodec`);
- the lossy ``q8`` (:data:`Q8`), which needs the float tensor itself and is only ever asked
  for by name (:class:`Q8Codec`).

:func:`decode` reads any of them.

It is long because it is the one registry: every codec's encoder and decoder stand together
so a format reader finds each byte layout in one place.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import zstandard

from ckptwise.errors import ConfigError, CorruptCheckpointError, SnapshotError
from ckptwise.store.layout import byte_view

if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    from ckptwise._lazy import np, torch

__all__ = [
    "BYTEGROUP",
    "CODECS",
    "DELTA",
    "LOSSLESS",
    "LOSSY",
    "Q8",
    "Q8_CODEC",
    "RAW",
    "XOR_CODEC",
    "ZSTD",
    "ByteGroupedCodec",
    "Codec",
    "Q8Codec",
    "Quantized",
    "RawCodec",
    "XorBytegroupCodec",
    "ZstdCodec",
    "decode",
    "decoded_size",
    "get_codec",
    "readable",
]

RAW = "raw"
ZSTD = "zstd"
BYTEGROUP = "bytegroup"
#: An object stored as the byte-grouped XOR against another object (its base).
DELTA = "xor-bytegroup"
Q8 = "q8"


class Codec(Protocol):
    """A lossless transform of a whole object's bytes.

    ``itemsize`` is the byte width of the tensor's elements (2 for bf16, 4 for fp32); codecs
    that do not care about element boundaries ignore it.
    """

    name: str

    def encode(self, raw: memoryview, *, itemsize: int) -> bytes | memoryview:
        """The stored form of ``raw`` (a flat byte view)."""
        ...

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        """Fill ``out`` (exactly the raw size) from ``stored``."""
        ...


class RawCodec:
    """Stores the bytes as they are, so a restore is one read straight into the tensor."""

    name = RAW

    def encode(self, raw: memoryview, *, itemsize: int) -> memoryview:
        return raw

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        if len(stored) != len(out):
            raise CorruptCheckpointError(f"object holds {len(stored)} bytes, expected {len(out)}")
        out[:] = stored


class ZstdCodec:
    """Plain zstd of the raw bytes (level 3 by default)."""

    name = ZSTD

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def encode(self, raw: memoryview, *, itemsize: int) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        data = _unzstd(stored, len(out), "zstd object")
        if len(data) != len(out):
            raise CorruptCheckpointError(
                f"object decodes to {len(data)} bytes, expected {len(out)}"
            )
        out[:] = data

    def decoded_size(self, stored: bytes) -> int:
        """The raw size the object's frame header records."""
        return _frame_size(stored, "zstd object")


def _frame_size(frame: bytes | memoryview, what: str) -> int:
    """The content size a zstd frame's header records; ckptwise always records it."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"{what} is not a zstd frame: {exc}") from exc
    if size < 0:
        raise CorruptCheckpointError(f"{what}: its zstd frame does not record its size")
    return int(size)


def _unzstd(frame: bytes | memoryview, size: int, what: str) -> bytes:
    """Decompress a frame that must hold exactly ``size`` bytes, checking the size its header
    claims first: a frame claiming 2**40 bytes fails without their being allocated."""
    claimed = _frame_size(frame, what)
    if claimed != size:
        raise CorruptCheckpointError(f"{what} says it holds {claimed} bytes, expected {size}")
    try:
        data: bytes = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"{what} does not decode: {exc}") from exc
    return data


_HEADER = struct.Struct("<4sBBBB")  # magic, version, itemsize, planes, reserved
_PLANE = struct.Struct("<BQ")  # mode (0 stored, 1 zstd), payload length
_MAGIC = b"CKBG"
_SAMPLE = 1 << 18


class ByteGroupedCodec:
    """Splits elements into byte planes and compresses each plane that compresses.

    In a float tensor the byte holding the sign and the high exponent bits is highly
    repetitive while the mantissa bytes are close to random; grouping byte *i* of every
    element into plane *i* lets zstd find the exponent's redundancy (about 1.46x on bf16 and
    1.19x on fp32 normal weights here, against 1.28x and 1.08x for zstd of the raw bytes).
    A plane whose first 256 KiB do not compress by 3 % is stored as is, so mantissa planes
    cost a copy, not a compression. One-byte elements are a single plane (plain zstd).

    Layout: ``"CKBG"``, version 1, itemsize, plane count, 0; per plane a mode byte and a
    little-endian u64 payload length; then the payloads in plane order. Decoding goes by the
    width in the header, not by ``itemsize``: dedup is by content, so the same object may be
    listed under a dtype of another width than it was grouped by.
    """

    name = BYTEGROUP

    def __init__(self, level: int = 1) -> None:
        # level 1 compresses exponent planes better than 3 here (2.7x vs 2.4x) and faster
        self.level = level

    def _compress(self, plane: memoryview) -> tuple[int, bytes | memoryview]:
        compressor = zstandard.ZstdCompressor(level=self.level)
        if len(plane) > 4 * _SAMPLE:
            probe = compressor.compress(plane[:_SAMPLE])
            if len(probe) > 0.97 * _SAMPLE:
                return 0, plane
        packed = compressor.compress(plane)
        return (1, packed) if len(packed) < 0.97 * len(plane) else (0, plane)

    def encode(self, raw: memoryview, *, itemsize: int) -> bytes:
        if not 1 <= itemsize <= 255 or len(raw) % itemsize:
            raise ConfigError(
                f"itemsize={itemsize}: {len(raw)} bytes do not divide into {itemsize}-byte "
                "elements; pass the tensor's dtype.itemsize"
            )
        grouped = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.copy()
        parts = [self._compress(memoryview(grouped[i])) for i in range(itemsize)]
        header = _HEADER.pack(_MAGIC, 1, itemsize, itemsize, 0)
        table = b"".join(_PLANE.pack(mode, len(data)) for mode, data in parts)
        # joined from the planes' own buffers: a copy of each stored plane first would hold
        # most of the object a third time
        return b"".join([header, table, *(data for _, data in parts)])

    @staticmethod
    def _planes(stored: bytes) -> tuple[int, int, list[tuple[int, memoryview]]]:
        """Element width, element count and each plane's (mode, payload); every size the
        header and table claim is checked against the object's length and each other."""
        view = memoryview(stored)
        try:
            magic, version, width, planes, _ = _HEADER.unpack_from(view)
        except struct.error as exc:
            raise CorruptCheckpointError(f"byte-grouped object is truncated: {exc}") from exc
        if magic != _MAGIC or version != 1 or width < 1 or planes != width:
            raise CorruptCheckpointError(
                f"not a byte-grouped object (magic {magic!r}, version {version}, "
                f"itemsize {width}, planes {planes})"
            )
        offset = _HEADER.size + planes * _PLANE.size
        if offset > len(view):
            raise CorruptCheckpointError("byte-grouped object is truncated in its plane table")
        parts: list[tuple[int, memoryview]] = []
        counts = set()
        for i in range(planes):
            mode, length = _PLANE.unpack_from(view, _HEADER.size + i * _PLANE.size)
            if mode not in (0, 1):
                raise CorruptCheckpointError(f"plane {i} has unknown mode {mode}")
            if length > len(view) - offset:
                raise CorruptCheckpointError(f"plane {i} is truncated")
            payload = view[offset : offset + length]
            offset += length
            counts.add(length if mode == 0 else _frame_size(payload, f"plane {i}"))
            parts.append((mode, payload))
        if offset != len(view):
            raise CorruptCheckpointError(f"{len(view) - offset} stray bytes after the last plane")
        if len(counts) != 1:
            raise CorruptCheckpointError(f"planes hold different element counts {sorted(counts)}")
        return width, counts.pop(), parts

    def decoded_size(self, stored: bytes) -> int:
        """The raw size the object's header and plane table record."""
        width, count, _ = self._planes(stored)
        return width * count

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        width, count, parts = self._planes(stored)
        if count * width != len(out):
            raise CorruptCheckpointError(
                f"object holds {count} elements of {width} bytes, expected {len(out)} bytes"
            )
        grouped = np.empty((width, count), dtype=np.uint8)
        for i, (mode, payload) in enumerate(parts):
            data = _unzstd(payload, count, f"plane {i}") if mode == 1 else payload
            grouped[i] = np.frombuffer(data, dtype=np.uint8)
        target = np.frombuffer(out, dtype=np.uint8).reshape(count, width)
        target[...] = grouped.T


class XorBytegroupCodec:
    """A delta: the byte-grouped XOR of an object's raw bytes with those of its base.

    Between two checkpoints most bits of a slowly trained weight stay the same, so the XOR
    is mostly zero bytes and compresses far better than the object itself. ``base`` is the
    raw content of the object the delta is against (``bases[0]`` of its manifest entry).
    """

    name = DELTA

    def __init__(self, grouped: ByteGroupedCodec | None = None) -> None:
        self._grouped = grouped or ByteGroupedCodec()

    def encode(self, raw: memoryview, *, base: memoryview, itemsize: int) -> bytes:
        if len(base) != len(raw):
            raise ConfigError(
                f"a delta needs a base of the same size: {len(raw)} bytes against {len(base)}"
            )
        xor = np.bitwise_xor(np.frombuffer(raw, dtype=np.uint8), np.frombuffer(base, np.uint8))
        return self._grouped.encode(xor.data, itemsize=itemsize)

    def decoded_size(self, stored: bytes) -> int:
        """The raw size the delta's header records (that of the object and of its base)."""
        return self._grouped.decoded_size(stored)

    def decode(self, stored: bytes, out: memoryview, *, base: memoryview, itemsize: int) -> None:
        if len(base) != len(out):
            raise CorruptCheckpointError(
                f"the delta's base holds {len(base)} bytes, expected {len(out)}"
            )
        self._grouped.decode(stored, out, itemsize=itemsize)
        target = np.frombuffer(out, dtype=np.uint8)  # writes through to ``out``
        np.bitwise_xor(target, np.frombuffer(base, dtype=np.uint8), out=target)


_Q8_HEADER = struct.Struct("<4sBBHQ")  # magic, version, dtype code, block, element count
_Q8_MAGIC = b"CKQ8"
_Q8_DTYPES = {0: "float32", 1: "bfloat16", 2: "float16", 3: "float64"}


def _q8_code(dtype: torch.dtype) -> int | None:
    """The q8 header's code for ``dtype``; ``None`` for a dtype q8 does not quantize."""
    for code, name in _Q8_DTYPES.items():
        if getattr(torch, name) == dtype:
            return code
    return None


@dataclass(frozen=True)
class Quantized:
    """A tensor quantized by :class:`Q8Codec`."""

    #: the object's bytes on disk
    stored: bytes
    #: the raw bytes ``stored`` decodes to: the object's content, so its address
    decoded: memoryview
    #: what was lost, for the manifest entry's note
    note: str


class Q8Codec:
    """Lossy: blockwise absmax int8 quantization of float tensors, for archival copies only.

    Each block of ``block`` elements stores one float32 scale (its largest magnitude / 127)
    and one int8 per element; decoding computes ``q * scale`` in float32 and casts to the
    tensor's dtype. The object is zstd-compressed. A lossy object's address is the digest of
    what it *decodes* to, so it verifies like any other; what was lost is recorded in the
    manifest entry's note. Never chosen automatically.
    """

    name = Q8

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def quantize(self, tensor: torch.Tensor) -> Quantized:
        """Quantize a float tensor (any shape, any device)."""
        if _q8_code(tensor.dtype) is None:
            raise SnapshotError(
                f"q8 quantizes float32, bfloat16, float16 or float64 tensors, not {tensor.dtype}"
                "; leave this tensor out of lossy="
            )
        original = tensor.detach().cpu().contiguous()
        stored = self._pack(original)
        decoded = torch.empty(original.numel() * original.element_size(), dtype=torch.uint8)
        self.decode(stored, byte_view(decoded), itemsize=original.element_size())
        values = decoded.view(original.dtype).reshape(original.shape)
        error = (values.double() - original.double()).reshape(-1)
        scale = original.double().norm().item()
        rms = error.norm().item() / scale if scale else 0.0
        worst = error.abs().max().item() if error.numel() else 0.0
        note = f"lossy q8: max abs error {worst:.3g}, relative error {rms:.3g}"
        return Quantized(stored, byte_view(decoded), note)

    def _pack(self, values: torch.Tensor) -> bytes:
        flat = values.reshape(-1).to(torch.float32)
        count = flat.numel()
        pad = (-count) % self.block
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.block)
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp(-127, 127).to(torch.int8)
        header = _Q8_HEADER.pack(_Q8_MAGIC, 1, _q8_code(values.dtype), self.block, count)
        body = scales.numpy().tobytes() + q.reshape(-1)[:count].numpy().tobytes()
        return header + zstandard.ZstdCompressor(level=3).compress(body)

    @staticmethod
    def _header(stored: bytes) -> tuple[torch.dtype, int, int]:
        """The dtype, block size and element count a q8 object's header records."""
        try:
            magic, version, code, block, count = _Q8_HEADER.unpack_from(stored)
        except struct.error as exc:
            raise CorruptCheckpointError(f"q8 object is truncated: {exc}") from exc
        name = _Q8_DTYPES.get(code)
        dtype = None if name is None else getattr(torch, name)
        if magic != _Q8_MAGIC or version != 1 or dtype is None or block < 1:
            raise CorruptCheckpointError("not a q8 object")
        return dtype, block, count

    def decoded_size(self, stored: bytes) -> int:
        """The raw size the object's header records."""
        dtype, _, count = self._header(stored)
        return count * dtype.itemsize

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        """Fill ``out`` with the values, cast to the dtype the header names."""
        dtype, block, count = self._header(stored)
        if count * dtype.itemsize != len(out):
            raise CorruptCheckpointError("q8 object has the wrong size for its tensor")
        blocks = -(-count // block)
        body = _unzstd(stored[_Q8_HEADER.size :], 4 * blocks + count, "q8 object")
        scales = torch.frombuffer(bytearray(body[: 4 * blocks]), dtype=torch.float32)
        q = torch.frombuffer(bytearray(body[4 * blocks :]), dtype=torch.int8).to(torch.float32)
        q = torch.nn.functional.pad(q, (0, blocks * block - count)).reshape(blocks, block)
        values = (q * scales[:, None]).reshape(-1)[:count]
        target = torch.frombuffer(out, dtype=torch.uint8)
        target.copy_(values.to(dtype).view(torch.uint8))


#: The whole-object lossless codecs, by name: what a run may store with (``codec=``).
CODECS: Mapping[str, Codec] = MappingProxyType(
    {codec.name: codec for codec in (RawCodec(), ZstdCodec(), ByteGroupedCodec())}
)
LOSSLESS: frozenset[str] = frozenset(CODECS)
#: Codecs that lose precision: only ever asked for by name, never chosen.
LOSSY: frozenset[str] = frozenset({Q8})
XOR_CODEC = XorBytegroupCodec()
Q8_CODEC = Q8Codec()


def readable() -> frozenset[str]:
    """Every codec name this build decodes: a manifest naming another is from a newer one."""
    return LOSSLESS | LOSSY | {DELTA}


def get_codec(name: str) -> Codec:
    """The whole-object lossless codec registered under ``name``."""
    try:
        return CODECS[name]
    except KeyError:
        raise ConfigError(
            f"codec={name!r} is not a whole-object lossless codec; choose one of "
            f"{', '.join(sorted(CODECS))}"
        ) from None


def decoded_size(codec: str, stored: bytes) -> int:
    """The raw size an object stored with ``codec`` says it decodes to, read from its header
    alone, so a reader can refuse a wrong size before allocating it."""
    if codec == RAW:
        return len(stored)
    if codec == DELTA:
        return XOR_CODEC.decoded_size(stored)
    if codec == Q8:
        return Q8_CODEC.decoded_size(stored)
    if codec == ZSTD:
        return ZstdCodec().decoded_size(stored)
    if codec == BYTEGROUP:
        return ByteGroupedCodec().decoded_size(stored)
    raise CorruptCheckpointError(f"codec {codec!r} is unknown to this version of ckptwise")


def decode(
    codec: str, stored: bytes, out: memoryview, *, itemsize: int, base: memoryview | None = None
) -> None:
    """Fill ``out`` from an object stored with any readable codec.

    ``base`` is the raw content of a delta's first base; only a delta has one.
    """
    if (codec == DELTA) != (base is not None):
        raise CorruptCheckpointError(
            f"a {codec} object {'needs' if codec == DELTA else 'cannot have'} a base"
        )
    if base is not None:
        XOR_CODEC.decode(stored, out, base=base, itemsize=itemsize)
    elif codec == Q8:
        Q8_CODEC.decode(stored, out, itemsize=itemsize)
    elif codec in CODECS:
        CODECS[codec].decode(stored, out, itemsize=itemsize)
    else:
        raise CorruptCheckpointError(f"codec {codec!r} is unknown to this version of ckptwise")
