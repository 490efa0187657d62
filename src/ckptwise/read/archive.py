"""Lossy archive copies: one checkpoint into a new run, the optimizer state quantized.

For keeping a checkpoint long after training (an ablation's starting point, a paper's
reference) at a fraction of its size; never part of a training run's own saves.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ckptwise.errors import CheckpointError
from ckptwise.records import CheckpointInfo
from ckptwise.store import open_store

if TYPE_CHECKING:
    from ckptwise.read.restoring import Loaded

__all__ = ["archive_copy"]


def archive_copy(
    loaded: Loaded,
    source: str,
    out: str | os.PathLike[str],
    *,
    lossy: tuple[str, ...],
    codec: str,
) -> CheckpointInfo:
    """Commit ``loaded`` (read from the run at ``source``) as the only checkpoint of a new
    run at ``out``, storing float tensors named with a prefix in ``lossy`` as blockwise int8.

    Only floating-point tensors of more than one element are quantized: scalars such as
    Adam's ``step`` and integer bookkeeping are counters, not values that tolerate error,
    and quantizing one element saves nothing. They are copied exactly.
    """
    manifest = loaded.manifest
    if manifest.world_size > 1:
        raise CheckpointError(
            f"step {loaded.step} was saved by {manifest.world_size} processes; archiving "
            "multi-process checkpoints is not supported yet (export() the weights instead)"
        )
    target = open_store(out, codec=codec)
    lock = target.lock()
    lock.acquire()
    try:
        target.refresh()  # what is there now that the run is ours
        if target.steps():
            raise CheckpointError(
                f"{target.url} already holds checkpoints; archive into a new folder"
            )
        return target.commit(
            loaded.step,
            loaded.tensors,
            tree=manifest.tree,
            metrics=manifest.metrics,
            reasons=manifest.reasons,
            extra={**manifest.extra, "archive": {"from": source, "lossy": list(lossy)}},
            time=manifest.time,
            lossy=[
                name
                for name, tensor in loaded.tensors.items()
                if name.startswith(lossy) and tensor.is_floating_point() and tensor.numel() > 1
            ],
        )
    finally:
        lock.release()
