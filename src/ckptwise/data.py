"""A resumable sampler: the documented way to save a run's position in its data.

Put it in the state (``{"model": m, "optimizer": o, "data": sampler}``) and a resumed run
sees exactly the batches it would have seen, in the same order.

>>> from torch.utils.data import DataLoader
>>> sampler = ResumableSampler(1000, seed=0)
>>> # loader = DataLoader(dataset, batch_size=8, sampler=sampler)
>>> sampler.state_dict()["epoch"], sampler.state_dict()["offset"]
(0, 0)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

from ckptwise.errors import ConfigError

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Yields dataset indices epoch after epoch, and can restart mid-epoch.

    Each epoch's order is a permutation drawn from ``seed + epoch`` (or ``range(n)`` when
    ``shuffle`` is off), so it never depends on the global RNG. Call :meth:`advance` with
    ``epoch`` and ``offset`` in the state dict say where the run is; iteration after
    :meth:`load_state_dict` resumes at that offset.

    By default the sampler counts what it yields, which is exact for a ``DataLoader`` with
    ``num_workers=0``. Worker processes draw indices ahead of training (``prefetch_factor``
    batches per worker), so for them pass ``auto_advance=False`` and call
    :meth:`advance` with the batch size after each training step.
    """

    def __init__(
        self, length: int, *, seed: int = 0, shuffle: bool = True, auto_advance: bool = True
    ) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"ResumableSampler(length) must be a positive int, got {length!r}")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.auto_advance = auto_advance
        self.epoch = 0
        self.offset = 0

    def __len__(self) -> int:
        return self.length - self.offset

    def order(self, epoch: int) -> list[int]:
        """The index order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return [int(i) for i in torch.randperm(self.length, generator=g)]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if not self.auto_advance:
            yield from order[self.offset :]
            return
        for i in range(self.offset, self.length):
            self.offset = i + 1
            yield order[i]
        self.epoch += 1
        self.offset = 0

    def advance(self, n: int) -> None:
        """Record that ``n`` more samples were consumed (with ``auto_advance=False``)."""
        total = self.offset + n
        self.epoch += total // self.length
        self.offset = total % self.length

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "length": self.length,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("length") != self.length:
            raise ConfigError(
                f"the checkpoint's sampler covered {state.get('length')} samples but this one "
                f"covers {self.length}; resume with the same data set"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
