"""A DeepSpeed ZeRO-2/3 engine's checkpoint, captured as tensors and JSON, and written back.

Capture: for the duration of ``engine.save_checkpoint``, the engine's ``CheckpointEngine``
is swapped for one that keeps what it is handed instead of ``torch.save``-ing it, so each
rank gets exactly the dicts DeepSpeed would write (its partitions of the fp32 master
weights and Adam moments, its frozen weight fragments, the LR scheduler, the counters), as
it does for ``Trainer``'s own saves, and whatever DeepSpeed version writes them. The few
DeepSpeed types in them (``torch.Size``, ``ZeroStageEnum``, loss scalers,
``fragment_address``, dtypes, ordered dicts) become tagged JSON from an allow-list, so a
checkpoint holds only tensors and JSON. ``save_checkpoint`` is a collective (it has
barriers): every rank captures at the same step.

Restore: the dicts are rebuilt and ``torch.save``-d under their own names in a
``checkpoint-N/global_stepN/`` folder, which ``Trainer`` loads with its own DeepSpeed resume
code (``deepspeed_load_checkpoint``). DeepSpeed reads those files with
``weights_only=False``; ckptwise writes them from its own verified data and never reads them.
On another number of ranks, every saved rank's files are converted by DeepSpeed's own
``ds_to_universal`` into its universal checkpoint (:func:`to_universal`), which the engine
loads on any number of ranks with ``"checkpoint": {"load_universal": true}`` in its config
(:func:`set_load_universal`).
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ckptwise.errors import CheckpointError, ConfigError, CorruptCheckpointError, SnapshotError
from ckptwise.jsonvalues import Decode, Encode, ValueType, decode_value, encode_value
from ckptwise.read.run import Run

__all__ = [
    "EngineFiles",
    "consolidated_weights",
    "deepspeed_configs",
    "engine_file_names",
    "engine_scheduler",
    "engine_tag",
    "is_deepspeed_checkpoint",
    "per_rank_file",
    "set_load_universal",
    "to_universal",
    "write_engine_files",
]

log = logging.getLogger("ckptwise")

#: the tag key of DeepSpeed's values: the snapshot stores them as plain JSON, so
#: ``Run.read`` gives them back without importing DeepSpeed
_TAG = "__deepspeed__"


class _Capture:
    """A DeepSpeed ``CheckpointEngine`` that keeps each state dict instead of writing it."""

    name = "ckptwise-capture"

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.files: dict[str, Any] = {}

    def save(self, state_dict: Any, path: str) -> None:
        self.files[os.path.relpath(os.path.abspath(path), self.root)] = state_dict

    def load(self, path: str, map_location: Any = None) -> Any:
        raise ConfigError("ckptwise's capturing checkpoint engine cannot load")

    def create(self, info: Any) -> None:
        return None

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        return None

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        return None

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        return None

    def preserves_storage_sharing(self) -> bool:
        return True


def _scaler_classes() -> dict[str, Any]:
    from deepspeed.runtime.fp16 import loss_scaler

    return {c.__name__: c for c in (loss_scaler.LossScaler, loss_scaler.DynamicLossScaler)}


def _deepspeed_types() -> tuple[ValueType, ...]:
    """DeepSpeed's own types in its checkpoints, by allow-list (DeepSpeed is imported only
    when a DeepSpeed checkpoint is written or read back)."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scalers = {c.__name__: c for c in (loss_scaler.LossScaler, loss_scaler.DynamicLossScaler)}

    def scaler_to_json(value: Any, path: str, encode: Encode) -> dict[str, Any]:
        attrs = {k: encode(v, f"{path}.{k}") for k, v in vars(value).items()}
        return {"cls": type(value).__name__, "vars": attrs}

    def scaler_from_json(fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        cls = scalers[str(fields["cls"])]
        scaler = cls.__new__(cls)
        scaler.__dict__.update({k: decode(v, where) for k, v in fields["vars"].items()})
        return scaler

    def ordered_to_json(value: Any, path: str, encode: Encode) -> dict[str, Any]:
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            # JSON keeps the keys' order; the tag only says to rebuild an OrderedDict
            return {"dict": {k: encode(v, f"{path}/{k}") for k, v in value.items()}}
        return {"items": encode(dict(value), path)["items"]}

    def ordered_from_json(fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        if "dict" in fields:
            return collections.OrderedDict(decode(fields["dict"], where))
        return collections.OrderedDict(decode({_TAG: "dict", "items": fields["items"]}, where))

    def dtype_from_json(fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        dtype = getattr(torch, str(fields["value"]))
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{fields['value']!r} is not a dtype")
        return dtype

    def address_from_json(fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        numel, start = fields["value"]
        return fragment_address(numel=int(numel), start=int(start))

    return (
        ValueType(  # an int subclass: before the plain values
            "ZeroStageEnum",
            lambda v: isinstance(v, ZeroStageEnum),
            lambda v, path, encode: {"value": int(v)},
            lambda fields, where, decode: ZeroStageEnum(int(fields["value"])),
        ),
        ValueType(  # a tuple subclass: before tuples
            "Size",
            lambda v: isinstance(v, torch.Size),
            lambda v, path, encode: {"value": list(v)},
            lambda fields, where, decode: torch.Size(int(v) for v in fields["value"]),
        ),
        ValueType(
            "dtype",
            lambda v: isinstance(v, torch.dtype),
            lambda v, path, encode: {"value": str(v).removeprefix("torch.")},
            dtype_from_json,
        ),
        ValueType(
            "fragment_address",
            lambda v: isinstance(v, fragment_address),
            lambda v, path, encode: {"value": [v.numel, v.start]},
            address_from_json,
        ),
        ValueType(
            "LossScaler",
            lambda v: type(v) in scalers.values(),
            scaler_to_json,
            scaler_from_json,
        ),
        ValueType(
            "OrderedDict",
            lambda v: isinstance(v, collections.OrderedDict),
            ordered_to_json,
            ordered_from_json,
        ),
    )


def _to_plain(value: Any, where: str) -> Any:
    """``value`` with DeepSpeed's own types as tagged JSON (tensors left as they are, for
    the snapshot to store)."""
    try:
        return encode_value(value, where, types=_deepspeed_types(), keep=(torch.Tensor,), tag=_TAG)
    except SnapshotError as exc:
        raise SnapshotError(
            f"{exc}; DeepSpeed's checkpoint holds it, and this DeepSpeed version is not "
            "supported yet"
        ) from exc


def _from_plain(node: Any, where: str) -> Any:
    """Inverse of :func:`_to_plain`; only the tags it writes are accepted."""
    return decode_value(node, where, types=_deepspeed_types(), keep=(torch.Tensor,), tag=_TAG)


class EngineFiles:
    """A DeepSpeed engine as a state entry: what this rank's ``save_checkpoint`` writes.

    ``state_dict()`` is a collective (every rank must call it at the same step);
    ``load_state_dict`` refuses: ``Trainer`` restores the engine from files (see
    :func:`write_engine_files`).
    """

    #: DeepSpeed writes its 16-bit weights through ``.data``, which torch's version counter
    #: does not see: an async save must copy them afresh every time (see ckptwise.snapshot.copying)
    untracked_writes = True

    def __init__(self, engine: Any, step: int) -> None:
        self.engine = engine
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        scratch = tempfile.mkdtemp(prefix="ckptwise-ds-")
        capture = _Capture(scratch)
        engine, kept = self.engine, self.engine.checkpoint_engine
        engine.checkpoint_engine = capture
        try:
            engine.save_checkpoint(scratch, tag=f"global_step{self.step}")
        finally:
            engine.checkpoint_engine = kept
            shutil.rmtree(scratch, ignore_errors=True)  # `latest` and zero_to_fp32.py land here
        return {"files": {name: _to_plain(sd, name) for name, sd in capture.files.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise ConfigError(
            "a DeepSpeed engine is restored by Trainer from a checkpoint folder: pass "
            "callback.resume_checkpoint() to trainer.train(resume_from_checkpoint=...)"
        )


def write_engine_files(
    saved: Mapping[str, Any], folder: Path, *, only: Callable[[str], bool] | None = None
) -> dict[str, Any]:
    """Write one rank's captured DeepSpeed files under ``folder``; returns them by name.

    ``saved`` is what :meth:`EngineFiles.state_dict` returned, as a checkpoint gives it back;
    ``only`` picks the files to write by name (all by default).
    """
    written: dict[str, Any] = {}
    for name, plain in _files(saved).items():
        if only is not None and not only(name):
            continue
        parts = Path(name).parts
        path = folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        written[name] = _from_plain(plain, name)
        torch.save(written[name], path)
    return written


def _files(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The files of one rank's DeepSpeed entry by name, each name checked to be a plain
    relative path."""
    files = saved.get("files")
    if not isinstance(files, Mapping) or not files:
        raise CorruptCheckpointError("the DeepSpeed entry of this checkpoint has no files")
    for name in files:
        parts = Path(str(name)).parts
        if not parts or ".." in parts or Path(str(name)).is_absolute():
            raise CorruptCheckpointError(f"the DeepSpeed file name {name!r} is not a plain path")
    return {str(name): plain for name, plain in files.items()}


def engine_file_names(saved: Mapping[str, Any]) -> list[str]:
    """The names of one rank's DeepSpeed files (``global_stepN/...``)."""
    return list(_files(saved))


def engine_tag(saved: Mapping[str, Any]) -> str:
    """The folder DeepSpeed saved one rank's files in (``global_stepN``): the tag that
    ``latest`` names."""
    return Path(next(iter(_files(saved)))).parts[0]


#: a file of one rank's own: its optimizer partition (``*optim_states.pt``) or, under ZeRO-3,
#: its model states (``zero_pp_rank_R_mp_rank_XX_model_states.pt``)
_PER_RANK = re.compile(r"(optim_states\.pt$|zero_pp_rank_\d+_)")


def per_rank_file(name: str) -> bool:
    """Whether the DeepSpeed file ``name`` is loaded by its own rank only.

    ``engine.load_checkpoint`` reads, on each rank, the model states it finds under the
    rank's name and the optimizer partition of its data-parallel rank (every rank's with
    ZeRO-2's ``elastic_checkpoint``). Under ZeRO-3 both are per rank; under ZeRO-1/2 the model
    states are one file, ``mp_rank_00_model_states.pt``, that data-parallel rank 0 alone
    saves and every rank loads.
    """
    return _PER_RANK.search(Path(name).name) is not None


def is_deepspeed_checkpoint(run: Run, step: int) -> bool:
    """Whether the checkpoint at ``step`` holds a DeepSpeed engine rather than a model."""
    return "deepspeed" in run.manifest(step).tree


def consolidated_weights(run: Run, step: int) -> dict[str, torch.Tensor]:
    """The whole model's weights from a DeepSpeed checkpoint, on one process, offline.

    Every rank's files are written to a temporary folder as DeepSpeed laid them out, and
    DeepSpeed's own ``zero_to_fp32`` merges them (ZeRO-2 or ZeRO-3): trained parameters come
    out as their fp32 master copies, frozen ones in the dtype they were trained in.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    manifest = run.manifest(step)
    scratch = Path(tempfile.mkdtemp(prefix="ckptwise-zero-"))
    try:
        for rank in range(manifest.world_size):
            loaded = run.read(step, rank=rank)
            assert loaded is not None  # an explicit step either reads or raises
            write_engine_files(loaded.values()["deepspeed"], scratch)
        tags = sorted(p.name for p in scratch.iterdir() if p.is_dir())
        weights: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(
            str(scratch), tag=tags[-1]
        )
        return weights
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def to_universal(saved: Path, out: Path, *, ranks: int) -> None:
    """Convert the DeepSpeed checkpoint ``saved`` (a ``global_stepN`` folder holding every
    saved rank's files) into DeepSpeed's universal checkpoint ``out`` (a folder of the same
    name) with DeepSpeed's own ``deepspeed.checkpoint.ds_to_universal``; it also writes
    ``out.parent / "latest_universal"``, which the engine loads it by.

    The conversion is a fresh Python process (its own worker processes are forked from it,
    not from a training rank that holds a process group and perhaps a GPU context), given
    ``--inject_missing_state``: a ``Trainer``'s engine saves no ``universal_checkpoint_info``
    (Megatron-DeepSpeed's client state), which ZeRO-1/2 conversion otherwise requires.

    Raises:
        ConfigError: this DeepSpeed has no universal conversion.
        CheckpointError: the conversion failed (its output's end is in the message).
    """
    module = "deepspeed.checkpoint.ds_to_universal"
    version = _deepspeed_version()
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise ConfigError(
            f"resuming on another number of processes converts the checkpoint with DeepSpeed's "
            f"{module}, which DeepSpeed {version} lacks: upgrade DeepSpeed "
            "(pip install -U deepspeed), or resume on as many processes as saved it"
        )
    cpus = os.cpu_count() or 1
    command = [
        sys.executable,
        "-m",
        module,
        "--input_folder",
        str(saved),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        str(max(1, min(ranks, cpus, 8))),
        "--num_merge_workers",
        str(max(1, min(2, cpus))),  # DeepSpeed's default: merging holds whole parameters
        "--inject_missing_state",
    ]
    log.info("converting %s into DeepSpeed's universal checkpoint %s", saved, out)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    log.debug("ds_to_universal said:\n%s%s", done.stdout, done.stderr)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip()[-3000:]
        raise CheckpointError(
            f"DeepSpeed {version}'s universal checkpoint conversion ({module}) failed with exit "
            f"status {done.returncode}, so this checkpoint cannot resume on another number of "
            "processes here: resume on as many processes as saved it, or upgrade DeepSpeed. "
            f"Its output ends:\n{said}"
        )


def _deepspeed_version() -> str:
    try:
        from importlib.metadata import version

        return version("deepspeed")
    except Exception:
        return "(not installed)"


def deepspeed_configs(trainer: Any) -> list[dict[str, Any]]:
    """The DeepSpeed config dicts of a ``Trainer``, each once: the one accelerate hands
    ``deepspeed.initialize`` (``accelerator.state.deepspeed_plugin``'s) and the training
    arguments' copy, which a hyperparameter search builds the next one from."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    found: dict[int, dict[str, Any]] = {}
    for config in (
        getattr(plugin, "deepspeed_config", None),
        getattr(getattr(plugin, "hf_ds_config", None), "config", None),
        getattr(
            getattr(getattr(trainer, "args", None), "hf_deepspeed_config", None), "config", None
        ),
    ):
        if isinstance(config, dict):
            found.setdefault(id(config), config)
    return list(found.values())


def set_load_universal(configs: list[dict[str, Any]], on: bool) -> None:
    """Set ``"checkpoint": {"load_universal": on}`` in each config: the engine that
    ``trainer.train()`` creates next then loads a universal checkpoint (or a plain one)."""
    for config in configs:
        checkpoint = config.setdefault("checkpoint", {})
        if not isinstance(checkpoint, dict):
            raise ConfigError(
                f"the DeepSpeed config's 'checkpoint' is {checkpoint!r}, not a mapping: make it "
                'a mapping, e.g. "checkpoint": {}'
            )
        checkpoint["load_universal"] = on


def engine_scheduler(saved: Mapping[str, Any]) -> dict[str, Any] | None:
    """The LR scheduler's state in one rank's DeepSpeed entry (in its model states, which
    ZeRO-3 ranks each save and ZeRO-1/2's data-parallel rank 0 alone), or ``None``."""
    for name, plain in _files(saved).items():
        if name.endswith("model_states.pt"):
            state = _from_plain(plain, name)
            scheduler = state.get("lr_scheduler") if isinstance(state, Mapping) else None
            if isinstance(scheduler, Mapping):
                return dict(scheduler)
    return None
