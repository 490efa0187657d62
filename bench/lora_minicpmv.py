"""LoRA fine-tune of the tiny MiniCPM-V-shaped model, saving every 5 steps one of two ways.

    python -m bench.lora_minicpmv --mode ckptwise --output_dir /tmp/lora --summary_file s.json
    python -m bench.lora_minicpmv --mode trainer --output_dir /tmp/lora-hf --summary_file t.json

The model is ``examples/minicpmv_tiny.build_model`` wrapped in peft LoRA (r=8 on ``q_proj``
and ``v_proj``, which only the LLM has; no ``modules_to_save``); everything else, the
vision tower and the resampler included, is frozen. ``--mode ckptwise`` hands saving to
ckptwise (``every(5)``, everything kept, ``--weights`` chooses ``"all"`` or
``"trainable"``); ``--mode trainer`` uses the ``Trainer``'s own ``save_steps=5`` and adds up
the bytes of each ``checkpoint-N`` folder as it is saved. ``bench.storage`` runs both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from finetune_minicpmv import BytesRecorder
from minicpmv_tiny import CPMTrainer, SyntheticImageText, build_model

import ckptwise as cw
from ckptwise.integrations.transformers import attach

__all__ = ["main"]


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["ckptwise", "trainer"], required=True)
    parser.add_argument("--weights", choices=["all", "trainable"], default="all")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--summary_file", default=None)
    parser.add_argument("--max_steps", type=int, default=50)
    parser.add_argument("--save_steps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    base = build_model(seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model: Any = get_peft_model(base, lora)  # freezes every parameter that is not LoRA's
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    untouched = [
        n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    ]  # the vision tower and resampler must be frozen too
    if untouched:
        raise SystemExit(f"parameters outside LoRA still train: {untouched[:5]}")

    output_dir = Path(args.output_dir)
    training = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="steps" if args.mode == "trainer" else "no",
        save_steps=args.save_steps,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = CPMTrainer(model=model, args=training, train_dataset=SyntheticImageText(256, seed=1))
    summary: dict[str, Any] = {"mode": args.mode, "trainable_fraction": trainable / total}
    if args.mode == "ckptwise":
        root = output_dir / "ckptwise"
        callback = attach(
            trainer,
            root,
            save=cw.every(args.save_steps),
            keep=cw.keep_all(),
            weights=args.weights,
        )
        trainer.train()
        summary["weights"] = args.weights
        summary["saves"] = [step for step, _ in callback.saved]
        summary["bytes_written"] = callback.bytes_written
        summary["on_disk"] = _tree_bytes(root)
        callback.manager.close()
    else:
        recorder = BytesRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        summary["saves"] = recorder.saves
        summary["bytes_written"] = recorder.written
        summary["on_disk"] = sum(_tree_bytes(p) for p in output_dir.glob("checkpoint-*"))
    summary["final_loss"] = next(
        (float(e["loss"]) for e in reversed(trainer.state.log_history) if "loss" in e), None
    )
    if args.summary_file:
        Path(args.summary_file).write_text(json.dumps(summary, indent=1))
    else:
        json.dump(summary, sys.stdout, indent=1)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
