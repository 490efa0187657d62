"""Hugging Face ``Trainer`` adapter: ckptwise decides, stores and keeps; ``Trainer`` resumes.

One line after the ``Trainer`` is built hands saving to ckptwise, and one more resumes::

    from ckptwise.integrations.transformers import attach

    callback = attach(trainer, "runs/exp1", save=cw.every(1000, start=2000)
                      | cw.on_improvement("eval_loss"), keep=cw.keep_last(2) | cw.keep_best(1, "eval_loss"))
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint())

Three modules: :mod:`.arguments` (where the policy comes from), :mod:`.callback` (the
``TrainerCallback``) and :mod:`.folder` (the ``Trainer``'s ``checkpoint-N`` folder, written
for resuming). We resume through that folder rather than restore objects from a callback
because ``Trainer`` decides how far to fast-forward the data, when to put the RNG back and
how to load weights (plain, sharded, peft adapters, DeepSpeed) *before* any callback runs;
its folder layout has been stable from 4.x to 5.x, so its own resume code is the most robust
way to continue exactly. The folder is deleted once training runs again.

The run goes to ``OUTPUT_DIR/ckptwise`` unless told otherwise (``attach`` logs where, at
INFO); the command line reads it there: ``ckptwise ls OUTPUT_DIR/ckptwise``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from transformers import Trainer

from ckptwise.errors import ConfigError
from ckptwise.integrations.common import open_manager
from ckptwise.integrations.transformers.arguments import (
    CkptwiseArguments,
    Weights,
    best_metric,
    policy_from_training_args,
    resolve_policy,
)
from ckptwise.integrations.transformers.callback import CheckpointCallback
from ckptwise.policy import RetentionPolicy, Trigger

__all__ = ["CheckpointCallback", "CkptwiseArguments", "attach", "policy_from_training_args"]

log = logging.getLogger("ckptwise")


def attach(
    trainer: Trainer,
    root: str | os.PathLike[str] | None = None,
    *,
    save: Trigger | None = None,
    keep: RetentionPolicy | None = None,
    config: Any = None,
    args: CkptwiseArguments | None = None,
    weights: Weights | None = None,
    final: bool = True,
    **manager_options: Any,
) -> CheckpointCallback:
    """Hand ``trainer``'s checkpointing to ckptwise; returns the callback it added.

    The policy comes from ``save``/``keep``, else ``config`` (a mapping or file), else
    ``args`` or the ``CKPTWISE_*`` environment variables, else the trainer's own
    ``save_strategy``/``save_steps``/``save_total_limit``. ``root`` defaults to
    ``args.ckptwise_dir`` or ``OUTPUT_DIR/ckptwise`` (logged at INFO). ``weights="trainable"``
    leaves frozen parameters out of checkpoints (they come from the base model on resume and
    export). ``final=False`` saves only what the policy says; by default the last step of
    training is saved too, as the ``Trainer``'s own checkpointing does.

    The callback holds the run's lock until training ends. Attaching again to the same run
    in this process closes the earlier callback's manager first (a notebook may rebuild its
    trainer and attach again); another process writing to the run raises
    :class:`~ckptwise.RunLockedError`.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError(
            "ckptwise's Trainer adapter does not support the Trainer's FSDP yet (DDP and "
            "DeepSpeed ZeRO-2/3 are supported); keep the Trainer's own checkpoints for FSDP"
        )
    options = args if args is not None else CkptwiseArguments.from_env()
    policy = resolve_policy(trainer.args, save, keep, config, options)
    chosen = options.weights(weights)
    if chosen == "trainable" and getattr(trainer, "is_deepspeed_enabled", False):
        raise ConfigError(
            "weights='trainable' is not supported with DeepSpeed yet; frozen weights are "
            "stored once anyway (dedup), so weights='all' costs them only at the first save"
        )
    run = root or options.ckptwise_dir or os.path.join(str(trainer.args.output_dir), "ckptwise")
    # a policy file's manager options (codec, deltas, async_save, ...); arguments win
    reopen = functools.partial(open_manager, run, **{**policy.manager_options(), **manager_options})
    manager = reopen()
    if manager.ranks is None or manager.ranks.coordinator:
        log.info(
            "ckptwise saves this Trainer's checkpoints in %s (list them: ckptwise ls %s)",
            manager.run.url,
            manager.run.url,
        )
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
        weights=chosen,
        best=best_metric(policy, trainer.args),
        final=final,
        reopen=reopen,
    )
    trainer.add_callback(callback)
    return callback
