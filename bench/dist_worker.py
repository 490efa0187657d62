"""One rank of the distributed benchmark (run by ``bench.distributed`` under ``torchrun``).

``decide``: time steps of a small loop without ckptwise, with a step-only policy (no
message), and with a policy that needs rank 0's decision (one collective a step), in
alternating blocks; ``write``: time synchronous saves of a replicated state (as DDP holds it),
each rank hashing its share of it (the default), and each rank hashing all of it. Rank 0 prints one JSON line of raw timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ckptwise as cw
from ckptwise.distributed import save as dist_save


def decide(steps: int, blocks: int) -> dict[str, Any]:
    x = torch.randn(256, 256)

    def step() -> None:
        torch.mm(x, x)

    root = Path(tempfile.mkdtemp(prefix="bench-decide-")) if dist.get_rank() == 0 else None
    box = [str(root)]
    dist.broadcast_object_list(box, src=0)
    managers = {
        "step_only": cw.CheckpointManager(f"{box[0]}/a", save=cw.every(10**9)),
        "coordinated": cw.CheckpointManager(
            f"{box[0]}/b", save=cw.every_duration(timedelta(days=1)) | cw.on_signal()
        ),
    }
    times: dict[str, list[float]] = {"plain": [], "step_only": [], "coordinated": []}
    n = 0
    for _ in range(blocks):
        for kind in times:
            dist.barrier()
            started = time.perf_counter()
            for _ in range(steps):
                n += 1
                step()
                if kind != "plain":
                    managers[kind].step(n, {})
            times[kind].append((time.perf_counter() - started) / steps)
    for manager in managers.values():
        manager.close()
    dist.barrier()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    return dict(times)


def write(megabytes: int, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)  # the same "replicated" state on every rank, as DDP keeps it
    chunks = [torch.randn(megabytes * 2**20 // 4 // 16) for _ in range(16)]
    rank = dist.get_rank()
    base = tempfile.mkdtemp(prefix="bench-write-") if rank == 0 else ""
    box = [base]
    dist.broadcast_object_list(box, src=0)
    shared_min = dist_save.SHARED_MIN_BYTES
    times: dict[str, list[float]] = {"shared": [], "each_hashes_all": []}
    for rep in range(reps):
        for kind in times:
            # "each_hashes_all": no tensor counts as shared, so every rank hashes its
            # whole replicated state, as before the hashing was split by tensor name
            dist_save.SHARED_MIN_BYTES = shared_min if kind == "shared" else 2**62
            for c in chunks:
                c.add_(1.0)  # new content: every object is written again
            manager = cw.CheckpointManager(
                f"{box[0]}/{kind}{rep}", save=cw.every(1), rng=False, codec="raw",
                async_save=False,
            )  # fmt: skip
            state = {f"w{i}": c for i, c in enumerate(chunks)}
            dist.barrier()
            started = time.perf_counter()
            manager.save(1, state)
            times[kind].append(time.perf_counter() - started)
            manager.close()
    dist_save.SHARED_MIN_BYTES = shared_min
    dist.barrier()
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
    return {"bytes": sum(c.nbytes for c in chunks), **times}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["decide", "write"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = (
        decide(args.steps, args.blocks)
        if args.what == "decide"
        else write(args.megabytes, args.reps)
    )
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
