"""The checkpoint manager: decide, snapshot, write, prune; and restore.

The manager is orchestration only. It builds a :class:`~ckptwise.policy.TrainingState` at
each step (injecting its clock and the metric history), asks the save trigger, captures the
state with :mod:`ckptwise.snapshot`, hands the commit to the writer, then applies the
retention plan. Framework adapters live in :mod:`ckptwise.integrations`.

>>> import ckptwise as cw
>>> manager = cw.CheckpointManager(  # doctest: +SKIP
...     "runs/exp1", save=cw.every(1000, start=200), keep=cw.keep_last(3))
>>> start = manager.restore(state)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from ckptwise.errors import CheckpointError, ConfigError, CorruptCheckpointError
from ckptwise.monitor import Monitor
from ckptwise.policy.content import ContentPolicy, Variant, full
from ckptwise.policy.retention import (
    KeepBest,
    RetentionContext,
    RetentionPlan,
    RetentionPolicy,
    keep_all,
    plan_retention,
)
from ckptwise.policy.state import Decision
from ckptwise.policy.triggers import Trigger, _check_trigger, never, walk
from ckptwise.progress import Progress
from ckptwise.records import CheckpointInfo
from ckptwise.snapshot import ModelWeights, RngState, SnapshotCopier, apply, capture, rebuild
from ckptwise.store.backend import open_backend
from ckptwise.store.lock import RunLock
from ckptwise.store.manifest import DTYPES, Manifest
from ckptwise.store.store import CheckpointStore
from ckptwise.writer import AsyncWriter, SyncWriter, Writer

__all__ = ["CheckpointManager", "RestoreWarning"]

log = logging.getLogger("ckptwise")

RNG_KEY = "__rng__"


class RestoreWarning(UserWarning):
    """A checkpoint was skipped during restore because it failed verification."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


#: saves and restores shorter than this are not reported on the terminal
REPORT_AFTER_SECONDS = 2.0


def _report(what: str, step: int, nbytes: int, seconds: float) -> None:
    """One line with bytes and MB/s for a long save or restore, on a terminal only."""
    if seconds < REPORT_AFTER_SECONDS or not sys.stderr.isatty():
        return
    sys.stderr.write(
        f"ckptwise: {what} {step}: {nbytes / 1e6:.0f} MB in {seconds:.1f} s "
        f"({nbytes / 1e6 / seconds:.0f} MB/s)\n"
    )


def _variant_label(manifest: Manifest) -> str:
    variant = manifest.extra.get("variant")
    if not isinstance(variant, dict):
        return "full"
    kind, cast = str(variant.get("kind", "full")), variant.get("cast")
    return kind if not cast else f"{kind}/{cast}"


def _as_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"metric names must be strings, got {key!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"metric {key!r} has value {value!r} of type {type(value).__name__}; "
                "pass plain numbers (e.g. loss.item())"
            )
        out[key] = float(value)
    return out


class CheckpointManager:
    """Saves a training state by policy, keeps checkpoints by policy, and restores exactly.

    With ``save`` or ``keep`` given, the manager writes: it takes the run's lock (released
    by :meth:`close`), cleans debris a crash left and prunes after every commit. With
    neither, it only reads: restore, load, export and inspect, without taking the lock.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/run``, ``memory://run``).
        save: when to save (triggers composed with ``|`` / ``&``); none saves nothing.
        content: what each save holds; by default everything. E.g.
            ``cw.full_every(5000, otherwise=cw.weights_only())`` makes the saves between
            full ones slim. Only full checkpoints can be restored into a training state.
        keep: what to keep; defaults to :func:`~ckptwise.keep_all` for a writing manager.
            The newest checkpoint, pinned ones and the one this manager restored are
            always kept.
        rng: also save and restore Python, numpy, torch (and CUDA) RNG states.
        codec: how new objects are encoded: ``"auto"`` (the default: byte-grouped zstd for
            float tensors where the measured encode and write rates say it makes the save
            faster, raw elsewhere), ``"raw"``, ``"bytegroup"`` or ``"zstd"``.
        deltas: with a compressing codec, store a tensor as the XOR against its value in
            the previous checkpoint when that is 10 % smaller, with a whole keyframe at least
            every ``deltas`` saves, so a restore reads at most ``deltas`` objects per tensor.
        clock: the time source given to policies; tests pass a fake clock.
        async_save: take a private copy of what changed and return; hashing, encoding,
            writing and pruning run on a background thread (at most one save in flight).
            Its errors are raised by the next ``step()``, ``wait()`` or ``close()``.
        on_busy: with ``async_save``, what a new save does while one is still writing:
            ``"wait"`` for it, or ``"skip"`` (recorded in :attr:`skipped`).
        storage_options: passed to fsspec for URLs (credentials, endpoint).
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
        async_save: bool = False,
        on_busy: Literal["wait", "skip"] = "wait",
        clock: Callable[[], datetime] = _utcnow,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if save is not None:
            _check_trigger(save)
        if keep is not None and not hasattr(keep, "select"):
            raise ConfigError(
                f"keep= expects a retention policy such as cw.keep_last(3), got {keep!r}"
            )
        self.writable = save is not None or keep is not None
        self.save_policy: Trigger = save if save is not None else never()
        self.keep_policy: RetentionPolicy = keep if keep is not None else keep_all()
        if content is not None and not isinstance(content, ContentPolicy):
            raise ConfigError(
                f"content= expects a content policy such as cw.full_every(5000), got {content!r}"
            )
        self.content: ContentPolicy = content if content is not None else full()
        if on_busy not in ("wait", "skip"):
            raise ConfigError(f"on_busy must be 'wait' or 'skip', got {on_busy!r}")
        self.rng = rng
        self.clock = clock
        backend = open_backend(root, **dict(storage_options or {}))
        self._lock = RunLock(backend)
        if self.writable:
            self._lock.acquire()
        try:
            self.store = CheckpointStore(backend, codec=codec, deltas=deltas)
            if self.writable:
                removed = self.store.clean()
                if removed:
                    log.info("removed %d leftover file(s) from an interrupted save", removed)
        except BaseException:
            self._lock.release()
            raise
        self.on_busy = on_busy
        self._writer: Writer = AsyncWriter() if async_save else SyncWriter()
        self._copier = SnapshotCopier() if async_save else None
        self._after_commit: list[Callable[[], None]] = []
        #: steps whose save was skipped because the previous one was still writing
        self.skipped: list[int] = []
        self._progress = Progress(self.clock())
        self._monitor = Monitor(backend, walk(self.save_policy)) if self.writable else None
        self._requests: set[str] = set()
        self.resumed_from: int | None = None
        self.last_plan: RetentionPlan | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls,
        root: str | os.PathLike[str],
        config: Mapping[str, Any] | str | os.PathLike[str],
        **kwargs: Any,
    ) -> CheckpointManager:
        """A manager whose policies come from a config mapping or a YAML/TOML/JSON file.

        >>> manager = cw.CheckpointManager.from_config("runs/exp1", "policy.yaml")  # doctest: +SKIP
        """
        from ckptwise.config import policy_from_config

        policy = policy_from_config(config)
        return cls(root, save=policy.save, keep=policy.keep, **kwargs)

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
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}")
        self._finish(self._writer.poll())
        values = _as_metrics(metrics)
        now = self.clock()
        requests = frozenset(self._requests)
        if self._monitor is not None:
            requests |= self._monitor.poll()
        training = self._progress.state(step, now, metrics=values, requests=requests, final=final)
        decision = self.save_policy.decide(training)
        self._progress.observe(step, values)
        if decision.save:
            if self._writer.busy and self.on_busy == "skip":
                self.skipped.append(step)
                log.info("step %d not saved: the save of a previous step is still writing", step)
                return decision
            variant = self.content.choose(training, decision)
            self._requests.difference_update(requests)
            if self._monitor is not None:
                monitor = self._monitor
                self._after_commit.append(lambda: monitor.consume(requests))
            self.save(
                step, state, metrics=values, reasons=decision.reasons, now=now, variant=variant
            )
            if self._monitor is not None and self._monitor.wants_exit(decision.reasons):
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

    def request_save(self, reason: str) -> None:
        """Add ``reason`` to the next step's ``requests`` (e.g. ``"signal:SIGTERM"``).

        Framework adapters use this to forward requests they received themselves.
        """
        self._requests.add(reason)

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
        values = _as_metrics(metrics)
        variant = variant if variant is not None else full()
        if self._writer.busy:
            self._finish(self._writer.wait())  # at most one save in flight
        snap = capture(self._contents(state, variant))
        tensors = snap.tensors if self._copier is None else self._copier.copy(snap.tensors)
        self._progress.started_save(step, now, reasons)
        extra = self._progress.to_json()
        extra["variant"] = {"kind": variant.kind, "key": variant.key, "cast": variant.cast}

        def job() -> CheckpointInfo:
            started = time.perf_counter()
            info = self.store.commit(
                step,
                tensors,
                tree=snap.tree,
                metrics=values,
                reasons=reasons,
                extra=extra,
                time=now.timestamp(),
            )
            self.prune(now=now)
            _report("saved step", step, info.new_bytes, time.perf_counter() - started)
            return info

        info = self._writer.write(job, step=step)
        # what training felt: the whole save when synchronous, the copy when asynchronous
        self._progress.finished_save(self.clock() - now)
        self._finish(info)
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
        cast = None if variant.cast is None else DTYPES[variant.cast]
        weights = ModelWeights(
            state[variant.key], trainable_only=variant.kind == "trainable", cast=cast
        )
        return {variant.key: weights}

    def prune(self, *, now: datetime | None = None) -> RetentionPlan:
        """Apply the retention policy to the committed checkpoints and delete the rest."""
        self._check_open()
        if not self.writable:
            raise ConfigError("this manager was opened read-only; pass keep=... to prune")
        plan = plan_retention(
            self.keep_policy,
            self.store.checkpoints(),
            now=self.clock() if now is None else now,
            pinned=self.pinned(),
            resumed_from=self.resumed_from,
            object_bytes=self.store.object_bytes(),
        )
        self.store.delete(plan.delete)
        run = self.store.read_run_state()
        run["kept"] = {str(s): list(r) for s, r in plan.keep.items()}
        self.store.write_run_state(run)
        self.last_plan = plan
        return plan

    # -- pins ------------------------------------------------------------------------------

    def pinned(self) -> set[int]:
        """Steps pinned in this run (kept until unpinned)."""
        pins = self.store.read_run_state().get("pins", [])
        return {int(p) for p in pins if isinstance(p, int)}

    def pin(self, step: int) -> None:
        """Keep ``step`` whatever the retention policy says, until :meth:`unpin`."""
        self.store.manifest(step)
        self._set_pins(self.pinned() | {step})

    def unpin(self, step: int) -> None:
        """Let the retention policy decide about ``step`` again."""
        self._set_pins(self.pinned() - {step})

    def _set_pins(self, pins: set[int]) -> None:
        run = self.store.read_run_state()
        run["pins"] = sorted(pins)
        self.store.write_run_state(run)

    # -- reading ---------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first, with step, time, metrics, bytes and what each
        holds (``variant``: full or a slim kind, which this manager records in ``extra``)."""
        return [
            dataclasses.replace(info, variant=_variant_label(self.store.manifest(info.step)))
            for info in self.store.checkpoints()
        ]

    def best_step(self, metric: str, mode: Literal["min", "max"] = "min") -> int:
        """The committed step with the best recorded ``metric`` (as ``keep_best`` ranks it:
        NaN and missing values ignored, ties to the earlier step)."""
        chosen = KeepBest(1, metric, mode).select(
            RetentionContext(checkpoints=self.checkpoints(), now=self.clock())
        )
        if not chosen:
            raise CheckpointError(f"no committed checkpoint in this run recorded {metric!r}")
        return next(iter(chosen))

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        steps = self.store.steps()
        return steps[-1] if steps else None

    def restore(
        self, state: MutableMapping[str, Any], *, step: int | None = None, strict: bool = True
    ) -> int:
        """Load the newest checkpoint that verifies into ``state``; returns its step.

        Returns 0 when the run has no checkpoint (so ``range(start + 1, ...)`` starts a
        fresh run). A checkpoint that fails verification is skipped with a
        :class:`RestoreWarning` and the next older one is tried; with an explicit ``step``
        a failure raises :class:`~ckptwise.errors.CorruptCheckpointError` instead.

        Tensors are read straight into the state's own memory where they fit, so a restore
        that raises may leave the state partly overwritten.
        """
        started = time.perf_counter()
        # read straight into the live tensors (model parameters, optimizer state): they
        # are captured under the names they were saved with, and alias the live memory
        live = capture({**state, RNG_KEY: RngState()} if self.rng else dict(state)).tensors
        found = self._newest_verified(step, into=live)
        if found is None:
            return 0
        candidate, manifest, tensors = found
        where = f"checkpoint at step {candidate}"
        apply(state, manifest.tree, tensors, strict=strict, where=where)
        if self.rng and RNG_KEY in manifest.tree:
            apply({RNG_KEY: RngState()}, manifest.tree, tensors, where=where)
        self._adopt(candidate, manifest)
        _report("restored step", candidate, manifest.logical_bytes, time.perf_counter() - started)
        return candidate

    def resume_values(self, step: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """Like :meth:`restore`, for adapters that load the state themselves.

        Returns the step and every saved value (RNG states under ``"__rng__"``) of the
        newest checkpoint that verifies, and continues this run from it (metric history,
        protection of the resumed-from checkpoint); ``None`` when there is none.
        """
        found = self._newest_verified(step)
        if found is None:
            return None
        candidate, manifest, tensors = found
        values = {key: rebuild(manifest.tree, tensors, key) for key in manifest.tree}
        self._adopt(candidate, manifest)
        return candidate, values

    def _newest_verified(
        self, step: int | None, *, into: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[int, Manifest, dict[str, torch.Tensor]] | None:
        for path, why in self.store.broken.items():
            warnings.warn(
                f"skipping unreadable manifest {path}: {why}", RestoreWarning, stacklevel=3
            )
        candidates = [step] if step is not None else sorted(self.store.steps(), reverse=True)
        for candidate in candidates:
            manifest = self.store.manifest(candidate)
            kind = _variant_label(manifest).split("/")[0]
            if kind != "full":
                if step is not None:
                    raise CheckpointError(
                        f"step {candidate} holds {kind} only and cannot resume training; "
                        "load() or export() it, or restore a full checkpoint"
                    )
                continue
            try:
                return candidate, manifest, self.store.load_tensors(candidate, into=into)
            except CorruptCheckpointError as exc:
                if step is not None:
                    raise
                warnings.warn(
                    f"checkpoint at step {candidate} fails verification ({exc}); "
                    "falling back to an older one",
                    RestoreWarning,
                    stacklevel=3,
                )
        if candidates:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.store.backend.url} verifies (tried steps "
                f"{', '.join(map(str, candidates))}); run `ckptwise verify` for details"
            )
        return None

    def _adopt(self, step: int, manifest: Manifest) -> None:
        self._progress.restore_json(manifest.extra, step=step, now=self.clock())
        self.resumed_from = step

    def load(self, step: int | None = None) -> dict[str, Any]:
        """A checkpoint's saved values without a live state: state dicts, tensors, values.

        ``step`` defaults to the newest. Tensors are verified as they are read.
        """
        step = self._resolve(step)
        manifest = self.store.manifest(step)
        tensors = self.store.load_tensors(step)
        return {
            key: rebuild(manifest.tree, tensors, key) for key in manifest.tree if key != RNG_KEY
        }

    def export(
        self, step: int | None, out_dir: str | os.PathLike[str], *, key: str = "model"
    ) -> Path:
        """Write the weights under ``key`` as ``out_dir/model.safetensors``; returns the path.

        The file is plain safetensors: ``safetensors.torch.load_file`` reads it and
        ``model.load_state_dict`` accepts what it returns.
        """
        from safetensors.torch import save_file

        step = self._resolve(step)
        manifest = self.store.manifest(step)
        prefix = f"{key}/"
        names = [n for n in manifest.tensors if n.startswith(prefix)]
        if not names:
            raise CheckpointError(
                f"checkpoint at step {step} has no tensors under {key!r}; its entries are "
                f"{', '.join(k for k in manifest.tree if k != RNG_KEY)}; pass key=..."
            )
        weights = {
            n[len(prefix) :]: self.store.read_tensor(manifest.tensors[n], step=step, name=n)
            for n in names
        }
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.safetensors"
        save_file(weights, str(path), metadata={"format": "pt", "ckptwise_step": str(step)})
        return path

    def archive(
        self,
        step: int | None,
        out: str | os.PathLike[str],
        *,
        lossy: tuple[str, ...] = ("optimizer/",),
        codec: str = "bytegroup",
    ) -> CheckpointInfo:
        """Copy one checkpoint into a new run at ``out``, quantizing some tensors (lossy).

        Float tensors whose names start with a prefix in ``lossy`` (by default the optimizer
        state: Adam moments) are stored as blockwise int8 (codec ``q8``), in the spirit of
        Check-N-Run and ExCP; every other tensor is copied exactly with ``codec``. Each lossy
        entry's note records its maximum and relative error. The copy restores like any
        checkpoint (with the quantized optimizer state); the original run is untouched.
        Opt-in only: nothing lossy ever happens in a training run's own saves.
        """
        step = self._resolve(step)
        manifest = self.store.manifest(step)
        tensors = self.store.load_tensors(step)
        backend = open_backend(out)
        lock = RunLock(backend)
        lock.acquire()
        try:
            target = CheckpointStore(backend, codec=codec)
            if target.steps():
                raise CheckpointError(
                    f"{backend.url} already holds checkpoints; archive into a new folder"
                )
            return target.commit(
                step,
                tensors,
                tree=manifest.tree,
                metrics=manifest.metrics,
                reasons=manifest.reasons,
                extra={
                    **manifest.extra,
                    "archive": {"from": self.store.backend.url, "lossy": list(lossy)},
                },
                time=manifest.time,
                lossy=[n for n in tensors if n.startswith(lossy)],
            )
        finally:
            lock.release()

    def _resolve(self, step: int | None) -> int:
        if step is not None:
            return step
        latest = self.latest_step()
        if latest is None:
            raise CheckpointError(f"run {self.store.backend.url} has no committed checkpoint")
        return latest

    # -- lifetime --------------------------------------------------------------------------

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight (if any) has committed; re-raise its error."""
        info = self._writer.wait()
        self._finish(info)
        return info

    def close(self) -> None:
        """Wait for the last write, then release the run's lock. Safe to call twice."""
        if self._closed:
            return
        try:
            self._finish(self._writer.wait())
            self._writer.close()
        finally:
            self._closed = True
            if self._monitor is not None:
                self._monitor.close()
            self._lock.release()

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
        return f"CheckpointManager({self.store.backend.url!r}, {mode}, steps={self.store.steps()})"
