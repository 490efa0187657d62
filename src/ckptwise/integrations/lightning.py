"""Lightning adapter: a ``Callback`` that saves by ckptwise's policies and resumes exactly.

    from ckptwise.integrations.lightning import CheckpointCallback

    callback = CheckpointCallback("runs/exp1", save=cw.every(500) | cw.on_improvement("val_loss"),
                                  keep=cw.keep_last(2) | cw.keep_best(1, "val_loss"))
    trainer = L.Trainer(callbacks=[callback], enable_checkpointing=False, ...)
    trainer.fit(model, datamodule, ckpt_path=callback.resume_checkpoint())
    callback.best_model_score, callback.export_best("best")  # as ModelCheckpoint offers

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

On another number of ranks than saved the run (one ``RestoreWarning`` per rank says what
it got), a rank that existed resumes from its own state, exactly. A new rank resumes from
rank 0's, as Lightning loads its own checkpoint on every rank: the weights and optimizer
state exactly, and rank 0's data position too (one order for every rank is exact; with a
sampler seeded per rank, the new rank reads rank 0's order, which the warning names when
the saved ranks' positions differed). Of the RNG states it takes rank 0's generators only
where every rank held them alike (``seed_everything`` seeds every rank alike) and keeps
its own otherwise. Data order unchanged, the losses then match an uninterrupted run on
the new number of ranks bit for bit.

The last step of training is saved (reason ``"final"``) when the policy did not save it,
unless ``final=False``. The callback closes its manager (releasing the run's lock) when
``fit`` ends and opens a new one when it starts again; a new callback on the same run in the
same process closes the manager of the earlier one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.data import extract_batch_size

from ckptwise.config import policy_from_config
from ckptwise.data import ResumableSampler
from ckptwise.decide.metrics import coerce_metrics
from ckptwise.errors import ConfigError
from ckptwise.integrations.common import (
    Metric,
    open_manager,
    policy_metric,
    remove_scratch,
    scratch_folder,
)
from ckptwise.manager import CheckpointManager
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
    """Lightning ``Callback`` with ckptwise's policies, storage and exact resume.

    ``monitor``/``mode`` name the metric "best" means for :attr:`best_model_score`,
    :attr:`best_model_path` and :meth:`export_best` (by default the policy's ``keep_best``,
    else its ``on_improvement``). ``final=False`` saves only what the policy says.

    Attributes:
        manager: the run's :class:`~ckptwise.CheckpointManager`; it holds the run's lock
            until ``fit`` ends, then still reads. ``fit`` again (or :meth:`resume_checkpoint`)
            opens a new one.
        saved: every save this callback made, as ``(step, reasons)``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save: Trigger | None = None,
        keep: RetentionPolicy | None = None,
        config: Any = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        final: bool = True,
        **manager_options: Any,
    ) -> None:
        if save is None and keep is None and config is not None:
            policy = policy_from_config(config)
            save, keep = policy.save, policy.keep
            # the file's manager options (codec, deltas, async_save, ...); arguments win
            manager_options = {**policy.options(), **manager_options}
        if save is None:
            raise ConfigError(
                "CheckpointCallback needs a save policy: save=cw.every(1000) (or config=...)"
            )
        if mode not in (None, "min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        from_policy = policy_metric(save, keep)
        if monitor is None and mode is not None:
            raise ConfigError(f"mode={mode!r} needs the metric it ranks: pass monitor=...")
        #: the metric "best" means, and whether lower or higher is better
        self.best: Metric | None = from_policy
        if monitor is not None:
            same = from_policy is not None and from_policy[0] == monitor
            self.best = (monitor, mode or (from_policy[1] if same and from_policy else "min"))
        self.final = final
        self._reopen = functools.partial(
            open_manager, root, save=save, keep=keep, **manager_options
        )
        self.manager = self._reopen()
        self.saved: list[tuple[int, tuple[str, ...]]] = []
        self._pending: int | None = None
        self._loops: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None
        self._resume_dir: Path | None = None
        self._last_saved: int | None = None

    def _open_manager(self) -> CheckpointManager:
        if self.manager.closed:
            self.manager = self._reopen()
            self._last_saved = None
        return self.manager

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks):
            raise ConfigError(
                "Lightning's ModelCheckpoint would write its own checkpoints next to ckptwise's; "
                "create the Trainer with enable_checkpointing=False"
            )
        if stage == "fit":
            self._open_manager()

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
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # kept as a tensor: the manager reads it (a device sync) only when a policy needs it
            self._metrics = {"loss": loss.detach()}
        else:
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
        if decision.save and step not in self.manager.skipped:
            self.saved.append((step, decision.reasons))
            self._last_saved = step
        elif final and self.final and step != self.manager.resumed_from:
            # the last step of training, which the policy did not save (every rank agrees)
            self.manager.save(step, state, metrics=self._metrics, reasons=("final",))
            self.saved.append((step, ("final",)))
            self._last_saved = step

    def resume_checkpoint(self, step: int | None = None) -> str | None:
        """Write the newest verified checkpoint as a ``.ckpt`` for ``trainer.fit(ckpt_path=)``.

        ``None`` when the run has no checkpoint yet (``fit`` then starts fresh). The file
        is removed once training has started again (or ``fit`` ends).
        """
        self._remove_resume_dir()
        found = self._open_manager().resume_values(step)
        if found is None:
            return None
        step, values = found
        scratch = scratch_folder(self.manager.run.url, "lightning-resume")
        path = scratch / f"step-{step}.ckpt"
        torch.save(values["lightning"], path)
        self._resume = values
        self._resume_dir = scratch
        return str(path)

    def _remove_resume_dir(self) -> None:
        remove_scratch(self._resume_dir)
        self._resume_dir = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._remove_resume_dir()
            self.manager.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: release the run here (fit's error stays
        # the one raised; one from the last save in flight is logged)
        self._remove_resume_dir()
        try:
            self.manager.close()
        except Exception:
            log.exception("closing the CheckpointManager of %s failed", self.manager.run.url)

    # -- the best checkpoint ---------------------------------------------------------------

    def _best(self, metric: str | None = None, mode: str | None = None) -> Metric:
        if mode not in (None, "min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if metric is not None:
            same = self.best is not None and self.best[0] == metric
            chosen = mode or (self.best[1] if same and self.best else "min")
            return metric, "max" if chosen == "max" else "min"
        if self.best is None:
            raise ConfigError(
                "no metric to pick the best checkpoint by: pass monitor='val_loss' to "
                "CheckpointCallback (or metric= here), or use keep_best/on_improvement in "
                "the policy"
            )
        return self.best

    @property
    def best_model_step(self) -> int | None:
        """The committed step with the best value of the monitored metric; ``None`` when no
        metric is monitored or no checkpoint of the run recorded it."""
        if self.best is None:
            return None
        metric, mode = self.best
        recorded = [
            c
            for c in self.manager.run.checkpoints()
            if not math.isnan(c.metrics.get(metric, math.nan))
        ]
        return self.manager.run.best_step(metric, mode) if recorded else None

    @property
    def best_model_score(self) -> float | None:
        """The monitored metric's value at :attr:`best_model_step` (a float, where
        ``ModelCheckpoint`` gives a tensor); ``None`` when there is none."""
        step = self.best_model_step
        if step is None or self.best is None:
            return None
        return self.manager.run.info(step).metrics[self.best[0]]

    @property
    def best_model_path(self) -> str:
        """The manifest of the best checkpoint, ``RUN/checkpoints/<step>.json`` (``""``
        when there is none, as in ``ModelCheckpoint``).

        It names the run and the step; it is not a ``.ckpt``. :meth:`export_best` writes
        the weights (or a ``.ckpt`` for ``load_from_checkpoint``); from the command line,
        ``ckptwise export RUN OUT --step STEP``.
        """
        step = self.best_model_step
        return "" if step is None else self.manager.run.manifest_path(step)

    def export_best(
        self,
        out_dir: str | os.PathLike[str],
        *,
        metric: str | None = None,
        mode: Literal["min", "max"] | None = None,
        format: Literal["safetensors", "ckpt"] = "safetensors",
    ) -> Path:
        """Write the best checkpoint's model weights into ``out_dir``; returns the file.

        ``"safetensors"``: ``out_dir/model.safetensors``, the ``LightningModule``'s state
        dict (``model.load_state_dict(safetensors.torch.load_file(path))``), through
        :meth:`ckptwise.Run.export`. ``"ckpt"``: ``out_dir/step-N.ckpt``, Lightning's whole
        checkpoint, for ``Model.load_from_checkpoint`` or ``trainer.test(ckpt_path=...)``.
        ``metric``/``mode`` rank by another recorded metric than the monitored one.
        """
        if format not in ("safetensors", "ckpt"):
            raise ConfigError(f"format must be 'safetensors' or 'ckpt', got {format!r}")
        run = self.manager.run
        step = run.best_step(*self._best(metric, mode))
        if format == "safetensors":
            return run.export(step, out_dir, key="lightning/state_dict")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step-{step}.ckpt"
        torch.save(run.load(step)["lightning"], path)
        return path
