"""Plain records shared by the policy, store and manager layers.

They carry no behaviour and import nothing from torch, so policies stay pure values and the
store stays ignorant of training frameworks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["CheckpointInfo"]


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint as the store describes it.

    ``logical_bytes`` is the size of every tensor it holds; ``new_bytes`` is what this
    checkpoint added to the store when it was written (objects that earlier checkpoints had
    not already stored), so the sum of ``new_bytes`` over a run is what was written.
    """

    step: int
    time: datetime
    metrics: Mapping[str, float] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    logical_bytes: int = 0
    new_bytes: int = 0
    objects: frozenset[str] = frozenset()
    #: what the checkpoint holds: ``full``, ``weights``, ``trainable`` (``/dtype`` if cast)
    variant: str = "full"
