"""The checkpoint manager: decide, then hand the save to the pipeline, then upkeep.

At each step the manager asks its :class:`~ckptwise.decide.decider.Decider` (the policies, fed with
the clock, metrics, history and outside requests); a save goes to the
:class:`~ckptwise.save.pipeline.SavePipeline` (capture, copy, write, commit; synchronously, in the
background or on every rank), which calls the run's :class:`~ckptwise.save.upkeep.Upkeep`
(rollback branches, the resume point, pruning) around each commit. Reads (listing, loading,
verifying, exporting) go through :attr:`CheckpointManager.run`, a :class:`~ckptwise.read.run.Run`.
The module is long only because the constructor documents every option a training script
sets.

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
from typing import Any, Literal, NoReturn

import torch
import torch.distributed as dist

from ckptwise.config.record import policy_record
from ckptwise.decide.decider import Decider
from ckptwise.decide.felt import Felt
from ckptwise.decide.metrics import coerce_metrics
from ckptwise.distributed.confirm import UploadConfirmer
from ckptwise.distributed.ranks import DEFAULT_TIMEOUT, Failure, Ranks, describe
from ckptwise.errors import CheckpointError, ConfigError
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
    on_final,
)
from ckptwise.read.run import RestoreWarning, Run
from ckptwise.records import CheckpointInfo
from ckptwise.save.pipeline import AsyncPath, RanksPath, SaveOrder, SavePath, SavePipeline, SyncPath
from ckptwise.save.upkeep import Upkeep
from ckptwise.snapshot import RNG_KEY, ModelWeights, RngState
from ckptwise.store import RunLock, TieredBackend, open_store, rank_cache

__all__ = ["RNG_KEY", "CheckpointManager", "RestoreWarning"]

log = logging.getLogger("ckptwise")


#: how often a manager given no ``save=`` saves: the ``Trainer``'s default
DEFAULT_SAVE_STEPS = 500


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointManager:
    """Saves a training state by policy, keeps checkpoints by policy, and restores exactly.

    The manager writes: it takes the run's lock (released by :meth:`close`), cleans debris a
    crash left and prunes after every commit. To only read a run (evaluation, export, the
    command line), use :func:`ckptwise.open_run`, which takes no lock.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/run``, ``memory://run``).
        save: when to save (triggers composed with ``|`` / ``&``). Without it the manager
            saves as the ``Trainer`` does by default, ``every(500) | on_final()``, and logs
            a warning saying so: a manager that never saved would lose the run without a
            word. ``save=cw.never()`` saves only on explicit :meth:`save` calls.
        content: what each save holds; by default everything. E.g.
            ``cw.full_every(5000, otherwise=cw.weights_only())`` makes the saves between
            full ones slim. Only full checkpoints can be restored into a training state.
        keep: what to keep; by default everything (:func:`~ckptwise.keep_all`).
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
        async_save: save in the background: ``step()`` returns once the state is copied
            to private memory (one memcpy of it, into buffers kept from the last save), and
            hashing, encoding, writing and pruning run on a background thread (at most one
            save in flight). Whatever the loop does next, the checkpoint holds the state as
            it was at ``step()``. A checkpoint is listed once it has committed (:meth:`wait`
            blocks until then; ``manager.run`` waits when asked for that very step). Errors
            are raised by the next ``step()``, ``save()``, ``prune()``, ``restore()``,
            ``wait()`` or ``close()``. A save whose copy would not fit in the memory
            available is taken synchronously, with a warning. With several processes each
            rank copies its own state and writes its share in the background, and the
            ranks commit together on a process group of their own (see
            :class:`~ckptwise.save.pipeline.RanksPath`); a save that fails on one rank
            fails on every rank, each raising the same error (naming the rank) at its first
            ``step()`` after the save ended. ``None`` (the default) and ``True``: in the
            background; ``False``: synchronously.
        defer_copy: with ``async_save``, copy what a torch optimizer overwrites while the
            next forward and backward run (its next ``step()`` waits for the copy), so
            ``step()`` returns after copying the rest only. The contract you accept: until
            an optimizer's next ``step()``, its parameters and states change only through it.
            A write torch's version counter sees fails the save (``SnapshotError``); a write
            through ``.data`` (weight clipping, a hand-made update) before that step is not
            seen and can tear the checkpoint. Off by default.
        on_busy: with ``async_save``, what a new save does while one is still writing:
            ``"wait"`` for it, or ``"skip"`` (recorded in :attr:`skipped`; one process only).
        storage_options: passed to fsspec for URLs (credentials, endpoint).
        cache: for a remote run (``s3://...``), a local folder (one per run) that saves are
            written to; an uploader sends them to ``root`` in the background, objects before
            the manifest that names them, so the network is never in a save's way and a
            reader of the remote sees only whole checkpoints. Restores read the cache when
            it holds a verified copy, else the remote. :meth:`close` waits for the uploads;
            :meth:`Run.upload_states` (``manager.run``) says which checkpoints are
            ``local``, ``uploading`` or ``remote``. In a job of several ranks each node
            names a folder on its own disk; each rank writes and uploads its objects through
            a folder of its own inside it (``rank-00003``), and rank 0 uploads a manifest
            once every rank has confirmed its objects are up (see
            :mod:`ckptwise.distributed.confirm`): no node needs to see another's disk.
        cache_bytes: the most bytes of already uploaded files the cache keeps (least
            recently used go first; files not yet uploaded are always kept).
        process_group: in a multi-process job (``torchrun``), the group whose ranks save
            together; by default the default group when ``torch.distributed`` is
            initialized. Every rank creates its manager with the same arguments: rank 0
            takes the lock, decides, writes the manifest and prunes; each rank writes its
            share of the objects (see :mod:`ckptwise.distributed`).
        dist_timeout: how long a rank waits for the others in one checkpoint collective
            before the save fails on every rank (a dead rank usually fails it at once).
            :meth:`restore` waits for every rank to call it a quarter of this at most (a
            minute at most), then fails. The ranks' root, policies and options are compared
            at creation: a manager created with other arguments than on rank 0 is refused
            on every rank (:class:`~ckptwise.ConfigError`).
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
        defer_copy: bool = False,
        on_busy: Literal["wait", "skip"] = "wait",
        clock: Callable[[], datetime] = _utcnow,
        storage_options: Mapping[str, Any] | None = None,
        cache: str | os.PathLike[str] | None = None,
        cache_bytes: int | None = None,
        process_group: Any = None,
        dist_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if save is None:
            save = every(DEFAULT_SAVE_STEPS) | on_final()
            log.warning(
                "CheckpointManager(%r) was given no save=: saving every(%d) | on_final(), as "
                "the Trainer does by default (pass save=... to choose; step(..., final=True) "
                "marks the last step)",
                os.fspath(root),
                DEFAULT_SAVE_STEPS,
            )
        check_trigger(save)
        if keep is not None:
            check_retention(keep)
        if content is not None and not isinstance(content, ContentPolicy):
            raise ConfigError(
                f"content= expects a content policy such as cw.full_every(5000), got {content!r}"
            )
        if on_busy not in ("wait", "skip"):
            raise ConfigError(f"on_busy must be 'wait' or 'skip', got {on_busy!r}")
        self.save_policy: Trigger = save
        self.keep_policy: RetentionPolicy = keep if keep is not None else keep_all()
        self.content: ContentPolicy = content if content is not None else full()
        # recorded in every manifest, so readers rank by the run's own metric (computed once:
        # the policies never change)
        self._policy_record = policy_record(self.save_policy, self.keep_policy, self.content)
        self.rng = rng
        self.clock = clock
        self.on_busy = on_busy
        #: the ranks of a multi-process job (``None`` for one process)
        self.ranks = Ranks.detect(process_group, timeout=dist_timeout)
        lock: RunLock | None = None
        try:
            # what may fail on one rank only is carried to the others, not raised before
            # them: a rank that left would leave them waiting in the next collective
            failure: Exception | None = None
            try:
                if async_save is None:
                    async_save = True
                if defer_copy and not async_save:
                    raise ConfigError(
                        "defer_copy=True defers the copy of a background save, and this manager "
                        "saves synchronously; drop defer_copy, or drop async_save=False"
                    )
                if self.ranks is not None and async_save and on_busy == "skip":
                    raise ConfigError(
                        "on_busy='skip' needs one process: with several, each rank's save "
                        "ends at its own time, so the ranks would not skip the same steps; "
                        "drop on_busy (a save then waits for the one in flight)"
                    )
                # the lock and the run folder's upkeep belong to rank 0 alone
                self._owns_run = self.ranks is None or self.ranks.coordinator
                if cache is not None and self.ranks is not None:
                    # one cache folder per rank, on its node's disk (see distributed.confirm)
                    cache = os.path.join(os.fspath(cache), rank_cache(self.ranks.rank))
                self._store = open_store(
                    root,
                    cache=cache,
                    cache_bytes=cache_bytes,
                    storage_options=storage_options,
                    codec=codec,
                    deltas=deltas,
                )
                backend = self._store.backend
                self._cached = backend if isinstance(backend, TieredBackend) else None
                if self._cached is not None and self.ranks is not None and self._owns_run:
                    self._cached.expect_confirmations()
                lock = self._lock = self._store.lock()
                if self._owns_run:
                    lock.acquire()
                    self._store.refresh()  # as it is now that no other writer can change it
                    removed = self._store.clean()
                    if removed:
                        log.info("removed %d leftover file(s) from an interrupted save", removed)
                elif self._cached is not None:
                    self._store.start_uploads()  # rank 0's lock covers the job's ranks
            except Exception as exc:
                if self.ranks is None:
                    raise
                failure = exc
            if self.ranks is not None:
                root_url = self._store.url if failure is None else os.fspath(root)
                self.ranks.same(
                    {
                        "root": root_url,
                        "save": describe(self.save_policy),
                        "keep": describe(self.keep_policy),
                        "content": describe(self.content),
                        "codec": repr(codec),
                        "deltas": repr(deltas),
                        "async_save": repr(async_save),
                        "defer_copy": repr(defer_copy),
                        "on_busy": repr(on_busy),
                        "rng": repr(rng),
                        "cache": repr(cache is not None),
                    },
                    None if failure is None else Failure.of(self.ranks.rank, failure),
                    "creating the CheckpointManager",
                )
        except BaseException:
            if lock is not None:
                lock.release()  # a lock not taken is left alone
            if self.ranks is not None:  # the group this manager opened
                self.ranks.close()
            raise
        assert lock is not None  # a rank that failed to take it raised above
        self._upkeep = Upkeep(self._store, lock, self.keep_policy, owns_run=self._owns_run)
        path: SavePath
        #: with several ranks and caches: the confirmations that let rank 0 upload manifests
        self._confirmer: UploadConfirmer | None = None
        if self.ranks is not None:
            if self._cached is not None:
                self._confirmer = UploadConfirmer(
                    self.ranks, self._cached, exit_timeout=self._cached.exit_timeout
                )
            path = RanksPath(
                self._store,
                self.ranks,
                self._upkeep,
                background=bool(async_save),
                defer=defer_copy,
                committed=None if self._confirmer is None else self._confirmer.committed,
            )
        elif async_save:
            path = AsyncPath(self._store, lock, self._upkeep, defer=defer_copy)
        else:
            path = SyncPath(self._store, lock, self._upkeep)
        self._pipeline = SavePipeline(path, show=self._owns_run, joint=self.ranks is not None)
        #: the read-only view of this run (listing, loading, verifying, exporting, pins)
        self.run = Run(self._store, settle=self._pipeline.settle)
        self._felt = Felt()
        self._answering: frozenset[Request] = frozenset()  # by the save in flight
        #: steps whose save was skipped because the previous one was still writing
        self.skipped: list[int] = []
        self._decider = Decider(
            self.save_policy,
            self.content,
            self.clock,
            watch=self._store,
            watch_files=self._owns_run,
            ranks=self.ranks,
        )
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

    # -- what the pipeline and upkeep report -------------------------------------------------

    @property
    def resumed_from(self) -> int | None:
        """The step this manager restored (``None`` before a restore)."""
        return self._upkeep.resumed_from

    @property
    def last_plan(self) -> RetentionPlan | None:
        """The last retention decision applied (``None`` before the first prune)."""
        return self._upkeep.last_plan

    @property
    def bytes_written(self) -> int:
        """Bytes this manager's commits added to the store (new objects, after dedup)."""
        return self._pipeline.bytes_written

    @property
    def last_copy(self) -> tuple[int, int]:
        """Bytes the last async save copied before ``step()`` returned, and while the next
        forward and backward ran (only with ``defer_copy=True``)."""
        return self._pipeline.last_copy

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
        """
        self._check_open()
        # with several ranks a refused input still joins the step's collective (see _step)
        refused: ConfigError | None = None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            refused = ConfigError(f"step must be an integer >= 0, got {step!r}")
            if self.ranks is None:
                raise refused
        # a background save slows the steps it runs beside: that counts as its cost too
        felt = self._felt.arrived(self.clock().timestamp(), busy=self._pipeline.busy)
        if felt:
            self._decider.waited_for_save(timedelta(seconds=felt))
        try:
            return self._step(step, state, metrics, final, refused)
        finally:
            self._felt.left(self.clock().timestamp())

    def _step(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        final: bool,
        refused: ConfigError | None = None,
    ) -> Decision:
        # with several ranks a background save's failure is held until this step's decision
        # is taken and its save, if any, has started (see SavePipeline.poll)
        self._pipeline.poll()
        values: Mapping[str, float] = {}
        if refused is None:
            try:
                values = coerce_metrics(metrics)
            except ConfigError as exc:
                if self.ranks is None:
                    raise
                refused = exc
        if refused is not None and self._decider.alone:
            self._refuse_alone(step, final, refused)  # the save's failure is logged then
        # a request is forgotten once the save answering it commits; until then it must not
        # ask for another save at every step
        answered = self._answering if self._pipeline.busy else frozenset()
        verdict = self._decider.decide(
            step, values, final=final, answered=answered, refused=refused
        )
        decision = verdict.decision
        if not decision.save:
            self._pipeline.raise_held()
            return decision
        if self._pipeline.busy and self.on_busy == "skip":
            self.skipped.append(step)
            log.info("step %d not saved: the save of a previous step is still writing", step)
            return decision
        self._pipeline.before_save()  # what waits for its commit is not this save's to run
        self._answering = decision.requests
        self._save(
            step,
            state,
            metrics=values,
            reasons=decision.reasons,
            now=verdict.now,
            variant=verdict.variant,
            on_commit=self._decider.on_commit(decision),
        )
        if self._decider.wants_exit(decision):
            self.wait()
            # a warning: the process ends here, and its log should say why
            log.warning(
                "saved step %d to %s on a signal (%s); exiting as on_signal(then='exit') asks",
                step,
                self.run.url,
                ", ".join(decision.reasons),
            )
            raise SystemExit(0)
        return decision

    def _refuse_alone(self, step: int, final: bool, refused: ConfigError) -> NoReturn:
        """Raise ``refused`` (a bad input to :meth:`step`) where each rank decides alone: on
        every rank when the ranks save at this step (this rank joins the save's collectives
        to fail it), else on this rank only (no rank waits for it). A step that is no
        integer tells nothing: this rank cannot know what the others do, and raises alone.
        """
        assert self.ranks is not None
        valid = isinstance(step, int) and not isinstance(step, bool) and step >= 0
        if valid and self._decider.saves_alone(step, final=final):
            self._pipeline.refuse(step, refused)
        raise refused

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
        return self._save(
            step,
            state,
            metrics=coerce_metrics(metrics),
            reasons=reasons,
            now=self.clock() if now is None else now,
            variant=variant if variant is not None else full(),
        )

    def _save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float],
        reasons: tuple[str, ...],
        now: datetime,
        variant: Variant,
        on_commit: Callable[[], None] | None = None,
    ) -> CheckpointInfo | None:
        if RNG_KEY in state:
            raise ConfigError(f"the state key {RNG_KEY!r} is reserved for the RNG states")
        entries = self._contents(state, variant)
        captured = self._pipeline.capture(step, entries)
        self._decider.started_save(step, now, reasons)
        order = SaveOrder(
            step=step,
            now=now,
            metrics=metrics,
            reasons=tuple(reasons),
            extra={
                **self._decider.to_json(),
                "variant": variant.to_json(),
                "policy": self._policy_record,
            },
        )
        info = self._pipeline.write(captured, order, on_commit=on_commit)
        # what training felt: the whole save when synchronous; when asynchronous, what
        # step() took now and what the steps run beside the save lose (see Felt)
        self._decider.finished_save(self.clock() - now)
        if self._pipeline.busy:
            self._felt.saved()
        return info

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
        self._pipeline.wait()
        return self._upkeep.prune(self.clock() if now is None else now)

    def delete_branch(self, name: str) -> None:
        """Delete a branch of abandoned checkpoints (see :meth:`Run.branches`) and the
        objects only it referenced. A save still writing in the background commits first,
        as for :meth:`prune`."""
        self._check_open()
        self._pipeline.wait()  # collecting garbage beside it would take its new objects
        self._upkeep.delete_branch(name, self.run.url)

    def pin(self, step: int) -> None:
        """Keep ``step`` whatever the retention policy says, until :meth:`unpin`
        (:meth:`Run.pins` lists the pinned steps)."""
        self.run.pin(step)

    def unpin(self, step: int) -> None:
        """Let the retention policy decide about ``step`` again."""
        self.run.unpin(step)

    # -- continuing a run ------------------------------------------------------------------

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
        self._pipeline.wait()  # a background save still reads the live tensors
        if self.ranks is not None:  # a rank restoring alone would wait out dist_timeout
            self.ranks.meet("restore()")
            self._see_commits()
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
        self._pipeline.wait()  # resume from the newest checkpoint, as restore() does
        if self.ranks is not None:
            self.ranks.meet("resume_values()")
            self._see_commits()
        rank = self._read_rank() if self.ranks is None else self.ranks.rank
        loaded = self.run.read(step, full_only=True, rank=rank, ranks=self.ranks)
        if loaded is None:
            log.info("no full checkpoint in %s to resume from; starting from scratch", self.run.url)
            return None
        log.info("resuming from step %d of %s", loaded.step, self.run.url)
        self._adopt(loaded.step)
        return loaded.step, loaded.values(rng=True)

    def _see_commits(self) -> None:
        """Before a read every rank makes together: on a rank other than 0, list the run
        again (rank 0 wrote the manifests this rank's saves took part in). With caches,
        every checkpoint committed so far is first made durable remotely (each rank's
        objects may be on its node's disk alone), so every rank reads the same run."""
        if self.ranks is None:
            return
        if self._confirmer is not None:
            assert self._cached is not None
            failure: Failure | None = None
            try:
                self._confirmer.drain()
                if self.ranks.coordinator:
                    self._store.flush_uploads()
                    self._set_aside_lost()
            except CheckpointError as exc:
                failure = Failure.of(self.ranks.rank, exc)
            # rank 0's manifests are up (or every rank raises why not)
            self.ranks.agree(failure, "making the committed checkpoints durable before reading")
            if not self.ranks.coordinator:
                self._cached.relist()
        if not self.ranks.coordinator:
            self._store.refresh()

    def _set_aside_lost(self) -> None:
        """On rank 0, every rank's uploads confirmed: the manifests still waiting for
        objects can never go up (see :meth:`TieredBackend.set_aside_parked`), so they stop
        being checkpoints of this run, with a warning, and the ranks read the same run."""
        assert self._cached is not None
        steps = self._cached.set_aside_parked()
        if not steps:
            return
        log.warning(
            "checkpoint(s) at step %s were committed into rank 0's cache but can never be "
            "uploaded to %s: objects other ranks wrote for them are neither in those ranks' "
            "cache folders nor in the store (a node came back without its cache folder, or "
            "an object was damaged). They are set aside in %s, and the ranks resume from the "
            "newest checkpoint whole in the store",
            ", ".join(str(s) for s in steps),
            self._cached.url,
            self._cached.set_aside_folder,
        )
        self._store.refresh()

    def _read_rank(self) -> int:
        """Whose per-rank entries this process reads alone: its rank among the ranks it
        saved with (those of ``process_group``), once the manager is closed."""
        return _process_rank() if self._rank_alone is None else self._rank_alone

    def _adopt(self, step: int) -> None:
        self._decider.adopt(self._store.manifest(step).extra, step)
        self._upkeep.adopt(step)

    # -- lifetime --------------------------------------------------------------------------

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight (if any) has committed; re-raise its error."""
        return self._pipeline.wait()

    def flush_uploads(self, timeout: timedelta | None = None) -> None:
        """Block until every checkpoint committed so far is durable remotely (with a
        ``cache``; otherwise return at once). With several ranks every rank calls it at the
        same point (the ranks confirm their uploads together).

        Raises:
            StorageError: an upload failed after its retries, or ``timeout`` passed.
        """
        self.wait()
        if self._confirmer is not None and self.ranks is not None:
            # several ranks: their objects first (confirmed to rank 0), then its manifests
            self._confirmer.drain(timeout)
            if self.ranks.coordinator:
                self._store.flush_uploads(timeout)
            return
        self._store.flush_uploads(timeout)

    def close(self) -> None:
        """Wait for the last write, then release the run's lock and (with several ranks)
        destroy the checkpoint's process group. Safe to call twice.

        Every rank calls it once it is done with the manager. A closed manager still
        reads through :attr:`run`, each rank on its own, and :meth:`restore` still works.
        """
        if self._closed:
            return
        try:
            try:
                self._pipeline.close()  # a failed last save still lets go of threads and copies
            finally:
                if self._confirmer is not None:  # every rank's objects up: manifests may go
                    self._confirmer.close(self._cached.exit_timeout if self._cached else None)
            if self._owns_run or self._cached is not None:
                self._store.close()  # every upload done, before the lock lets another writer in
        finally:
            self._closed = True
            self._decider.close()
            self._lock.release()
            if self.ranks is not None:
                # a closed manager reads without the other ranks; only rank 0 wrote the
                # manifests, so the others list them afresh
                coordinator = self.ranks.coordinator
                self._rank_alone = self.ranks.rank
                self.ranks.close()
                self.ranks = None
                if not coordinator:
                    with contextlib.suppress(CheckpointError):  # a later read says it
                        self._store.refresh()

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
        return f"CheckpointManager({self.run.url!r}, steps={self.run.steps()})"
