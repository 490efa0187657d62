"""The tiny MiniCPM-V-shaped model on ``Trainer`` + DeepSpeed ZeRO-2/3 (or plain DDP) under
``torchrun`` (CPU).

``torchrun --nproc_per_node 2 ds_train.py RUN OUT --stage 3 --steps 20 [--resume [STEP]]``
fine-tunes as MiniCPM-V's ``finetune_ds.sh`` does (bf16, LLM frozen, vision tower and
resampler trained, DeepSpeed's ``AdamW`` and ``WarmupLR`` from its ZeRO config), with
ckptwise attached, and writes ``OUT/rankR.json``: each logged loss as an exact hex float, the
saves, what it resumed from, and ``bytes_written``.

Only the test harness adapts the run to a CPU: accelerate gets a gloo process group of its
own (it sets none up without a GPU), DeepSpeed's AdamW runs as torch's (``torch_adam``,
instead of compiling FusedAdam) and its shared-memory inference op is not compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def zero_config(stage: int) -> dict[str, Any]:
    """The settings of MiniCPM-V's ``ds_config_zero{2,3}.json``, plus ``torch_adam`` for CPU."""
    zero: dict[str, Any] = {
        "stage": stage,
        "offload_optimizer": {"device": "none", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        zero.update(
            offload_param={"device": "none", "pin_memory": True},
            sub_group_size=1e9,
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    adam = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    return {
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
                 "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {**adam, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto",
                      "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 100,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }  # fmt: skip


def cpu_setup(deepspeed: bool) -> None:
    """What a CPU needs that a GPU machine does not (see the module docstring)."""
    torch.set_num_threads(1)
    if deepspeed:
        from ckptwise.testing import deepspeed_on_cpu

        deepspeed_on_cpu()  # the documented recipe, as a user would call it
        return
    from accelerate import PartialState

    PartialState(backend="gloo")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, default=3, help="ZeRO stage; 0: plain DDP")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save", default="every(10)")
    parser.add_argument("--resume", type=int, nargs="?", const=-1, default=None)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument(
        "--trainer-saves", action="store_true", help="no ckptwise: the Trainer's own saves"
    )
    parser.add_argument(
        "--dump-start",
        help="a folder where the engine saves itself (DeepSpeed's own save_checkpoint, tag "
        "'start') as training begins, after resuming: the state it resumed to",
    )
    parser.add_argument(
        "--slow-writes",
        type=float,
        default=0.0,
        help="seconds each rank's object writes sleep first, so training goes on changing "
        "the live state while a background save writes",
    )
    parser.add_argument("--cache", default=None, help="the node's cache folder (cache=)")
    parser.add_argument(
        "--slow-uploads",
        type=float,
        default=0.0,
        help="seconds each object upload of the ranks of node --slow-node (torchrun's "
        "GROUP_RANK) sleeps first",
    )
    parser.add_argument("--slow-node", default="1")
    parser.add_argument(
        "--export", help="a folder where rank 0 exports the last checkpoint (callback.export)"
    )
    parser.add_argument(
        "--dump-final",
        help="a safetensors file where rank 0 writes the model as the engine held it when "
        "training ended (accelerate's get_state_dict: under ZeRO-3 gathered, in bf16)",
    )
    args = parser.parse_args()
    cpu_setup(args.stage > 0)

    import torch.distributed as dist
    from minicpmv_tiny import CPMTrainer, SyntheticImageText, build_model, build_tokenizer
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    import ckptwise as cw
    from ckptwise.integrations.transformers import attach

    rank = dist.get_rank()
    if args.slow_writes:
        import time

        from ckptwise.store import CheckpointStore

        real_write = CheckpointStore.write_objects

        def slow_write(store: CheckpointStore, new: Any, **options: Any) -> Any:
            time.sleep(args.slow_writes)
            return real_write(store, new, **options)

        CheckpointStore.write_objects = slow_write  # type: ignore[method-assign,assignment]
    if args.slow_uploads and os.environ.get("GROUP_RANK") == args.slow_node:
        from nodes_job import slow_uploads

        slow_uploads(args.slow_uploads)
    remote = os.environ.get("CKPTWISE_TEST_S3")  # storage options of an s3:// RUN
    options: dict[str, Any] = {} if args.cache is None else {"cache": args.cache}
    if remote is not None:
        options["storage_options"] = json.loads(remote)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"rank": rank, "losses": {}}

    class Losses(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> Any:
            if logs and "loss" in logs:
                record["losses"][str(state.global_step)] = float(logs["loss"]).hex()
            return control

    training = TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        adam_beta2=0.95,
        warmup_steps=5,
        bf16=args.stage > 0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        report_to=[],
        seed=42,
        remove_unused_columns=False,
        label_names=["labels"],
        deepspeed=zero_config(args.stage) if args.stage else None,
        accelerator_config={"use_configured_state": True},
        disable_tqdm=True,
        use_cpu=True,  # bf16 on a CPU needs it on transformers 5
    )
    model = build_model(seed=training.seed)
    trainer = CPMTrainer(
        model=model,
        args=training,
        train_dataset=SyntheticImageText(256, seed=1),
        processing_class=build_tokenizer(),  # recorded for export, as a script's tokenizer
        data_collator=default_data_collator,  # not the padding collator a tokenizer implies
        callbacks=[Losses()],
    )
    if args.dump_start:
        dump = args.dump_start
        is_deepspeed = args.stage > 0

        class DumpStart(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if not is_deepspeed:  # DDP: the weights and Adam's moments, by name
                    from safetensors.torch import save_file

                    live: Any = trainer.model
                    optimizer: Any = trainer.optimizer
                    tensors = {f"model/{k}": v for k, v in live.state_dict().items()}
                    # numbered as the optimizer's state_dict() numbers them
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    for index, param in enumerate(params):
                        for key, value in optimizer.state.get(param, {}).items():
                            tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value)
                    Path(dump).mkdir(parents=True, exist_ok=True)
                    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
                    save_file(tensors, f"{dump}/rank{rank}.safetensors")
                    return control
                engine: Any = trainer.model_wrapped  # the DeepSpeed engine, once training began
                engine.save_checkpoint(dump, tag="start")
                return control

        trainer.add_callback(DumpStart())
    if args.trainer_saves:
        trainer.train()
        files = [f for f in (out / "hf").rglob("*") if f.is_file()]
        record["bytes_written"] = sum(f.stat().st_size for f in files)
    else:
        callback = attach(
            trainer, args.run, save=cw.parse_save(args.save), keep=cw.keep_all(), **options
        )
        resume = None
        if args.resume is not None:
            resume = callback.resume_checkpoint(None if args.resume < 0 else args.resume)
        if resume is not None:  # what this rank's node got, before training removes it
            folder = Path(resume)
            record["resume_folder"] = str(folder)
            record["resume_files"] = sorted(
                str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()
            )
        record["resumed_from"] = resume and int(resume.rsplit("-", 1)[1])
        trainer.train(resume_from_checkpoint=resume)
        record["saves"] = [[step, list(reasons)] for step, reasons in callback.saved]
        if args.export and rank == 0:
            callback.export(args.export, "latest")
        record["bytes_written"] = callback.bytes_written
    if args.dump_final:
        from safetensors.torch import save_file

        final = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # every rank
        if rank == 0:
            save_file({k: v.contiguous() for k, v in final.items()}, args.dump_final)
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()  # an explicit teardown: without it the exit can abort
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' helpers (nodes_job)
    sys.exit(main())
