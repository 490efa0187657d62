"""Save speed, measured side by side in one run on the same state and disk.

    python -m bench.stall [--params 100] [--reps 3] [--steps 200] [--json out.json]

A model of about ``--params`` million fp32 parameters with AdamW state (over 1 GiB in all)
is trained a step, then saved and restored in several ways. Every figure is a ratio of two
timings taken in this run (medians of ``--reps``), so the machine's speed cancels out:

* a training run saving every 20 steps, async ckptwise vs sync ``torch.save``, each minus
  the same run without saves;
* a sync ckptwise save / ``torch.save`` + fsync, and its throughput / a raw write of the
  same bytes with fsync (the async stall is measured inside a training loop by
  :mod:`bench.overlap`);
* restore / a raw read of the same bytes, and / ``torch.load`` of the ``torch.save`` file
  (files are evicted from the page cache before every read, where the kernel allows it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptwise as cw
from ckptwise.store.layout import tensor_bytes


def build(params_m: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Square linear layers of width 4096 (16.8M parameters each) and AdamW, one step in."""
    torch.manual_seed(0)
    layers = max(1, round(params_m / 16.8))
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train(model, opt, 1)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 4096)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(int(t.nbytes) for t in model.state_dict().values())
    for per_param in opt.state.values():
        total += sum(int(v.nbytes) for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def median(reps: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(reps))


def evict(paths: list[Path]) -> bool:
    """Drop files from the page cache (clean pages only); whether the kernel allowed it."""
    ok = True
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def torch_save(obj: Any, path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_write(buffers: list[memoryview], path: Path) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in buffers:
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def raw_read(path: Path, size: int) -> float:
    evict([path])
    out = bytearray(size)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        view = memoryview(out)
        while view:
            n = f.readinto(view)
            if not n:
                break
            view = view[n:]
    return time.perf_counter() - start


def wall(work: Path, params_m: int, steps: int, every: int, how: str) -> float:
    """Seconds for ``steps`` training steps saving every ``every`` with ``how``."""
    model, opt = build(params_m)
    state = {"model": model, "optimizer": opt}
    root = work / f"wall-{how}"
    shutil.rmtree(root, ignore_errors=True)
    manager = None
    if how == "ckptwise-async":
        manager = cw.CheckpointManager(
            root, save=cw.every(every), keep=cw.keep_last(1), async_save=True, codec="raw"
        )
    start = time.perf_counter()
    for step in range(1, steps + 1):
        train(model, opt, 1)
        if manager is not None:
            manager.step(step, state)
        elif how == "torch.save" and step % every == 0:
            root.mkdir(parents=True, exist_ok=True)
            torch_save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()}, root / "last.pt"
            )
    if manager is not None:
        manager.close()
    elapsed = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return elapsed


def machine(work: Path) -> str:
    df = subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout
    disk = df.splitlines()[-1].split()[0] if df else "?"
    return f"{os.cpu_count()} cores, disk {disk} ({work}), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=100, help="millions of fp32 parameters")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument(
        "--wall-params",
        type=int,
        default=34,
        help="millions of parameters for the training-run comparison",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--only-run", action="store_true", help="only the training-run figure")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ckptwise-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.only_run:
        base = wall(work, args.wall_params, args.steps, args.every, "none")
        w_async = wall(work, args.wall_params, args.steps, args.every, "ckptwise-async")
        w_torch = wall(work, args.wall_params, args.steps, args.every, "torch.save")
        print(
            f"run overhead: async ckptwise +{w_async - base:.1f} s, sync torch.save "
            f"+{w_torch - base:.1f} s on {base:.1f} s: ratio {(w_async - base) / (w_torch - base):.2f}"
        )
        return
    model, opt = build(args.params)
    state = {"model": model, "optimizer": opt}
    size = state_bytes(model, opt)
    print(f"machine: {machine(work)}")
    print(
        f"state: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M fp32 parameters "
        f"+ AdamW moments = {size / 2**30:.2f} GiB\n"
    )

    pt = work / "state.pt"
    t_torch = median(
        args.reps,
        lambda: torch_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, pt),
    )
    tensors = list(model.state_dict().values()) + [
        v for per in opt.state.values() for v in per.values() if isinstance(v, torch.Tensor)
    ]
    buffers = [tensor_bytes(t) for t in tensors]
    raw = work / "state.raw"
    t_raw_write = median(args.reps, lambda: raw_write(buffers, raw))

    def ours_sync() -> float:
        root = work / "sync"
        shutil.rmtree(root, ignore_errors=True)
        train(model, opt, 1)
        with cw.CheckpointManager(
            root, save=cw.every(1), codec="raw", rng=False, async_save=False
        ) as m:
            start = time.perf_counter()
            m.step(1, state)
            return time.perf_counter() - start

    t_sync = median(args.reps, ours_sync)

    sync_root = work / "sync"
    evictable = evict(files_under(sync_root))

    def restore() -> float:
        evict(files_under(sync_root))
        target = {"model": model, "optimizer": opt}
        start = time.perf_counter()
        cw.CheckpointManager(sync_root).restore(target)
        return time.perf_counter() - start

    t_restore = median(args.reps, restore)
    t_raw_read = median(args.reps, lambda: raw_read(raw, size))

    def torch_load() -> float:
        evict([pt])
        start = time.perf_counter()
        torch.load(pt, weights_only=True)
        return time.perf_counter() - start

    t_load = median(args.reps, torch_load)

    print(
        f"training run: {args.steps} steps of a {args.wall_params}M-parameter model, "
        f"saving every {args.every}"
    )
    base = wall(work, args.wall_params, args.steps, args.every, "none")
    w_async = wall(work, args.wall_params, args.steps, args.every, "ckptwise-async")
    w_torch = wall(work, args.wall_params, args.steps, args.every, "torch.save")
    shutil.rmtree(work, ignore_errors=True)

    rows = [
        (
            "run overhead: async ckptwise / sync torch.save",
            (w_async - base) / (w_torch - base),
            "lower is better",
            f"+{w_async - base:.1f} s vs +{w_torch - base:.1f} s on {base:.1f} s",
        ),
        (
            "sync save / (torch.save + fsync)",
            t_sync / t_torch,
            "lower is better",
            f"{t_sync:.2f} s vs {t_torch:.2f} s",
        ),
        (
            "sync save throughput / raw write + fsync",
            t_raw_write / t_sync,
            ">= 0.8",
            f"{size / t_sync / 1e6:.0f} vs {size / t_raw_write / 1e6:.0f} MB/s",
        ),
        (
            "restore / raw read of the same bytes",
            t_restore / t_raw_read,
            "<= 1.25",
            f"{t_restore:.2f} s vs {t_raw_read:.2f} s",
        ),
        (
            "restore / torch.load of the torch.save file",
            t_restore / t_load,
            "lower is better",
            f"{t_restore:.2f} s vs {t_load:.2f} s",
        ),
    ]
    print(f"\n{'figure':48} {'ratio':>7}  {'target':20} measured (median of {args.reps})")
    for name, ratio, target, detail in rows:
        print(f"{name:48} {ratio:7.3f}  {target:20} {detail}")
    if not evictable:
        print("\nnote: the kernel refused to drop files from the page cache; reads are warm")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(Path(tempfile.gettempdir())),
                    "state_bytes": size,
                    "rows": [
                        {"figure": r[0], "ratio": r[1], "target": r[2], "detail": r[3]}
                        for r in rows
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
