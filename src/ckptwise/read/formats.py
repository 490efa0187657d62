"""Files other tools read and write: plain safetensors, Hugging Face style folders, resume
scratch space.

``export`` (the :class:`~ckptwise.read.run.Run` method and ``ckptwise export``), the ``Trainer``
adapter's resume folder and the Lightning adapter's resume file all write through here, so
each format is produced in one place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ckptwise.errors import ConfigError

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch


__all__ = [
    "copy_hf_metadata",
    "open_permissions",
    "read_model_folder",
    "resume_scratch",
    "write_safetensors",
]

#: JSON files of a model folder that describe one saved state, not the model: never copied
_STATE_FILES = frozenset({"model.safetensors.index.json", "trainer_state.json"})


def write_safetensors(
    weights: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, step: int | None = None
) -> Path:
    """Write ``weights`` as one plain safetensors file that ``load_state_dict`` accepts.

    Tensors that share memory (tied embeddings) are written as separate copies, as
    safetensors requires; non-contiguous ones are made contiguous.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[int, int]] = set()
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        t = tensor.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        plain[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    metadata = {"format": "pt"}
    if step is not None:
        metadata["ckptwise_step"] = str(step)
    save_file(plain, str(out), metadata=metadata)
    open_permissions(out)
    return out


def open_permissions(*paths: str | os.PathLike[str]) -> None:
    """Give files the mode any new file gets here (``0o666`` less the umask).

    safetensors 0.8 writes through a temporary file of mode ``0o600`` and renames it
    (safetensors issue #782), so a model another user or a serving container reads
    would otherwise be readable by its writer alone, unlike the ``config.json`` beside it.
    """
    mode = 0o666 & ~_umask()
    for path in paths:
        os.chmod(path, mode)


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the usual set-and-restore
    os.umask(mask)
    return mask


def read_model_folder(
    folder: str | os.PathLike[str], *, skip: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """The weights of a model folder ``save_pretrained`` wrote (``model.safetensors``, or
    the shards ``model.safetensors.index.json`` names), but those named in ``skip``.

    Only safetensors are read: a folder of ``pytorch_model.bin`` files is refused, since
    reading one means unpickling it.

    Raises:
        ConfigError: the folder holds no safetensors weights, or its index is unreadable.
    """
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{index} is not a safetensors index ({exc})") from exc
    elif (root / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ConfigError(
            f"{root} holds no model.safetensors (nor model.safetensors.index.json): give the "
            "folder save_pretrained wrote; .bin weights are not read (that would unpickle "
            "them), so convert them with save_pretrained(..., safe_serialization=True)"
        )
    skipped = set(skip)
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = root / shard
        if Path(shard).name != shard or not path.is_file():
            raise ConfigError(f"{index} names the shard {shard!r}, which {root} does not hold")
        with safe_open(str(path), framework="pt") as opened:
            for name in opened.keys():  # noqa: SIM118 (safe_open is no mapping)
                if name not in skipped:
                    out[name] = opened.get_tensor(name)
    return out


def copy_hf_metadata(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[str]:
    """Copy a model folder's config and tokenizer JSON files into ``out``; returns their names.

    Together with a ``model.safetensors`` this makes ``out`` a folder ``from_pretrained`` loads.
    """
    copied = []
    for path in sorted(Path(source).glob("*.json")):
        if path.name not in _STATE_FILES:
            shutil.copy2(path, Path(out) / path.name)
            copied.append(path.name)
    return copied


def resume_scratch(run_url: str, kind: str) -> Path:
    """A new, empty folder for files a framework resumes from (remove it when done).

    For a local run it sits inside the run folder, on the same disk as the checkpoints
    (a model's weights may not fit the system's temporary folder); for a remote run, in the
    temporary folder, on the local disk of the machine that calls this. Ranks that share a
    machine may share one folder, which one of them makes; each machine (node) of a job
    makes its own, so nodes need no shared file system beyond the run's store.
    """
    if "://" in run_url:
        return Path(tempfile.mkdtemp(prefix=f"ckptwise-{kind}-"))
    os.makedirs(run_url, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=run_url))
