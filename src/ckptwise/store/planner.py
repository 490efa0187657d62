"""Choosing a codec for each new object: compress only where it makes the save faster.

Writing ``n`` raw bytes costs ``n / W`` (``W``: the store's measured write rate, fsync
included). Compressed, the store's worker threads encode some objects while others are
written, so the save costs about ``max(n / (p * E), n / (r * W))`` (``E``: the codec's
measured encode rate on one core, ``p``: cores the encoders can use, ``r``: the measured
ratio for that element width). With ``codec="auto"`` the planner picks the byte-grouped
codec for float tensors exactly when that is clearly smaller (by :data:`MARGIN`), and says
why in the manifest (``ckptwise show`` prints it). On a local disk that writes faster than
the cores encode, that means raw; on a slow or remote store, compression.

Every rate is measured on this run, never assumed: the first save of a run is raw (it
measures how fast the store writes); before the planner first considers compressing, it
times the codec on a few MiB of weight-like data on this machine as it is loaded now, and
counts ``p`` as the cores this process may use that the load average leaves idle. A guess
that proves wrong (the machine got busier) costs one save: each compressed object re-measures
the encode rate, and each commit the write rate and the idle cores.

Deltas (``deltas=K``) are a request for fewer bytes, which the planner does not second-guess:
with ``"bytegroup"`` every new object is tried as a delta, with ``"auto"`` every float tensor
it would consider compressing (2-, 4- or 8-byte floats of 64 KiB or more), whichever codec it
picks for the object whole. Raw and zstd runs cannot store deltas (a delta is byte-grouped).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptwise.store.codecs import BYTEGROUP, LOSSLESS, RAW, get_codec

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "AUTO",
    "DELTA_MODES",
    "ENCODING_BYTES",
    "MODES",
    "CodecPlanner",
    "idle_cores",
    "measure_encode_rate",
]

#: The planner's own mode: choose per object (see the module docstring).
AUTO = "auto"
#: What a run's ``codec=`` may be.
MODES = frozenset({AUTO}) | LOSSLESS
#: The modes that can store deltas.
DELTA_MODES = frozenset({AUTO, BYTEGROUP})

#: Objects smaller than this are never compressed: the saving is noise.
MIN_COMPRESS = 1 << 16
#: Compression must be predicted this much faster than raw (0.9: 10 %), so that a
#: measurement's noise never makes a save slower.
MARGIN = 0.9
#: At most this many cores encode at once (the store's writer threads).
MAX_PARALLEL = 4
#: Ratios until the run's own compressed objects are measured (bf16, fp32, fp64 weights).
GUESS_RATIO = {2: 1.45, 4: 1.18, 8: 1.08}
#: How much weight-like data the encode rate is first measured on.
CALIBRATION_BYTES = 1 << 21


def _ewma(old: float | None, new: float, weight: float = 0.5) -> float:
    return new if old is None else weight * new + (1 - weight) * old


def idle_cores() -> int:
    """Cores this process may run on (its CPU affinity) that the load average leaves idle,
    counting this process's own busy thread as not in the way; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    return max(1, min(cores, int(cores - max(0.0, busy - 1.0) + 0.5)))


def measure_encode_rate(nbytes: int = CALIBRATION_BYTES) -> float:
    """Bytes per second the byte-grouped codec encodes on one core, measured now on
    ``nbytes`` of weight-like bf16 values (normal, scale 0.02: what model weights hold)."""
    import numpy as np

    values = np.random.default_rng(0).standard_normal(nbytes // 2, dtype=np.float32) * 0.02
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    raw = memoryview(bf16.tobytes())
    codec = get_codec(BYTEGROUP)
    started = time.perf_counter()
    codec.encode(raw, itemsize=2)
    return len(raw) / max(time.perf_counter() - started, 1e-6)


#: Raw bytes of objects being encoded (compressed, byte-grouped, as deltas) at once. Encoding
#: holds about 1.3 times an object's size until it is written, so four writers on large
#: objects held 2.6 GiB for a 1.2 GiB state (measured); with this cap a save's encoding holds
#: at most about 0.7 GiB, or 1.3 times its largest object, which encodes alone. Raw objects
#: are written from the tensors' own memory and count for nothing.
ENCODING_BYTES = 512 * 2**20


@dataclass
class CodecPlanner:
    """Per-store state of the codec decision; ``mode`` is ``"auto"`` or a codec name.

    ``parallel`` is the cores the encoders can use (``None``: :func:`idle_cores`, counted
    when the encode rate is first measured and again at every commit).
    """

    mode: str = RAW
    remote: bool = False
    write_rate: float | None = None
    encode_rate: float | None = None
    ratios: dict[int, float] = field(default_factory=dict)
    parallel: int | None = None
    #: measures the encode rate when the run has not yet compressed anything
    calibrate: Callable[[], float] = field(default=measure_encode_rate, repr=False)

    def __post_init__(self) -> None:
        self._count_cores = self.parallel is None

    @property
    def cores(self) -> int:
        """The cores the encoders can use (see ``parallel``)."""
        if self.parallel is None:
            self.parallel = min(idle_cores(), MAX_PARALLEL)
        return self.parallel

    def choose(self, dtype: torch.dtype, nbytes: int) -> tuple[str, str]:
        """The codec for a new object, and the reason."""
        if self.mode != AUTO:
            return self.mode, ""  # the run asked for it: nothing to explain
        unfit = _unfit(dtype, nbytes)
        if unfit:
            return RAW, unfit
        write = self.write_rate
        if write is None:
            return RAW, "first save to this store: measuring how fast it writes"
        if self.encode_rate is None:
            self.encode_rate = self.calibrate()
            if self._count_cores:
                self.parallel = None  # counted now, under the load of this moment
        encode = self.encode_rate
        # objects this large encode fewer at a time (see ENCODING_BYTES), one when over it
        cores = max(1, min(self.cores, ENCODING_BYTES // max(nbytes, 1)))
        ratio = self.ratios.get(dtype.itemsize, GUESS_RATIO.get(dtype.itemsize, 1.05))
        raw_time = 1 / write
        packed_time = max(1 / (encode * cores), 1 / (ratio * write))
        rates = (
            f"encodes {encode / 1e6:.0f} MB/s per core x {cores} at {ratio:.2f}x, "
            f"store writes {write / 1e6:.0f} MB/s"
        )
        if packed_time < MARGIN * raw_time:
            return BYTEGROUP, f"pays: {rates}"
        return RAW, f"would not make the save clearly faster: {rates}"

    def tries_delta(self, dtype: torch.dtype, nbytes: int) -> bool:
        """Whether a new object is worth trying as a delta, when the run has deltas on."""
        if self.mode == AUTO:
            return not _unfit(dtype, nbytes)
        return self.mode == BYTEGROUP

    def observed_write(self, nbytes: int, seconds: float) -> None:
        """Fold in one commit's object writes (bytes on disk, wall seconds)."""
        if nbytes >= MIN_COMPRESS and seconds > 0:
            self.write_rate = _ewma(self.write_rate, nbytes / seconds)
        if self._count_cores:
            self.parallel = None  # counted again when next needed

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
