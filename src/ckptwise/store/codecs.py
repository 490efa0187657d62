"""Codecs turn a tensor's raw bytes into the bytes of its stored object, and back.

Each codec is named in the manifest entry of every tensor that uses it, so a run can mix
codecs and old runs stay readable as new codecs are added. Decoding always checks the
output length; the store then checks the content hash. ``docs/FORMAT.md`` gives each
codec's byte layout.
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import torch
import zstandard

from ckptwise.errors import CorruptCheckpointError

__all__ = [
    "CODECS",
    "ByteGroupedCodec",
    "Codec",
    "Q8Codec",
    "RawCodec",
    "ZstdCodec",
    "get_codec",
]


class Codec(Protocol):
    """A lossless transform of an object's bytes.

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

    name = "raw"

    def encode(self, raw: memoryview, *, itemsize: int) -> memoryview:
        return raw

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        if len(stored) != len(out):
            raise CorruptCheckpointError(f"object holds {len(stored)} bytes, expected {len(out)}")
        out[:] = stored


class ZstdCodec:
    """Plain zstd of the raw bytes (level 3 by default)."""

    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def encode(self, raw: memoryview, *, itemsize: int) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        try:
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=len(out))
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(f"zstd object does not decode: {exc}") from exc
        if len(data) != len(out):
            raise CorruptCheckpointError(
                f"object decodes to {len(data)} bytes, expected {len(out)}"
            )
        out[:] = data


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
    little-endian u64 payload length; then the payloads in plane order.
    """

    name = "bytegroup"

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
        if itemsize < 1 or len(raw) % itemsize:
            raise ValueError(f"{len(raw)} bytes do not divide into {itemsize}-byte elements")
        grouped = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.copy()
        parts = [self._compress(memoryview(grouped[i])) for i in range(itemsize)]
        header = _HEADER.pack(_MAGIC, 1, itemsize, itemsize, 0)
        table = b"".join(_PLANE.pack(mode, len(data)) for mode, data in parts)
        return b"".join([header, table, *(bytes(data) for _, data in parts)])

    @staticmethod
    def stored_itemsize(stored: bytes) -> int:
        """The element width an object was grouped with (its header says), or 0."""
        try:
            magic, _, width, _, _ = _HEADER.unpack_from(stored)
        except struct.error:
            return 0
        return int(width) if magic == _MAGIC else 0

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        view = memoryview(stored)
        try:
            magic, version, width, planes, _ = _HEADER.unpack_from(view)
        except struct.error as exc:
            raise CorruptCheckpointError(f"byte-grouped object is truncated: {exc}") from exc
        if magic != _MAGIC or version != 1 or width != itemsize or planes != itemsize:
            raise CorruptCheckpointError(
                f"not a byte-grouped object for {itemsize}-byte elements "
                f"(magic {magic!r}, version {version}, itemsize {width}, planes {planes})"
            )
        count = len(out) // itemsize if itemsize else 0
        if count * itemsize != len(out):
            raise CorruptCheckpointError(f"{len(out)} bytes are not whole {itemsize}-byte elements")
        grouped = np.empty((itemsize, count), dtype=np.uint8)
        offset = _HEADER.size + planes * _PLANE.size
        decompressor = zstandard.ZstdDecompressor()
        for i in range(planes):
            mode, length = _PLANE.unpack_from(view, _HEADER.size + i * _PLANE.size)
            payload = view[offset : offset + length]
            offset += length
            if len(payload) != length:
                raise CorruptCheckpointError(f"plane {i} is truncated")
            try:
                data = (
                    decompressor.decompress(payload, max_output_size=count)
                    if mode == 1
                    else bytes(payload)
                )
            except zstandard.ZstdError as exc:
                raise CorruptCheckpointError(f"plane {i} does not decode: {exc}") from exc
            if mode not in (0, 1) or len(data) != count:
                raise CorruptCheckpointError(f"plane {i} decodes to {len(data)} bytes, not {count}")
            grouped[i] = np.frombuffer(data, dtype=np.uint8)
        if offset != len(view):
            raise CorruptCheckpointError(f"{len(view) - offset} stray bytes after the last plane")
        target = np.frombuffer(out, dtype=np.uint8).reshape(count, itemsize)
        target[...] = grouped.T


_Q8_HEADER = struct.Struct("<4sBBHQ")  # magic, version, dtype code, block, element count
_Q8_MAGIC = b"CKQ8"
_Q8_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16, 3: torch.float64}
_Q8_CODES = {v: k for k, v in _Q8_DTYPES.items()}


class Q8Codec:
    """Lossy: blockwise absmax int8 quantization of float tensors, for archival copies only.

    Each block of ``block`` elements stores one float32 scale (its largest magnitude / 127)
    and one int8 per element; decoding computes ``q * scale`` in float32 and casts to the
    tensor's dtype. The object is zstd-compressed. A lossy object's address is the digest of
    what it *decodes* to, so it verifies like any other; what was lost is recorded in the
    manifest entry's note. Never chosen automatically.
    """

    name = "q8"
    lossy = True

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def quantize(self, values: torch.Tensor) -> bytes:
        """The stored form of a float tensor's values (any shape)."""
        flat = values.detach().reshape(-1).to(torch.float32)
        count = flat.numel()
        pad = (-count) % self.block
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.block)
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp(-127, 127).to(torch.int8)
        if values.dtype not in _Q8_CODES:
            raise TypeError(f"q8 quantizes floating-point tensors, not {values.dtype}")
        header = _Q8_HEADER.pack(_Q8_MAGIC, 1, _Q8_CODES[values.dtype], self.block, count)
        body = scales.numpy().tobytes() + q.reshape(-1)[:count].numpy().tobytes()
        return header + zstandard.ZstdCompressor(level=3).compress(body)

    def encode(self, raw: memoryview, *, itemsize: int) -> bytes:
        raise TypeError("q8 is lossy: quantize() the tensor, it does not encode raw bytes")

    def decode(self, stored: bytes, out: memoryview, *, itemsize: int) -> None:
        try:
            magic, version, code, block, count = _Q8_HEADER.unpack_from(stored)
            body = zstandard.ZstdDecompressor().decompress(
                stored[_Q8_HEADER.size :],
                max_output_size=count * 5 + 4 * count // max(block, 1) + 8,
            )
        except (struct.error, zstandard.ZstdError) as exc:
            raise CorruptCheckpointError(f"q8 object does not decode: {exc}") from exc
        dtype = _Q8_DTYPES.get(code)
        if magic != _Q8_MAGIC or version != 1 or dtype is None or block < 1:
            raise CorruptCheckpointError("not a q8 object")
        if dtype.itemsize != itemsize:
            raise CorruptCheckpointError(f"q8 object holds {dtype}, not {itemsize}-byte elements")
        blocks = -(-count // block)
        if len(body) != 4 * blocks + count or count * itemsize != len(out):
            raise CorruptCheckpointError("q8 object has the wrong size for its tensor")
        scales = torch.frombuffer(bytearray(body[: 4 * blocks]), dtype=torch.float32)
        q = torch.frombuffer(bytearray(body[4 * blocks :]), dtype=torch.int8).to(torch.float32)
        q = torch.nn.functional.pad(q, (0, blocks * block - count)).reshape(blocks, block)
        values = (q * scales[:, None]).reshape(-1)[:count]
        target = torch.frombuffer(out, dtype=torch.uint8)
        target.copy_(values.to(dtype).view(torch.uint8))


CODECS: dict[str, Codec] = {
    "raw": RawCodec(),
    "zstd": ZstdCodec(),
    "bytegroup": ByteGroupedCodec(),
    "q8": Q8Codec(),
}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``."""
    return CODECS[name]
