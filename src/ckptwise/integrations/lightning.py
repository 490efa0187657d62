"""Lightning adapter: a ``Callback`` that saves by ckptwise's policies and resumes exactly.

    from ckptwise.integrations.lightning import CheckpointCallback

    callback = CheckpointCallback("runs/exp1", save=cw.every(500) | cw.on_improvement("val_loss"),
                                  keep=cw.keep_last(2) | cw.keep_best(1, "val_loss"))
    trainer = L.Trainer(callbacks=[callback], enable_checkpointing=False, ...)
    trainer.fit(model, datamodule, ckpt_path=callback.resume_checkpoint())

Each save holds what Lightning's own checkpoint holds (weights, optimizers, schedulers,
loops, callbacks, hyper-parameters, precision state) plus what it misses: the RNG states
and, when the training ``DataLoader`` uses a :class:`~ckptwise.ResumableSampler`, the
position in the data. The callback advances that sampler itself after every batch (create
it with ``auto_advance=False``: Lightning fetches a batch ahead), and takes the save
decision for step N at the start of batch N+1 -- after any validation of step N, so
``on_improvement("val_loss")`` sees it, and at the point where a resumed run puts the RNG
states back. :meth:`CheckpointCallback.resume_checkpoint` writes the newest checkpoint
that verifies as a ``.ckpt`` for ``trainer.fit(ckpt_path=...)``, which restores the loops.

Under ``torchrun`` (``strategy="ddp"``, or FSDP2 through ``ModelParallelStrategy``) the
process group must exist before the callback is created, so its manager joins the job; each
rank then saves its own state (its shards, under FSDP2) and resumes from its own ``.ckpt``,
which holds whole tensors that Lightning shards again on load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.data import extract_batch_size

from ckptwise.config import policy_from_config
from ckptwise.data import ResumableSampler
from ckptwise.errors import ConfigError
from ckptwise.formats import resume_scratch
from ckptwise.manager import CheckpointManager
from ckptwise.metrics import coerce_metrics
from ckptwise.policy import RetentionPolicy, Trigger
from ckptwise.snapshot import RNG_KEY, RngState

__all__ = ["CheckpointCallback"]

log = logging.getLogger("ckptwise")


class _LightningState:
    """What ``Trainer.save_checkpoint`` would write, as a stateful entry, built only when a
    save happens. The loop counters are those recorded at ``on_train_batch_end`` -- where
    Lightning's own ``ModelCheckpoint`` saves, so they restore right; by the decision, at the
    start of the next batch, Lightning has already counted that batch as fetched."""

    def __init__(self, trainer: Any, loops: dict[str, Any]) -> None:
        self.trainer = trainer
        self.loops = loops

    def state_dict(self) -> dict[str, Any]:
        checkpoint: dict[str, Any] = self.trainer._checkpoint_connector.dump_checkpoint(False)
        checkpoint["loops"] = self.loops
        return checkpoint

    def load_state_dict(self, state: Any) -> None:
        raise ConfigError("Lightning restores its own state: pass ckpt_path to trainer.fit")


def _sampler(trainer: Any) -> ResumableSampler | None:
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = getattr(loader, "flattened", None) or [getattr(trainer, "train_dataloader", None)]
    for item in loaders:
        sampler = getattr(item, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            return sampler
    return None


class CheckpointCallback(Callback):
    """Lightning ``Callback`` with ckptwise's policies, storage and exact resume."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save: Trigger | None = None,
        keep: RetentionPolicy | None = None,
        config: Any = None,
        **manager_options: Any,
    ) -> None:
        if save is None and keep is None and config is not None:
            policy = policy_from_config(config)
            save, keep = policy.save, policy.keep
        if save is None:
            raise ConfigError(
                "CheckpointCallback needs a save policy: save=cw.every(1000) (or config=...)"
            )
        self.manager = CheckpointManager(root, save=save, keep=keep, **manager_options)
        self.saved: list[tuple[int, tuple[str, ...]]] = []
        self._pending: int | None = None
        self._loops: dict[str, Any] = {}
        self._metrics: dict[str, float] = {}
        self._resume: dict[str, Any] | None = None
        self._resume_dir: Path | None = None

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks):
            raise ConfigError(
                "Lightning's ModelCheckpoint would write its own checkpoints next to ckptwise's; "
                "create the Trainer with enable_checkpointing=False"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        sampler = _sampler(trainer)
        if sampler is not None and sampler.auto_advance:
            raise ConfigError(
                "the training DataLoader's ResumableSampler counts what it yields, but Lightning "
                "fetches batches ahead; create it with ResumableSampler(..., auto_advance=False) "
                "and this callback advances it after each batch"
            )
        if self._resume is not None and sampler is not None and "data" in self._resume:
            sampler.load_state_dict(self._resume["data"])

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._decide(trainer, final=False)
        if self._resume is not None:
            if RNG_KEY in self._resume:  # where the saved run took its decision
                RngState().load_state_dict(self._resume[RNG_KEY])
            self._resume = None
            self._remove_resume_dir()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sampler = _sampler(trainer)
        if sampler is not None:
            sampler.advance(extract_batch_size(batch))
        self._pending = trainer.global_step
        # only the (small) loop counters on every step; the rest when a save happens
        self._loops = trainer._checkpoint_connector._get_loops_state_dict()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._metrics = coerce_metrics({"loss": loss}, strict=False) if loss is not None else {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and self._pending is not None:
            self._metrics.update(coerce_metrics(trainer.callback_metrics, strict=False))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:
            self._decide(trainer, final=True)
        self.manager.wait()

    # -- saving and resuming ---------------------------------------------------------------

    def _decide(self, trainer: Any, *, final: bool) -> None:
        step, self._pending = self._pending, None
        assert step is not None
        state: dict[str, Any] = {"lightning": _LightningState(trainer, self._loops)}
        sampler = _sampler(trainer)
        if sampler is not None:
            state["data"] = sampler
        decision = self.manager.step(step, state, metrics=self._metrics, final=final)
        if decision.save:
            self.saved.append((step, decision.reasons))

    def resume_checkpoint(self, step: int | None = None) -> str | None:
        """Write the newest verified checkpoint as a ``.ckpt`` for ``trainer.fit(ckpt_path=)``.

        ``None`` when the run has no checkpoint yet (``fit`` then starts fresh). The file
        is removed once training has started again.
        """
        found = self.manager.resume_values(step)
        if found is None:
            return None
        step, values = found
        scratch = resume_scratch(self.manager.run.url, "lightning-resume")
        path = scratch / f"step-{step}.ckpt"
        torch.save(values["lightning"], path)
        self._resume = values
        self._resume_dir = scratch
        return str(path)

    def _remove_resume_dir(self) -> None:
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.manager.close()
