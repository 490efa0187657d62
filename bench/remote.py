"""Saving to S3 through a local cache against saving to local disk, side by side in one run.

    python -m bench.remote [--params 34] [--saves 4] [--every 6]

A real S3-compatible server (``moto_server``) runs on 127.0.0.1. The same training loop (a
``--params`` million parameter model with AdamW) saves asynchronously every ``--every``
steps three ways: to a local folder, to ``s3://`` through a local cache (``cache=``), and to
``s3://`` directly. For each, the stall of a save is what ``manager.step`` took plus what the
next step took beyond a step without saves (as in :mod:`bench.overlap`). Also reported: how
long after ``step()`` a checkpoint is durable remotely (``flush_uploads()`` returned).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

import ckptwise as cw
from bench.overlap import spread, timed
from bench.stall import build, machine, state_bytes, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import moto_s3

BUCKET = "bench"


def stalls(
    root: str, params_m: int, saves: int, every: int, **kwargs: Any
) -> tuple[list[float], list[float], float]:
    """Stalls of ``saves`` async saves to ``root``, seconds from each save until its
    checkpoint is durable remotely (with ``cache=``; polled once a step), and the median
    step time without saves."""
    model, opt = build(params_m)
    state = {"model": model, "optimizer": opt}

    def step() -> None:
        train(model, opt, 1)

    base = statistics.median(timed(step) for _ in range(every))
    out: list[float] = []
    durable: list[float] = []
    waiting: dict[int, float] = {}
    manager = cw.CheckpointManager(
        root, save=cw.every(every), keep=cw.keep_last(2), async_save=True, rng=False, **kwargs
    )
    call = 0.0
    for n in range(1, (saves + 1) * every + 2):
        took = timed(step)
        if n > 2 * every and n % every == 1:  # right after a save (the first is not counted)
            out.append(call + max(0.0, took - base))
        started = time.perf_counter()
        call = timed(lambda n=n: manager.step(n, state))  # type: ignore[misc]
        if n % every == 0:
            waiting[n] = started
        uploads = manager.run.upload_states() or {}
        for saved, at in list(waiting.items()):
            if uploads.get(saved) == "remote":
                durable.append(time.perf_counter() - at)
                del waiting[saved]
    manager.close()
    return out, durable, base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=34, help="millions of fp32 parameters")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--every", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="ckptwise-remote-"))
    model, opt = build(args.params)
    size = state_bytes(model, opt)
    del model, opt
    print(f"machine: {machine(work)}")
    print(f"state: {args.params}M fp32 parameters + AdamW = {size / 2**20:.0f} MiB")
    with moto_s3(BUCKET) as s3:
        options = {**s3, "skip_instance_cache": True}
        local, _, base = stalls(str(work / "local"), args.params, args.saves, args.every)
        cached, durable, _ = stalls(
            f"s3://{BUCKET}/cached-{uuid.uuid4().hex[:6]}",
            args.params,
            args.saves,
            args.every,
            cache=work / "cache",
            storage_options=options,
        )
        direct, _, _ = stalls(
            f"s3://{BUCKET}/direct-{uuid.uuid4().hex[:6]}",
            args.params,
            args.saves,
            args.every,
            storage_options=options,
        )
    shutil.rmtree(work, ignore_errors=True)

    def ms(xs: list[float]) -> list[float]:
        return [x * 1e3 for x in xs]

    rows = [
        (
            "stall: S3 through a cache / local disk",
            statistics.median(cached) / statistics.median(local),
            "<= 1.1",
            f"{spread(ms(cached))} ms vs {spread(ms(local))} ms",
        ),
        (
            "stall: S3 directly / local disk",
            statistics.median(direct) / statistics.median(local),
            "for scale",
            f"{spread(ms(direct))} ms",
        ),
        (
            "durable remotely after step(), in steps",
            statistics.median(durable) / base if durable else float("nan"),
            "reported",
            f"{spread(durable) if durable else 'none seen'} s; a step takes {base:.3f} s",
        ),
    ]
    print(f"\n{'figure':42} {'ratio':>7}  {'target':10} measured: median [min-max]")
    for name, ratio, target, detail in rows:
        print(f"{name:42} {ratio:7.3f}  {target:10} {detail}")


if __name__ == "__main__":
    main()
