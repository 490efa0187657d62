"""Saving to S3 through a local cache against saving to local disk, side by side in one run.

    python -m bench.remote [--params 34] [--saves 4] [--every 6]
    python -m bench.remote --check-only [--objects 10 100 1000 3000]

A real S3-compatible server (``moto_server``) runs on 127.0.0.1. The same training loop (a
``--params`` million parameter model with AdamW) saves asynchronously every ``--every``
steps three ways: to a local folder, to ``s3://`` through a local cache (``cache=``), and to
``s3://`` directly. For each, the stall of a save is what ``manager.step`` took plus what the
next step took beyond a step without saves (as in :mod:`bench.overlap`). Also reported: how
long after ``step()`` a checkpoint is durable remotely (``flush_uploads()`` returned).

``--check-only`` measures instead what the reuse check costs a save on ``s3://`` (every
reused object's size, asked where the run keeps it; see :mod:`ckptwise.store.commit`), for
runs of ``--objects`` objects all reused: one listing of ``objects/`` against a request
(``HEAD``) per object, and a whole save that reuses everything.
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
from ckptwise.store import CheckpointStore, FsspecBackend
from ckptwise.store.backend import sizes_one_by_one
from ckptwise.store.layout import object_path

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


def check_cost(
    count: int, options: dict[str, Any], repeats: int
) -> tuple[list[float], list[float], list[float]]:
    """Seconds a run of ``count`` objects, all reused, takes on ``s3://`` to size them by
    one listing, by a request each, and to save again (``repeats`` times each)."""
    backend = FsspecBackend(f"s3://{BUCKET}/check-{uuid.uuid4().hex[:6]}", **options)
    store = CheckpointStore(backend)
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(count)}
    store.commit(1, tensors)
    paths = [object_path(e.object) for e in store.manifest(1).entries()]
    listing = [timed(lambda: backend.sizes(paths)) for _ in range(repeats)]
    heads = [timed(lambda: sizes_one_by_one(backend, paths)) for _ in range(repeats)]
    saves = [
        timed(lambda n=n: store.commit(n, tensors))  # type: ignore[misc]
        for n in range(2, 2 + repeats)
    ]
    return listing, heads, saves


def check_costs(counts: list[int], repeats: int = 3) -> None:
    """Print what the reuse check of one save costs on ``s3://`` (``moto_server``) for runs
    of each of ``counts`` objects, all reused: listing, a request per object, a save."""

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:.0f} ms"

    print(f"{'objects':>8} {'listing':>12} {'HEAD each':>12} {'save, all reused':>18}")
    with moto_s3(BUCKET) as s3:
        options = {**s3, "skip_instance_cache": True}
        for count in counts:
            listing, heads, saves = check_cost(count, options, repeats)
            print(f"{count:8d} {ms(listing):>12} {ms(heads):>12} {ms(saves):>18}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=34, help="millions of fp32 parameters")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--every", type=int, default=12)
    parser.add_argument("--check-only", action="store_true", help="the reuse check's cost")
    parser.add_argument("--objects", type=int, nargs="+", default=[10, 100, 1000, 3000])
    args = parser.parse_args(argv)
    if args.check_only:
        check_costs(args.objects)
        return
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
