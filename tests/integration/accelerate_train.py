"""A tiny loop on an ``Accelerator`` (CPU), saving through ckptwise; used as a subprocess.

``python accelerate_train.py RUN --out OUT.json --steps 24 [--stop-after 11]``; under
``torchrun`` each rank writes ``OUT.json`` with its rank before the suffix.

For resuming on another number of processes: ``--split-batches`` (``DataLoaderConfiguration(
split_batches=True)``) splits each batch of 8 between the processes, so every step trains
on the same samples whatever their number; ``--dropout 0`` leaves out the dropout, whose
masks would be drawn per process; ``--restore-step S`` restores step S rather than the
newest; ``--dump-step S`` records the model and optimizer state after step S, and the
restore records what it put back and the ``RestoreWarning`` lines it gave. Each step's
loss over all processes (the mean of theirs) is recorded under ``"mean_losses"``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

import ckptwise as cw
from ckptwise.integrations.accelerate import accelerate_state


def dump(model: nn.Module, optimizer: Optimizer) -> dict[str, object]:
    """Weights and optimizer state as exact lists, for bit-exact comparisons."""
    weights = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
    moments = {
        f"{i}/{k}": v.flatten().tolist()
        for i, s in optimizer.state_dict()["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    return {"weights": weights, "moments": moments}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--samples", type=int, default=70)
    parser.add_argument("--split-batches", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--restore-step", type=int)
    parser.add_argument("--dump-step", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # without a GPU accelerate would set up no process group; without cpu=True it would
        # not wrap the model in DDP, and each process would train a model of its own
        PartialState(cpu=True, backend="gloo")
    split = DataLoaderConfiguration(split_batches=args.split_batches)
    accelerator = Accelerator(cpu=True, dataloader_config=split)
    set_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Dropout(args.dropout), nn.Linear(24, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, 6, generator=g)
    sampler = cw.ResumableSampler(args.samples, seed=2, auto_advance=False)
    loader = DataLoader(
        TensorDataset(x, x.sum(dim=1, keepdim=True)),
        batch_size=8,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = accelerate_state(
        accelerator, model=model, optimizer=optimizer, scheduler=scheduler, data=sampler
    )
    out = Path(args.out)
    if accelerator.num_processes > 1:
        out = out.with_name(f"{out.stem}{accelerator.process_index}{out.suffix}")
    record = json.loads(out.read_text()) if out.exists() else {"losses": {}}
    with cw.CheckpointManager(
        args.run, save=cw.every(3) | cw.on_final(), keep=cw.keep_last(2)
    ) as manager:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", cw.RestoreWarning)
            step = manager.restore(state, step=args.restore_step)
        record["warnings"] = [str(w.message) for w in caught if w.category is cw.RestoreWarning]
        record.setdefault("restored", []).append(step)
        record["restored_state"] = dump(accelerator.unwrap_model(model), optimizer)
        while step < args.steps:
            for xb, yb in loader:
                step += 1
                loss = nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                # the sampler feeds every process: it moves by the batches of all of them (with
                # a dataset that splits evenly; accelerate pads an uneven last round)
                sampler.advance(len(xb) * accelerator.num_processes)
                record["losses"][str(step)] = float(loss.item()).hex()
                mean = accelerator.reduce(loss.detach(), reduction="mean")
                record.setdefault("mean_losses", {})[str(step)] = float(mean.item()).hex()
                if step == args.dump_step:
                    record["at_step"] = dump(accelerator.unwrap_model(model), optimizer)
                stop = step in (args.stop_after, args.steps)
                manager.step(step, state, metrics={"loss": loss.item()}, final=stop)
                if stop:
                    break
            if step == args.stop_after:
                break
    unwrapped = accelerator.unwrap_model(model)
    record["weights"] = {k: v.flatten().tolist() for k, v in unwrapped.state_dict().items()}
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
