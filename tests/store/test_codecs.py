"""Codecs round-trip every bit pattern; byte grouping compresses float weights."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptwise.errors import CorruptCheckpointError
from ckptwise.store.codecs import CODECS, ByteGroupedCodec
from ckptwise.store.manifest import DTYPES
from ckptwise.store.store import tensor_bytes

LOSSLESS = sorted(name for name, codec in CODECS.items() if not getattr(codec, "lossy", False))


def round_trip(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor_bytes(tensor)
    itemsize = tensor.dtype.itemsize
    stored = bytes(CODECS[codec].encode(raw, itemsize=itemsize))
    out = torch.empty(len(raw), dtype=torch.uint8)
    CODECS[codec].decode(stored, memoryview(out.numpy()), itemsize=itemsize)  # type: ignore[arg-type]
    return out.view(tensor.dtype).reshape(tensor.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))


@settings(max_examples=150, deadline=None)
@given(
    codec=st.sampled_from(LOSSLESS),
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


@pytest.mark.parametrize("codec", LOSSLESS)
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
