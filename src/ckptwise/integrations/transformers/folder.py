"""The ``Trainer``'s own checkpoint folder, written from a ckptwise checkpoint.

``checkpoint-N/`` holds what ``Trainer._load_from_checkpoint`` and ``_load_rng_state`` read
(all with ``weights_only=True``): the weights (``save_pretrained``'s layout, or one
safetensors file), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` and
``trainer_state.json``; with several processes one ``rng_state_{rank}.pth`` per rank, and
under DeepSpeed its ``global_stepN/`` files instead of weights, optimizer and scheduler. The
same weights writer makes the folders ``export`` writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptwise.integrations.transformers.deepspeed import write_engine_files
from ckptwise.read.formats import write_safetensors
from ckptwise.snapshot import RNG_KEY

__all__ = ["full_weights", "write_trainer_folder", "write_weights"]

#: entries of a checkpoint that become the Trainer's ``torch.save`` files
_TORCH_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "scaler": "scaler.pt"}


def full_weights(model: Any, saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's whole state dict: the saved tensors over the live model's own (frozen
    weights a ``weights="trainable"`` checkpoint left out come from the live model)."""
    live = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    live.update(saved)
    return live


def write_weights(model: Any, weights: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Write ``weights`` the way ``model.save_pretrained`` lays them out (for a peft model:
    an adapter folder), or as one ``model.safetensors`` for a plain module."""
    # save_pretrained writes nothing on ranks other than 0 (transformers 5): a rank that
    # resumes from a folder of its own writes plain safetensors, which Trainer loads as well
    other_rank = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
    if hasattr(model, "save_pretrained") and not other_rank:
        model.save_pretrained(str(folder), state_dict=dict(weights))
    else:
        write_safetensors(weights, folder / "model.safetensors")


def _hf_rng(saved: Mapping[str, Any]) -> dict[str, Any]:
    """ckptwise's RNG entry in the layout ``Trainer._load_rng_state`` reads."""
    numpy_state = saved["numpy"]
    out: dict[str, Any] = {
        "python": saved["python"],
        "numpy": (
            numpy_state["bit_generator"],
            numpy_state["state"]["key"],
            numpy_state["state"]["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        ),
        "cpu": saved["torch"],
    }
    if "cuda" in saved:
        states = saved["cuda"]
        out["cuda"] = states if len(states) > 1 else states[0]
    return out


def write_trainer_folder(
    folder: Path,
    values: Mapping[str, Any],
    *,
    model: Any,
    weights: Mapping[str, torch.Tensor] | None,
    rank: int = 0,
    world_size: int = 1,
    rng_rank: int | None = None,
) -> Path:
    """Write ``rank``'s part of ``folder`` (named ``checkpoint-N``) from a checkpoint's saved
    ``values``; when several ranks share one folder each calls it with its own ``rank``.

    Rank 0 writes what is shared: the weights, ``optimizer.pt``, ``scheduler.pt`` (or, for
    DeepSpeed, ``latest``) and ``trainer_state.json``; each rank writes its RNG states
    (``rng_state_{rng_rank}.pth`` when there are several; ``rng_rank`` defaults to
    ``rank``) and its DeepSpeed files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    engine = values.get("deepspeed")
    if engine is not None:
        files = write_engine_files(engine, folder)
        if rank == 0:
            (folder / "latest").write_text(Path(next(iter(files))).parts[0])
            _scheduler_from_engine(files, folder)
    elif rank == 0:
        assert weights is not None
        write_weights(model, weights, folder)
        for key, name in _TORCH_FILES.items():
            if key in values:
                torch.save(values[key], folder / name)
    # a rank that did not exist when the checkpoint was saved is given only the generators
    # every rank held alike; Trainer reads all or none, and without the file keeps its own
    if RNG_KEY in values and {"python", "numpy", "torch"} <= values[RNG_KEY].keys():
        owner = rank if rng_rank is None else rng_rank
        name = "rng_state.pth" if world_size == 1 else f"rng_state_{owner}.pth"
        torch.save(_hf_rng(values[RNG_KEY]), folder / name)
    if rank == 0:
        (folder / "trainer_state.json").write_text(json.dumps(values["trainer_state"], indent=2))
    return folder


def _scheduler_from_engine(files: Mapping[str, Any], folder: Path) -> None:
    """``scheduler.pt`` for a scheduler ``Trainer`` made itself (it loads that file when the
    scheduler is not DeepSpeed's); DeepSpeed keeps the same state in its model states."""
    for name, state in files.items():
        if name.endswith("model_states.pt") and isinstance(state, Mapping):
            scheduler = state.get("lr_scheduler")
            if isinstance(scheduler, Mapping):
                torch.save(dict(scheduler), folder / "scheduler.pt")
                return
