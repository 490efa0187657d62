"""The checkpoint manager: decide, snapshot, write, prune.

At each step the manager asks its :class:`~ckptwise.decider.Decider` (the policies, fed with
the clock, metrics, history and outside requests), captures the state with
:mod:`ckptwise.snapshot`, hands the commit to the writer (with several processes, to
:mod:`ckptwise.distributed`), then applies the retention plan. Its reads (restore with
fallback, listing, best/latest) go through a :class:`~ckptwise.run.Run`, available as
:attr:`CheckpointManager.run`. Framework adapters live in :mod:`ckptwise.integrations`.
The module is long only because the constructor documents every option a training script
sets; each job it orchestrates lives in a module of its own.

>>> import ckptwise as cw
>>> manager = cw.CheckpointManager(  # doctest: +SKIP
...     "runs/exp1", save=cw.every(1000, start=200), keep=cw.keep_last(3))
>>> start = manager.restore(state)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal

import torch
import torch.distributed as dist

from ckptwise.compat import ManagerReads
from ckptwise.copying import SnapshotCopier, available_memory, optimizers_in
from ckptwise.decider import Decider
from ckptwise.distributed.ranks import DEFAULT_TIMEOUT, Ranks
from ckptwise.distributed.save import commit_across_ranks
from ckptwise.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ckptwise.felt import Felt
from ckptwise.metrics import coerce_metrics
from ckptwise.policy import (
    ContentPolicy,
    Decision,
    Request,
    RetentionPlan,
    RetentionPolicy,
    Trigger,
    Variant,
    check_retention,
    check_trigger,
    every,
    full,
    keep_all,
    never,
    on_final,
    plan_retention,
)
from ckptwise.records import CheckpointInfo
from ckptwise.report import metered
from ckptwise.run import RestoreWarning, Run
from ckptwise.snapshot import RNG_KEY, ModelWeights, RngState, capture
from ckptwise.store import CheckpointStore, Manifest, RunLock, open_backend, runfile
from ckptwise.store.tiered import TieredBackend, UploadState, upload_states
from ckptwise.writer import AsyncWriter, SyncWriter, Writer

__all__ = ["RNG_KEY", "CheckpointManager", "RestoreWarning"]

log = logging.getLogger("ckptwise")


#: how often a manager given ``keep=`` but no ``save=`` saves: the ``Trainer``'s default
DEFAULT_SAVE_STEPS = 500


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointManager(ManagerReads):
    """Saves a training state by policy, keeps checkpoints by policy, and restores exactly.

    With ``save`` or ``keep`` given, the manager writes: it takes the run's lock (released
    by :meth:`close`), cleans debris a crash left and prunes after every commit. With
    neither, it only reads (as :func:`ckptwise.open_run` does), without taking the lock;
    its :meth:`step` then raises, since it could never save.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/run``, ``memory://run``).
        save: when to save (triggers composed with ``|`` / ``&``). Given ``keep`` but no
            ``save``, the manager saves as the ``Trainer`` does by default,
            ``every(500) | on_final()``, and logs a warning saying so: whoever sets only
            retention expects saves to happen, and a writing manager that never saves would
            lose the run without a word. ``save=cw.never()`` saves only on explicit
            :meth:`save` calls.
        content: what each save holds; by default everything. E.g.
            ``cw.full_every(5000, otherwise=cw.weights_only())`` makes the saves between
            full ones slim. Only full checkpoints can be restored into a training state.
        keep: what to keep; defaults to :func:`~ckptwise.keep_all` for a writing manager.
            The newest checkpoint and pinned ones are always kept; the one this manager
            restored is kept until a newer checkpoint has committed and verifies.
        rng: also save and restore Python, numpy, torch (and CUDA) RNG states.
        codec: how new objects are encoded: ``"auto"`` (the default: byte-grouped zstd for
            float tensors where the measured encode and write rates say it makes the save
            faster, raw elsewhere), ``"raw"``, ``"bytegroup"`` or ``"zstd"``.
        deltas: store a tensor as the XOR against its value in the previous checkpoint when
            that is 10 % smaller, with a whole keyframe at least every ``deltas`` saves, so
            a restore reads at most ``deltas`` objects per tensor (needs a byte-grouping
            codec: ``"bytegroup"`` or ``"auto"``).
        clock: the time source given to policies; tests pass a fake clock.
        async_save: save in the background: ``step()`` returns at once; what the
            optimizers overwrite is copied while the next forward and backward run (their
            next ``step()`` waits for it), everything else before ``step()`` returns, and
            hashing, encoding, writing and pruning run on a background thread (at most one
            save in flight). A checkpoint is listed once it has committed (:meth:`wait`
            blocks until then; ``manager.run`` waits when asked for that very step). Errors
            are raised by the next ``step()``, ``save()``, ``prune()``, ``restore()``,
            ``wait()`` or ``close()``. A save whose copy would not fit in the memory
            available is taken synchronously, with a warning. Not supported with several
            processes. ``None`` (the default): in the background for one process,
            synchronously with several; ``False``: always synchronously.
        on_busy: with ``async_save``, what a new save does while one is still writing:
            ``"wait"`` for it, or ``"skip"`` (recorded in :attr:`skipped`).
        storage_options: passed to fsspec for URLs (credentials, endpoint).
        cache: for a remote run (``s3://...``), a local folder (one per run) that saves are
            written to; an uploader sends them to ``root`` in the background, objects before
            the manifest that names them, so the network is never in a save's way and a
            reader of the remote sees only whole checkpoints. Restores read the cache when
            it holds a verified copy, else the remote. :meth:`close` waits for the uploads;
            :meth:`upload_states` says which checkpoints are ``local``, ``uploading`` or
            ``remote``. One process only.
        cache_bytes: the most bytes of already uploaded files the cache keeps (least
            recently used go first; files not yet uploaded are always kept).
        process_group: in a multi-process job (``torchrun``), the group whose ranks save
            together; by default the default group when ``torch.distributed`` is
            initialized. Every rank creates its manager with the same arguments: rank 0
            takes the lock, decides, writes the manifest and prunes; each rank writes its
            share of the objects (see :mod:`ckptwise.distributed`).
        dist_timeout: how long a rank waits for the others in one checkpoint collective
            before the save fails on every rank (a dead rank usually fails it at once).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save: Trigger | None = None,
        keep: RetentionPolicy | None = None,
        content: ContentPolicy | None = None,
        rng: bool = True,
        codec: str = "auto",
        deltas: int | None = None,
        async_save: bool | None = None,
        on_busy: Literal["wait", "skip"] = "wait",
        clock: Callable[[], datetime] = _utcnow,
        storage_options: Mapping[str, Any] | None = None,
        cache: str | os.PathLike[str] | None = None,
        cache_bytes: int | None = None,
        process_group: Any = None,
        dist_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if save is None and keep is not None:
            save = every(DEFAULT_SAVE_STEPS) | on_final()
            log.warning(
                "CheckpointManager(%r) was given keep= but no save=: saving every(%d) | "
                "on_final(), as the Trainer does by default (pass save=... to choose; "
                "step(..., final=True) marks the last step)",
                os.fspath(root),
                DEFAULT_SAVE_STEPS,
            )
        if save is not None:
            check_trigger(save)
        if keep is not None:
            check_retention(keep)
        if content is not None and not isinstance(content, ContentPolicy):
            raise ConfigError(
                f"content= expects a content policy such as cw.full_every(5000), got {content!r}"
            )
        if on_busy not in ("wait", "skip"):
            raise ConfigError(f"on_busy must be 'wait' or 'skip', got {on_busy!r}")
        self.writable = save is not None or keep is not None
        self.save_policy: Trigger = save if save is not None else never()
        self.keep_policy: RetentionPolicy = keep if keep is not None else keep_all()
        self.content: ContentPolicy = content if content is not None else full()
        self.rng = rng
        self.clock = clock
        self.on_busy = on_busy
        #: the ranks of a multi-process job (``None`` for one process, and for a manager that
        #: only reads: creating the checkpoint's process group would need every rank)
        self.ranks = Ranks.detect(process_group, timeout=dist_timeout) if self.writable else None
        lock: RunLock | None = None
        try:
            if async_save is None:
                async_save = self.ranks is None
            if self.ranks is not None and async_save:
                raise ConfigError(
                    "async_save=True is not supported in multi-process runs yet; pass "
                    "async_save=False (each rank writes its share of the save)"
                )
            coordinator = self.ranks is None or self.ranks.coordinator
            # the lock and the run folder's upkeep belong to rank 0 alone
            self._owns_run = self.writable and coordinator
            if cache is not None and self.ranks is not None:
                raise ConfigError(
                    "cache= is for one writing process: with several, rank 0 cannot know that the "
                    "other ranks' objects are uploaded before it uploads the manifest; drop cache= "
                    "(each rank then writes to the remote store directly)"
                )
            backend = open_backend(
                root, cache=cache, cache_bytes=cache_bytes, **dict(storage_options or {})
            )
            lock = self._lock = RunLock(backend)
            if self._owns_run:
                lock.acquire()
            self._store = CheckpointStore(backend, codec=codec, deltas=deltas)
            if self._owns_run:
                removed = self._store.clean()
                if removed:
                    log.info("removed %d leftover file(s) from an interrupted save", removed)
        except BaseException:
            if lock is not None:
                lock.release()  # a lock not taken is left alone
            if self.ranks is not None:  # the group this manager opened
                self.ranks.close()
            raise
        #: the read-only view of this run (listing, loading, verifying, exporting)
        self.run = Run(self._store, settle=self._settle)
        self._writer: Writer = AsyncWriter() if async_save else SyncWriter()
        self._copier = SnapshotCopier() if async_save else None
        self._warned_memory = False
        self._felt = Felt()
        self._after_commit: list[Callable[[], None]] = []
        self._answering: frozenset[Request] = frozenset()  # by the save in flight
        self._saving: int | None = None  # its step
        #: steps whose save was skipped because the previous one was still writing
        self.skipped: list[int] = []
        #: bytes this manager's commits added to the store (new objects, after dedup)
        self.bytes_written = 0
        self._decider = Decider(
            self.save_policy,
            self.content,
            self.clock,
            watch=backend if self.writable else None,
            watch_files=coordinator,
            ranks=self.ranks,
        )
        self.resumed_from: int | None = None
        self._protect_resumed = False
        self.last_plan: RetentionPlan | None = None
        self._closed = False
        self._rank_alone: int | None = None  # see _read_rank

    @classmethod
    def from_config(
        cls,
        root: str | os.PathLike[str],
        config: Mapping[str, Any] | str | os.PathLike[str],
        **kwargs: Any,
    ) -> CheckpointManager:
        """A manager whose policies and options come from a config mapping or a
        YAML/TOML/JSON file (``save``, ``keep``, ``content``, ``codec``, ``deltas``,
        ``async_save``, ``on_busy``, ``rng``); keyword arguments given here win over the file.

        >>> manager = cw.CheckpointManager.from_config("runs/exp1", "policy.yaml")  # doctest: +SKIP
        """
        from ckptwise.config import policy_from_config

        policy = policy_from_config(config)
        return cls(root, **{**policy.manager_options(), **kwargs})

    # -- saving ----------------------------------------------------------------------------

    def step(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        final: bool = False,
    ) -> Decision:
        """Report that ``step`` finished; save and prune if the policy says so.

        ``metrics`` are the values reported at this step (e.g. ``{"eval_loss": 0.4}``);
        ``final=True`` marks the last step, for :func:`~ckptwise.on_final`. Returns the
        decision, whose ``reasons`` say which triggers fired.

        Raises:
            ConfigError: the manager is read-only (no ``save=`` or ``keep=``): it could
                never save, and a loop calling it would lose its checkpoints silently.
        """
        self._check_open()
        if not self.writable:
            raise ConfigError(
                "step() was called on a read-only CheckpointManager (created with no save= or "
                "keep= policy), which never saves; pass save=... (e.g. save=cw.every(1000) | "
                "cw.on_final()) to CheckpointManager to write checkpoints, or read the run "
                "with cw.open_run(root)"
            )
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}")
        # a background save slows the steps it runs beside: that counts as its cost too
        felt = self._felt.arrived(self.clock().timestamp(), busy=self._writer.busy)
        if felt:
            self._decider.waited_for_save(timedelta(seconds=felt))
        try:
            return self._step(step, state, metrics, final)
        finally:
            self._felt.left(self.clock().timestamp())

    def _step(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None, final: bool
    ) -> Decision:
        self._finish(self._writer.poll())
        values = coerce_metrics(metrics)
        # a request is forgotten once the save answering it commits; until then it must not
        # ask for another save at every step
        answered = self._answering if self._writer.busy else frozenset()
        verdict = self._decider.decide(step, values, final=final, answered=answered)
        decision = verdict.decision
        if not decision.save:
            return decision
        if self._writer.busy and self.on_busy == "skip":
            self.skipped.append(step)
            log.info("step %d not saved: the save of a previous step is still writing", step)
            return decision
        if self._writer.busy:  # what waits for its commit is not this save's to run
            self._finish(self._writer.wait())
        consume = self._decider.on_commit(decision)
        if consume is not None:
            self._after_commit.append(consume)
        self._answering = decision.requests
        self.save(
            step,
            state,
            metrics=values,
            reasons=decision.reasons,
            now=verdict.now,
            variant=verdict.variant,
        )
        if self._decider.wants_exit(decision):
            self.wait()
            log.info("saved step %d on a signal; exiting as on_signal(then='exit') asks", step)
            raise SystemExit(0)
        return decision

    def _finish(self, info: CheckpointInfo | None) -> None:
        """Run what waits for a commit (request files are removed only once it is durable)."""
        if info is None:
            return
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            action()

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        reasons: tuple[str, ...] = ("manual",),
        now: datetime | None = None,
        variant: Variant | None = None,
    ) -> CheckpointInfo | None:
        """Save ``state`` as ``step`` now, whatever the policy says, then prune.

        ``variant`` (default: the whole state) may make it a slim, weights-only save.
        Returns the committed checkpoint, or ``None`` while an async save is still writing.
        In a multi-process job every rank must call it for the same step (``step()`` does
        that by itself): the ranks write the checkpoint together.
        """
        self._check_open()
        if not self.writable:
            raise ConfigError(
                "this manager was opened read-only (no save= or keep= policy); pass "
                "save=... to CheckpointManager to write checkpoints"
            )
        if RNG_KEY in state:
            raise ConfigError(f"the state key {RNG_KEY!r} is reserved for the RNG states")
        now = self.clock() if now is None else now
        values = coerce_metrics(metrics)
        variant = variant if variant is not None else full()
        if self._writer.busy:
            self._finish(self._writer.wait())  # at most one save in flight
        entries = self._contents(state, variant)
        # with several ranks the capture runs inside the save's protocol: a rank whose state
        # cannot be captured then fails the save on every rank instead of falling out of step
        snap = capture(entries) if self.ranks is None else None
        tensors = {} if snap is None else snap.tensors
        pending = None
        writer = self._writer
        if self._copier is not None and not self._copy_fits(step, tensors):
            writer = SyncWriter()
        elif self._copier is not None:
            # what an optimizer's next step() overwrites is copied while training goes on
            pending = self._copier.start(
                tensors,
                step=step,
                optimizers=optimizers_in(entries.values()),
                untracked=[k for k, v in entries.items() if getattr(v, "untracked_writes", False)],
            )
        self._decider.started_save(step, now, reasons)
        extra = {**self._decider.to_json(), "variant": variant.to_json()}

        def job() -> CheckpointInfo:
            copies = tensors if pending is None else pending.result()
            if self._owns_run:
                self._branch_off(step, now)
            if self.ranks is None:
                self._lock.check()  # fenced: never commit next to a writer that took over
                assert snap is not None
                info = self._store.commit(
                    step,
                    copies,
                    tree=snap.tree,
                    metrics=values,
                    reasons=reasons,
                    extra=extra,
                    time=now.timestamp(),
                )
                self._release_resume_point(step)
                self._prune(now)
            else:

                def after_commit() -> None:  # on rank 0, once every rank's part is durable
                    # no read-back here: the other ranks wait for rank 0 within a timeout
                    self._release_resume_point(step, verify=False)
                    self._prune(now)

                ours = Manifest(
                    step=step,
                    time=now.timestamp(),
                    tensors={},
                    metrics=values,
                    reasons=tuple(reasons),
                    extra=extra,
                )
                info = commit_across_ranks(
                    self.ranks,
                    self._store,
                    ours,
                    lambda: capture(entries),
                    after_commit=after_commit,
                )
            self.bytes_written += info.new_bytes
            return info

        total = sum(t.nbytes for t in tensors.values())
        shown = metered(
            job, f"saving step {step}", f"saved step {step}", total, show=self._owns_run
        )
        self._saving = step
        info = writer.write(shown, step=step)
        # what training felt: the whole save when synchronous; when asynchronous, what
        # step() took now and what the steps run beside the save lose (see Felt)
        self._decider.finished_save(self.clock() - now)
        if writer.busy:
            self._felt.saved()
        self._finish(info)
        return info

    def _copy_fits(self, step: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether the private copy of an async save fits in the memory available now
        (keeping a tenth of it for training); warns once when it does not."""
        assert self._copier is not None
        needed = self._copier.new_bytes(tensors)
        free = available_memory()
        if free is None or needed <= 0.9 * free:
            return True
        if not self._warned_memory:
            log.warning(
                "step %d is saved synchronously: its background copy needs %.1f GiB more "
                "memory and %.1f GiB are available; save less (content=cw.trainable_only() "
                "for frozen backbones) or pass async_save=False to silence this",
                step,
                needed / 2**30,
                free / 2**30,
            )
            self._warned_memory = True
        return False

    def _settle(self, step: int) -> None:
        """Before :attr:`run` reads ``step``: wait for its save if it is the one in flight (a
        read naming the step just saved means it; listings show committed steps only)."""
        if self._writer.busy and step == self._saving:
            self.wait()

    def _release_resume_point(self, step: int, *, verify: bool = True) -> None:
        """Once a checkpoint newer than the one restored has committed and verifies, let
        retention decide about the restored one again.

        The restored checkpoint is the one known to load; until a newer one is known to
        verify too, it is kept whatever the policy says. Reading the new checkpoint back
        costs one read of it, once per resumed run; afterwards ``keep_last(2)`` means two
        checkpoints again, not three. With several ranks (``verify=False``) the commit
        itself is the proof: every rank hashed and synced its objects before it.
        """
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

    def _branch_off(self, step: int, now: datetime) -> None:
        """Before saving ``step``, move the run's checkpoints of later steps to a branch.

        A save at a step earlier than the run's newest checkpoint means training went back
        (a restore of an older step after a loss spike, or a step counter that restarted):
        from here on the run's line is the one being trained, so the later checkpoints of
        the abandoned line must neither be preferred by a plain restore nor push what is
        saved now out of retention. They are kept, never deleted, under
        ``branches/NAME/``: listed by :meth:`Run.branches`, readable through
        :meth:`Run.branch`, removed by :meth:`delete_branch`.
        """
        later = [s for s in self._store.steps() if s > step]
        if not later:
            return
        self._lock.check()  # fenced: never rearrange a run another writer has taken over
        name = f"{now:%Y%m%dT%H%M%S}-steps-{later[0]}-to-{later[-1]}"
        self._store.move_to_branch(later, name)
        # a pin belongs to the checkpoint, which the branch keeps: it must not pin the step
        # number of the line trained from now on
        for moved in sorted(runfile.read_pins(self._store.backend) & set(later)):
            runfile.unpin(self._store.backend, moved)
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

    def delete_branch(self, name: str) -> None:
        """Delete a branch of abandoned checkpoints (see :meth:`Run.branches`) and the
        objects only it referenced. A save still writing in the background commits first,
        as for :meth:`prune`."""
        self._check_open()
        if not self._owns_run:
            raise ConfigError(
                "only the writing manager (rank 0 of a job) deletes branches; open "
                "CheckpointManager(root, keep=...) to delete one"
            )
        if self._writer.busy:  # collecting garbage beside it would take its new objects
            self._finish(self._writer.wait())
        if name not in self._store.branches():
            have = ", ".join(sorted(self._store.branches())) or "none"
            raise CheckpointNotFoundError(
                f"run {self.run.url} has no branch {name!r} (have: {have})"
            )
        self._store.delete_branch(name)

    def _contents(self, state: Mapping[str, Any], variant: Variant) -> dict[str, Any]:
        """The entries one save of ``variant`` captures."""
        if variant.kind == "full":
            return {**state, RNG_KEY: RngState()} if self.rng else dict(state)
        if variant.key not in state:
            raise ConfigError(
                f"a {variant.kind}-only save needs the model under {variant.key!r} in the state "
                f"(it has {', '.join(map(repr, state))}); pass key= to the variant"
            )
        cast = None if variant.cast is None else getattr(torch, variant.cast)
        weights = ModelWeights(
            state[variant.key], trainable_only=variant.kind == "trainable", cast=cast
        )
        return {variant.key: weights}

    def prune(self, *, now: datetime | None = None) -> RetentionPlan:
        """Apply the retention policy to the committed checkpoints and delete the rest.

        In a multi-process job only rank 0 prunes; on the other ranks this does nothing.
        A save still writing in the background commits first (its objects are not yet
        named by a manifest, so pruning beside it could collect them).
        """
        self._check_open()
        if not self.writable:
            raise ConfigError("this manager was opened read-only; pass keep=... to prune")
        if self._writer.busy:
            self._finish(self._writer.wait())
        return self._prune(self.clock() if now is None else now)

    def _prune(self, now: datetime) -> RetentionPlan:
        """:meth:`prune`, on whichever thread commits."""
        if not self._owns_run:
            return RetentionPlan()
        backend = self._store.backend
        if self.last_plan is None:
            runfile.clear_tombstones(backend)  # a crashed writer's, which would block pins
        plan = plan_retention(
            self.keep_policy,
            self._store.checkpoints(),
            now=now,
            pinned=self.run.pins(),
            resumed_from=self.resumed_from if self._protect_resumed else None,
            object_bytes=self._store.object_bytes(),
        )
        if plan.delete:
            self._lock.check()
            # the handshake with pin(): a step pinned since the plan was made is kept
            pinned = runfile.delete_unpinned(backend, plan.delete, self._store.delete)
            if pinned:
                keep = {**plan.keep, **dict.fromkeys(pinned, ("pinned",))}
                deleted = tuple(s for s in plan.delete if s not in pinned)
                plan = RetentionPlan(keep=dict(sorted(keep.items())), delete=deleted)
        runfile.record_kept(backend, plan.keep)  # advisory: warns, never raises
        self.last_plan = plan
        return plan

    @property
    def last_copy(self) -> tuple[int, int]:
        """Bytes the last async save copied (what changed) and reused (unchanged tensors)."""
        if self._copier is None:
            return 0, 0
        return self._copier.copied_bytes, self._copier.reused_bytes

    # -- pins ------------------------------------------------------------------------------

    def pinned(self) -> set[int]:
        """Steps pinned in this run (kept until unpinned)."""
        return self.run.pins()

    def pin(self, step: int) -> None:
        """Keep ``step`` whatever the retention policy says, until :meth:`unpin`."""
        self.run.pin(step)

    def unpin(self, step: int) -> None:
        """Let the retention policy decide about ``step`` again."""
        self.run.unpin(step)

    # -- reading ---------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (see :meth:`Run.checkpoints`)."""
        return self.run.checkpoints()

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        return self.run.latest_step()

    def best_step(self, metric: str, mode: Literal["min", "max"] = "min") -> int:
        """The committed step with the best recorded ``metric`` (see :meth:`Run.best_step`)."""
        return self.run.best_step(metric, mode)

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        strict: bool = True,
        missing: Literal["start", "error"] = "start",
    ) -> int:
        """Load the newest checkpoint that verifies into ``state``, continue this run from
        it, and return its step; with none, 0, or with ``missing="error"``
        :class:`~ckptwise.CheckpointNotFoundError` (see :meth:`Run.restore`, which also says
        how a state that does not fit the checkpoint is refused, leaving it unchanged).

        The saved RNG states are restored too (unless the manager has ``rng=False``): this
        resumes training, whereas ``cw.open_run(root).restore(state)`` (for evaluation)
        leaves them alone unless asked.

        Continuing means: metric history and trigger bookkeeping are those saved with the
        checkpoint, wall-clock triggers count from now, and the checkpoint is kept until a
        newer one has committed and verifies. Restoring an older step than the run's newest
        and saving from there sets the later checkpoints aside as a branch (see
        :meth:`Run.branches`).
        """
        if self._writer.busy:  # a background save still reads the live tensors
            self._finish(self._writer.wait())
        restored = self.run.restore(
            state,
            step=step,
            strict=strict,
            rng=self.rng,
            missing=missing,
            ranks=self.ranks,
            rank=self._read_rank(),
        )
        if restored in self._store.steps():  # 0 also means "nothing to restore"
            self._adopt(restored)
        return restored

    def resume_values(self, step: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """Like :meth:`restore`, for adapters that load the state themselves.

        Returns the step and every saved value (RNG states under ``"__rng__"``) of the
        newest full checkpoint that verifies, and continues this run from it; ``None``
        when there is none.
        """
        if self._writer.busy:  # resume from the newest checkpoint, as restore() does
            self._finish(self._writer.wait())
        rank = self._read_rank() if self.ranks is None else self.ranks.rank
        loaded = self.run.read(step, full_only=True, rank=rank, ranks=self.ranks)
        if loaded is None:
            log.info("no full checkpoint in %s to resume from; starting from scratch", self.run.url)
            return None
        log.info("resuming from step %d of %s", loaded.step, self.run.url)
        self._adopt(loaded.step)
        return loaded.step, loaded.values(rng=True)

    def _read_rank(self) -> int:
        """Whose per-rank entries this process reads alone: its rank among the ranks it
        saved with (those of ``process_group``), once the manager is closed."""
        return _process_rank() if self._rank_alone is None else self._rank_alone

    def _adopt(self, step: int) -> None:
        self._decider.adopt(self._store.manifest(step).extra, step)
        self.resumed_from = step
        self._protect_resumed = True

    # -- lifetime --------------------------------------------------------------------------

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight (if any) has committed; re-raise its error."""
        info = self._writer.wait()
        self._finish(info)
        return info

    def close(self) -> None:
        """Wait for the last write, then release the run's lock and (with several ranks)
        destroy the checkpoint's process group. Safe to call twice.

        Every rank calls it once it is done with the manager. A closed manager still
        reads, as a read-only one does: each rank on its own.
        """
        if self._closed:
            return
        try:
            # a failed last save still lets go of the thread, hooks and copies
            with contextlib.ExitStack() as stack:
                if self._copier is not None:
                    stack.callback(self._copier.close)
                stack.callback(self._writer.close)
                self._finish(self._writer.wait())
            backend = self._store.backend
            if isinstance(backend, TieredBackend) and self._owns_run:
                backend.close()  # every upload done, before the lock lets another writer in
        finally:
            self._closed = True
            self._decider.close()
            self._lock.release()
            if self.ranks is not None:
                # a closed manager reads as a read-only one does, without the other ranks;
                # only rank 0 wrote the manifests, so the others list them afresh
                coordinator = self.ranks.coordinator
                self._rank_alone = self.ranks.rank
                self.ranks.close()
                self.ranks = None
                if not coordinator:
                    with contextlib.suppress(CheckpointError):  # a later read says it
                        self._store.refresh()

    def upload_states(self) -> dict[int, UploadState] | None:
        """For a run written through a ``cache``: each checkpoint's upload state
        (``"local"``, ``"uploading"`` or ``"remote"``); ``None`` for other runs."""
        return upload_states(self._store.backend)

    def flush_uploads(self, timeout: timedelta | None = None) -> None:
        """Block until every checkpoint committed so far is durable remotely (with a
        ``cache``; otherwise return at once).

        Raises:
            StorageError: an upload failed after its retries, or ``timeout`` passed.
        """
        self.wait()
        backend = self._store.backend
        if isinstance(backend, TieredBackend):
            backend.flush(timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: the manager still reads, but saves no more
        and no longer holds the run's lock."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(
                "this CheckpointManager is closed; it can still read, but create a new one to save"
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        return f"CheckpointManager({self.run.url!r}, {mode}, steps={self.run.steps()})"
