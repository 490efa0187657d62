"""The Hugging Face model a checkpoint records beside its weights, and the folder export writes.

The ``Trainer`` adapter stores, in each checkpoint, the entry ``hf_model``
(:data:`HF_MODEL_KEY`): the model's ``config.json`` as JSON, the dtype the model was
trained in, and the small files ``from_pretrained`` reads besides the weights (tokenizer
or processor files, ``generation_config.json``, the code of a ``trust_remote_code`` model)
as ``uint8`` tensors, so identical bytes are stored once per run however often they are
saved. :func:`write_model_folder` turns weights plus that record into a folder
``from_pretrained`` loads, under a stated dtype policy (:func:`export_dtype`):

- ``"as-trained"`` (the default): every tensor in the dtype the training model held it in,
  and ``config.json``'s ``dtype`` the model's. Under DeepSpeed's bf16 or fp16 the engine
  trains 16-bit weights and keeps fp32 master copies of the trained ones; "as trained" is
  the 16-bit model the forward pass ran, the masters rounded as DeepSpeed rounds them after
  each step. So transformers 5's ``from_pretrained(folder)``, whose default ``dtype="auto"``
  takes ``config.json``'s, gives the trained model's dtypes and values.
- ``"bf16"``, ``"fp16"``, ``"fp32"``: every floating-point tensor in that dtype (``fp32``
  keeps DeepSpeed's fp32 master weights as they are).

Nothing here imports a framework; the entry holds JSON and tensors only (no pickle).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptwise.errors import CheckpointError, ConfigError, CorruptCheckpointError, FormatError
from ckptwise.read.formats import copy_hf_metadata, read_model_folder, write_safetensors

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = [
    "AS_TRAINED",
    "DTYPE_CHOICES",
    "HF_MODEL_KEY",
    "ExportedFolder",
    "HfModelRecord",
    "cast_weights",
    "export_dtype",
    "write_model_folder",
]

#: the checkpoint entry (a top-level key of the state) that holds an :class:`HfModelRecord`
HF_MODEL_KEY = "hf_model"
#: the version of the entry's layout; a reader refuses a newer one. A record of a model
#: saved without its frozen weights is written as version 2, so that a reader from before
#: ``trainable_only`` refuses it rather than export a folder that lacks them
RECORD_VERSION = 2
#: the default dtype policy
AS_TRAINED = "as-trained"
#: the dtype policies ``export`` takes, short and long names
DTYPE_CHOICES = (AS_TRAINED, "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
#: floating-point dtypes a record may name
_FLOAT_NAMES = ("float32", "bfloat16", "float16", "float64")
_SHORT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: files a record never holds: the weights and the config are written from elsewhere
_NOT_FILES = ("config.json", "model.safetensors.index.json")
Layout = Literal["auto", "hf", "safetensors"]


def export_dtype(policy: str) -> torch.dtype | None:
    """The dtype the policy ``policy`` casts every floating-point tensor to; ``None`` for
    ``"as-trained"``.

    Raises:
        ConfigError: an unknown policy.
    """
    if policy == AS_TRAINED:
        return None
    name = _SHORT.get(policy, policy)
    if name not in ("bfloat16", "float16", "float32"):
        raise ConfigError(
            f"dtype must be one of {', '.join(DTYPE_CHOICES[:4])}, got {policy!r}: "
            f"'{AS_TRAINED}' writes each tensor as the model held it while training"
        )
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class HfModelRecord:
    """What ``from_pretrained`` needs besides the weights, recorded when a checkpoint was saved.

    Attributes:
        config: the model's ``config.json`` as ``save_pretrained`` writes it (``architectures``
            set), without the dtype, which export sets.
        dtype: the model's dtype while training (the first floating-point parameter's, as
            ``PreTrainedModel.dtype`` says), e.g. ``"bfloat16"``; ``None`` without one.
        dtypes: floating-point tensors (state-dict names) held in another dtype than
            ``dtype`` (a norm kept in fp32); names the weights lack are ignored.
        files: other files of the model folder by name (tokenizer, processor, generation
            config, remote code), their bytes.
        trainable_only: the checkpoint holds the trained parameters only (the ``Trainer``
            adapter's ``weights="trainable"``): the frozen ones were never saved, so an
            export must take them from the model the run fine-tuned (``base``).
    """

    config: Mapping[str, Any]
    dtype: str | None = None
    dtypes: Mapping[str, str] | None = None
    files: Mapping[str, bytes] | None = None
    trainable_only: bool = False

    def to_value(self) -> dict[str, Any]:
        """The checkpoint entry: JSON, with each file as a ``uint8`` tensor."""
        return {
            "version": 2 if self.trainable_only else 1,
            **({"trainable_only": True} if self.trainable_only else {}),
            "config": dict(self.config),
            "dtype": self.dtype,
            "dtypes": dict(self.dtypes or {}),
            "files": {
                name: torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else _empty()
                for name, data in (self.files or {}).items()
            },
        }

    @classmethod
    def from_value(cls, value: Any, where: str) -> HfModelRecord:
        """The record a checkpoint's entry holds, checked (it was read from a store).

        Raises:
            CorruptCheckpointError: the entry is malformed, or names a file that is not a
                plain file name.
            FormatError: written by a newer ckptwise.
        """

        def bad(what: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"{where}: the {HF_MODEL_KEY!r} entry {what}")

        if not isinstance(value, Mapping):
            raise bad("is not a mapping")
        version = value.get("version")
        if not isinstance(version, int) or version < 1:
            raise bad(f"has no valid version ({version!r})")
        if version > RECORD_VERSION:
            raise FormatError(
                f"{where}: the {HF_MODEL_KEY!r} entry has version {version}, newer than this "
                f"ckptwise reads ({RECORD_VERSION}): upgrade ckptwise (pip install -U ckptwise)"
            )
        config, dtype, dtypes, files = (
            value.get(k) for k in ("config", "dtype", "dtypes", "files")
        )
        trainable_only = value.get("trainable_only", False)
        if not isinstance(trainable_only, bool):
            raise bad(f"says trainable_only {trainable_only!r}, not true or false")
        if not isinstance(config, Mapping):
            raise bad("has no config mapping")
        if dtype is not None and dtype not in _FLOAT_NAMES:
            raise bad(f"names the dtype {dtype!r}")
        if not isinstance(dtypes, Mapping) or not all(
            isinstance(k, str) and v in _FLOAT_NAMES for k, v in dtypes.items()
        ):
            raise bad("has malformed per-tensor dtypes")
        if not isinstance(files, Mapping):
            raise bad("has no files mapping")
        out: dict[str, bytes] = {}
        for name, data in files.items():
            if not _plain_file_name(name) or name in _NOT_FILES or name.endswith(".safetensors"):
                raise bad(f"holds the file {name!r}, which is not a plain file name it may hold")
            if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
                raise bad(f"holds the file {name!r} as something other than bytes")
            out[name] = data.numpy().tobytes()
        return cls(
            dict(config), dtype, {str(k): str(v) for k, v in dtypes.items()}, out, trainable_only
        )


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.uint8)


def _plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0:")
        and Path(name).name == name
    )


def cast_weights(
    weights: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None,
    record: HfModelRecord | None,
) -> tuple[dict[str, torch.Tensor], str | None]:
    """``weights`` under a dtype policy, and the model's dtype for ``config.json``.

    ``dtype`` (from :func:`export_dtype`) casts every floating-point tensor; ``None`` (as
    trained) casts each to the dtype ``record`` says the model held it in. Without a record
    the tensors stay as stored, and the model's dtype is their one floating-point dtype
    (``None`` when they are mixed or there is none). Other tensors are never cast.
    """
    if dtype is not None:
        main, per_tensor = _dtype_name(dtype), {}
    elif record is not None and record.dtype is not None:
        main, per_tensor = record.dtype, dict(record.dtypes or {})
    else:
        found = {t.dtype for t in weights.values() if t.is_floating_point()}
        return dict(weights), (_dtype_name(found.pop()) if len(found) == 1 else None)
    out = {
        name: tensor.to(getattr(torch, per_tensor.get(name, main)))
        if tensor.is_floating_point()
        else tensor
        for name, tensor in weights.items()
    }
    return out, main


@dataclass(frozen=True)
class ExportedFolder:
    """What :func:`write_model_folder` wrote."""

    #: the weights file
    path: Path
    #: the files of the folder, by name
    files: tuple[str, ...]
    #: ``config.json``'s dtype, as written; ``None`` when none was set
    dtype: str | None
    #: without a record and under "as-trained": the floating-point dtypes of the weights as
    #: stored, and how many tensors each, when they are more than one
    mixed: Mapping[str, int]


def write_model_folder(
    weights: Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    *,
    record: HfModelRecord | None,
    dtype: torch.dtype | None = None,
    layout: Layout = "auto",
    config_from: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    step: int | None = None,
) -> ExportedFolder:
    """Write ``weights`` as ``out/model.safetensors`` under a dtype policy (see
    :func:`cast_weights`) and, for a Hugging Face folder, what ``from_pretrained`` needs.

    ``base`` (a model folder of safetensors weights, see
    :func:`~ckptwise.read.formats.read_model_folder`) supplies every tensor ``weights``
    lacks: the frozen weights of a checkpoint saved with the trained ones only. Such a
    checkpoint (``record.trainable_only``) is refused without ``base``, since its folder
    would load with the frozen weights newly initialized.

    ``layout="hf"`` also writes ``record``'s files and ``config.json`` (then copies
    ``config_from``'s JSON files over them, see :func:`copy_hf_metadata`), and sets
    ``config.json``'s ``dtype`` (and ``torch_dtype``, which transformers 4 reads) to the
    model's dtype, so that ``from_pretrained`` with its defaults keeps the tensors' dtypes.
    ``"auto"`` is ``"hf"`` when there is a record or ``config_from``, else ``"safetensors"``
    (the weights file alone).
    """
    folder = Path(out)
    if base is not None:
        weights = {**read_model_folder(base, skip=weights.keys()), **weights}
    elif record is not None and record.trainable_only:
        where = f"step {step}" if step is not None else "the checkpoint"
        raise CheckpointError(
            f"{where} holds the trained weights only (saved with weights='trainable'): the "
            "frozen ones were never saved, so the folder would load with them newly "
            "initialized. Pass --base MODEL_DIR (base= in Python), the folder of the model "
            "this run fine-tuned, to take them from there; or export from the training "
            "script with callback.export(), which takes them from the live model"
        )
    cast, main = cast_weights(weights, dtype=dtype, record=record)
    mixed: dict[str, int] = {}
    if dtype is None and record is None and main is None:
        counted = Counter(_dtype_name(t.dtype) for t in weights.values() if t.is_floating_point())
        mixed = dict(counted) if len(counted) > 1 else {}
    path = write_safetensors(cast, folder / "model.safetensors", step=step)
    if layout == "hf" or (layout == "auto" and (record is not None or config_from is not None)):
        if record is not None:
            for name, data in (record.files or {}).items():
                (folder / name).write_bytes(data)
            _write_config(folder / "config.json", record.config, main)
        if config_from is not None:
            copy_hf_metadata(config_from, folder)
            config = folder / "config.json"
            if main is not None and config.is_file():
                _write_config(config, json.loads(config.read_text(encoding="utf-8")), main)
    files = tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))
    written = main if (folder / "config.json").is_file() else None
    return ExportedFolder(path, files, written, mixed)


def _write_config(path: Path, config: Mapping[str, Any], dtype: str | None) -> None:
    """``config.json`` with ``dtype`` (and ``torch_dtype``) set in it and in the sub-configs
    that name one, laid out as transformers writes it."""
    doc = dict(config)
    if dtype is not None:
        doc["dtype"] = doc["torch_dtype"] = dtype
        for key, sub in doc.items():
            named = [k for k in ("dtype", "torch_dtype") if isinstance(sub, Mapping) and k in sub]
            if named and "model_type" in sub:
                doc[key] = {**sub, **dict.fromkeys(named, dtype)}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
