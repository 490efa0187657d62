"""One rank of ``bench.deepspeed_save``: a Llama-shaped ``Trainer`` + DeepSpeed ZeRO-3 job.

``torchrun --nproc_per_node 2 -m bench.ds_save_worker VARIANT OUT [--params small] ...``
trains a ``LlamaForCausalLM`` built from a config (no weights are downloaded) on synthetic
tokens, in bf16 on the CPU, with the DeepSpeed config and CPU recipe of
``tests/integration/ds_train.py``. ``VARIANT`` says who saves: ``none`` (nobody),
``deepspeed`` (the ``Trainer``, through DeepSpeed's ``save_checkpoint``), ``sync`` or
``async`` (ckptwise attached, the ``Trainer``'s saves off). Rank 0 prints one
``RESULT {json}`` line with every rank's figures: the time of each step, of the training
loop and of ``trainer.train()``, peak RSS, and the bytes the saves wrote.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.memory import peak_rss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from ds_train import cpu_setup, zero_config

VARIANTS = ("none", "deepspeed", "sync", "async")

# (hidden, layers, intermediate, heads, vocab): "full" is 162.4M parameters, "small" 4.8M
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "full": (768, 16, 2048, 12, 32000),
    "small": (192, 4, 512, 4, 8000),
}


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences, the same for every variant (a fixed generator seed)."""

    def __init__(self, count: int, length: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def build_model(params: str, frozen: bool, length: int) -> tuple[Any, int, int]:
    """The model, its parameter count and how many of them train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, vocab = SHAPES[params]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(length, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if frozen:
        # MiniCPM-V's current script: the LLM body frozen, a small part trained (here the
        # last decoder layer and the final norm, 4.4 % of the full-size model)
        model.requires_grad_(False)
        model.model.layers[-1].requires_grad_(True)
        model.model.norm.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, total, trained


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("out")
    parser.add_argument("--params", choices=sorted(SHAPES), default="full")
    parser.add_argument("--frozen", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    cpu_setup(deepspeed=True)

    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import ckptwise as cw
    from ckptwise.errors import ConfigError
    from ckptwise.integrations.transformers import attach

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    begins: list[float] = []
    ended: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            begins.append(time.perf_counter())
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            ended.append(time.perf_counter())
            return control

    trainer_saves = args.variant == "deepspeed"
    training = TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-5,
        weight_decay=0.1,
        adam_beta2=0.95,
        warmup_steps=2,
        bf16=True,
        logging_steps=args.steps,
        save_strategy="steps" if trainer_saves else "no",
        save_steps=args.every,
        report_to=[],
        seed=42,
        deepspeed=zero_config(3),
        accelerator_config={"use_configured_state": True},
        disable_tqdm=True,
        use_cpu=True,  # bf16 on a CPU needs it on transformers 5
    )
    model, total, trained = build_model(args.params, args.frozen, args.length)
    data = TokenData(args.steps * args.batch * world, args.length, model.config.vocab_size)
    trainer = Trainer(model=model, args=training, train_dataset=data)
    record: dict[str, Any] = {"rank": rank, "params": total, "trained": trained}
    callback = None
    if args.variant in ("sync", "async"):
        try:
            callback = attach(
                trainer,
                out / "ckptwise",
                save=cw.every(args.every),
                keep=cw.keep_all(),
                async_save=args.variant == "async",
            )
        except ConfigError as exc:
            record["refused"] = str(exc)
    # added after ckptwise's callback: its on_train_end runs after ckptwise's has waited
    # for a save still in flight, so the last step's time includes that wait
    trainer.add_callback(Clock())
    if "refused" not in record:
        with peak_rss() as rss:
            started = time.perf_counter()
            trainer.train()
            finished = time.perf_counter()
        marks = [*begins, ended[0]]
        record.update(
            train_s=finished - started,
            loop_s=marks[-1] - marks[0],
            step_s=[b - a for a, b in itertools.pairwise(marks)],
            rss_train_peak=rss[0],
        )
        if callback is not None:
            record["saves"] = [step for step, _ in callback.saved]
            record["bytes_written"] = callback.bytes_written
            # this rank's state as a save copies it (0 when saves are synchronous)
            record["copied_bytes"] = sum(callback.manager.last_copy)
        dist.barrier()  # every rank's files are written
        folder = out / ("ckptwise" if callback is not None else "hf")
        if folder.exists():
            record["bytes_on_disk"] = sum(
                f.stat().st_size for f in folder.rglob("*") if f.is_file()
            )
        if trainer_saves:
            record["saves"] = sorted(
                int(d.name.rsplit("-", 1)[1]) for d in folder.glob("checkpoint-*")
            )
    record["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    records: list[Any] = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        print("RESULT " + json.dumps(records), flush=True)
    dist.barrier()
    dist.destroy_process_group()  # an explicit teardown: without it the exit can abort
    return 0


if __name__ == "__main__":
    sys.exit(main())
