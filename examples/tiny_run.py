"""The main job: a small real training run that shows ckptwise's policies at work.

A tiny model (a frozen "backbone" and a trainable head) learns a synthetic task. ckptwise
saves by policy -- skip the first 20 steps, then every 20, plus whenever the validation loss
improves, plus the final step -- and keeps the last 2 plus the best 1. The run stops at step
70 as if the job had been preempted, a fresh model and optimizer restore from the run folder
and training finishes; the losses after resuming match an uninterrupted run bit for bit.

    python examples/tiny_run.py [--out runs/tiny]

Without ``--out`` the runs go to a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptwise as cw

STEPS, STOP_AT, EVAL_EVERY = 120, 70, 15


def build() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256),
        nn.GELU(),
        nn.Linear(256, 256),
        nn.GELU(),  # the frozen backbone
        nn.Dropout(0.1),
        nn.Linear(256, 2),  # the head that trains
    )
    for layer in (model[0], model[2]):
        layer.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 32, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long()
    sampler = cw.ResumableSampler(1792, seed=2)
    loader = DataLoader(
        TensorDataset(x[:1792], y[:1792]),
        batch_size=32,
        sampler=sampler,
        generator=torch.Generator().manual_seed(3),
    )
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "data": sampler,
        "_loader": loader,
        "_val": (x[1792:], y[1792:]),
    }


def stream(loader: DataLoader[Any]) -> Iterator[Any]:
    while True:
        yield from loader


TOTALS = {"saves": 0, "written": 0, "whole": 0}


def train(run: Path, until: int, *, log: bool) -> dict[int, float]:
    parts = build()
    state = {k: v for k, v in parts.items() if not k.startswith("_")}
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    save = cw.every(20, start=30) | cw.on_improvement("eval_loss") | cw.on_final()
    keep = cw.keep_last(2) | cw.keep_best(1, "eval_loss")
    losses: dict[int, float] = {}
    with cw.CheckpointManager(run, save=save, keep=keep) as manager:
        start = manager.restore(state)
        if log and start:
            print(f"\nresumed from step {start} with a fresh model, optimizer and sampler")
        batches = stream(parts["_loader"])
        for step in range(start + 1, until + 1):
            model.train()
            x, y = next(batches)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            losses[step] = loss.item()
            metrics: dict[str, float] = {"loss": loss.item()}
            if step % EVAL_EVERY == 0:
                model.eval()
                with torch.no_grad():
                    vx, vy = parts["_val"]
                    metrics["eval_loss"] = nn.functional.cross_entropy(model(vx), vy).item()
            decision = manager.step(step, state, metrics=metrics, final=step == STEPS)
            if log and decision.save:
                info = manager.run.info(step)
                TOTALS["saves"] += 1
                TOTALS["written"] += info.new_bytes
                TOTALS["whole"] += info.logical_bytes
                ev = f"  eval_loss={metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
                print(
                    f"step {step:4d}: saved because {', '.join(decision.reasons):40s}"
                    f" wrote {info.new_bytes / 1024:8.1f} KiB of {info.logical_bytes / 1024:.1f} KiB{ev}"
                )
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder to keep the runs in (default: none)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ckptwise-demo-"))
    try:
        demo(base)
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)


def demo(base: Path) -> None:
    run, reference = base / "run", base / "reference"
    for folder in (run, reference):  # an earlier demo's, when --out is given again
        shutil.rmtree(folder, ignore_errors=True)

    print(f"training to step {STOP_AT}, then stopping as if preempted (run folder: {run})")
    first = train(run, STOP_AT, log=True)
    second = train(run, STEPS, log=True)
    straight = train(reference, STEPS, log=False)

    finished = cw.open_run(run)
    print("\nkept checkpoints:")
    kept = finished.kept()
    for info in finished.checkpoints():
        ev = info.metrics.get("eval_loss")
        print(
            f"  step {info.step:4d}  saved for {', '.join(info.reasons):30s} kept as "
            f"{', '.join(kept.get(info.step, [])):25s}"
            + (f" eval_loss={ev:.4f}" if ev is not None else "")
        )
    print(
        f"\n{TOTALS['saves']} saves wrote {TOTALS['written'] / 1024:.1f} KiB; writing each "
        f"whole, as torch.save does, would write {TOTALS['whole'] / 1024:.1f} KiB "
        "(the frozen backbone is stored once)"
    )
    print(f"bytes on disk now: {finished.physical_bytes() / 1024:.1f} KiB")
    problems = finished.verify()
    print(f"verify: {problems if problems else 'all objects match their checksums'}")
    resumed = {**first, **second}
    same = all(resumed[s] == straight[s] for s in straight)
    print(f"losses after resuming equal an uninterrupted run, bit for bit: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
