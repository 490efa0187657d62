"""Which metric a run's own policies rank its checkpoints by, read back from what it recorded.

A run records its policies in each manifest (``extra["policy"]``, see
:func:`ckptwise.config.policy_record`): the newest manifest's record says the metric and its
direction. Checkpoints written before runs recorded their policies hold only traces of
them: the writer's last retention decision names the steps ``keep_best(n, metric)`` keeps
(``best n metric``), and a save ``on_improvement(metric)`` triggered carries that reason (the
newest manifest also holds the step it last fired at, and the run's best and worst values of
every metric). Their direction is not recorded; it is read from those traces where they
decide it.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ckptwise.read.run import Run
    from ckptwise.records import CheckpointInfo

__all__ = ["Ranking", "recorded_metrics", "run_ranking", "unknown_metric"]

Mode = Literal["min", "max"]

_KEPT_BEST = re.compile(r"^best [0-9]+ (.+)$")
_IMPROVED = re.compile(r"^on_improvement\((.+)\)$")


@dataclass(frozen=True)
class Ranking:
    """The metric a run ranks by, which policy says so, and its direction if recorded."""

    metric: str
    #: ``keep_best`` or ``on_improvement``
    policy: str
    #: ``None`` when what the run recorded does not tell
    mode: Mode | None

    def describe(self) -> str:
        direction = {"min": "lower is better", "max": "higher is better", None: "direction unknown"}
        return f"{self.metric} (the run's {self.policy}, {direction[self.mode]})"


def recorded_metrics(checkpoints: Sequence[CheckpointInfo]) -> list[str]:
    """Every metric some checkpoint recorded, sorted."""
    return sorted({name for info in checkpoints for name in info.metrics})


def unknown_metric(metric: str, checkpoints: Sequence[CheckpointInfo]) -> str | None:
    """Why ``metric`` cannot rank these checkpoints (listing what they did record), or
    ``None`` when some checkpoint recorded it."""
    recorded = recorded_metrics(checkpoints)
    if metric in recorded:
        return None
    close = difflib.get_close_matches(metric, recorded, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"no checkpoint recorded the metric {metric!r}; the run recorded: "
        f"{', '.join(recorded) or 'no metrics'}{hint}"
    )


def run_ranking(run: Run, checkpoints: Sequence[CheckpointInfo]) -> Ranking | None:
    """The metric the run's ``keep_best`` (else its ``on_improvement``) ranks by; ``None``
    when the run has neither."""
    from ckptwise.config import ranking_of  # the policies: not needed by `ckptwise --help`

    extra: Mapping[str, Any] = {}
    if checkpoints:
        extra = run.manifest(checkpoints[-1].step).extra
    if "policy" in extra:
        recorded = ranking_of(extra["policy"])
        return None if recorded is None else Ranking(**vars(recorded))
    kept = run.kept()
    for step in sorted(kept):
        for reason in kept[step]:
            match = _KEPT_BEST.match(reason)
            if match:
                metric = match.group(1)
                best = {s for s, why in kept.items() if reason in why}
                mode = _mode_of_kept(metric, best, checkpoints, extra)
                return Ranking(metric, "keep_best", mode)
    reasons = [r for info in checkpoints for r in info.reasons]
    for reason in [*reasons, *extra.get("marks", {})]:
        match = _IMPROVED.match(reason)
        if match:
            metric = match.group(1)
            mode = _mode_of_improvements(metric, reason, checkpoints, extra)
            return Ranking(metric, "on_improvement", mode)
    return None


def _values(metric: str, checkpoints: Sequence[CheckpointInfo]) -> dict[int, float]:
    return {
        info.step: float(info.metrics[metric])
        for info in checkpoints
        if metric in info.metrics and math.isfinite(info.metrics[metric])
    }


def _mode_of_kept(
    metric: str, best: set[int], checkpoints: Sequence[CheckpointInfo], extra: Mapping[str, Any]
) -> Mode | None:
    """Lower is better when the steps kept as best hold the lowest values (and not also the
    highest), or hold the run's lowest value ever reported and not its highest; and the
    reverse."""
    values = _values(metric, checkpoints)
    kept = [v for s, v in values.items() if s in best]
    rest = [v for s, v in values.items() if s not in best]
    if kept and rest:
        lowest, highest = max(kept) <= min(rest), min(kept) >= max(rest)
        if lowest != highest:
            return "min" if lowest else "max"
    history = extra.get("metric_history", {}).get(metric, {})
    low, high = history.get("min_step") in best, history.get("max_step") in best
    if low != high:
        return "min" if low else "max"
    return None


def _mode_of_improvements(
    metric: str,
    reason: str,
    checkpoints: Sequence[CheckpointInfo],
    extra: Mapping[str, Any],
) -> Mode | None:
    """From the step the trigger last fired at against the run's best and worst steps of
    the metric, else from the values of the checkpoints it saved (they only improve)."""
    mark = extra.get("marks", {}).get(reason, {})
    history = extra.get("metric_history", {}).get(metric, {})
    fired, low, high = mark.get("step"), history.get("min_step"), history.get("max_step")
    if fired is not None and low != high:
        if fired == low:
            return "min"
        if fired == high:
            return "max"
    fired_at = {info.step for info in checkpoints if reason in info.reasons}
    saved = [v for s, v in sorted(_values(metric, checkpoints).items()) if s in fired_at]
    pairs = list(itertools.pairwise(saved))
    if pairs and all(b < a for a, b in pairs):
        return "min"
    if pairs and all(b > a for a, b in pairs):
        return "max"
    return None
