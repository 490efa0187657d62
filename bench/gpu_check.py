"""A device check on a CUDA machine: async saves of GPU state, and restores back to the GPU.

    python -m bench.gpu_check [--params 400]

Trains a model on the GPU a step (half of it frozen), then: the stall of an async save
(pinned, non-blocking device-to-host copies) against ``torch.save`` + fsync of the same
state; the stall of the next save, where the frozen half is not copied again; that a save is
immune to training mutating the GPU tensors right after ``step()`` returns; and that a
restore into a fresh GPU model is bit-exact. Not part of CI (CI has no GPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ckptwise as cw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=400, help="millions of fp32 parameters")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    device = torch.device("cuda")
    layers = max(2, round(args.params / 16.8))

    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(layers)]).to(device)
        for layer in list(model)[: layers // 2]:
            layer.requires_grad_(False)  # a frozen half, like a frozen LLM
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, opt

    def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = model(torch.randn(16, 4096, device=device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    model, opt = build(0)
    train(model, opt)
    state = {"model": model, "optimizer": opt}
    size = sum(t.nbytes for t in model.state_dict().values()) + sum(
        v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    work = Path(tempfile.mkdtemp(prefix="ckptwise-gpu-"))
    print(
        f"{torch.cuda.get_device_name()}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"parameters (half frozen) + AdamW = {size / 2**30:.2f} GiB on the GPU; disk {work}"
    )

    torch.cuda.synchronize()
    start = time.perf_counter()
    with open(work / "state.pt", "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    t_torch = time.perf_counter() - start

    stalls = []
    with cw.CheckpointManager(work / "run", save=cw.every(1), async_save=True, codec="raw") as m:
        for step in range(1, 5):
            train(model, opt)
            torch.cuda.synchronize()
            start = time.perf_counter()
            m.step(step, state)
            stalls.append(time.perf_counter() - start)
            if step == 4:
                expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)  # training goes on while the write is in flight
            m.wait()
        copied, deferred = m.last_copy
    saved = cw.open_run(work / "run").load(4)["model"]
    immune = all(torch.equal(saved[k], expected[k]) for k in expected)

    fresh, fresh_opt = build(1)
    target = {"model": fresh, "optimizer": fresh_opt}
    torch.cuda.synchronize()
    start = time.perf_counter()
    restored = cw.open_run(work / "run").restore(target)
    torch.cuda.synchronize()
    t_restore = time.perf_counter() - start
    exact = all(torch.equal(fresh.state_dict()[k].cpu(), expected[k]) for k in expected)
    on_gpu = all(p.device.type == "cuda" for p in fresh.parameters())

    print(f"torch.save + fsync of the state: {t_torch:.2f} s")
    print(f"async save stalls (steps 1-4): {', '.join(f'{s * 1e3:.0f} ms' for s in stalls)}")
    print(
        f"stall / torch.save: first {stalls[0] / t_torch:.3f}, later median "
        f"{sorted(stalls[1:])[1] / t_torch:.3f} (target <= 0.05)"
    )
    print(
        f"last save copied {copied / 2**30:.2f} GiB before step() returned and "
        f"{deferred / 2**30:.2f} GiB in the background (defer_copy=True only)"
    )
    print(f"saved values immune to mutation after step(): {immune}")
    print(
        f"restore of step {restored} into a fresh GPU model: {t_restore:.2f} s, "
        f"bit-exact: {exact}, on the GPU: {on_gpu}"
    )
    shutil.rmtree(work, ignore_errors=True)
    if not (immune and exact and on_gpu):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
