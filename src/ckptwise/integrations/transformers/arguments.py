"""Where a ``Trainer`` run's policy comes from: arguments, environment, or ``TrainingArguments``.

The order is: ``save``/``keep`` passed to ``attach``, else a ``config`` mapping or file, else
:class:`CkptwiseArguments` (command-line flags) or the ``CKPTWISE_*`` environment
variables, else the ``Trainer``'s own ``save_strategy``/``save_steps``/``save_total_limit``
turned into the equivalent ckptwise policy. A config file also sets the manager's options
(``content``, ``codec``, ``deltas``, ``async_save``, ``on_busy``, ``rng``): the returned
:class:`~ckptwise.config.Policy` hands them over with :meth:`~ckptwise.config.Policy.manager_options`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ckptwise.config import Policy, parse_keep, parse_save, policy_from_config
from ckptwise.errors import ConfigError
from ckptwise.integrations.common import Metric, policy_metric
from ckptwise.policy import (
    KeepAny,
    RetentionPolicy,
    Trigger,
    every,
    keep_all,
    keep_best,
    keep_last,
    on_final,
    on_improvement,
)

__all__ = [
    "CkptwiseArguments",
    "Weights",
    "best_metric",
    "policy_from_training_args",
    "resolve_policy",
]

Weights = Literal["all", "trainable"]


@dataclass
class CkptwiseArguments:
    """Command-line arguments for ``HfArgumentParser``, so shell scripts pick the policy.

    Add it to the parser's dataclasses (``HfArgumentParser((ModelArguments, ...,
    TrainingArguments, CkptwiseArguments))``) and pass the parsed value to ``attach``.
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
    #: whether the settings came from the environment (errors then name the variable);
    #: not a command-line flag (``HfArgumentParser`` skips fields that are not in ``__init__``)
    from_environment: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls) -> CkptwiseArguments:
        """The settings from ``CKPTWISE_*`` environment variables."""
        env = os.environ
        options = cls(
            ckptwise_config=env.get("CKPTWISE_CONFIG"),
            ckptwise_save=env.get("CKPTWISE_SAVE"),
            ckptwise_keep=env.get("CKPTWISE_KEEP"),
            ckptwise_dir=env.get("CKPTWISE_DIR"),
            ckptwise_weights=env.get("CKPTWISE_WEIGHTS", "all"),
        )
        options.from_environment = True
        return options

    def source(self, name: str) -> str:
        """Where the setting ``name`` (``"save"``) came from, as an error names it:
        ``CKPTWISE_SAVE``, or the flag ``--ckptwise_save``."""
        return f"CKPTWISE_{name.upper()}" if self.from_environment else f"--ckptwise_{name}"

    def weights(self, override: str | None = None) -> Weights:
        """Which weights a checkpoint holds: ``override`` if given, else the setting."""
        chosen = override or self.ckptwise_weights
        if chosen not in ("all", "trainable"):
            where = "weights=" if override else f"{self.source('weights')}="
            raise ConfigError(f"{where}{chosen!r}: weights must be 'all' or 'trainable'")
        return "trainable" if chosen == "trainable" else "all"

    def policy(self) -> Policy:
        """The policy these settings give: the config file's, with ``save``/``keep``
        replaced by the one-line settings where those are given. Errors name the setting."""
        policy = Policy()
        if self.ckptwise_config:
            try:
                policy = policy_from_config(self.ckptwise_config)
            except ConfigError as exc:
                raise ConfigError(
                    f"{self.source('config')}={self.ckptwise_config!r}: {exc}"
                ) from exc
        if self.ckptwise_save:
            policy = replace(
                policy, save=parse_save(self.ckptwise_save, source=self.source("save"))
            )
        if self.ckptwise_keep:
            policy = replace(
                policy, keep=parse_keep(self.ckptwise_keep, source=self.source("keep"))
            )
        return policy


def _metric_name(args: Any) -> Metric | None:
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
        keep_last(args.save_total_limit) if args.save_total_limit else keep_all()
    )
    if best is not None and (args.load_best_model_at_end or strategy == "best"):
        keep = KeepAny((keep, keep_best(1, best[0], best[1])))
    return Policy(save, keep)


def resolve_policy(
    args: Any,
    save: Trigger | None,
    keep: RetentionPolicy | None,
    config: Any,
    options: CkptwiseArguments,
) -> Policy:
    """The policy of a run, from the first source that gives one (see the module doc).

    Retention alone (``keep=`` without ``save=``) saves as the script's own
    ``--save_steps``/``--save_strategy`` say.
    """
    if save is not None or keep is not None:
        if save is None:
            # without an equivalent, the manager's Trainer-like default (which it announces)
            with contextlib.suppress(ConfigError):
                save = policy_from_training_args(args).save
        return Policy(save, keep)
    if config is not None:
        return policy_from_config(config)
    if options.ckptwise_config or options.ckptwise_save or options.ckptwise_keep:
        return options.policy()
    return policy_from_training_args(args)


def best_metric(policy: Policy, args: Any) -> Metric | None:
    """The metric "best" means: ``metric_for_best_model``, else the policy's ``keep_best``,
    else its ``on_improvement``."""
    return _metric_name(args) or policy_metric(policy.save, policy.keep)
