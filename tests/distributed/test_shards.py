"""Chunks of sharded tensors: any chunking of a tensor reassembles it, into any other."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptwise.distributed.shards import copy_overlap


def chunks(
    shape: tuple[int, ...], cuts: list[list[int]]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of the grid of chunks that ``cuts`` (sorted positions per dim) make."""
    spans = []
    for size, where in zip(shape, cuts, strict=True):
        edges = [0, *sorted({c for c in where if 0 < c < size}), size]
        spans.append([(a, b - a) for a, b in itertools.pairwise(edges)])
    return [
        (tuple(o for o, _ in parts), tuple(n for _, n in parts))
        for parts in itertools.product(*spans)
    ]


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, data=st.data())
def test_saved_chunks_fill_any_wanted_chunk_exactly(
    shape: tuple[int, ...], data: st.DataObject
) -> None:
    whole = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    cut = st.lists(
        st.lists(st.integers(0, 7), max_size=3), min_size=len(shape), max_size=len(shape)
    )
    saved = chunks(shape, data.draw(cut))
    wanted = chunks(shape, data.draw(cut))
    for at, sizes in wanted:
        target = torch.full(sizes, -1, dtype=whole.dtype)
        filled = 0
        for src_at, src_sizes in saved:
            piece = whole[tuple(slice(o, o + n) for o, n in zip(src_at, src_sizes, strict=True))]
            filled += copy_overlap(target, at, piece.clone(), src_at)
        expected = whole[tuple(slice(o, o + n) for o, n in zip(at, sizes, strict=True))]
        assert filled == target.numel()
        assert torch.equal(target, expected)


def test_disjoint_chunks_copy_nothing() -> None:
    target = torch.zeros(2, 2)
    assert copy_overlap(target, (0, 0), torch.ones(2, 2), (2, 0)) == 0
    assert torch.equal(target, torch.zeros(2, 2))
