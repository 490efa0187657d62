"""The read-only view of a run: list, resolve, load, restore with fallback, verify, export.

A :class:`Run` never takes the write lock and never deletes anything, so it can be opened
while a training process writes to the same folder: the command line, evaluation scripts
and the framework adapters read through it, and :class:`~ckptwise.CheckpointManager`
uses one for its own reads. :class:`Run` is the whole public read API and computes little
itself: restore planning (fallback, the fit check) is in :mod:`ckptwise.read.restoring`,
the rest in :mod:`ckptwise.read.usage`, :mod:`ckptwise.distributed.restore`,
:mod:`ckptwise.read.archive` and :mod:`ckptwise.read.formats`.

It is long because it is the whole public read API, each method documented for users; the
work behind them lives in the modules named above.

>>> import ckptwise as cw
>>> run = cw.open_run("runs/exp1")  # doctest: +SKIP
>>> run.latest_step(), run.best_step("eval_loss")  # doctest: +SKIP
(4000, 3000)
>>> run.restore({"model": model})  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ckptwise.distributed.ranks import Ranks
from ckptwise.distributed.restore import read_rank
from ckptwise.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ckptwise.policy import KeepBest, RetentionContext
from ckptwise.read.archive import archive_copy
from ckptwise.read.hf_model import (
    AS_TRAINED,
    HF_MODEL_KEY,
    ExportedFolder,
    HfModelRecord,
    Layout,
    export_dtype,
    write_model_folder,
)
from ckptwise.read.restoring import (
    MOST_REMOVED,
    Loaded,
    RestoreWarning,
    catch_up,
    read_first_good,
    restore_state,
    variant_of,
)
from ckptwise.read.usage import TensorChange, Usage, diff_manifests, usage_of
from ckptwise.records import CheckpointInfo
from ckptwise.snapshot import RNG_KEY, rebuild, tensor_names
from ckptwise.store import (
    CheckpointStore,
    FsspecBackend,
    Manifest,
    Problem,
    TensorEntry,
    TieredBackend,
    UploadState,
    is_cache_folder,
    open_store,
)

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
    "cache_folders",
    "open_run",
]

T = TypeVar("T")
Mode = Literal["min", "max"]
#: what names one checkpoint: a step, ``"latest"`` or ``"best"`` (or their text)
StepSpec = int | str | None


def cache_folders(caches: Iterable[str | os.PathLike[str]]) -> tuple[dict[int, str], bool]:
    """The cache folders ``caches`` name, by rank, and whether they are one writer's own
    cache folder (one process, given as rank 0) rather than the folders the nodes of a job
    of several were given (each ``rank-NNNNN`` folder inside them).

    Raises:
        ConfigError: a folder is neither, or a one-process folder comes with others.
    """
    found: dict[int, str] = {}
    single: list[str] = []
    for cache in (os.fspath(c) for c in caches):
        if is_cache_folder(cache):
            single.append(cache)
            continue
        inside = sorted(Path(cache).glob("rank-[0-9]*")) if os.path.isdir(cache) else []
        ranks = [r for r in inside if r.name[5:].isdigit() and is_cache_folder(r)]
        if not ranks:
            raise ConfigError(
                f"{cache} is no ckptwise cache folder: it holds no cache.json and no rank-NNNNN "
                "folders; pass the folder the writer (or a node of the job) was given as cache="
            )
        found.update((int(folder.name[5:]), str(folder)) for folder in ranks)
    if single and (found or len(single) > 1):
        raise ConfigError(
            "a one-process cache folder was named beside other folders: name one writer's "
            "cache folder, or the nodes' cache folders of one job"
        )
    return ({0: single[0]}, True) if single else (found, False)


def open_run(
    root: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> Run:
    """Open the run at ``root`` (a folder or an fsspec URL) for reading.

    A folder with no checkpoint yet opens as an empty run. ``cache``: the local folder a
    writer of the remote run ``root`` was given as ``cache=``; the run then also lists what
    that writer has not uploaded yet, and :meth:`Run.upload_states` says which checkpoints
    are durable remotely. Nothing is written to either.

    Raises:
        ConfigError: ``cache`` is no cache folder of ``root``.
    """
    if cache is not None and not is_cache_folder(cache):
        raise ConfigError(
            f"{os.fspath(cache)} is no ckptwise cache folder (it holds no cache.json); pass "
            "the folder the writer was given as cache="
        )
    return Run(open_store(root, cache=cache, storage_options=storage_options))


class Run:
    """The committed checkpoints of one run, for reading. Create it with :func:`open_run`.

    The run of a writing :class:`~ckptwise.CheckpointManager` (``manager.run``) waits for a
    save still writing in the background when asked for that very step (its manifest, load,
    restore, verify, export, archive, pin): ``manager.step(n, state)`` then
    ``manager.run.export(n, out)`` exports step ``n``. Listings (``steps()``,
    ``checkpoints()``, ``"latest"``) show what has committed and never wait.
    """

    def __init__(
        self, store: CheckpointStore, *, settle: Callable[[int], None] | None = None
    ) -> None:
        self._store = store
        self._settle = settle

    @property
    def url(self) -> str:
        """Where the run lives: a local path or the URL it was opened with."""
        return self._store.url

    def manifest_path(self, step: int) -> str:
        """Where the manifest of ``step`` lives (or would): :attr:`url` and its path in the
        run, for messages and loggers that name a checkpoint's file."""
        return f"{self.url}/{self._store.manifest_path(step)}"

    def upload_states(self) -> dict[int, UploadState] | None:
        """For a run opened through a ``cache``: each checkpoint's upload state (``"local"``,
        ``"uploading"`` while the writer holds the cache, ``"remote"``); ``None`` otherwise."""
        return self._store.upload_states()

    def rank_upload_states(self, cache: str | os.PathLike[str]) -> dict[int, UploadState]:
        """Where the objects one rank of a job of several wrote through its own cache folder
        (``cache``: a ``rank-00003`` folder inside the folder a node named as ``cache=``) are
        durable, for each listed checkpoint: ``"local"`` or ``"uploading"`` (while its
        writer runs) when the folder still holds some of them unsent, else ``"remote"``.
        Rank 0's folder answers :meth:`upload_states` for the manifests themselves.

        Raises:
            ConfigError: ``cache`` is no cache folder of this run.
        """
        if not is_cache_folder(cache):
            raise ConfigError(
                f"{os.fspath(cache)} is no ckptwise cache folder (it holds no cache.json); pass "
                "a rank's folder inside the folder the job was given as cache="
            )
        remote = self._store.backend.lock_backend()
        if not isinstance(remote, FsspecBackend):
            raise ConfigError(f"{self.url} is not a remote run: it has no upload states")
        folder = TieredBackend(cache, remote)
        out: dict[int, UploadState] = {}
        for manifest in self._store.iter_manifests():
            out[manifest.step] = folder.objects_state(manifest)
        return out

    def exists(self) -> bool:
        """Whether anything of a run is there (an empty or missing folder is no run)."""
        return self._store.has_files()

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
        self._committed(step)
        return self._store.manifest(step)

    def _committed(self, step: int | None) -> None:
        """Before reading ``step``: let the writing manager finish saving it (see the class)."""
        if self._settle is not None and step is not None:
            self._settle(step)

    def info(self, step: int) -> CheckpointInfo:
        """The summary of one committed step (as :meth:`checkpoints` lists it)."""
        self._committed(step)
        return replace(self._store.info(step), variant=variant_of(self.manifest(step)).label)

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
        branch = self._store.branch(name)  # ConfigError for a name that names no folder
        if name not in self._store.branches():
            have = ", ".join(sorted(self._store.branches())) or "none"
            raise CheckpointNotFoundError(f"run {self.url} has no branch {name!r} (have: {have})")
        return Run(branch)

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

    def _named(self, step: StepSpec, action: Callable[[int], T]) -> T:
        """``action`` on the step ``step`` names. When ``step`` names the newest checkpoint
        (``None`` or ``"latest"``) and the writer removes it while ``action`` reads it
        (:class:`~ckptwise.CheckpointNotFoundError`), the run is listed again and the
        newest one now is taken; a step given by number raises."""
        for _ in range(MOST_REMOVED):
            chosen = self.resolve(step)
            try:
                return action(chosen)
            except CheckpointNotFoundError:
                if step not in (None, "latest"):
                    raise
                catch_up(self._store, chosen)
        return action(self.resolve(step))

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
        empty. With ``step`` a failure raises. A checkpoint removed by a writer's retention
        while it is read is no failure: the newest checkpoint then is read instead, and
        with ``step`` :class:`~ckptwise.CheckpointNotFoundError` says it was removed.
        ``full_only`` skips slim (weights-only)
        checkpoints, which cannot resume training. ``into`` maps tensor names to live
        tensors to read straight into where they fit. ``rank`` picks which rank's part of a
        multi-process checkpoint to read (sharded tensors come back whole unless ``into``
        holds a ``DTensor`` for them). With ``ranks`` (a multi-process job, every rank
        calling), the ranks agree: a checkpoint counts as verified only if it verified on
        every rank.

        A rank the checkpoint did not have reads rank 0's entries, as a framework that loads
        one checkpoint on every rank does, and of the RNG states only the generators
        :meth:`restore` would give it; a read for resuming (``full_only``) on another number
        of ranks says so in a :class:`RestoreWarning`.
        """
        self._committed(step)
        return read_first_good(
            self._store,
            step,
            into=into,
            full_only=full_only,
            rank=rank,
            ranks=ranks,
            stacklevel=2,
        )

    def load(self, step: StepSpec = None) -> dict[str, Any]:
        """A checkpoint's saved values without a live state: state dicts, tensors, values
        (``step`` defaults to the newest). Tensors are verified as they are read.

        When the newest checkpoint (``None``, ``"latest"``) is removed by a writer's
        retention while it is read, the newest one then is loaded; a step given by number
        raises :class:`~ckptwise.CheckpointNotFoundError` saying it was removed, never
        :class:`~ckptwise.CorruptCheckpointError`."""
        loaded = self._named(step, self.read)
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
        it (see :mod:`ckptwise.snapshot.mismatch`): modules' keys, shapes and dtypes, optimizers'
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
        One that a writer's retention removes while it is read is not damaged: the newest
        checkpoint then is restored instead, and with an explicit ``step``
        :class:`~ckptwise.CheckpointNotFoundError` says it was removed.
        ``rng=True`` also puts back the saved Python, numpy, torch and CUDA RNG states. It is
        off here, so reading a checkpoint for evaluation leaves the process's generators
        alone; the manager's restore, which resumes training, turns it on.

        In a multi-process job every rank calls this with ``ranks`` (the manager passes its
        own): each restores its own part, on the same or another number of ranks, and all
        restore the same step, or all raise. Without ``ranks``, ``rank`` picks whose
        per-rank state (RNG, data position) a multi-process checkpoint gives back (rank 0's
        by default).

        On another number of ranks than saved it (one :class:`RestoreWarning` per rank says
        what it got): sharded tensors (FSDP2's) are cut to each rank's chunk now, and what
        every saved rank held alike (DDP's weights and optimizer state; all of a checkpoint
        of one process) is restored on every rank, bit-exactly. A rank that existed then
        restores its own per-rank entries; those of ranks that are gone are restored by
        none. A rank that did not exist keeps its own value of each entry that differed
        between the saved ranks (a data position of its own), and its own RNG generators
        unless every rank held them alike then and holds them alike now (one seed for all
        ranks), when it takes rank 0's: no two ranks draw one random stream that did not.
        A checkpoint of one process cannot tell which of its entries were meant per rank:
        each new rank gets them all, but the RNG generators the live ranks hold apart.

        Tensors are read straight into the state's own memory where they fit, once the check
        has passed. Bytes that fail verification while being read may still leave such
        tensors overwritten: the fallback to an older checkpoint then overwrites them again,
        and if no checkpoint verifies the state must be rebuilt.
        """
        self._committed(step)
        return restore_state(
            self._store,
            state,
            step=step,
            strict=strict,
            rng=rng,
            missing=missing,
            ranks=ranks,
            rank=rank,
            stacklevel=2,
        )

    def verify(self, steps: list[int] | None = None) -> list[Problem]:
        """Check every object of ``steps`` (all by default) against its checksum; empty when
        all is well. Unreadable manifests are problems too."""
        for step in steps or ():
            self._committed(step)
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
        compression saved over the run; and the objects no checkpoint names (a failed or
        interrupted save's, which the next writer removes)."""
        usage = usage_of({s: self.manifest(s) for s in self.steps()})
        count, size = self._store.unreferenced_bytes()
        return replace(usage, unreferenced_objects=count, unreferenced_bytes=size)

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
        return self._store.pins()

    def pin(self, step: int) -> None:
        """Keep ``step`` whatever the retention policy says, until :meth:`unpin`.

        Safe while a writer trains and prunes: once this returns, the step is never deleted
        (see :meth:`CheckpointStore.pin <ckptwise.store.CheckpointStore.pin>`).

        Raises:
            CheckpointNotFoundError: the step has no checkpoint, or the writer's retention
                is deleting it right now (pin a newer step).
        """
        self._committed(step)
        self._store.pin(step)

    def unpin(self, step: int) -> None:
        """Let the retention policy decide about ``step`` again (at the next prune)."""
        self._store.unpin(step)

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
        dtype: str = AS_TRAINED,
        layout: Layout = "auto",
        base: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Write the weights under ``key`` as ``out_dir/model.safetensors``; returns the path.

        The file is plain safetensors: ``safetensors.torch.load_file`` reads it and
        ``model.load_state_dict`` accepts what it returns. A checkpoint the ``Trainer``
        adapter saved records its model (see :meth:`hf_model`): the folder then also gets
        ``config.json`` and the tokenizer/processor files, and loads with
        ``from_pretrained``. ``config_from`` (a model folder) adds its config and tokenizer
        JSON files, over the recorded ones. ``dtype`` is the policy: ``"as-trained"`` (each
        tensor in the dtype the model trained in, where the checkpoint records it; else as
        stored), ``"bf16"``, ``"fp16"`` or ``"fp32"``; ``config.json``'s ``dtype`` says the
        same, so ``from_pretrained`` keeps it. ``layout="safetensors"`` writes the weights
        file alone; ``"hf"`` the folder even without a record (see
        :func:`~ckptwise.read.hf_model.write_model_folder`). ``base`` (the folder of the model
        the run fine-tuned, safetensors weights) supplies the tensors the checkpoint lacks:
        a ``Trainer`` checkpoint saved with ``weights="trainable"`` holds no frozen weights
        and is refused without it.

        Raises:
            ConfigError: an unknown ``dtype``, or a ``base`` with no safetensors weights.
            CheckpointError: the checkpoint has no tensors under ``key``, or holds the
                trained weights only and no ``base`` was given.
        """
        cast = export_dtype(dtype)
        return self._named(
            step,
            lambda chosen: (
                self._export(
                    chosen,
                    out_dir,
                    key=key,
                    config_from=config_from,
                    dtype=cast,
                    layout=layout,
                    base=base,
                ).path
            ),
        )

    def export_folder(
        self,
        step: int,
        out_dir: str | os.PathLike[str],
        *,
        key: str = "model",
        config_from: str | os.PathLike[str] | None = None,
        dtype: str = AS_TRAINED,
        layout: Layout = "auto",
        base: str | os.PathLike[str] | None = None,
    ) -> ExportedFolder:
        """:meth:`export` of the committed ``step``, saying what it wrote: the files, the
        dtype ``config.json`` got, and (without a record) whether the stored weights mix
        dtypes."""
        self._committed(step)
        return self._export(
            step,
            out_dir,
            key=key,
            config_from=config_from,
            dtype=export_dtype(dtype),
            layout=layout,
            base=base,
        )

    def _export(
        self,
        chosen: int,
        out_dir: str | os.PathLike[str],
        *,
        key: str,
        config_from: str | os.PathLike[str] | None,
        dtype: torch.dtype | None,
        layout: Layout,
        base: str | os.PathLike[str] | None,
    ) -> ExportedFolder:
        """:meth:`export` of the step ``chosen``."""
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
        record = self.hf_model(chosen) if key == "model" else None
        return write_model_folder(
            weights,
            out_dir,
            record=record,
            dtype=dtype,
            layout=layout,
            config_from=config_from,
            base=base,
            step=chosen,
        )

    def hf_model(self, step: int) -> HfModelRecord | None:
        """The Hugging Face model the ``Trainer`` adapter recorded with ``step``: its config,
        the dtype it trained in and its tokenizer/processor files; ``None`` for a
        checkpoint saved without one (by another adapter, or before ckptwise recorded it).

        Raises:
            CorruptCheckpointError: the record is malformed.
        """
        manifest = self.manifest(step)
        tree = manifest.tree
        if HF_MODEL_KEY not in tree:
            return None
        names = sorted(tensor_names(tree, [HF_MODEL_KEY]))
        tensors = read_rank(self._store, manifest, rank=0, names=names) if names else {}
        value = rebuild(tree, tensors, HF_MODEL_KEY)
        return HfModelRecord.from_value(value, f"checkpoint at step {step}")

    def archive(
        self,
        step: StepSpec,
        out: str | os.PathLike[str],
        *,
        lossy: tuple[str, ...] = ("optimizer/",),
        codec: str = "bytegroup",
    ) -> CheckpointInfo:
        """Copy one checkpoint into a new run at ``out``, quantizing some tensors (lossy).

        Float tensors of more than one element whose names start with a prefix in ``lossy``
        (by default the optimizer state: Adam moments) are stored as blockwise int8, in the
        spirit of Check-N-Run and ExCP; every other tensor (Adam's ``step`` counters, integer
        and one-element tensors too) is copied exactly with ``codec``. Each lossy entry's note
        records its maximum and relative error. The copy restores like any checkpoint (with
        the quantized optimizer state); this run is untouched. Opt-in only: nothing lossy
        ever happens in a training run's own saves.
        """
        loaded = self._named(step, self.read)
        assert loaded is not None  # an explicit step either reads or raises
        return archive_copy(loaded, self.url, out, lossy=lossy, codec=codec)

    def __repr__(self) -> str:
        return f"Run({self.url!r}, steps={self.steps()})"
