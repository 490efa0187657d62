"""The ``Trainer``'s own checkpoint folder, written from a ckptwise checkpoint.

``checkpoint-N/`` holds what ``Trainer._load_from_checkpoint`` and ``_load_rng_state`` read
(all with ``weights_only=True``): the weights (``save_pretrained``'s layout, or one
safetensors file), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` and
``trainer_state.json``; with several processes one ``rng_state_{rank}.pth`` per rank, and
under DeepSpeed its ``global_stepN/`` files instead of weights and optimizer (or its
universal checkpoint, on another number of processes). Under DeepSpeed one folder serves
the ranks of a node: each rank writes its own files into it, and one rank what they share.
The same weights writer makes the folders ``export`` writes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptwise.integrations.transformers.deepspeed import (
    engine_file_names,
    engine_scheduler,
    engine_tag,
    per_rank_file,
    to_universal,
    write_engine_files,
)
from ckptwise.read.formats import open_permissions, write_safetensors
from ckptwise.snapshot import RNG_KEY

__all__ = [
    "full_weights",
    "write_deepspeed_node",
    "write_deepspeed_own",
    "write_rng",
    "write_trainer_folder",
    "write_weights",
]

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
        open_permissions(*folder.glob("*.safetensors"))  # as write_safetensors does
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
    weights: Mapping[str, torch.Tensor],
    world_size: int = 1,
    rng_rank: int = 0,
) -> Path:
    """Write one process's whole ``folder`` (named ``checkpoint-N``) from a checkpoint's saved
    ``values``: the weights, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
    ``trainer_state.json`` and the RNG states (``rng_state_{rng_rank}.pth`` when
    ``world_size`` is over 1). DeepSpeed's folders are written by :func:`write_deepspeed_own`
    and :func:`write_deepspeed_node`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(model, weights, folder)
    for key, name in _TORCH_FILES.items():
        if key in values:
            torch.save(values[key], folder / name)
    if RNG_KEY in values:
        write_rng(folder, values[RNG_KEY], rank=rng_rank, world_size=world_size)
    _write_trainer_state(folder, values)
    return folder


def write_rng(folder: Path, saved: Mapping[str, Any], *, rank: int, world_size: int) -> None:
    """Write saved RNG states as the file ``Trainer`` loads on process ``rank`` of
    ``world_size`` (``rng_state.pth`` for one process). Nothing when some generator is
    missing: a rank that did not exist when the checkpoint was saved is given only the
    generators every rank held alike, and ``Trainer`` reads all or none (without the file
    it keeps its own, and says so)."""
    if not {"python", "numpy", "torch"} <= saved.keys():
        return
    folder.mkdir(parents=True, exist_ok=True)
    name = "rng_state.pth" if world_size == 1 else f"rng_state_{rank}.pth"
    torch.save(_hf_rng(saved), folder / name)


def _write_trainer_state(folder: Path, values: Mapping[str, Any]) -> None:
    (folder / "trainer_state.json").write_text(json.dumps(values["trainer_state"], indent=2))


def write_deepspeed_own(folder: Path, engine: Mapping[str, Any]) -> None:
    """Write the DeepSpeed files of ``engine`` (one saved rank's entry) that its own rank
    alone loads (see :func:`~ckptwise.integrations.transformers.deepspeed.per_rank_file`)."""
    write_engine_files(engine, folder, only=per_rank_file)


def write_deepspeed_node(
    folder: Path,
    values: Mapping[str, Any],
    engine_of: Callable[[int], Mapping[str, Any]],
    *,
    rank: int,
    saved_by: int,
    all_ranks: bool,
    universal: bool,
) -> None:
    """Write what the ranks of one node share in ``folder`` (``checkpoint-N``): DeepSpeed's
    files but those each rank writes for itself (:func:`write_deepspeed_own`),
    ``trainer_state.json`` and ``scheduler.pt``.

    ``values`` are the saved values this process resumes from (saved rank ``rank``'s);
    ``engine_of(r)`` reads saved rank ``r``'s DeepSpeed entry, of the ``saved_by`` ranks that
    saved, when it is needed. By default that is ``latest`` and the files of saved rank 0
    that every rank loads (ZeRO-1/2's model states; none under ZeRO-3). With ``all_ranks``
    every saved rank's files are written, as ZeRO-2's ``elastic_checkpoint`` loads them all
    on each rank. With ``universal`` every saved rank's files are written to a folder beside
    ``folder`` and converted into DeepSpeed's universal checkpoint in ``folder``
    (``global_stepN/`` and ``latest_universal``), which the engine loads on any number of
    ranks when its config says ``load_universal``; the saved files are removed after.
    """
    folder.mkdir(parents=True, exist_ok=True)
    own = values["deepspeed"]
    scheduler = engine_scheduler(own)
    if universal:
        raw = Path(tempfile.mkdtemp(prefix="saved-", dir=folder.parent))
        try:
            for r in range(saved_by):
                engine = own if r == rank else engine_of(r)
                write_engine_files(engine, raw)
                scheduler = scheduler or engine_scheduler(engine)
                del engine  # one saved rank in memory at a time
            tag = engine_tag(own)
            to_universal(raw / tag, folder / tag, ranks=saved_by)
        finally:
            shutil.rmtree(raw, ignore_errors=True)
    elif all_ranks:
        for r in range(saved_by):
            write_engine_files(own if r == rank else engine_of(r), folder)
    elif rank != 0 and not any(n.endswith("model_states.pt") for n in engine_file_names(own)):
        # ZeRO-1/2: this rank saved no model states; saved rank 0's are every rank's
        zero = engine_of(0)
        write_engine_files(zero, folder, only=lambda name: not per_rank_file(name))
        scheduler = engine_scheduler(zero)
    else:
        write_engine_files(own, folder, only=lambda name: not per_rank_file(name))
    if not universal:
        (folder / "latest").write_text(engine_tag(own))
    if scheduler is not None:
        # for a scheduler Trainer made itself, which it loads from scheduler.pt (DeepSpeed's
        # own is restored by the engine from its model states, where this state comes from)
        torch.save(scheduler, folder / "scheduler.pt")
    _write_trainer_state(folder, values)
