"""One rank of :mod:`bench.nodes` (run under ``torchrun --nnodes 2``): the same DDP loop saving
in the background to a local run folder and to ``s3://`` through the node's cache folder, in
alternating blocks; rank 0 prints one JSON line of raw timings."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ckptwise as cw
from bench.stall import build, state_bytes
from ckptwise.store import FsspecBackend
from ckptwise.store.layout import manifest_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=84)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--local-run", dest="local", required=True, help="the local run folder")
    parser.add_argument("--s3-run", dest="remote", required=True, help="the s3:// run")
    parser.add_argument("--cache", required=True, help="this node's cache folder")
    args = parser.parse_args()
    options = json.loads(os.environ["CKPTWISE_BENCH_S3"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build(args.params)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = {"model": model, "optimizer": opt}

    def train() -> None:
        x = torch.randn(8, 4096)
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    figures: dict[str, Any] = {"state_bytes": state_bytes(model, opt), "durable": []}
    step = 0
    for rep in range(args.reps):
        for mode in ("none", "local", "s3"):
            manager: cw.CheckpointManager | None = None
            if mode == "local":
                manager = cw.CheckpointManager(
                    f"{args.local}/r{rep}", save=cw.every(args.every), keep=cw.keep_last(2)
                )
            elif mode == "s3":
                manager = cw.CheckpointManager(
                    f"{args.remote}-r{rep}",
                    save=cw.every(args.every),
                    keep=cw.keep_last(2),
                    cache=f"{args.cache}/r{rep}",
                    storage_options=options,
                )
            remote = FsspecBackend(f"{args.remote}-r{rep}", **options)
            dist.barrier()
            began, store_cpu = time.perf_counter(), cpu_seconds(os.environ.get("BENCH_STORE_PID"))
            for _ in range(args.saves * args.every):
                step += 1
                train()
                if manager is None:
                    continue
                start = time.perf_counter()
                decision = manager.step(step, state)
                if decision.save:
                    figures.setdefault(f"{mode}_stall", []).append(time.perf_counter() - start)
                    if mode == "s3" and rank == 0:
                        threading.Thread(
                            target=watch, args=(remote, step, figures["durable"]), daemon=True
                        ).start()
            figures.setdefault(f"{mode}_block", []).append(time.perf_counter() - began)
            if manager is not None:
                start = time.perf_counter()
                manager.close()  # the last save committed (s3: and durable in the bucket)
                figures.setdefault(f"{mode}_close", []).append(time.perf_counter() - start)
            used = cpu_seconds(os.environ.get("BENCH_STORE_PID")) - store_cpu
            figures.setdefault(f"{mode}_store_cpu", []).append(used)
    if rank == 0:
        print("RESULT " + json.dumps(figures), flush=True)
    dist.destroy_process_group()


def cpu_seconds(pid: str | None) -> float:
    """The CPU time the process ``pid`` (the object store's server) has used so far."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(remote: FsspecBackend, step: int, out: list[float]) -> None:
    """Seconds from now until the checkpoint of ``step`` is listed in the bucket."""
    start = time.perf_counter()
    path = manifest_path(step)
    while not remote.exists(path):
        time.sleep(0.02)
    out.append(time.perf_counter() - start)


if __name__ == "__main__":
    main()
