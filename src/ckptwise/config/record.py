"""What a run records of its policies with each checkpoint, and the ranking read back.

The manager stores :func:`policy_record` in every manifest (``extra["policy"]``), so the
command line (``ckptwise ls``, ``export --step best``) learns the metric "best" means, and
whether lower or higher is better, from the run itself instead of guessing it from save
reasons. :func:`policy_ranking` works it out from policy objects (the adapters, which hold
them); :func:`ranking_of` reads it from a record.

>>> import ckptwise as cw
>>> record = policy_record(cw.every(100), cw.keep_last(2) | cw.keep_best(1, "eval_loss"))
>>> ranking_of(record)
RankedBy(metric='eval_loss', mode='min', policy='keep_best')
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ckptwise.config.mapping import Policy, to_config
from ckptwise.errors import CheckpointError
from ckptwise.policy import KeepAny, KeepBest, OnImprovement, walk
from ckptwise.policy.base import RetentionPolicy, Trigger
from ckptwise.policy.content import ContentPolicy

__all__ = ["RankedBy", "policy_ranking", "policy_record", "ranking_of"]

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class RankedBy:
    """The metric a run's checkpoints are ranked by, its direction, and which policy says
    so (``keep_best`` or ``on_improvement``)."""

    metric: str
    mode: Mode
    policy: Literal["keep_best", "on_improvement"]


def policy_ranking(save: Trigger | None, keep: RetentionPolicy | None) -> RankedBy | None:
    """The ranking of these policies: their ``keep_best``, else their ``on_improvement``."""
    for part in _retention_leaves(keep):
        if isinstance(part, KeepBest):
            return RankedBy(part.metric, part.mode, "keep_best")
    if save is not None:
        for trigger in walk(save):
            if isinstance(trigger, OnImprovement):
                return RankedBy(trigger.metric, trigger.mode, "on_improvement")
    return None


def _retention_leaves(keep: RetentionPolicy | None) -> Iterator[RetentionPolicy]:
    """Every policy inside ``keep``, also through a ``KeepAny`` built directly around
    another (``KeepAny.of`` and ``|`` flatten; the constructor does not)."""
    if isinstance(keep, KeepAny):
        for inner in keep.policies:
            yield from _retention_leaves(inner)
    elif keep is not None:
        yield keep


def policy_record(
    save: Trigger | None,
    keep: RetentionPolicy | None,
    content: ContentPolicy | None = None,
) -> dict[str, Any]:
    """The JSON a manifest records of the policies that wrote it (``extra["policy"]``).

    ``config`` is :func:`~ckptwise.config.to_config` of the three as a JSON policy file
    writes it (``schedule``'s steps become string keys; ``None`` when one is a policy of
    your own, which has no config form); ``ranking`` is :func:`policy_ranking`'s answer as
    ``{"metric", "mode", "policy"}`` (``None`` when there is none).
    """
    try:
        config: dict[str, Any] | None = to_config(Policy(save=save, keep=keep, content=content))
    except CheckpointError:
        config = None
    if config is not None:
        config = json.loads(json.dumps(config))  # a manifest holds JSON only
    ranked = policy_ranking(save, keep)
    ranking = None
    if ranked is not None:
        ranking = {"metric": ranked.metric, "mode": ranked.mode, "policy": ranked.policy}
    return {"config": config, "ranking": ranking}


def ranking_of(record: object) -> RankedBy | None:
    """The ranking a :func:`policy_record` holds; ``None`` when it holds none, or when
    ``record`` is no such record (a manifest's ``extra`` is untrusted JSON)."""
    if not isinstance(record, Mapping):
        return None
    ranking = record.get("ranking")
    if not isinstance(ranking, Mapping):
        return None
    metric, mode, policy = ranking.get("metric"), ranking.get("mode"), ranking.get("policy")
    if not isinstance(metric, str) or not metric:
        return None
    if mode not in ("min", "max") or policy not in ("keep_best", "on_improvement"):
        return None
    return RankedBy(metric, mode, policy)
