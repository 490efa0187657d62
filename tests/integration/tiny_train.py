"""A tiny, deterministic training run used by the integration tests as a real subprocess.

``python tiny_train.py RUN --steps 40 [--stop-after 20] --out OUT.json`` trains a small MLP
(half of it frozen, with dropout so the RNG matters) on synthetic data through a
:class:`ckptwise.ResumableSampler`, saving with ckptwise. It restores from RUN first, and
appends each step's loss (as an exact hex float) to OUT.json, with the final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptwise as cw


def build(
    seed: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),  # frozen "backbone"
        nn.Dropout(0.2),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 1),
    )
    for p in list(model[0].parameters()) + list(model[2].parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    return model, opt, sched


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(200, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    return TensorDataset(x, y)


def batches(loader: DataLoader[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-rng", action="store_true", help="do not save/restore RNG states")
    parser.add_argument("--on-signal", action="store_true", help="save and exit on SIGTERM")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to wait per step")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    model, opt, sched = build()
    sampler = cw.ResumableSampler(len(data()), seed=7)
    # A DataLoader draws a seed from the global RNG each time it starts an epoch, unless it
    # has its own generator; with one, resuming mid-epoch leaves the global RNG in step.
    loader = DataLoader(
        data(), batch_size=16, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler}
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"losses": {}}
    save = cw.every(args.every) | cw.on_final()
    if args.on_signal:
        save = save | cw.on_signal("SIGTERM", then="exit")
    try:
        with cw.CheckpointManager(
            args.run, save=save, keep=cw.keep_last(2), rng=not args.no_rng
        ) as manager:
            train(manager, state, loader, record, args)
    finally:  # also when on_signal ends the run with SystemExit(0)
        record["weights"] = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
        out.write_text(json.dumps(record))
    return 0


def train(
    manager: cw.CheckpointManager,
    state: dict[str, Any],
    loader: DataLoader[tuple[torch.Tensor, ...]],
    record: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    start = manager.restore(state)
    record.setdefault("restored", []).append(start)
    stream = batches(loader)
    for step in range(start + 1, args.steps + 1):
        model.train()
        x, y = next(stream)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        record["losses"][str(step)] = float(loss.item()).hex()
        last = step == args.stop_after or step == args.steps
        print(f"step {step}", flush=True)
        time.sleep(args.step_sleep)
        manager.step(step, state, metrics={"loss": loss.item()}, final=last)
        if step == args.stop_after:
            break


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    raise SystemExit(main())
