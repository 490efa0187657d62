"""Hugging Face ``Trainer`` adapter: ckptwise decides, stores and keeps; ``Trainer`` resumes.

One line after the ``Trainer`` is built hands saving to ckptwise, and one more resumes::

    from ckptwise.integrations.transformers import attach

    callback = attach(trainer, "runs/exp1", save=cw.every(1000, start=2000)
                      | cw.on_improvement("eval_loss"), keep=cw.keep_last(2) | cw.keep_best(1, "eval_loss"))
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint())

:func:`attach` switches the ``Trainer``'s own saving off (``save_strategy="no"``, and
``control.should_save`` is answered "no" at every step, including the forced save at
``max_steps``) and saves, at the end of each step once its logs and evaluation are in, the
model, optimizer, LR scheduler, grad scaler, RNG states and ``TrainerState`` -- through the
policies. Frozen weights are stored once.

Resuming: :meth:`CheckpointCallback.resume_checkpoint` writes the newest checkpoint that
verifies as an ordinary ``checkpoint-N`` folder (``trainer_state.json``, weights,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``) and returns its path for
``trainer.train(resume_from_checkpoint=...)``. We chose this over restoring objects from a
callback because ``Trainer`` decides how far to fast-forward the data, when to put the RNG
back and how to load weights (plain, sharded, peft adapters, DeepSpeed) *before* any
callback runs; its folder layout has been stable from 4.x to 5.x, so its own resume code is
the most robust way to continue exactly. The folder is deleted once training runs again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ckptwise.config import Policy, parse_keep, parse_save, policy_from_config
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.manager import RNG_KEY, CheckpointManager
from ckptwise.policy.retention import KeepAny, KeepBest, RetentionPolicy, keep_all, keep_best
from ckptwise.policy.retention import keep_last as _keep_last
from ckptwise.policy.triggers import OnImprovement, Trigger, every, on_final, on_improvement, walk
from ckptwise.snapshot import ModelWeights

__all__ = ["CheckpointCallback", "CkptwiseArguments", "attach", "policy_from_training_args"]

log = logging.getLogger("ckptwise")

Weights = Literal["all", "trainable"]


@dataclass
class CkptwiseArguments:
    """Command-line arguments for ``HfArgumentParser``, so shell scripts pick the policy.

    Add it to the parser's dataclasses (``HfArgumentParser((ModelArguments, ...,
    TrainingArguments, CkptwiseArguments))``) and pass the parsed value to :func:`attach`.
    The same settings are read from ``CKPTWISE_CONFIG``, ``CKPTWISE_SAVE``,
    ``CKPTWISE_KEEP``, ``CKPTWISE_DIR`` and ``CKPTWISE_WEIGHTS`` when no argument is given.
    """

    ckptwise_config: str | None = field(
        default=None, metadata={"help": "ckptwise policy file (YAML, TOML or JSON)."}
    )
    ckptwise_save: str | None = field(
        default=None,
        metadata={"help": "Save policy, one-line form, e.g. 'every(1000) | on_signal'."},
    )
    ckptwise_keep: str | None = field(
        default=None,
        metadata={"help": "Retention, one-line form, e.g. 'last(2) | best(1, eval_loss)'."},
    )
    ckptwise_dir: str | None = field(
        default=None, metadata={"help": "Run folder or URL (default: OUTPUT_DIR/ckptwise)."}
    )
    ckptwise_weights: str = field(
        default="all", metadata={"help": "'all', or 'trainable' to leave frozen weights out."}
    )

    @classmethod
    def from_env(cls) -> CkptwiseArguments:
        """The settings from ``CKPTWISE_*`` environment variables."""
        env = os.environ
        return cls(
            ckptwise_config=env.get("CKPTWISE_CONFIG"),
            ckptwise_save=env.get("CKPTWISE_SAVE"),
            ckptwise_keep=env.get("CKPTWISE_KEEP"),
            ckptwise_dir=env.get("CKPTWISE_DIR"),
            ckptwise_weights=env.get("CKPTWISE_WEIGHTS", "all"),
        )


def _metric_name(args: Any) -> tuple[str, Literal["min", "max"]] | None:
    name = getattr(args, "metric_for_best_model", None)
    if not name:
        return None
    if not name.startswith("eval_"):
        name = f"eval_{name}"
    greater = getattr(args, "greater_is_better", None)
    if greater is None:
        greater = not name.endswith("loss")
    return name, "max" if greater else "min"


def policy_from_training_args(args: Any) -> Policy:
    """The ckptwise policy that matches ``TrainingArguments``' own saving.

    ``save_strategy="steps"`` becomes ``every(save_steps) | on_final()``, ``"best"``
    becomes ``on_improvement(metric_for_best_model)``; ``save_total_limit`` becomes
    ``keep_last``, plus ``keep_best(1, ...)`` with ``load_best_model_at_end``.
    """
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    best = _metric_name(args)
    save: Trigger
    if strategy == "steps":
        steps = args.save_steps
        if not float(steps).is_integer() or steps < 1:
            raise ConfigError(
                f"save_steps={steps} is a fraction of the run; give ckptwise an explicit policy "
                "(e.g. save=cw.every(1000)) instead"
            )
        save = every(int(steps)) | on_final()
    elif strategy == "best" and best is not None:
        save = on_improvement(best[0], best[1])
    else:
        raise ConfigError(
            f"save_strategy={strategy!r} has no ckptwise equivalent to derive; pass save=... "
            "(e.g. cw.every(1000)), config=..., or set CKPTWISE_SAVE"
        )
    keep: RetentionPolicy = (
        _keep_last(args.save_total_limit) if args.save_total_limit else keep_all()
    )
    if best is not None and (args.load_best_model_at_end or strategy == "best"):
        keep = KeepAny((keep, keep_best(1, best[0], best[1])))
    return Policy(save, keep)


def _resolve_policy(
    args: Any,
    save: Trigger | None,
    keep: RetentionPolicy | None,
    config: Any,
    options: CkptwiseArguments,
) -> Policy:
    if save is not None or keep is not None:
        return Policy(save, keep)
    if config is not None:
        return policy_from_config(config)
    if options.ckptwise_config or options.ckptwise_save or options.ckptwise_keep:
        policy = (
            policy_from_config(options.ckptwise_config) if options.ckptwise_config else Policy()
        )
        return Policy(
            parse_save(options.ckptwise_save) if options.ckptwise_save else policy.save,
            parse_keep(options.ckptwise_keep) if options.ckptwise_keep else policy.keep,
        )
    return policy_from_training_args(args)


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
        raise CheckpointError("TrainerState is restored by Trainer from trainer_state.json")


class CheckpointCallback(TrainerCallback):
    """Takes over a ``Trainer``'s checkpointing; create it with :func:`attach`.

    Metrics are collected for each step from ``on_log`` (``loss``, ``learning_rate``, ...)
    and ``on_evaluate`` (``eval_*``); the save decision is taken once the last of them has
    arrived, so ``on_improvement("eval_loss")`` sees the evaluation of the very step.
    """

    def __init__(
        self,
        trainer: Trainer,
        manager: CheckpointManager,
        *,
        weights: Weights = "all",
        best: tuple[str, Literal["min", "max"]] | None = None,
    ) -> None:
        if weights not in ("all", "trainable"):
            raise ConfigError(f"weights must be 'all' or 'trainable', got {weights!r}")
        self.trainer: Any = trainer  # framework objects are used duck-typed
        self.manager = manager
        self.weights = weights
        self.best = best
        #: every save this callback made: (step, reasons)
        self.saved: list[tuple[int, tuple[str, ...]]] = []
        #: bytes those saves added to the store (after dedup)
        self.bytes_written = 0
        self._pending: int | None = None
        self._metrics: dict[str, float] = {}
        self._evaluations_left = 0
        self._resume_dir: Path | None = None

    # -- Trainer events --------------------------------------------------------------------

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_save = False
        self._cleanup_resume_dir()
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
        if self._pending == state.global_step:
            self._decide(state)
        self.manager.wait()
        self._cleanup_resume_dir()
        return control

    # -- saving ----------------------------------------------------------------------------

    def _eval_sets(self) -> int:
        eval_dataset = getattr(self.trainer, "eval_dataset", None)
        return len(eval_dataset) if isinstance(eval_dataset, dict) else 1

    def _collect(self, values: Any) -> None:
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._metrics[key] = float(value)

    def state(self) -> dict[str, Any]:
        """What one checkpoint holds (the RNG states are added by the manager)."""
        trainer = self.trainer
        out: dict[str, Any] = {
            "model": ModelWeights(trainer.model, trainable_only=self.weights == "trainable")
        }
        if trainer.optimizer is not None:
            out["optimizer"] = trainer.optimizer
        if trainer.lr_scheduler is not None:
            out["scheduler"] = trainer.lr_scheduler
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            out["scaler"] = scaler
        out["trainer_state"] = _TrainerStateEntry(trainer)
        return out

    def _decide(self, state: Any) -> None:
        step = state.global_step
        self._pending = None
        final = bool(state.max_steps) and step >= state.max_steps
        decision = self.manager.step(step, self.state(), metrics=self._metrics, final=final)
        if decision.save:
            self.saved.append((step, decision.reasons))
            self.bytes_written += self.manager.store.info(step).new_bytes

    # -- resuming --------------------------------------------------------------------------

    def resume_checkpoint(self, step: int | None = None) -> str | None:
        """Write the newest verified checkpoint as a ``Trainer`` folder; ``None`` if none.

        Pass the result to ``trainer.train(resume_from_checkpoint=...)``.
        """
        found = self.manager.resume_values(step)
        if found is None:
            return None
        step, values = found
        folder = self._resume_base() / f"checkpoint-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._write_weights(values["model"], folder)
        for key, name in (
            ("optimizer", "optimizer.pt"),
            ("scheduler", "scheduler.pt"),
            ("scaler", "scaler.pt"),
        ):
            if key in values:
                torch.save(values[key], folder / name)
        if RNG_KEY in values:
            # attach() refuses multi-process runs, so there is one RNG file, not one per rank
            torch.save(_hf_rng(values[RNG_KEY]), folder / "rng_state.pth")
        (folder / "trainer_state.json").write_text(json.dumps(values["trainer_state"], indent=2))
        self._resume_dir = folder
        log.info("resuming from ckptwise checkpoint %d through %s", step, folder)
        return str(folder)

    def _resume_base(self) -> Path:
        url = self.manager.store.backend.url
        if "://" in url:
            return Path(tempfile.mkdtemp(prefix="ckptwise-resume-"))
        return Path(url) / "hf-resume"

    def _full_weights(self, saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.weights == "all":
            return dict(saved)
        live = {k: v.detach().cpu() for k, v in self.trainer.model.state_dict().items()}
        live.update(saved)
        return live

    def _write_weights(self, saved: Mapping[str, torch.Tensor], folder: Path) -> None:
        model = self.trainer.model
        weights = self._full_weights(saved)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(folder), state_dict=weights)
        else:
            _save_plain(weights, folder / "model.safetensors")

    def _cleanup_resume_dir(self) -> None:
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None

    # -- exporting -------------------------------------------------------------------------

    def best_step(self) -> int:
        """The committed step with the best value of the tracked metric."""
        if self.best is None:
            raise CheckpointError(
                "no metric to pick the best checkpoint by: set metric_for_best_model, or use "
                "on_improvement/keep_best in the policy"
            )
        return self.manager.best_step(*self.best)

    def export(self, out_dir: str | os.PathLike[str], step: int | str = "best") -> Path:
        """Write a checkpoint's weights as a folder ``from_pretrained`` loads.

        ``step`` is a step number, ``"best"`` or ``"latest"``. For a peft model the folder is
        an adapter folder (``PeftModel.from_pretrained`` loads it over the base model).
        """
        if step == "best":
            step = self.best_step()
        elif step in ("latest", "final"):
            step = self.manager.latest_step() or 0
        if not isinstance(step, int):
            raise ConfigError(f"step must be an int, 'best' or 'latest', got {step!r}")
        saved = self.manager.load(step)["model"]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._write_weights(saved, out)
        processing = getattr(self.trainer, "processing_class", None)
        if processing is not None and hasattr(processing, "save_pretrained"):
            processing.save_pretrained(str(out))
        return out


def _save_plain(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})


def _hf_rng(saved: Mapping[str, Any]) -> dict[str, Any]:
    """ckptwise's RNG entry in the layout ``Trainer._load_rng_state`` reads."""
    numpy_state = saved["numpy"]
    out: dict[str, Any] = {
        "python": saved["python"],
        "numpy": (
            numpy_state["bit_generator"],
            numpy_state["state"]["key"],
            numpy_state["state"]["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        ),
        "cpu": saved["torch"],
    }
    if "cuda" in saved:
        states = saved["cuda"]
        out["cuda"] = states if len(states) > 1 else states[0]
    return out


def attach(
    trainer: Trainer,
    root: str | os.PathLike[str] | None = None,
    *,
    save: Trigger | None = None,
    keep: RetentionPolicy | None = None,
    config: Any = None,
    args: CkptwiseArguments | None = None,
    weights: Weights | None = None,
    **manager_options: Any,
) -> CheckpointCallback:
    """Hand ``trainer``'s checkpointing to ckptwise; returns the callback it added.

    The policy comes from ``save``/``keep``, else ``config`` (a mapping or file), else
    ``args`` or the ``CKPTWISE_*`` environment variables, else the trainer's own
    ``save_strategy``/``save_steps``/``save_total_limit``. ``root`` defaults to
    ``args.ckptwise_dir`` or ``OUTPUT_DIR/ckptwise``. ``weights="trainable"`` leaves frozen
    parameters out of checkpoints (they come from the base model on resume and export).
    """
    if getattr(trainer.args, "world_size", 1) > 1:
        raise ConfigError(
            f"this Trainer runs {trainer.args.world_size} processes; ckptwise's Trainer adapter "
            "is single-process for now (per-rank shards are not written yet): run one "
            "process, or keep the Trainer's own checkpoints for multi-process runs"
        )
    options = args if args is not None else CkptwiseArguments.from_env()
    policy = _resolve_policy(trainer.args, save, keep, config, options)
    chosen = weights or options.ckptwise_weights
    if chosen not in ("all", "trainable"):
        raise ConfigError(f"weights must be 'all' or 'trainable', got {chosen!r}")
    run = root or options.ckptwise_dir or os.path.join(str(trainer.args.output_dir), "ckptwise")
    manager = CheckpointManager(run, save=policy.save, keep=policy.keep, **manager_options)
    trainer.args.save_strategy = "no"
    if getattr(trainer.args, "load_best_model_at_end", False):
        log.warning(
            "load_best_model_at_end is ignored with ckptwise: use callback.export(out, 'best') "
            "or keep_best to get the best model"
        )
        trainer.args.load_best_model_at_end = False
    callback = CheckpointCallback(
        trainer,
        manager,
        weights="trainable" if chosen == "trainable" else "all",
        best=_best_metric(policy, trainer.args),
    )
    trainer.add_callback(callback)
    return callback


def _best_metric(policy: Policy, args: Any) -> tuple[str, Literal["min", "max"]] | None:
    from_args = _metric_name(args)
    if from_args is not None:
        return from_args
    if policy.keep is not None:
        parts = policy.keep.policies if isinstance(policy.keep, KeepAny) else (policy.keep,)
        for part in parts:
            if isinstance(part, KeepBest):
                return part.metric, part.mode
    if policy.save is not None:
        for trigger in walk(policy.save):
            if isinstance(trigger, OnImprovement):
                return trigger.metric, trigger.mode
    return None
