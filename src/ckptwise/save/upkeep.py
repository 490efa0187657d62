"""The run folder's upkeep around each commit: rollback branches, the resume point, pruning.

:class:`Upkeep` is what the writing process that owns the run (the only process, or rank 0)
does before and after a checkpoint commits; the save pipeline calls it on whichever thread
commits, so it holds no reference to the manager. On the other ranks of a job it does
nothing: they neither take the lock nor rearrange the folder.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from ckptwise.errors import CheckpointNotFoundError, ConfigError
from ckptwise.policy import RetentionPlan, RetentionPolicy, plan_retention
from ckptwise.store import CheckpointStore, RunLock

__all__ = ["Upkeep"]

log = logging.getLogger("ckptwise")


class Upkeep:
    """Keeps one run's folder in order: what retention deletes and what it must not.

    ``owns_run`` is false on the ranks other than 0 of a job, where every method but the
    bookkeeping of :meth:`adopt` does nothing. The checkpoint training resumed from
    (:meth:`adopt`) is kept until a newer one has committed and verifies.
    """

    def __init__(
        self,
        store: CheckpointStore,
        lock: RunLock,
        keep: RetentionPolicy,
        *,
        owns_run: bool,
    ) -> None:
        self._store = store
        self._lock = lock
        self.keep = keep
        self.owns_run = owns_run
        #: the step this run resumed from (``None`` before a restore)
        self.resumed_from: int | None = None
        self._protect_resumed = False
        #: the last retention decision applied (``None`` before the first prune)
        self.last_plan: RetentionPlan | None = None
        # pruning runs on the writer thread after a commit and on the training thread from
        # prune(); the pipeline never runs both at once, this makes it true by construction
        self._pruning = threading.Lock()

    def adopt(self, step: int) -> None:
        """Continue the run from ``step``: keep it until a newer checkpoint verifies."""
        self.resumed_from = step
        self._protect_resumed = True

    def before_commit(self, step: int, now: datetime) -> None:
        """Before ``step`` commits, move the run's checkpoints of later steps to a branch.

        A save at a step earlier than the run's newest checkpoint means training went back
        (a restore of an older step after a loss spike, or a step counter that restarted):
        from here on the run's line is the one being trained, so the later checkpoints of
        the abandoned line must neither be preferred by a plain restore nor push what is
        saved now out of retention. They are kept, never deleted, under
        ``branches/NAME/``: listed by :meth:`Run.branches`, readable through
        :meth:`Run.branch`, removed by :meth:`delete_branch`.
        """
        if not self.owns_run:
            return
        later = [s for s in self._store.steps() if s > step]
        if not later:
            return
        self._lock.check()  # fenced: never rearrange a run another writer has taken over
        name = f"{now:%Y%m%dT%H%M%S}-steps-{later[0]}-to-{later[-1]}"
        self._store.move_to_branch(later, name)
        # a pin belongs to the checkpoint, which the branch keeps: it must not pin the step
        # number of the line trained from now on
        self._store.unpin_moved(later)
        log.warning(
            "step %d is earlier than this run's checkpoints of steps %s (training went back): "
            "they no longer count as the run's newest and are kept as branch %r (read them with "
            "cw.open_run(root).branch(%r); delete them with manager.delete_branch(%r))",
            step,
            ", ".join(map(str, later)),
            name,
            name,
            name,
        )

    def after_commit(self, step: int, now: datetime, *, verify: bool = True) -> None:
        """Once ``step`` has committed: let go of the resume point if ``step`` proves a newer
        checkpoint loads, then prune.

        Reading the new checkpoint back costs one read of it, once per resumed run;
        afterwards ``keep_last(2)`` means two checkpoints again, not three. With several
        ranks (``verify=False``) the commit itself is the proof: every rank hashed and synced
        its objects before it, and the other ranks wait for rank 0 within a timeout.
        """
        self._release_resume_point(step, verify=verify)
        self.prune(now)

    def _release_resume_point(self, step: int, *, verify: bool) -> None:
        if not self._protect_resumed or self.resumed_from is None or step <= self.resumed_from:
            return
        problems = self._store.verify([step]) if verify else []
        if problems:
            log.warning(
                "step %d does not verify after its commit (%s); keeping step %d, which this run "
                "resumed from",
                step,
                problems[0],
                self.resumed_from,
            )
            return
        self._protect_resumed = False

    def prune(self, now: datetime) -> RetentionPlan:
        """Apply the retention policy to the committed checkpoints and delete the rest.

        The newest checkpoint, pinned ones and the protected resume point are kept; a step
        pinned while the plan was being made is kept too (the handshake of
        :meth:`CheckpointStore.delete_unpinned`).
        """
        if not self.owns_run:
            return RetentionPlan()
        with self._pruning:
            if self.last_plan is None:
                self._store.clear_tombstones()  # a crashed writer's, which would block pins
            plan = plan_retention(
                self.keep,
                self._store.checkpoints(),
                now=now,
                pinned=self._store.pins(),
                resumed_from=self.resumed_from if self._protect_resumed else None,
                object_bytes=self._store.object_bytes(),
            )
            if plan.delete:
                self._lock.check()
                pinned = self._store.delete_unpinned(plan.delete)
                if pinned:
                    keep = {**plan.keep, **dict.fromkeys(pinned, ("pinned",))}
                    deleted = tuple(s for s in plan.delete if s not in pinned)
                    plan = RetentionPlan(keep=dict(sorted(keep.items())), delete=deleted)
            self._store.record_kept(plan.keep)  # advisory: warns, never raises
            self.last_plan = plan
            return plan

    def delete_branch(self, name: str, url: str) -> None:
        """Delete a branch of abandoned checkpoints and the objects only it referenced.

        Raises:
            ConfigError: this process does not own the run (a rank other than 0).
            CheckpointNotFoundError: the run has no such branch.
        """
        if not self.owns_run:
            raise ConfigError(
                "only the writing manager of rank 0 deletes branches; call delete_branch() there"
            )
        if name not in self._store.branches():
            have = ", ".join(sorted(self._store.branches())) or "none"
            raise CheckpointNotFoundError(f"run {url} has no branch {name!r} (have: {have})")
        self._store.delete_branch(name)
