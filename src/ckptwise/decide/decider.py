"""From a finished step to a save decision: the inputs the policies read, and who decides.

The :class:`Decider` builds each step's :class:`~ckptwise.policy.TrainingState` from the
clock, the reported metrics, the run's history (:mod:`ckptwise.decide.progress`) and outside
requests (signals and request files, :mod:`ckptwise.decide.monitor`), asks the save trigger and
the content policy, and in a multi-process job makes rank 0's decision every rank's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ckptwise.decide.monitor import Monitor, Watched
from ckptwise.decide.progress import Progress
from ckptwise.distributed.ranks import Failure, Ranks
from ckptwise.policy import (
    ContentPolicy,
    Decision,
    Request,
    Trigger,
    Variant,
    full,
    step_only,
    walk,
)

__all__ = ["Decider", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    """What the policies said about one step: save or not, why, and what the save holds."""

    decision: Decision
    variant: Variant
    now: datetime


class Decider:
    """The policies' view of the run, and the one decision all ranks act on.

    In a multi-process job, rank 0 decides from its own clock, metrics, signals and request
    files. When the trigger reads only the step (``every``, ``at_steps``, ...) each rank
    reaches the same decision alone; otherwise one all-reduce of a few integers per step
    tells every rank whether rank 0 saves (its decision follows only then), and tells rank 0
    which signals other ranks received, which it acts on at the next step.
    """

    def __init__(
        self,
        save: Trigger,
        content: ContentPolicy,
        clock: Callable[[], datetime],
        *,
        watch: Watched | None,
        watch_files: bool = True,
        ranks: Ranks | None = None,
    ) -> None:
        """``watch`` is the run's store (any :class:`~ckptwise.decide.monitor.Watched`), where request
        files are looked for; with ``None`` neither signals nor files are watched.
        ``watch_files=False`` leaves the request files to rank 0."""
        self.save = save
        self.content = content
        self.clock = clock
        self.monitor = None if watch is None else Monitor(watch, walk(save), files=watch_files)
        self.ranks = ranks if ranks is not None and not step_only(save) else None
        #: whether each rank decides alone, with no message per step (several ranks)
        self.alone = ranks is not None and self.ranks is None
        self.progress = Progress(clock())
        self._remote: frozenset[Request] = frozenset()  # other ranks' requests, on rank 0

    def decide(
        self,
        step: int,
        metrics: Mapping[str, float],
        *,
        final: bool,
        answered: frozenset[Request] = frozenset(),
        refused: Exception | None = None,
    ) -> Verdict:
        """The verdict for ``step``; ``metrics`` join the history after it is taken.

        ``answered`` are requests a save still in flight answers: they stay pending (a
        request is forgotten once its save is durable) but ask for no other save.
        With several ranks, a rank whose policies raise, or whose input to ``step()`` was
        ``refused`` (the error to raise), still joins the step's collective (saying so),
        and every rank raises the same error naming that rank: none waits for a rank that
        left. Without a collective (one process, or triggers that read only the step)
        ``refused`` is raised here.
        """
        now = self.clock()
        requests: frozenset[Request] = frozenset()
        decision, variant, failure = Decision.no(), full(), refused
        if failure is not None and self.ranks is None:
            raise failure
        try:
            if failure is None:
                requests = (
                    self.monitor.poll() - answered if self.monitor is not None else frozenset()
                )
                training = self.progress.state(
                    step, now, metrics=metrics, requests=requests | self._remote, final=final
                )
                decision = self.save.decide(training)
                variant = self.content.choose(training, decision) if decision.save else full()
        except Exception as exc:
            if self.ranks is None:
                raise
            failure = exc
        if self.ranks is not None:
            decision, variant = self._agree(requests, decision, variant, failure)
        self.progress.observe(step, metrics)
        return Verdict(decision, variant, now)

    def saves_alone(self, step: int, *, final: bool) -> bool:
        """Whether every rank, deciding alone from the step, saves at ``step``: the ranks
        are then in the save's collectives, which a rank that cannot go on must join."""
        training = self.progress.state(
            step, self.clock(), metrics={}, requests=frozenset(), final=final
        )
        return self.alone and self.save.decide(training).save

    def _agree(
        self,
        requests: frozenset[Request],
        decision: Decision,
        variant: Variant,
        failure: Exception | None,
    ) -> tuple[Decision, Variant]:
        """Rank 0's decision on every rank: one all-reduce of a few integers per step (whether
        any rank failed to decide, whether rank 0 saves, which watched signals any rank
        received), and rank 0's decision itself only on the steps that save. When a rank
        failed, a second collective tells every rank which one and why."""
        assert self.ranks is not None
        coordinator = self.ranks.coordinator
        signals = [
            Request("signal", name) for name in (self.monitor.signals if self.monitor else [])
        ]
        flags = [int(failure is not None), int(coordinator and decision.save)]
        merged = self.ranks.max_flags(flags + [int(r in requests) for r in signals])
        if merged[0]:
            mine = None if failure is None else Failure.of(self.ranks.rank, failure)
            self.ranks.agree(mine, "step()")  # the same words on every rank
        if coordinator:
            seen = {r for r, on in zip(signals, merged[2:], strict=True) if on}
            self._remote = frozenset(seen) - requests - decision.requests
        if not merged[1]:
            return (decision, variant) if coordinator else (Decision.no(), full())
        chosen = self.ranks.broadcast((decision, variant) if coordinator else None)
        assert chosen is not None  # rank 0 sent its own
        return chosen

    def on_commit(self, decision: Decision) -> Callable[[], None] | None:
        """What to do once the save for ``decision`` is durable: forget the requests it
        answered and remove their request files."""
        monitor = self.monitor
        if monitor is None or not decision.requests:
            return None
        return lambda: monitor.consume(decision.requests)

    def wants_exit(self, decision: Decision) -> bool:
        """Whether the save for ``decision`` should end the process (``on_signal(then="exit")``)."""
        return self.monitor is not None and self.monitor.wants_exit(decision)

    def started_save(self, step: int, now: datetime, reasons: tuple[str, ...]) -> None:
        """Record a save begun at ``now``."""
        self.progress.started_save(step, now, reasons)

    def finished_save(self, cost: timedelta) -> None:
        """Record what the save cost the training loop."""
        self.progress.finished_save(cost)

    def waited_for_save(self, extra: timedelta) -> None:
        """Record what training waited for the last save after it returned."""
        self.progress.add_cost(extra)

    def to_json(self) -> dict[str, Any]:
        """The history a checkpoint stores, so a resumed run decides as this one would."""
        return self.progress.to_json()

    def adopt(self, saved: Mapping[str, Any], step: int) -> None:
        """Continue from a checkpoint of ``step`` whose bookkeeping is ``saved``."""
        self.progress.restore_json(saved, step=step, now=self.clock())

    def close(self) -> None:
        """Put back the signal handlers the monitor replaced."""
        if self.monitor is not None:
            self.monitor.close()
