"""What the ``Trainer`` adapter records of a model for export (``hf_model``): its config, the
dtypes it trains in, and the folder files ``save_pretrained`` would write besides weights."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import peft
import pytest
import torch
from minicpmv_tiny import MiniCPMVLike, MiniCPMVLikeConfig, build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from ckptwise.integrations.transformers.model_record import ModelRecorder, trained_dtypes

pytestmark = pytest.mark.integration


class RemoteTiny(MiniCPMVLike):  # type: ignore[no-untyped-call]  # transformers' hook
    """A model class registered for ``AutoModel``, as a ``trust_remote_code`` model's is."""


RemoteTiny.register_for_auto_class("AutoModel")  # type: ignore[no-untyped-call]


class CountingTokenizer:
    """A processor that counts its ``save_pretrained`` calls."""

    def __init__(self) -> None:
        self.inner = build_tokenizer()
        self.saves = 0

    def save_pretrained(self, folder: str) -> Any:
        self.saves += 1
        return self.inner.save_pretrained(folder)


def _llama() -> Any:
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_the_dtype_is_the_first_float_parameters_and_others_are_named() -> None:
    model = _llama().to(torch.bfloat16)
    model.model.norm.float()  # a norm kept in fp32, as some recipes do
    main, others = trained_dtypes(model)
    assert main == "bfloat16"
    assert others == {"model.norm.weight": "float32"}
    assert trained_dtypes(_llama()) == ("float32", {})


def test_the_record_holds_the_config_dtype_tokenizer_and_generation_config() -> None:
    model: Any = _llama()
    model.to(torch.bfloat16)
    processor = CountingTokenizer()
    recorder = ModelRecorder(SimpleNamespace(model=model, processing_class=processor))
    record = recorder.record()
    assert record is not None
    assert record.config["architectures"] == ["LlamaForCausalLM"]
    assert record.config["hidden_size"] == 16
    assert "dtype" not in record.config  # export writes the dtype it exports
    assert (record.dtype, record.dtypes) == ("bfloat16", {})
    files = record.files or {}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files.keys()
    assert json.loads(files["generation_config.json"])["eos_token_id"] == 2
    # the files are made once per training session, and again after refresh()
    recorder.record()
    assert processor.saves == 1
    recorder.refresh()
    recorder.record()
    assert processor.saves == 2


def test_a_remote_code_model_records_its_code_and_auto_map() -> None:
    model = RemoteTiny(MiniCPMVLikeConfig())
    record = ModelRecorder(SimpleNamespace(model=model, processing_class=None)).record()
    assert record is not None
    assert record.config["auto_map"] == {"AutoModel": "test_model_record.RemoteTiny"}
    assert b"class RemoteTiny(MiniCPMVLike)" in (record.files or {})["test_model_record.py"]


def test_peft_models_and_plain_modules_are_not_recorded() -> None:
    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    for model in (peft.get_peft_model(_llama(), config), torch.nn.Linear(2, 2)):
        recorder = ModelRecorder(SimpleNamespace(model=model, processing_class=None))
        assert not recorder.records()
        assert recorder.record() is None
