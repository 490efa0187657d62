"""Codecs round-trip every bit pattern; byte grouping compresses float weights."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptwise.errors import ConfigError, CorruptCheckpointError, SnapshotError
from ckptwise.store.codecs import (
    BYTEGROUP,
    CODECS,
    DELTA,
    LOSSLESS,
    LOSSY,
    Q8,
    Q8_CODEC,
    RAW,
    XOR_CODEC,
    ZSTD,
    ByteGroupedCodec,
    decode,
    decoded_size,
    get_codec,
    readable,
)
from ckptwise.store.layout import byte_view, tensor_bytes
from ckptwise.store.manifest import DTYPES
from ckptwise.store.planner import CodecPlanner


def round_trip(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor_bytes(tensor)
    itemsize = tensor.dtype.itemsize
    stored = bytes(CODECS[codec].encode(raw, itemsize=itemsize))
    out = torch.empty(len(raw), dtype=torch.uint8)
    CODECS[codec].decode(stored, byte_view(out), itemsize=itemsize)
    return out.view(tensor.dtype).reshape(tensor.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))


@settings(max_examples=150, deadline=None)
@given(
    codec=st.sampled_from(sorted(LOSSLESS)),
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 7), max_size=4),
    data=st.data(),
)
def test_every_codec_round_trips_any_bits(
    codec: str, dtype: str, shape: list[int], data: st.DataObject
) -> None:
    torch_dtype = DTYPES[dtype]
    n = int(np.prod(shape)) * torch_dtype.itemsize
    raw = data.draw(st.binary(min_size=n, max_size=n))  # NaN, Inf, denormals: any bit pattern
    tensor = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch_dtype).reshape(shape)
        if n
        else torch.empty(shape, dtype=torch_dtype)
    )
    assert same_bits(round_trip(codec, tensor), tensor)


@pytest.mark.parametrize("codec", sorted(LOSSLESS))
def test_special_values_and_views(codec: str) -> None:
    special = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 5e-324, -1e-310, 3.4e38],
        dtype=torch.float64,
    )
    assert same_bits(round_trip(codec, special), special)
    base = torch.randn(6, 5).to(torch.bfloat16)
    for view in (base.t(), base[:, ::2], base[1:4, 1:3], base.flip(0)):
        assert same_bits(round_trip(codec, view), view.contiguous())


def test_byte_grouping_compresses_float_weights_past_plain_zstd() -> None:
    torch.manual_seed(0)
    weights = torch.randn(1 << 20) * 0.02
    for dtype, target in ((torch.bfloat16, 1.4), (torch.float16, 1.15), (torch.float32, 1.15)):
        raw = tensor_bytes(weights.to(dtype))
        grouped = len(CODECS["bytegroup"].encode(raw, itemsize=dtype.itemsize))
        plain = len(CODECS["zstd"].encode(raw, itemsize=dtype.itemsize))
        assert len(raw) / grouped >= target, (dtype, len(raw) / grouped)
        assert grouped < plain * 0.92, (dtype, grouped, plain)


def test_incompressible_planes_are_stored_not_compressed() -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=4 << 20, dtype=np.uint8).tobytes()
    stored = bytes(CODECS["bytegroup"].encode(memoryview(noise), itemsize=4))
    modes = [struct.unpack_from("<BQ", stored, 8 + 9 * i)[0] for i in range(4)]
    assert modes == [0, 0, 0, 0]
    assert len(stored) == len(noise) + 8 + 4 * 9


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "not a byte-grouped object"),
        (lambda b: b[:-1], "truncated|decode"),
        (lambda b: b + b"\0", "stray bytes"),
        (lambda b: b[:5], "truncated"),
    ],
)
def test_damaged_byte_grouped_objects_are_corruption(mutate: object, message: str) -> None:
    tensor = torch.randn(1000).to(torch.bfloat16)
    stored = bytes(CODECS["bytegroup"].encode(tensor_bytes(tensor), itemsize=2))
    out = memoryview(bytearray(2000))
    with pytest.raises(CorruptCheckpointError, match=message):
        ByteGroupedCodec().decode(mutate(stored), out, itemsize=2)  # type: ignore[operator]


# -- the registry ------------------------------------------------------------------------


def encoded_by(codec: str, tensor: torch.Tensor, base: torch.Tensor) -> bytes:
    """``tensor`` stored with ``codec`` (a delta is against ``base``)."""
    raw, itemsize = tensor_bytes(tensor), tensor.dtype.itemsize
    if codec == DELTA:
        return XOR_CODEC.encode(raw, base=tensor_bytes(base), itemsize=itemsize)
    if codec == Q8:
        return Q8_CODEC.quantize(tensor).stored
    return bytes(get_codec(codec).encode(raw, itemsize=itemsize))


@pytest.mark.parametrize("codec", sorted(readable()))
def test_every_readable_codec_decodes_what_it_stored(codec: str) -> None:
    base = torch.randn(3000).to(torch.bfloat16)
    tensor = base.clone()
    tensor[::7] += 1
    stored = encoded_by(codec, tensor, base)
    out = torch.empty(tensor.nbytes, dtype=torch.uint8)
    decode(
        codec,
        stored,
        byte_view(out),
        itemsize=2,
        base=tensor_bytes(base) if codec == DELTA else None,
    )
    if codec in LOSSY:
        assert torch.allclose(out.view(torch.bfloat16).float(), tensor.float(), atol=0.05)
    else:
        assert torch.equal(out.view(torch.bfloat16), tensor)


@pytest.mark.parametrize("codec", sorted(readable()))
def test_every_readable_codec_calls_garbage_corruption(codec: str) -> None:
    out = memoryview(bytearray(64))
    base = memoryview(bytearray(64)) if codec == DELTA else None
    with pytest.raises(CorruptCheckpointError):
        decode(codec, b"\x07" * 9, out, itemsize=4, base=base)


def test_the_registry_knows_its_names() -> None:
    assert readable() == {RAW, ZSTD, BYTEGROUP, DELTA, Q8}
    assert LOSSLESS == set(CODECS) == {RAW, ZSTD, BYTEGROUP}
    assert all(CODECS[name].name == name for name in CODECS)
    assert XOR_CODEC.name == DELTA
    assert Q8_CODEC.name == Q8
    assert not LOSSLESS & LOSSY
    with pytest.raises(ConfigError, match="not a whole-object lossless codec"):
        get_codec(Q8)
    with pytest.raises(CorruptCheckpointError, match="needs a base"):
        decode(DELTA, b"", memoryview(bytearray()), itemsize=1)
    with pytest.raises(CorruptCheckpointError, match="cannot have a base"):
        decode(RAW, b"", memoryview(bytearray()), itemsize=1, base=memoryview(b""))


@settings(max_examples=200, deadline=None)
@given(
    mode=st.sampled_from(["auto", *sorted(LOSSLESS)]),
    dtype=st.sampled_from(sorted(DTYPES)),
    nbytes=st.integers(0, 1 << 30),
    remote=st.booleans(),
    write_rate=st.none() | st.floats(1e3, 1e11),
    encode_rate=st.none() | st.floats(1e3, 1e11),
)
def test_the_planner_never_chooses_a_lossy_codec(
    mode: str,
    dtype: str,
    nbytes: int,
    remote: bool,
    write_rate: float | None,
    encode_rate: float | None,
) -> None:
    planner = CodecPlanner(mode=mode, remote=remote, write_rate=write_rate, encode_rate=encode_rate)
    codec, _ = planner.choose(DTYPES[dtype], nbytes)
    assert codec in LOSSLESS


def test_codec_misuse_is_the_callers_error() -> None:
    with pytest.raises(ConfigError, match="do not divide into 4-byte elements"):
        ByteGroupedCodec().encode(memoryview(b"abcdef"), itemsize=4)
    with pytest.raises(ConfigError, match="same size"):
        XOR_CODEC.encode(memoryview(b"ab"), base=memoryview(b"abc"), itemsize=1)
    with pytest.raises(SnapshotError, match=r"not torch\.int64"):
        Q8_CODEC.quantize(torch.arange(10))


def test_byte_grouped_objects_decode_by_their_own_width() -> None:
    """Dedup is by content: an object grouped as fp32 may be listed later as int16 bytes."""
    tensor = torch.randn(100)
    stored = ByteGroupedCodec().encode(tensor_bytes(tensor), itemsize=4)
    out = torch.empty(tensor.nbytes, dtype=torch.uint8)
    ByteGroupedCodec().decode(stored, byte_view(out), itemsize=2)
    assert torch.equal(out.view(torch.float32), tensor)


def _claims(size: int) -> bytes:
    """A zstd frame whose header claims ``size`` bytes, holding an empty raw block."""
    return struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", size) + b"\x01\0\0"


def test_a_zstd_frame_claiming_a_terabyte_fails_before_anything_is_allocated() -> None:
    out = memoryview(bytearray(16))
    with pytest.raises(CorruptCheckpointError, match="says it holds 1099511627776 bytes"):
        decode(ZSTD, _claims(2**40), out, itemsize=4)
    assert decoded_size(ZSTD, _claims(2**40)) == 2**40  # what a reader checks first
    plane = _claims(2**40)
    grouped = b"CKBG" + bytes([1, 1, 1, 0]) + bytes([1]) + struct.pack("<Q", len(plane)) + plane
    with pytest.raises(CorruptCheckpointError, match="holds 1099511627776 elements of 1 bytes"):
        decode(BYTEGROUP, grouped, out, itemsize=1)
    header = b"CKQ8" + bytes([1, 0]) + struct.pack("<HQ", 256, 2**61)
    with pytest.raises(CorruptCheckpointError, match="wrong size"):
        decode(Q8, header + _claims(2**62), out, itemsize=4)


def test_a_zstd_frame_that_does_not_record_its_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="does not record its size"):
        decode(ZSTD, frame, memoryview(bytearray(16)), itemsize=4)
    with pytest.raises(CorruptCheckpointError, match="does not record its size"):
        decode(ZSTD, frame, memoryview(bytearray(0)), itemsize=4)


@pytest.mark.parametrize("codec", [BYTEGROUP, ZSTD, Q8])
def test_every_truncation_of_an_object_is_a_corrupt_checkpoint(codec: str) -> None:
    tensor = torch.linspace(-3, 3, 300, dtype=torch.float32)
    raw = tensor_bytes(tensor)
    if codec == Q8:
        stored = Q8_CODEC.quantize(tensor).stored
    else:
        stored = bytes(CODECS[codec].encode(raw, itemsize=4))
    out = memoryview(bytearray(len(raw)))
    for cut in range(len(stored)):
        with pytest.raises(CorruptCheckpointError):
            decode(codec, stored[:cut], out, itemsize=4)
