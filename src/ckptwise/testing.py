"""For code that tests ckptwise or uses it in tests: a controllable clock, and the recipe that
runs ``Trainer`` + DeepSpeed on a CPU.

An in-memory store needs no double: ``CheckpointManager("memory://name", ...)`` runs on
fsspec's memory filesystem.
"""

from __future__ import annotations

import importlib
import os
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["FakeClock", "deepspeed_on_cpu"]


def deepspeed_on_cpu() -> dict[str, Any]:
    """Set up this process so that ``Trainer`` + DeepSpeed runs on a CPU (gloo), as this
    project's tests and ``examples/finetune_minicpmv.py`` do; returns the ``TrainingArguments``
    settings it also needs.

    Not for training: for checking a DeepSpeed setup (or ckptwise's claims) on a laptop or in
    CI. Call it first, before the script parses its arguments (``TrainingArguments`` reads
    the process state it sets up), in every process ``torchrun`` starts. It

    * keeps DeepSpeed from compiling its shared-memory communication op (it needs a C++
      toolchain and only speeds up CPU collectives); the function to replace is looked up in
      the module ``deepspeed.comm.torch``, which ``import deepspeed.comm.torch as m`` does
      not give (that name is the ``torch`` package inside ``deepspeed.comm``);
    * tells accelerate that DeepSpeed is used and gives it a ``gloo`` process state
      (accelerate sets none up without a GPU).

    Pass what it returns to ``TrainingArguments(...)`` (``use_cpu``, and the accelerator
    config that makes ``Trainer`` keep that state), and give DeepSpeed's optimizer
    ``"torch_adam": true`` in the config's ``optimizer.params`` (FusedAdam needs CUDA).
    """
    comm: Any = importlib.import_module("deepspeed.comm.torch")
    comm.build_shm_op = lambda *args, **kwargs: None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    return {"use_cpu": True, "accelerator_config": {"use_configured_state": True}}


class FakeClock:
    """A clock that only moves when told to; pass it as ``CheckpointManager(clock=...)``.

    >>> clock = FakeClock()
    >>> clock.advance(timedelta(minutes=5))
    >>> clock().minute
    5
    """

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start if start is not None else datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta``."""
        self.now += delta
