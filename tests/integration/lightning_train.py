"""A tiny Lightning run used by the tests as a real subprocess (and in-process).

``python lightning_train.py RUN --steps 40 --losses OUT [--resume] [--no-final]`` trains
an MLP with dropout through ``ckptwise.integrations.lightning.CheckpointCallback``, appending
each step's loss (as an exact hex float) to OUT, one JSON line per step. Under ``torchrun``
with ``--ddp`` it trains with Lightning's ``ddp`` strategy (with ``--fsdp``, its
``ModelParallelStrategy``, which shards the model with FSDP2's ``fully_shard`` and runs on the
CPU, where Lightning's FSDP1 strategy refuses to), each rank on its own order of the data, and
appends to ``OUT.rankR``. With ``--same-data`` every rank trains on the same batches (one
order of the data, and dropout masks alike, every rank's torch RNG being seeded alike), so
the run trains bit-identically on one rank or two; ``--resume-step S`` resumes from step S
rather than the newest checkpoint; ``--dump FILE`` writes the weights and optimizer state
each rank holds when training starts (after a resume: what it restored) to ``FILE``
(``FILE.rankR`` under ``torchrun``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptwise as cw
from ckptwise.integrations.lightning import CheckpointCallback


class Tiny(L.LightningModule):
    def __init__(
        self,
        losses: str | None = None,
        step_sleep: float = 0.0,
        shard: bool = False,
        dump: str | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.losses = losses
        self.step_sleep = step_sleep
        self.shard = shard
        self.dump = dump

    def on_train_start(self) -> None:
        if self.dump:  # Lightning has restored the weights and optimizer state by now
            (opt,) = self.trainer.optimizers
            doc = {
                "weights": {k: v.tolist() for k, v in self.state_dict().items()},
                "moments": {
                    f"{i}/{k}": v.tolist()
                    for i, s in opt.state_dict()["state"].items()
                    for k, v in s.items()
                    if isinstance(v, torch.Tensor)
                },
            }
            with open(self.dump, "w") as f:
                json.dump(doc, f)

    def configure_model(self) -> None:
        if self.shard:  # FSDP2: each Linear its own unit, then the root
            from torch.distributed.fsdp import fully_shard

            assert self.device_mesh is not None  # set by ModelParallelStrategy
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.losses:
            with open(self.losses, "a") as f:
                f.write(
                    json.dumps({"step": self.global_step + 1, "loss": float(loss.item()).hex()})
                    + "\n"
                )
        time.sleep(self.step_sleep)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.8)}


def loaders(rank: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The training and validation data; ``rank`` picks the training order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(120, 8, generator=g)
    y = x[:, :2].sum(dim=1, keepdim=True)
    sampler = cw.ResumableSampler(100, seed=5 + rank, auto_advance=False)
    train = DataLoader(
        TensorDataset(x[:100], y[:100]),
        batch_size=8,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    val = DataLoader(TensorDataset(x[100:], y[100:]), batch_size=10)
    return train, val


def run(
    root: str,
    steps: int,
    *,
    losses: str | None = None,
    resume: bool = False,
    step_sleep: float = 0.0,
    save: cw.Trigger | None = None,
    keep: cw.RetentionPolicy | None = None,
    val_every: int = 5,
    ddp: bool = False,
    fsdp: bool = False,
    same_data: bool = False,
    resume_step: int | None = None,
    dump: str | None = None,
    **callback_options: Any,
) -> CheckpointCallback:
    torch.manual_seed(0)
    rank = 0
    spread: dict[str, Any] = {}
    if ddp or fsdp:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # before the callback: its manager joins this job
        rank = dist.get_rank()
        losses = f"{losses}.rank{rank}" if losses else None
        dump = f"{dump}.rank{rank}" if dump else None
        strategy: Any = "ddp"
        if fsdp:
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = ModelParallelStrategy(
                data_parallel_size=dist.get_world_size(), tensor_parallel_size=1
            )
        spread = {
            "strategy": strategy,
            "devices": dist.get_world_size(),
            "use_distributed_sampler": False,
        }
    model = Tiny(losses, step_sleep, shard=fsdp, dump=dump)
    callback = CheckpointCallback(
        root, save=save or cw.every(5), keep=keep or cw.keep_last(2), **callback_options
    )
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        **spread,
    )
    train, val = loaders(0 if same_data else rank)
    resume_from = callback.resume_checkpoint(resume_step) if resume else None
    trainer.fit(model, train, val, ckpt_path=resume_from)
    return callback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--losses")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--no-final", action="store_true", help="do not save the last step")
    parser.add_argument("--same-data", action="store_true")
    parser.add_argument("--resume-step", type=int)
    parser.add_argument("--dump")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(
        args.run,
        args.steps,
        losses=args.losses,
        resume=args.resume,
        step_sleep=args.step_sleep,
        ddp=args.ddp,
        fsdp=args.fsdp,
        final=not args.no_final,
        same_data=args.same_data,
        resume_step=args.resume_step,
        dump=args.dump,
    )


if __name__ == "__main__":
    main()
