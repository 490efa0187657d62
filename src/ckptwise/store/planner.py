"""Choosing a codec for each new object: compress only where it makes the save faster.

Writing ``n`` raw bytes costs ``n / W`` (``W``: the store's measured write rate, fsync
included). Compressed, the store's worker threads encode some objects while others are
written, so the save costs about ``max(n / (p * E), n / (r * W))`` (``E``: the codec's
measured encode rate on one core, ``p``: cores the encoders can use, ``r``: the measured
ratio for that element width). With ``codec="auto"`` the planner picks the byte-grouped
codec for float tensors exactly when that is smaller, and says why in the manifest
(``ckptwise show`` prints it). On a local disk that writes faster than the cores encode,
that means raw; on a slow or remote store, compression.

Deltas (``deltas=K``) are a request for fewer bytes, which the planner does not second-guess:
with ``"bytegroup"`` every new object is tried as a delta, with ``"auto"`` every float tensor
it would consider compressing (2-, 4- or 8-byte floats of 64 KiB or more), whichever codec it
picks for the object whole. Raw and zstd runs cannot store deltas (a delta is byte-grouped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ckptwise.store.codecs import BYTEGROUP, LOSSLESS, RAW

__all__ = ["AUTO", "DELTA_MODES", "MODES", "CodecPlanner"]

#: The planner's own mode: choose per object (see the module docstring).
AUTO = "auto"
#: What a run's ``codec=`` may be.
MODES = frozenset({AUTO}) | LOSSLESS
#: The modes that can store deltas.
DELTA_MODES = frozenset({AUTO, BYTEGROUP})

#: Objects smaller than this are never compressed: the saving is noise.
MIN_COMPRESS = 1 << 16
#: Starting guesses, replaced by measurements after the first compressed objects.
GUESS_RATIO = {2: 1.45, 4: 1.18, 8: 1.08}
GUESS_ENCODE_RATE = 300e6
GUESS_REMOTE_WRITE_RATE = 100e6


def _ewma(old: float | None, new: float, weight: float = 0.5) -> float:
    return new if old is None else weight * new + (1 - weight) * old


@dataclass
class CodecPlanner:
    """Per-store state of the codec decision; ``mode`` is ``"auto"`` or a codec name."""

    mode: str = RAW
    remote: bool = False
    write_rate: float | None = None
    encode_rate: float | None = None
    ratios: dict[int, float] = field(default_factory=dict)
    parallel: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 4)))

    def choose(self, dtype: torch.dtype, nbytes: int) -> tuple[str, str]:
        """The codec for a new object, and the reason."""
        if self.mode != AUTO:
            return self.mode, ""  # the run asked for it: nothing to explain
        unfit = _unfit(dtype, nbytes)
        if unfit:
            return RAW, unfit
        write = self.write_rate
        if write is None:
            if not self.remote:
                return RAW, "first save to this store: measuring how fast it writes"
            write = GUESS_REMOTE_WRITE_RATE
        encode = self.encode_rate or GUESS_ENCODE_RATE
        ratio = self.ratios.get(dtype.itemsize, GUESS_RATIO.get(dtype.itemsize, 1.05))
        raw_time = 1 / write
        packed_time = max(1 / (encode * self.parallel), 1 / (ratio * write))
        rates = (
            f"encodes {encode / 1e6:.0f} MB/s per core x {self.parallel} at {ratio:.2f}x, "
            f"store writes {write / 1e6:.0f} MB/s"
        )
        if packed_time < raw_time:
            return BYTEGROUP, f"pays: {rates}"
        return RAW, f"would slow the save: {rates}"

    def tries_delta(self, dtype: torch.dtype, nbytes: int) -> bool:
        """Whether a new object is worth trying as a delta, when the run has deltas on."""
        if self.mode == AUTO:
            return not _unfit(dtype, nbytes)
        return self.mode == BYTEGROUP

    def observed_write(self, nbytes: int, seconds: float) -> None:
        """Fold in one commit's object writes (bytes on disk, wall seconds)."""
        if nbytes >= MIN_COMPRESS and seconds > 0:
            self.write_rate = _ewma(self.write_rate, nbytes / seconds)

    def observed_encode(self, itemsize: int, raw: int, stored: int, seconds: float) -> None:
        """Fold in one compressed object (raw and stored bytes, encode seconds)."""
        if raw >= MIN_COMPRESS and seconds > 0 and stored > 0:
            self.encode_rate = _ewma(self.encode_rate, raw / seconds)
            self.ratios[itemsize] = _ewma(self.ratios.get(itemsize), raw / stored)


def _unfit(dtype: torch.dtype, nbytes: int) -> str:
    """Why ``auto`` never compresses such an object; empty when it may."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        return "not a 2-, 4- or 8-byte float tensor"
    if nbytes < MIN_COMPRESS:
        return f"smaller than {MIN_COMPRESS // 1024} KiB"
    return ""
