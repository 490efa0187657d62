"""A MiniCPM-V-shaped model, small enough for a CPU: a vision tower (``vpm``), a resampler
and a language model (``llm``), plus synthetic image-text data and a ``Trainer`` subclass.

The layout mirrors MiniCPM-V's fine-tuning setup: ``--tune_vision true --tune_llm false``
freezes the LLM, so only the vision tower and the resampler (about 6% of the parameters)
train. Everything is built from configs; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
)

IMAGE = 16  # pixels per side
PATCH = 4
TEXT = 12  # text tokens per sample
VOCAB = 256


class MiniCPMVLikeConfig(PretrainedConfig):
    """Sizes of the three parts."""

    model_type = "minicpmv_like"

    def __init__(
        self,
        vision_dim: int = 48,
        vision_layers: int = 2,
        query_num: int = 8,
        llm_hidden: int = 128,
        llm_layers: int = 2,
        **kwargs: Any,
    ) -> None:
        self.vision_dim = vision_dim
        self.vision_layers = vision_layers
        self.query_num = query_num
        self.llm_hidden = llm_hidden
        self.hidden_size = (
            llm_hidden  # as MiniCPM-V's config has it (DeepSpeed sizes buckets by it)
        )
        self.llm_layers = llm_layers
        super().__init__(**kwargs)


class Resampler(nn.Module):
    """Learned queries cross-attending to the vision features, projected to the LLM width."""

    def __init__(self, query_num: int, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(query_num, vision_dim) * 0.02)
        self.attn = nn.MultiheadAttention(vision_dim, num_heads=4, batch_first=True)
        self.ln = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query.unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(queries, features, features, need_weights=False)
        projected: torch.Tensor = self.proj(self.ln(out))
        return projected


class MiniCPMVLike(PreTrainedModel):
    """``vpm`` (patch embedding + transformer) -> ``resampler`` -> ``llm`` (a Llama)."""

    config_class = MiniCPMVLikeConfig
    base_model_prefix = "minicpmv_like"
    _supports_sdpa = True

    def __init__(self, config: MiniCPMVLikeConfig) -> None:
        super().__init__(config)
        d = config.vision_dim
        self.vpm = nn.ModuleDict(
            {
                "patch_embed": nn.Linear(3 * PATCH * PATCH, d),
                "pos": nn.Embedding((IMAGE // PATCH) ** 2, d),
                "encoder": nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=True),
                    config.vision_layers,
                    enable_nested_tensor=False,
                ),
            }
        )
        self.resampler = Resampler(config.query_num, d, config.llm_hidden)
        self.llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=config.llm_hidden,
                intermediate_size=3 * config.llm_hidden,
                num_hidden_layers=config.llm_layers,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            )
        )
        self.post_init()

    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        patches = pixel_values.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * PATCH * PATCH)
        positions = torch.arange(patches.shape[1], device=patches.device)
        x = self.vpm["patch_embed"](patches) + self.vpm["pos"](positions)
        features: torch.Tensor = self.vpm["encoder"](x)
        return features

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> Any:
        image_tokens = self.resampler(self.vision(pixel_values))
        text = self.llm.get_input_embeddings()(input_ids)
        embeds = torch.cat([image_tokens, text], dim=1)
        full_labels = None
        if labels is not None:
            ignore = torch.full(image_tokens.shape[:2], -100, dtype=labels.dtype)
            full_labels = torch.cat([ignore, labels], dim=1)
        return self.llm(inputs_embeds=embeds, labels=full_labels)


#: the sizes :func:`build_model` gives beyond the config class's defaults: like a real
#: checkpoint's, the model's config is its own (a folder without its config.json builds the
#: class's defaults, a 2-layer LLM, and does not load)
SIZES = {"llm_layers": 4}


def build_model(seed: int = 0) -> MiniCPMVLike:
    """The model with the LLM frozen, as MiniCPM-V's ``--tune_llm false`` runs it."""
    torch.manual_seed(seed)
    model = MiniCPMVLike(MiniCPMVLikeConfig(**SIZES))
    model.llm.requires_grad_(False)
    return model


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the model's vocabulary (``w0`` ... ``w255``), built here:
    the ``processing_class`` a fine-tuning script hands ``Trainer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>")


def trainable_fraction(model: nn.Module) -> float:
    """Share of parameters that train."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


class SyntheticImageText(Dataset[dict[str, torch.Tensor]]):
    """Images whose colour statistics determine the caption tokens: learnable, and made
    here from a seed."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, IMAGE, IMAGE, generator=g)
        means = (self.images.mean(dim=(2, 3)) * 7).long()  # 3 "words" per image
        words = torch.cat([means, means.flip(1), means[:, :1] + 8], dim=1)
        base = torch.randint(16, VOCAB, (size, TEXT), generator=g)
        base[:, : words.shape[1]] = words
        self.tokens = base

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.images[i],
            "input_ids": self.tokens[i],
            "labels": self.tokens[i],
        }


class CPMTrainer(Trainer):
    """A ``Trainer`` subclass with its own ``compute_loss``, as MiniCPM-V's script has."""

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(**inputs)
        loss = outputs.loss
        return (loss, outputs) if return_outputs else loss
