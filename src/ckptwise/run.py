"""The read-only view of a run: list, resolve, load, restore with fallback, verify, export.

A :class:`Run` never takes the write lock and never deletes anything, so it can be opened
while a training process writes to the same folder: the command line, evaluation scripts
and the framework adapters read through it, and :class:`~ckptwise.CheckpointManager`
uses one for its own reads. The module is long because :class:`Run` is the whole public
read API; what it computes lives elsewhere (:mod:`ckptwise.usage`,
:mod:`ckptwise.distributed.restore`, :mod:`ckptwise.archive`, :mod:`ckptwise.formats`).

>>> import ckptwise as cw
>>> run = cw.open_run("runs/exp1")  # doctest: +SKIP
>>> run.latest_step(), run.best_step("eval_loss")  # doctest: +SKIP
(4000, 3000)
>>> run.restore({"model": model})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptwise.archive import archive_copy
from ckptwise.distributed.ranks import Failure, Ranks
from ckptwise.distributed.restore import (
    damaged_object,
    placeholders,
    prime_optimizers,
    read_rank,
    sharded_names,
)
from ckptwise.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
)
from ckptwise.formats import copy_hf_metadata, write_safetensors
from ckptwise.policy import KeepBest, RetentionContext, Variant
from ckptwise.records import CheckpointInfo
from ckptwise.report import Transfer
from ckptwise.snapshot import (
    RNG_KEY,
    RngState,
    apply,
    capture,
    fit_problems,
    misfit_message,
    rebuild,
    tensor_names,
)
from ckptwise.store import CheckpointStore, Manifest, Problem, TensorEntry, open_backend, runfile
from ckptwise.store.branch import BranchBackend, check_branch_name
from ckptwise.store.layout import CHECKPOINTS
from ckptwise.usage import TensorChange, Usage, diff_manifests, usage_of

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "Loaded",
    "Manifest",
    "Problem",
    "RestoreWarning",
    "Run",
    "TensorChange",
    "TensorEntry",
    "Usage",
    "open_run",
]

log = logging.getLogger("ckptwise")

Mode = Literal["min", "max"]
#: what names one checkpoint: a step, ``"latest"`` or ``"best"`` (or their text)
StepSpec = int | str | None


#: failures that make a restore fall back to an older checkpoint (the bytes are bad)
_CORRUPT = frozenset({"CorruptCheckpointError", "FormatError"})


class RestoreWarning(UserWarning):
    """Something about a restore the caller should know: a checkpoint skipped because it
    fails verification, saved entries the state left out, a change in the number of
    processes, a run holding only checkpoints that cannot resume training."""


def _variant(manifest: Manifest) -> Variant:
    """What a checkpoint holds, from the manager's bookkeeping (full when it says nothing)."""
    return Variant.from_json(manifest.extra.get("variant"))


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read and verified: its step, manifest and tensors by name."""

    step: int
    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]
    #: whose part of a multi-process checkpoint was read
    rank: int = 0

    @property
    def tree(self) -> dict[str, Any]:
        """The state tree of the rank read (rank 0's for a rank the checkpoint lacked)."""
        return self.manifest.tree_of(self.rank if self.rank < self.manifest.world_size else 0)

    def values(self, *, rng: bool = False) -> dict[str, Any]:
        """Every saved entry rebuilt (state dicts, tensors, JSON values); RNG states under
        ``"__rng__"`` only with ``rng=True``."""
        tree = self.tree
        return {k: rebuild(tree, self.tensors, k) for k in tree if rng or k != RNG_KEY}


def open_run(
    root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Run:
    """Open the run at ``root`` (a folder or an fsspec URL) for reading.

    A folder with no checkpoint yet opens as an empty run.
    """
    backend = open_backend(root, **dict(storage_options or {}))
    return Run(CheckpointStore(backend))


class Run:
    """The committed checkpoints of one run, for reading. Create it with :func:`open_run`."""

    def __init__(self, store: CheckpointStore) -> None:
        self._store = store

    @property
    def url(self) -> str:
        """Where the run lives: a local path or the URL it was opened with."""
        return self._store.backend.url

    def exists(self) -> bool:
        """Whether anything of a run is there (an empty or missing folder is no run)."""
        return bool(self._store.backend.list_files(""))

    def refresh(self) -> None:
        """Re-read the list of committed checkpoints (another process may have written)."""
        self._store.refresh()

    # -- listing ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return self._store.steps()

    def manifest(self, step: int) -> Manifest:
        """The manifest of a committed step: its tensors (object, dtype, shape, codec, ...),
        metrics, reasons and the manager's bookkeeping."""
        return self._store.manifest(step)

    def info(self, step: int) -> CheckpointInfo:
        """The summary of one committed step (as :meth:`checkpoints` lists it)."""
        return replace(self._store.info(step), variant=_variant(self.manifest(step)).label)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first, with step, time, metrics, bytes and what each
        holds (``variant``: ``full`` or a slim kind)."""
        return [self.info(step) for step in self.steps()]

    def branches(self) -> dict[str, list[int]]:
        """The run's branches: checkpoints a rollback set aside, by branch name, each with
        its steps, oldest first.

        When training goes back (a save at a step earlier than the run's newest checkpoint),
        the writer moves the later checkpoints to a branch instead of letting them shadow
        what is trained from then on; read one with :meth:`branch`.
        """
        return {
            name: sorted(m.step for m in manifests)
            for name, manifests in sorted(self._store.branches().items())
        }

    def branch(self, name: str) -> Run:
        """A read-only :class:`Run` over the checkpoints of branch ``name`` (list, verify,
        load, restore, export them as a run's own)."""
        if check_branch_name(name) not in self._store.branches():
            have = ", ".join(sorted(self._store.branches())) or "none"
            raise CheckpointNotFoundError(f"run {self.url} has no branch {name!r} (have: {have})")
        return Run(CheckpointStore(BranchBackend(self._store.backend, name)))

    @property
    def unreadable(self) -> dict[str, str]:
        """Manifest files that exist but cannot be read, with the reason."""
        return dict(self._store.broken)

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self, metric: str, mode: Mode = "min") -> int:
        """The committed step with the best recorded ``metric``, ranked as ``keep_best``
        ranks (NaN and missing values ignored, ties to the earlier step)."""
        chosen = KeepBest(1, metric, mode).select(
            RetentionContext(checkpoints=self.checkpoints(), now=datetime.now(UTC))
        )
        if not chosen:
            recorded = sorted({m for c in self.checkpoints() for m in c.metrics})
            raise CheckpointError(
                f"no committed checkpoint in {self.url} recorded {metric!r} (recorded: "
                f"{', '.join(recorded) or 'no metrics'})"
            )
        return next(iter(chosen))

    def resolve(
        self, step: StepSpec = None, *, metric: str | None = None, mode: Mode = "min"
    ) -> int:
        """The step that ``step`` names: a number (or its text), ``"latest"`` (also ``None``)
        or ``"best"`` by ``metric``."""
        if step is None or step == "latest":
            latest = self.latest_step()
            if latest is None:
                raise CheckpointError(f"run {self.url} has no committed checkpoint")
            return latest
        if step == "best":
            if not metric:
                raise ConfigError(
                    "step='best' needs the metric to rank by, e.g. metric='eval_loss'"
                )
            return self.best_step(metric, mode)
        if isinstance(step, str):
            try:
                return int(step)
            except ValueError:
                raise ConfigError(f"{step!r} is not a step, 'best' or 'latest'") from None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ConfigError(f"step must be an int, 'best' or 'latest', got {step!r}")
        return step

    # -- reading ---------------------------------------------------------------------------

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        """One tensor of a committed step (rank 0's; a sharded one whole), verified."""
        manifest = self.manifest(step)
        if name not in manifest.tensors:
            raise CheckpointError(f"checkpoint at step {step} has no tensor {name!r}")
        return read_rank(self._store, manifest, rank=0, names=[name])[name]

    def read(
        self,
        step: int | None = None,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        full_only: bool = False,
        rank: int = 0,
        ranks: Ranks | None = None,
    ) -> Loaded | None:
        """The newest checkpoint that verifies (or exactly ``step``), read and verified.

        Without ``step`` a checkpoint that fails verification is skipped with a
        :class:`RestoreWarning` and the next older one is tried; ``None`` when the run is
        empty. With ``step`` a failure raises. ``full_only`` skips slim (weights-only)
        checkpoints, which cannot resume training. ``into`` maps tensor names to live
        tensors to read straight into where they fit. ``rank`` picks which rank's part of a
        multi-process checkpoint to read (sharded tensors come back whole unless ``into``
        holds a ``DTensor`` for them). With ``ranks`` (a multi-process job, every rank
        calling), the ranks agree: a checkpoint counts as verified only if it verified on
        every rank.
        """
        return self._read(step, into=into, full_only=full_only, rank=rank, ranks=ranks)

    def _read(
        self,
        step: int | None,
        *,
        into: Mapping[str, torch.Tensor] | None,
        full_only: bool,
        rank: int,
        ranks: Ranks | None,
        prepare: Callable[[Manifest], Collection[str] | None] | None = None,
    ) -> Loaded | None:
        """:meth:`read`; ``prepare`` is called with each candidate's manifest before any of
        its tensors is read: it raises to stop the read (on every rank), and returns the
        names of the tensors to read (``None``: all of them)."""
        for path, why in self.unreadable.items():
            warnings.warn(
                f"skipping unreadable manifest {path}: {why}", RestoreWarning, stacklevel=3
            )
        candidates = self._candidates(step, full_only)
        if ranks is not None:
            candidates = ranks.broadcast(candidates)
        for candidate in candidates:
            manifest = self.manifest(candidate)
            failure: Exception | None = None
            tensors: dict[str, torch.Tensor] = {}
            try:
                names = None if prepare is None else prepare(manifest)
                tensors = read_rank(self._store, manifest, rank=rank, into=into, names=names)
            except Exception as exc:
                if ranks is None and not isinstance(exc, CorruptCheckpointError):
                    raise
                failure = exc
            if ranks is not None:
                # every rank must take the same path: fall back together, or raise together
                mine = None if failure is None else Failure.of(rank, failure)
                failures = [f for f in ranks.all_gather(mine) if f is not None]
                if any(f.kind not in _CORRUPT for f in failures):
                    first = next(f for f in failures if f.kind not in _CORRUPT)
                    raise first.error(f"reading step {candidate}") from failure
                if failures and failure is None:
                    failure = CorruptCheckpointError(
                        f"rank {failures[0].rank}: {failures[0].message}"
                    )
            if failure is None:
                return Loaded(candidate, manifest, tensors, rank)
            if step is not None:
                raise failure
            warnings.warn(
                f"checkpoint at step {candidate} fails verification ({failure}); "
                "falling back to an older one",
                RestoreWarning,
                stacklevel=3,
            )
        if candidates:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.url} verifies (tried steps "
                f"{', '.join(map(str, candidates))}); run `ckptwise verify` for details"
            )
        return None

    def _candidates(self, step: int | None, full_only: bool) -> list[int]:
        """The steps :meth:`read` tries, newest first (only ``step`` when given)."""
        if step is not None:
            if full_only:
                kind = _variant(self.manifest(step)).kind
                if kind != "full":
                    raise CheckpointError(
                        f"step {step} holds {kind} only and cannot resume training; "
                        "load() or export() it, or restore a full checkpoint"
                    )
            return [step]
        steps = sorted(self.steps(), reverse=True)
        if not full_only:
            return steps
        return [s for s in steps if _variant(self.manifest(s)).kind == "full"]

    def load(self, step: StepSpec = None) -> dict[str, Any]:
        """A checkpoint's saved values without a live state: state dicts, tensors, values
        (``step`` defaults to the newest). Tensors are verified as they are read."""
        loaded = self.read(self.resolve(step))
        assert loaded is not None  # an explicit step either reads or raises
        return loaded.values()

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        strict: bool = True,
        rng: bool = False,
        missing: Literal["start", "error"] = "start",
        ranks: Ranks | None = None,
        rank: int | None = None,
    ) -> int:
        """Load the newest full checkpoint that verifies into ``state``; returns its step.

        The whole state is checked against the checkpoint before anything is written into
        it (see :mod:`ckptwise.mismatch`): modules' keys, shapes and dtypes, optimizers'
        parameter groups and per-parameter state shapes, plain tensors' shapes and dtypes.
        A state that does not fit raises one :class:`~ckptwise.ConfigError` naming the
        checkpoint, every entry and key that differs, and the fix; the state is unchanged.
        ``strict`` means every entry of ``state`` must be in the checkpoint (torch's
        convention); saved entries that ``state`` leaves out are named in a
        :class:`RestoreWarning`, and their tensors are not read.

        With no checkpoint to restore, ``missing="start"`` returns 0 (so
        ``range(start + 1, ...)`` starts a fresh run) and ``missing="error"`` raises
        :class:`~ckptwise.CheckpointNotFoundError` naming the folder (and a run one folder
        down, such as a Trainer's ``output_dir/ckptwise``, when there is one). Which step
        was restored, or that none was, is logged at INFO on the ``ckptwise`` logger.

        A checkpoint that fails verification is skipped with a :class:`RestoreWarning`; with
        an explicit ``step`` the failure raises :class:`~ckptwise.CorruptCheckpointError`.
        ``rng=True`` also puts back the saved Python, numpy, torch and CUDA RNG states. It is
        off here, so reading a checkpoint for evaluation leaves the process's generators
        alone; the manager's restore, which resumes training, turns it on.

        In a multi-process job every rank calls this with ``ranks`` (the manager passes its
        own): each restores its own part, on the same or another number of ranks, and all
        restore the same step, or all raise. Without ``ranks``, ``rank`` picks whose
        per-rank state (RNG, data position) a multi-process checkpoint gives back (rank 0's
        by default).

        Tensors are read straight into the state's own memory where they fit, once the check
        has passed. Bytes that fail verification while being read may still leave such
        tensors overwritten: the fallback to an older checkpoint then overwrites them again,
        and if no checkpoint verifies the state must be rebuilt.
        """
        if missing not in ("start", "error"):
            raise ConfigError(
                f"missing= must be 'start' (return 0 when there is no checkpoint) or 'error', "
                f"got {missing!r}"
            )
        entries = {**state, RNG_KEY: RngState()} if rng else dict(state)
        rank = ranks.rank if ranks is not None else rank or 0

        def prepare(manifest: Manifest, say: bool = True) -> set[str]:
            """Check ``state`` against one checkpoint; the names of the tensors it needs."""
            mine = rank if rank < manifest.world_size else 0
            tree = manifest.tree_of(mine)
            names = tensor_names(tree, entries)
            where = f"checkpoint at step {manifest.step} of {self.url}"
            found, blamed = fit_problems(state, tree, placeholders(manifest, mine), strict=strict)
            if found:
                # blame the state only if the checkpoint holds what its manifest says: one
                # object that does is proof enough (another damaged one is found by the read)
                damage = damaged_object(self._store, manifest, mine, blamed[:1])
                if damage is not None:
                    raise CorruptCheckpointError(f"step {manifest.step}, {damage}")
                raise ConfigError(misfit_message(where, found))
            if not say:
                return names
            log.info(
                "restoring step %d of %s: %s%s",
                manifest.step,
                self.url,
                ", ".join(repr(k) for k in state if k in tree) or "nothing",
                " and the RNG states" if rng and RNG_KEY in tree else "",
            )
            return names

        # the live tensors are captured under the names they were saved with and alias the
        # live memory, so the read fills them in place
        live = capture(entries).tensors
        if ranks is not None:
            newest = ranks.broadcast(self._candidates(step, full_only=True)[:1])
            if newest:
                manifest = self.manifest(newest[0])
                # checked before optimizers are primed: a state that does not fit stays as is
                _on_every_rank(
                    ranks, lambda: prepare(manifest, say=False), f"checking step {newest[0]}"
                )
                if sharded_names(manifest) - live.keys() and prime_optimizers(state):
                    live = capture(entries).tensors  # sharded optimizer state to read into
        with Transfer("restoring", show=ranks is None or ranks.coordinator) as transfer:
            loaded = self._read(
                step, into=live, full_only=True, rank=rank, ranks=ranks, prepare=prepare
            )
            if loaded is None:
                self._nothing_to_restore(missing)
                return 0
            transfer.total = loaded.manifest.logical_bytes
            where = f"checkpoint at step {loaded.step} of {self.url}"
            saved_by, now_on = loaded.manifest.world_size, 1 if ranks is None else ranks.size
            if saved_by != now_on:
                warnings.warn(
                    f"{where} was saved by {saved_by} process(es) and is restored on {now_on}: "
                    "sharded tensors are resharded; per-rank entries (RNG states, data positions) "
                    f"are those of rank {rank if rank < saved_by else 0}",
                    RestoreWarning,
                    stacklevel=2,
                )
            tree = loaded.tree
            apply(state, tree, loaded.tensors, strict=strict, where=where)
            if rng and RNG_KEY in tree:
                apply({RNG_KEY: RngState()}, tree, loaded.tensors, where=where)
            left = [k for k in tree if k not in state and k != RNG_KEY]
            if left:
                warnings.warn(
                    f"{where} also holds {', '.join(map(repr, left))}, which were not restored "
                    "(the state passed to restore() has no entry for them); add them to the state "
                    "to restore them",
                    RestoreWarning,
                    stacklevel=2,
                )
            transfer.finish(loaded.manifest.logical_bytes, f"restored step {loaded.step}")
        return loaded.step

    def _nothing_to_restore(self, missing: str) -> None:
        """Raise (``missing="error"``) or log that the run has no checkpoint to restore,
        saying why, and naming a run one folder down when there is one."""
        steps = self.steps()
        if steps:
            why = (
                f"run {self.url} holds only weights-only checkpoints (steps "
                f"{', '.join(map(str, steps))}), which cannot resume training"
            )
        elif self.unreadable:
            why = (
                f"no checkpoint of {self.url} can be read ({len(self.unreadable)} unreadable "
                f"manifest(s); `ckptwise verify {self.url}` lists them)"
            )
        elif self.exists():
            why = f"run {self.url} has no committed checkpoint yet"
        else:
            why = f"{self.url} holds no ckptwise run"
        below = [] if steps else _runs_below(self._store.backend)
        if below:
            why += f"; did you mean {' or '.join(below)}?"
        if missing == "error":
            raise CheckpointNotFoundError(
                f"nothing to restore: {why}. Pass the run's folder (the one holding "
                f"{CHECKPOINTS}/), or missing='start' to start from scratch when there is none"
            )
        if steps:
            warnings.warn(
                f"nothing restored: {why}; starting from scratch", RestoreWarning, stacklevel=3
            )
        log.info("nothing to restore: %s; starting from scratch", why)

    def verify(self, steps: list[int] | None = None) -> list[Problem]:
        """Check every object of ``steps`` (all by default) against its checksum; empty when
        all is well. Unreadable manifests are problems too."""
        return self._store.verify(steps)

    # -- what it stores --------------------------------------------------------------------

    def physical_bytes(self) -> int:
        """Bytes of every object the committed checkpoints reference, each counted once."""
        return self._store.physical_bytes()

    def object_bytes(self) -> dict[str, int]:
        """Stored size of every object a committed checkpoint references."""
        return self._store.object_bytes()

    def usage(self) -> Usage:
        """Per checkpoint: logical, written, exclusive and shared bytes; what dedup and
        compression saved over the run."""
        return usage_of({s: self.manifest(s) for s in self.steps()})

    def first_stored(self, step: int) -> dict[str, int]:
        """For each tensor of ``step``, the oldest committed step that holds its object
        (``step`` itself when it wrote the object)."""
        earliest: dict[str, int] = {}
        for s in self.steps():
            if s > step:
                break
            for entry in self.manifest(s).tensors.values():
                earliest.setdefault(entry.object, s)
        return {name: earliest[e.object] for name, e in self.manifest(step).tensors.items()}

    def diff(self, a: int, b: int) -> list[TensorChange]:
        """Which tensors changed from step ``a`` to step ``b``, and by how much."""
        return diff_manifests(self.manifest(a), self.manifest(b), self.read_tensor, a, b)

    # -- pins and the last retention decision ----------------------------------------------

    def pins(self) -> set[int]:
        """Steps pinned in this run (kept whatever the retention policy says)."""
        return runfile.read_pins(self._store.backend)

    def pin(self, step: int) -> None:
        """Keep ``step`` whatever the retention policy says, until :meth:`unpin`.

        Safe while a writer trains and prunes: once this returns, the step is never deleted
        (see :mod:`ckptwise.store.runfile` for the handshake).

        Raises:
            CheckpointNotFoundError: the step has no checkpoint, or the writer's retention
                is deleting it right now (pin a newer step).
        """
        runfile.pin(self._store.backend, step)

    def unpin(self, step: int) -> None:
        """Let the retention policy decide about ``step`` again (at the next prune)."""
        runfile.unpin(self._store.backend, step)

    def kept(self) -> dict[int, list[str]]:
        """Why each checkpoint was kept, as the writer's last retention decision recorded."""
        return self._store.kept()

    # -- getting it out --------------------------------------------------------------------

    def export(
        self,
        step: StepSpec,
        out_dir: str | os.PathLike[str],
        *,
        key: str = "model",
        config_from: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Write the weights under ``key`` as ``out_dir/model.safetensors``; returns the path.

        The file is plain safetensors: ``safetensors.torch.load_file`` reads it and
        ``model.load_state_dict`` accepts what it returns. With ``config_from`` (a model
        folder) its config and tokenizer JSON files are copied too, so the folder loads with
        ``from_pretrained``.
        """
        chosen = self.resolve(step)
        manifest = self.manifest(chosen)
        prefix = f"{key}/"
        names = [n for n in manifest.tensors if n.startswith(prefix)]
        if not names:
            raise CheckpointError(
                f"checkpoint at step {chosen} has no tensors under {key!r}; its entries are "
                f"{', '.join(k for k in manifest.tree if k != RNG_KEY)}; pass key=..."
            )
        read = read_rank(self._store, manifest, rank=0, names=names)
        weights = {n[len(prefix) :]: read[n] for n in names}
        path = write_safetensors(weights, Path(out_dir) / "model.safetensors", step=chosen)
        if config_from is not None:
            copy_hf_metadata(config_from, out_dir)
        return path

    def archive(
        self,
        step: StepSpec,
        out: str | os.PathLike[str],
        *,
        lossy: tuple[str, ...] = ("optimizer/",),
        codec: str = "bytegroup",
    ) -> CheckpointInfo:
        """Copy one checkpoint into a new run at ``out``, quantizing some tensors (lossy).

        Float tensors whose names start with a prefix in ``lossy`` (by default the optimizer
        state: Adam moments) are stored as blockwise int8, in the spirit of Check-N-Run and
        ExCP; every other tensor is copied exactly with ``codec``. Each lossy entry's note
        records its maximum and relative error. The copy restores like any checkpoint (with
        the quantized optimizer state); this run is untouched. Opt-in only: nothing lossy
        ever happens in a training run's own saves.
        """
        loaded = self.read(self.resolve(step))
        assert loaded is not None  # an explicit step either reads or raises
        return archive_copy(loaded, self.url, out, lossy=lossy, codec=codec)

    def __repr__(self) -> str:
        return f"Run({self.url!r}, steps={self.steps()})"


def _on_every_rank(ranks: Ranks, action: Callable[[], object], what: str) -> None:
    """Run ``action`` on every rank; if it raised on any, raise on all (never on some only,
    which would leave the others waiting in the next collective)."""
    error: Exception | None = None
    try:
        action()
    except Exception as exc:
        error = exc
    mine = None if error is None else Failure.of(ranks.rank, error)
    failures = [f for f in ranks.all_gather(mine) if f is not None]
    if failures:
        raise failures[0].error(what) from error


def _runs_below(backend: object, most: int = 3) -> list[str]:
    """Runs in the folders right inside a local folder, such as the ``ckptwise`` run
    inside a Trainer's ``output_dir`` (remote stores are not listed: that costs)."""
    root = getattr(backend, "root", None)
    if not isinstance(root, str) or not os.path.isdir(root):
        return []
    try:
        with os.scandir(root) as entries:
            folders = sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    return [f for f in folders if os.path.isdir(os.path.join(f, CHECKPOINTS))][:most]
