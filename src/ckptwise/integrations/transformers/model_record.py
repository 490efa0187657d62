"""What a ``Trainer`` checkpoint records of its model besides the weights, for export.

:class:`ModelRecorder` builds, at each save, the :class:`~ckptwise.read.hf_model.HfModelRecord`
the callback stores under ``hf_model``: the config as ``save_pretrained`` would write it,
the dtypes the model holds its tensors in while it trains, and the small files of a model
folder that are not weights (tokenizer or processor files from ``processing_class``,
``generation_config.json``, the code of a ``trust_remote_code`` model). Those files are
made once per training session (``save_pretrained`` into a temporary folder); their bytes
are stored as ``uint8`` tensors, which dedup stores once per run while they do not change.
"""

from __future__ import annotations

import json
import logging
import tempfile
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from ckptwise.read.hf_model import HfModelRecord

__all__ = ["ModelRecorder", "trained_dtypes"]

log = logging.getLogger("ckptwise")

#: what a folder made for the record may hold that the record does not take
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def trained_dtypes(model: Any) -> tuple[str | None, dict[str, str]]:
    """The model's dtype (its first floating-point parameter's, as ``PreTrainedModel.dtype``
    says and ``save_pretrained`` writes in ``config.json``), and the floating-point
    parameters and buffers held in another dtype, by state-dict name.

    Under DeepSpeed ZeRO-3 a parameter's local data is an empty placeholder of the dtype
    the engine trains it in, so nothing is gathered.
    """
    params = [p.dtype for p in model.parameters() if p.is_floating_point()]
    tensors = chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    floating = [(name, t.dtype) for name, t in tensors if t.is_floating_point()]
    main = next(iter(params or [d for _, d in floating]), None)
    if main is None:
        return None, {}
    return _name(main), {name: _name(d) for name, d in floating if d != main}


def _partly_frozen(model: Any) -> bool:
    """Whether the model's state dict holds more than its trained parameters."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return any(name not in trained for name in model.state_dict())


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ModelRecorder:
    """The ``hf_model`` entry of a ``Trainer``'s checkpoints (see the module docstring).

    A model that is not a ``PreTrainedModel`` (no ``config.to_json_string`` and
    ``save_pretrained``), or a peft model (whose export is an adapter folder), is not
    recorded (:meth:`records`).
    """

    def __init__(self, trainer: Any, *, trainable_only: bool = False) -> None:
        self.trainer = trainer
        #: whether the checkpoints hold the trained parameters only (``weights="trainable"``);
        #: a record says so when the model has more than those (frozen ones, buffers)
        self.trainable_only = trainable_only
        self._files: tuple[tuple[int, int], dict[str, bytes], dict[str, Any]] | None = None

    def refresh(self) -> None:
        """Make the files again at the next save (a training session starts)."""
        self._files = None

    def records(self) -> bool:
        """Whether the trainer's model is one this records (cheap: no record is made)."""
        model = self.trainer.model
        config = getattr(model, "config", None)
        return not (
            config is None
            or not hasattr(config, "to_json_string")
            or not hasattr(model, "save_pretrained")
            or hasattr(model, "peft_config")  # PeftModel, or a model with adapters loaded
            or getattr(model, "_hf_peft_config_loaded", False)
        )

    def record(self) -> HfModelRecord | None:
        """The record of the trainer's model as it is now; ``None`` if it records none."""
        if not self.records():
            return None
        model = self.trainer.model
        config = model.config
        doc: dict[str, Any] = json.loads(config.to_json_string(use_diff=True))
        doc.pop("dtype", None)  # export sets it, from what it writes
        doc.pop("torch_dtype", None)
        doc["architectures"] = [type(model).__name__]
        files, auto_map = self._model_files(model)
        if auto_map:
            doc["auto_map"] = auto_map
        dtype, dtypes = trained_dtypes(model)
        return HfModelRecord(
            doc, dtype, dtypes, files, self.trainable_only and _partly_frozen(model)
        )

    def value(self) -> dict[str, Any] | None:
        """:meth:`record` as a checkpoint entry; ``None`` when the model is not recorded."""
        record = self.record()
        return None if record is None else record.to_value()

    def _model_files(self, model: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The folder files and ``auto_map`` of ``model`` and the trainer's processor, made
        once per model and processor (and training session)."""
        processor = getattr(self.trainer, "processing_class", None)
        if processor is None:
            processor = getattr(self.trainer, "tokenizer", None)  # transformers 4's name
        key = (id(model), id(processor))
        if self._files is None or self._files[0] != key:
            self._files = (key, *_folder_files(model, processor))
        return self._files[1], self._files[2]


def _folder_files(model: Any, processor: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
    """What ``save_pretrained`` writes besides the weights and config, read back as bytes,
    and the ``auto_map`` a ``trust_remote_code`` model's config gets."""
    config: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ckptwise-hf-model-") as scratch:
        folder = Path(scratch)
        if getattr(type(model), "_auto_class", None) is not None:  # remote code
            from transformers.dynamic_module_utils import custom_object_save

            auto_map = getattr(model.config, "auto_map", None)
            config["auto_map"] = dict(auto_map) if isinstance(auto_map, dict) else {}
            for obj in (model, model.config):
                if getattr(type(obj), "_auto_class", None) is not None:
                    custom_object_save(obj, folder, config=config)
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation is not None and callable(can_generate) and can_generate():
            try:
                generation.save_pretrained(str(folder))
            except Exception as exc:  # transformers refuses to save an invalid one
                log.warning("the model's generation config is not recorded: %s", exc)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(str(folder))
        files = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name != "config.json":
                if path.suffix in _SKIPPED_SUFFIXES:
                    continue
                files[path.name] = path.read_bytes()
            elif path.is_dir():
                log.warning("%s/ (made by save_pretrained) is not recorded for export", path.name)
    return files, config.get("auto_map", {})
