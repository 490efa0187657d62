"""Fine-tune the tiny MiniCPM-V-shaped model with a ``Trainer`` subclass, as MiniCPM-V's
``finetune.py`` does, with ckptwise added by one line (and resumed by one more).

    python examples/finetune_minicpmv.py --output_dir out --max_steps 60 \\
        --eval_strategy steps --eval_steps 10 --logging_steps 1 \\
        --ckptwise_save "after(20, every(10) | on_improvement(eval_loss))" \\
        --ckptwise_keep "last(2) | best(1, eval_loss)"

With ``--deepspeed examples/ds_config_zero3_cpu.json --bf16`` under ``torchrun`` it runs
MiniCPM-V's DeepSpeed ZeRO-3 launch on the CPU (see :func:`ckptwise.testing.deepspeed_on_cpu`).

``--use_ckptwise false`` runs the ``Trainer``'s own ``save_steps``/``save_total_limit``
checkpointing instead, for comparison. Each step's loss is appended to ``--losses_file``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minicpmv_tiny import CPMTrainer, SyntheticImageText, build_model

from ckptwise.integrations.transformers import CkptwiseArguments, attach


@dataclass
class ScriptArguments:
    use_ckptwise: bool = field(default=True, metadata={"help": "false: the Trainer saves."})
    resume: bool = field(default=False, metadata={"help": "Resume from the newest checkpoint."})
    losses_file: str | None = field(default=None, metadata={"help": "Append step losses here."})
    summary_file: str | None = field(default=None, metadata={"help": "Write a JSON summary."})
    train_size: int = 256
    export_best: str | None = field(default=None, metadata={"help": "Export the best model."})
    step_sleep: float = field(default=0.0, metadata={"help": "Seconds to wait after each step."})


class LossRecorder(TrainerCallback):
    """Appends every logged training loss, one JSON line per step, flushed at once."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        if self.path and logs and "loss" in logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "loss": float(logs["loss"]).hex()}))
                f.write("\n")
        return control


class Sleeper(TrainerCallback):
    """Slows steps down so a test can kill the process mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        return control


def weights_digest(model: torch.nn.Module) -> str:
    """One digest of every tensor of the model, to compare runs bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BytesRecorder(TrainerCallback):
    """Adds up what the Trainer's own checkpoints write (for the comparison)."""

    def __init__(self) -> None:
        self.written = 0
        self.saves: list[int] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.written += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        self.saves.append(state.global_step)
        return control


def main(argv: list[str] | None = None) -> dict[str, Any]:
    given = sys.argv[1:] if argv is None else argv
    deepspeed = any(a.startswith("--deepspeed") for a in given)
    if deepspeed and not torch.cuda.is_available():
        from ckptwise.testing import deepspeed_on_cpu

        cpu = deepspeed_on_cpu()  # before the arguments are parsed (see its docstring)
    dataclasses: Any = (ScriptArguments, TrainingArguments, CkptwiseArguments)
    parser = HfArgumentParser(dataclasses)
    script, training, ckpt = parser.parse_args_into_dataclasses(args=argv)
    if deepspeed and not torch.cuda.is_available():
        training.accelerator_config.use_configured_state = cpu["accelerator_config"][
            "use_configured_state"
        ]
    training.use_cpu = True
    training.report_to = []
    training.dataloader_num_workers = 0
    torch.set_num_threads(1)

    model = build_model(seed=training.seed)
    trainer = CPMTrainer(
        model=model,
        args=training,
        train_dataset=SyntheticImageText(script.train_size, seed=1),
        eval_dataset=SyntheticImageText(64, seed=2),
        callbacks=[LossRecorder(script.losses_file), Sleeper(script.step_sleep)],
    )
    summary: dict[str, Any] = {}
    if script.use_ckptwise:
        callback = attach(trainer, args=ckpt)  # <- the one line that hands saving to ckptwise
        resume = callback.resume_checkpoint() if script.resume else None  # <- and resuming
        trainer.train(resume_from_checkpoint=resume)
        manager = callback.manager
        summary["saves"] = [{"step": s, "reasons": list(r)} for s, r in callback.saved]
        summary["bytes_written"] = callback.bytes_written
        plan = manager.run.kept()
        summary["kept"] = {str(c.step): plan.get(c.step, []) for c in manager.run.checkpoints()}
        summary["on_disk"] = manager.run.physical_bytes()
        if script.export_best:
            summary["exported"] = str(callback.export(script.export_best, "best"))
    else:
        recorder = BytesRecorder()
        trainer.add_callback(recorder)
        trainer.train(resume_from_checkpoint=True if script.resume else None)
        summary["saves"] = [{"step": s, "reasons": ["save_steps"]} for s in recorder.saves]
        summary["bytes_written"] = recorder.written
        kept = sorted(Path(training.output_dir).glob("checkpoint-*"))
        summary["kept"] = {p.name.split("-")[1]: ["save_total_limit"] for p in kept}
        summary["on_disk"] = sum(
            f.stat().st_size for p in kept for f in p.rglob("*") if f.is_file()
        )
    summary["weights_digest"] = weights_digest(model)
    summary["trainable_fraction"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad
    ) / sum(p.numel() for p in model.parameters())
    if script.summary_file:
        Path(script.summary_file).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
