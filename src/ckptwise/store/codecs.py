"""Codecs turn a tensor's raw bytes into the bytes of its stored object, and back.

Each codec is named in the manifest entry of every tensor that uses it, so a run can mix
codecs and old runs stay readable as new codecs are added. Decoding always checks the
output length; the store then checks the content hash.
"""

from __future__ import annotations

from typing import Protocol

import zstandard

from ckptwise.errors import CorruptCheckpointError

__all__ = ["CODECS", "Codec", "RawCodec", "ZstdCodec", "get_codec"]


class Codec(Protocol):
    """A lossless transform of an object's bytes."""

    name: str

    def encode(self, raw: memoryview) -> bytes | memoryview:
        """The stored form of ``raw`` (a flat byte view)."""
        ...

    def decode(self, stored: bytes, out: memoryview) -> None:
        """Fill ``out`` (exactly the raw size) from ``stored``."""
        ...


class RawCodec:
    """Stores the bytes as they are, so a restore is one read straight into the tensor."""

    name = "raw"

    def encode(self, raw: memoryview) -> memoryview:
        return raw

    def decode(self, stored: bytes, out: memoryview) -> None:
        if len(stored) != len(out):
            raise CorruptCheckpointError(f"object holds {len(stored)} bytes, expected {len(out)}")
        out[:] = stored


class ZstdCodec:
    """Plain zstd of the raw bytes (level 3 by default)."""

    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def encode(self, raw: memoryview) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode(self, stored: bytes, out: memoryview) -> None:
        try:
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=len(out))
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(f"zstd object does not decode: {exc}") from exc
        if len(data) != len(out):
            raise CorruptCheckpointError(
                f"object decodes to {len(data)} bytes, expected {len(out)}"
            )
        out[:] = data


CODECS: dict[str, Codec] = {"raw": RawCodec(), "zstd": ZstdCodec()}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``."""
    return CODECS[name]
