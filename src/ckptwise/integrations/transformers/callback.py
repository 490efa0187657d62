"""The ``TrainerCallback`` that takes over a ``Trainer``'s checkpointing.

It answers ``control.should_save`` with "no" at every step (including the forced save at
``max_steps``) and instead, once a step's logs and evaluation are in, asks the manager,
which saves the model, optimizer, LR scheduler, grad scaler, RNG states and
``TrainerState`` through the policies. Resuming goes through the ``Trainer``'s own folder
layout (see :mod:`.folder`); create the callback with :func:`ckptwise.integrations.transformers.attach`.

The callback closes its manager when training ends (releasing the run's lock) and opens a
new one when training starts again, so a process may train, attach and train again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ckptwise.decide.metrics import coerce_metrics
from ckptwise.errors import ConfigError
from ckptwise.integrations.common import Metric, remove_scratch, scratch_folder
from ckptwise.integrations.transformers.arguments import Weights
from ckptwise.integrations.transformers.deepspeed import (
    EngineFiles,
    consolidated_weights,
    deepspeed_configs,
    is_deepspeed_checkpoint,
    set_load_universal,
)
from ckptwise.integrations.transformers.folder import (
    full_weights,
    write_deepspeed_node,
    write_deepspeed_own,
    write_rng,
    write_trainer_folder,
    write_weights,
)
from ckptwise.integrations.transformers.model_record import ModelRecorder
from ckptwise.manager import CheckpointManager
from ckptwise.read.hf_model import (
    AS_TRAINED,
    HF_MODEL_KEY,
    cast_weights,
    export_dtype,
    write_model_folder,
)
from ckptwise.snapshot import RNG_KEY, ModelWeights

__all__ = ["CheckpointCallback"]

log = logging.getLogger("ckptwise")

T = TypeVar("T")


class _TrainerStateEntry:
    """``TrainerState`` as JSON, with the ``ExportableState`` callbacks folded in as
    ``Trainer._save_checkpoint`` does."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer: Any = trainer  # framework objects are used duck-typed

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if hasattr(trainer, "store_flos"):
            trainer.store_flos()  # as Trainer does before it writes trainer_state.json
        state = trainer.state
        for cb in [*trainer.callback_handler.callbacks, trainer.control]:
            if isinstance(cb, ExportableState):
                name = cb.__class__.__name__
                if isinstance(state.stateful_callbacks.get(name), list):
                    state.stateful_callbacks[name].append(cb.state())
                else:
                    state.stateful_callbacks[name] = cb.state()
        doc: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(state)))
        return doc

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise ConfigError(
            "Trainer restores its own state from a checkpoint folder: pass "
            "callback.resume_checkpoint() to trainer.train(resume_from_checkpoint=...)"
        )


class _ModelRecordEntry:
    """The model's record for export (see :mod:`.model_record`), made when a save takes it."""

    def __init__(self, recorder: ModelRecorder) -> None:
        self.recorder = recorder

    def state_dict(self) -> dict[str, Any]:
        value = self.recorder.value()
        assert value is not None  # state() adds the entry only for a model it records
        return value

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise ConfigError(
            f"{HF_MODEL_KEY!r} records the model for export and restores nothing: leave it out "
            "of the state passed to restore"
        )


class CheckpointCallback(TrainerCallback):
    """Takes over a ``Trainer``'s checkpointing; create it with :func:`attach`.

    Metrics are collected for each step from ``on_log`` (``loss``, ``learning_rate``, ...)
    and ``on_evaluate`` (``eval_*``); the save decision is taken once the last of them has
    arrived, so ``on_improvement("eval_loss")`` sees the evaluation of the very step. With
    ``final`` (the default) the last step of training is saved (reason ``"final"``) when
    the policy did not save it, as the ``Trainer``'s own checkpointing does at ``max_steps``.

    Attributes:
        manager: the run's :class:`~ckptwise.CheckpointManager`. It holds the run's lock
            from ``attach`` until training ends, when the callback closes it; a closed
            manager still reads (``callback.manager.run.checkpoints()``, ``.run``, ``.pin()``
            needs none). Training again, or :meth:`resume_checkpoint`, opens a new one
            (``reopen``), which is then ``callback.manager``.
        saved: every save this callback made, as ``(step, reasons)``.
    """

    def __init__(
        self,
        trainer: Trainer,
        manager: CheckpointManager,
        *,
        weights: Weights = "all",
        best: Metric | None = None,
        final: bool = True,
        reopen: Callable[[], CheckpointManager] | None = None,
    ) -> None:
        if weights not in ("all", "trainable"):
            raise ConfigError(f"weights must be 'all' or 'trainable', got {weights!r}")
        self.trainer: Any = trainer  # framework objects are used duck-typed
        self.manager = manager
        self.weights = weights
        self.best = best
        self.final = final
        self._reopen = reopen
        self.saved: list[tuple[int, tuple[str, ...]]] = []
        self._pending: int | None = None
        self._metrics: dict[str, float] = {}
        self._evaluations_left = 0
        self._resume_dir: Path | None = None
        # the user's own "load_universal" (resuming sets it for each engine it loads)
        self._load_universal = any(
            isinstance(c.get("checkpoint"), Mapping) and bool(c["checkpoint"].get("load_universal"))
            for c in deepspeed_configs(trainer)
        )
        self._last_saved: int | None = None
        self._trained = False
        self._recorder = ModelRecorder(trainer, trainable_only=weights == "trainable")

    def _open_manager(self) -> CheckpointManager:
        """The manager, reopened if training ended (and closed it) since it was created."""
        if self.manager.closed:
            if self._reopen is None:
                raise ConfigError(
                    f"the CheckpointManager of {self.manager.run.url} is closed; create the "
                    "callback with ckptwise.integrations.transformers.attach(), which reopens "
                    "it when training starts again"
                )
            self.manager = self._reopen()
            self._last_saved = None
        return self.manager

    # -- Trainer events --------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._open_manager()
        self._trained = False
        self._recorder.refresh()  # the processor may have changed between sessions
        self._end_if_finished(state, control)
        return control

    def _end_if_finished(self, state: Any, control: Any) -> None:
        """End a ``train()`` that resumed at ``max_steps`` (a scheduler requeued a finished
        job) before it takes a step.

        ``Trainer`` checks ``max_steps`` only after a step, and its loop resumes mid-epoch
        when ``max_steps`` is no whole number of epochs: it would train one step past
        ``max_steps``, which the callback would save as ``final``. No callback event comes
        between here and that step's optimizer step, so the stop also hands the loop no
        batches (an instance attribute over ``Trainer.get_batch_samples``, removed when
        training ends or starts again): it finds none, and stops.
        """
        self.trainer.__dict__.pop("get_batch_samples", None)  # a train() that raised
        if not (state.max_steps and state.global_step >= state.max_steps):
            return
        log.warning(
            "checkpoint %d is at max_steps (%d): training is already finished; this train() "
            "takes no step and saves nothing (raise max_steps to train on)",
            state.global_step,
            state.max_steps,
        )
        control.should_training_stop = True
        self.trainer.get_batch_samples = lambda *args, **kwargs: ([], None)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_save = False
        self._cleanup_resume_dir()
        self._trained = True
        self._pending = state.global_step
        self._metrics = {}
        self._evaluations_left = self._eval_sets() if control.should_evaluate else 0
        if not control.should_log and not control.should_evaluate:
            self._decide(state)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        if self._pending == state.global_step:
            self._collect(logs)
            if self._evaluations_left == 0:
                self._decide(state)
        return control

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> Any:
        if self._pending == state.global_step:
            self._collect(metrics)
            self._evaluations_left -= 1
            if self._evaluations_left <= 0:
                self._decide(state)
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_save = False
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        try:
            if self._pending == state.global_step:
                self._decide(state)
            if self._trained:  # also when training stopped early (EarlyStoppingCallback)
                self._save_final(state.global_step)
        finally:
            self.trainer.__dict__.pop("get_batch_samples", None)  # see _end_if_finished
            self._cleanup_resume_dir()
            self.manager.close()  # waits for a save in flight, releases the run's lock
        return control

    # -- saving ----------------------------------------------------------------------------

    def _eval_sets(self) -> int:
        eval_dataset = getattr(self.trainer, "eval_dataset", None)
        return len(eval_dataset) if isinstance(eval_dataset, dict) else 1

    def _collect(self, values: Any) -> None:
        self._metrics.update(coerce_metrics(values, strict=False))

    @property
    def bytes_written(self) -> int:
        """Bytes the saves of this run added to the store (after dedup)."""
        return self.manager.bytes_written

    def state(self) -> dict[str, Any]:
        """What one checkpoint holds (the RNG states are added by the manager).

        Under DeepSpeed the engine's own checkpoint stands for the model, optimizer and
        scheduler: each rank's partitions, as ``engine.save_checkpoint`` gives them. For a
        ``PreTrainedModel`` (not a peft one) ``hf_model`` records what export needs besides
        the weights (see :mod:`.model_record`).
        """
        trainer = self.trainer
        out: dict[str, Any]
        if getattr(trainer, "is_deepspeed_enabled", False):
            engine = EngineFiles(trainer.model_wrapped, trainer.state.global_step)
            out = {"deepspeed": engine, "trainer_state": _TrainerStateEntry(trainer)}
        else:
            out = {"model": ModelWeights(trainer.model, trainable_only=self.weights == "trainable")}
            if trainer.optimizer is not None:
                out["optimizer"] = trainer.optimizer
            if trainer.lr_scheduler is not None:
                out["scheduler"] = trainer.lr_scheduler
            scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
            if scaler is not None:
                out["scaler"] = scaler
            out["trainer_state"] = _TrainerStateEntry(trainer)
        if self._recorder.records():
            out[HF_MODEL_KEY] = _ModelRecordEntry(self._recorder)
        return out

    def _decide(self, state: Any) -> None:
        step = state.global_step
        self._pending = None
        final = bool(state.max_steps) and step >= state.max_steps
        decision = self.manager.step(step, self.state(), metrics=self._metrics, final=final)
        if decision.save and step not in self.manager.skipped:
            self.saved.append((step, decision.reasons))
            self._last_saved = step
        if final:
            self._save_final(step)

    def _save_final(self, step: int) -> None:
        """Save the last step of training unless it is saved already (every rank agrees:
        the decisions and the step restored are the same on all of them)."""
        if not self.final or step in (self._last_saved, self.manager.resumed_from):
            return
        self.manager.save(step, self.state(), metrics=self._metrics, reasons=("final",))
        self.saved.append((step, ("final",)))
        self._last_saved = step

    # -- resuming --------------------------------------------------------------------------

    def resume_checkpoint(self, step: int | None = None) -> str | None:
        """Write the newest verified checkpoint as a ``Trainer`` folder; ``None`` if none.

        Pass the result to ``trainer.train(resume_from_checkpoint=...)``; every rank calls
        it. The folder is removed once training has taken its first step (or ends).

        Without DeepSpeed each rank gets a whole folder of its own state. Under DeepSpeed
        the ranks of a node (see :func:`ckptwise.distributed.ranks.node_name`) share one
        folder on it, so nodes need no shared file system: each rank writes the files it
        loads itself, and the node's lowest rank what they all load (see
        :meth:`_resume_deepspeed`).

        A DeepSpeed checkpoint saved by another number of processes resumes through
        DeepSpeed's Universal Checkpointing: on each node the lowest rank writes every saved
        rank's files and converts them with DeepSpeed's own ``ds_to_universal`` (reading and
        writing them all once more), and ``"checkpoint": {"load_universal": true}`` is set in
        the DeepSpeed config the ``Trainer`` hands ``deepspeed.initialize``. Exact: the fp32
        master weights, Adam moments and steps, the LR schedule and the step count (frozen
        parameters, which hold no optimizer state, come from the model as built, as at the
        start of any fine-tune). Not exact: the data order (``Trainer`` skips as many batches
        of the new data loader as steps were done, and each step takes another global batch)
        and the RNG of new ranks (a rank the checkpoint had gets its saved RNG states back; a
        new one keeps the seeded state ``Trainer`` starts with, as ``Trainer`` does when a
        rank's RNG file is missing). So the losses follow the uninterrupted run's closely,
        not bit for bit.

        Raises:
            ConfigError: DeepSpeed lacks the universal conversion (on another world size).
            CheckpointError: the conversion failed, or writing the folder failed on a rank
                (raised on every rank).
        """
        self._cleanup_resume_dir()
        found = self._open_manager().resume_values(step)
        if found is None:
            if getattr(self.trainer, "is_deepspeed_enabled", False):
                set_load_universal(deepspeed_configs(self.trainer), self._load_universal)
            return None
        step, values = found
        if "deepspeed" in values:
            folder = self._resume_deepspeed(step, values)
        else:
            folder = self._resume_alone(step, values)
        log.info("resuming from ckptwise checkpoint %d through %s", step, folder)
        return str(folder)

    def _resume_alone(self, step: int, values: Mapping[str, Any]) -> Path:
        """A whole folder of this rank's own state (whose weights need not be rank 0's:
        ranks that do not synchronise)."""
        ranks = self.manager.ranks
        rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.size)
        scratch = scratch_folder(self.manager.run.url, "hf-resume")
        self._resume_dir = scratch
        return write_trainer_folder(
            scratch / f"checkpoint-{step}",
            values,
            model=self.trainer.model,
            weights=self._weights_of(values["model"]),
            world_size=world,
            rng_rank=rank,
        )

    def _resume_deepspeed(self, step: int, values: Mapping[str, Any]) -> Path:
        """The folder this rank's DeepSpeed engine resumes from, one per node.

        What ``engine.load_checkpoint`` reads on each rank: ZeRO-3, its own model states
        and optimizer partition; ZeRO-1/2, its optimizer partition and the model states
        that data-parallel rank 0 saved (every saved rank's partitions with
        ``elastic_checkpoint``); with ``load_universal``, the whole universal folder. Each
        rank writes its own files and RNG states; the node's leader (its lowest rank)
        makes the folder and writes ``latest``, ``trainer_state.json``, ``scheduler.pt``
        and the files of other saved ranks that its ranks load, reading them from the run
        (``run.read(step, rank=r)``). When the number of processes changed, the leader
        converts every saved rank's files into a universal checkpoint instead.
        """
        manager = self.manager
        ranks = manager.ranks
        rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.size)
        saved_by = manager.run.manifest(step).world_size
        configs = deepspeed_configs(self.trainer)
        universal = saved_by != world or self._load_universal
        all_ranks = any(
            isinstance(c.get("zero_optimization"), Mapping)
            and bool(c["zero_optimization"].get("elastic_checkpoint"))
            for c in configs
        )
        set_load_universal(configs, universal)
        leaders = [0] if ranks is None else ranks.leaders()
        leader = leaders[rank] == rank

        def make() -> str:
            if not leader:
                return ""
            self._resume_dir = scratch_folder(manager.run.url, "hf-resume")
            return str(self._resume_dir)

        # a rank the checkpoint did not have was given saved rank 0's values
        saved_rank = rank if rank < saved_by else 0

        def engine_of(r: int) -> Mapping[str, Any]:
            loaded = manager.run.read(step, rank=r)
            assert loaded is not None  # an explicit step either reads or raises
            engine: Mapping[str, Any] = loaded.values()["deepspeed"]
            return engine

        def write(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            if not (universal or all_ranks):
                write_deepspeed_own(folder, values["deepspeed"])
            if leader:
                write_deepspeed_node(
                    folder,
                    values,
                    engine_of,
                    rank=saved_rank,
                    saved_by=saved_by,
                    all_ranks=all_ranks,
                    universal=universal,
                )
            if rank < saved_by and RNG_KEY in values:
                write_rng(folder, values[RNG_KEY], rank=rank, world_size=world)

        try:
            made = self._on_every_rank(make)
            folder = Path(made[leaders[rank]]) / f"checkpoint-{step}"
            self._on_every_rank(lambda: write(folder))
        except BaseException:
            self._cleanup_resume_dir()  # a leader's folder, made or half written
            raise
        return folder

    def _on_every_rank(self, work: Callable[[], T]) -> list[T]:
        """Every rank's result of ``work``, or the first failure raised on every rank."""
        ranks = self.manager.ranks
        return [work()] if ranks is None else ranks.each(work, "resume_checkpoint()")

    def _weights_of(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """The model's weights to write from a checkpoint's ``model`` entry."""
        return saved if self.weights == "all" else full_weights(self.trainer.model, saved)

    def _cleanup_resume_dir(self) -> None:
        remove_scratch(self._resume_dir)
        self._resume_dir = None

    # -- exporting -------------------------------------------------------------------------

    def best_step(self) -> int:
        """The committed step with the best value of the tracked metric."""
        if self.best is None:
            raise ConfigError(
                "no metric to pick the best checkpoint by: set metric_for_best_model, or use "
                "on_improvement/keep_best in the policy"
            )
        return self.manager.run.best_step(*self.best)

    def export(
        self, out_dir: str | os.PathLike[str], step: int | str = "best", *, dtype: str = AS_TRAINED
    ) -> Path:
        """Write a checkpoint's weights as a folder ``from_pretrained`` loads.

        ``step`` is a step number, ``"best"`` or ``"latest"``. The folder holds
        ``model.safetensors``, ``config.json`` and the tokenizer/processor files (as the
        checkpoint recorded them; for a checkpoint saved before ckptwise recorded them, the
        live model's and ``processing_class``'s). ``dtype`` is the policy (see
        :func:`~ckptwise.read.hf_model.export_dtype`): ``"as-trained"`` writes each tensor
        in the dtype the model was trained in (under DeepSpeed bf16, the bf16 model; not the
        fp32 master copies), ``"bf16"``, ``"fp16"`` or ``"fp32"`` every floating-point one
        so; ``config.json`` says the same, so ``from_pretrained(out_dir)`` loads the model
        as trained. For a peft model the folder is an adapter folder
        (``PeftModel.from_pretrained`` loads it over the base model).

        >>> callback.export("best-model", "best")  # doctest: +SKIP

        Raises:
            ConfigError: an unknown ``dtype``, or ``"best"`` with no metric to rank by.
        """
        cast = export_dtype(dtype)
        run = self.manager.run
        chosen = (
            self.best_step()
            if step == "best"
            else run.resolve("latest" if step == "final" else step)
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if is_deepspeed_checkpoint(run, chosen):
            weights: Mapping[str, Any] = consolidated_weights(run, chosen)
        else:
            weights = self._weights_of(run.load(chosen)["model"])
        record = run.hf_model(chosen)
        if record is None and self._recorder.records():
            record = self._recorder.record()  # saved before ckptwise recorded the model
        if record is not None:
            # _weights_of took the frozen weights the checkpoint lacks from the live model
            record = dataclasses.replace(record, trainable_only=False)
            write_model_folder(weights, out, record=record, dtype=cast, layout="hf", step=chosen)
            return out
        if cast is not None:
            weights = cast_weights(weights, dtype=cast, record=None)[0]
        write_weights(self.trainer.model, weights, out)  # peft: an adapter folder
        processing = getattr(self.trainer, "processing_class", None)
        if processing is not None and hasattr(processing, "save_pretrained"):
            processing.save_pretrained(str(out))
        return out
