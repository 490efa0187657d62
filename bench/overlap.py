"""What an async save costs a training loop, measured inside the loop, baselines in the same run.

    python -m bench.overlap [--params 100] [--saves 5] [--every 4] [--steps 200]
                            [--wall-params 34] [--json out.json]

A model of about ``--params`` million fp32 parameters with AdamW (over 1 GiB of state) trains
on random data. The same process first trains without saves (the baseline step time), then
with ``CheckpointManager(async_save=True)`` saving every ``--every`` steps. Every figure is a
ratio of timings taken in this run:

* the stall of one save: the time ``manager.step`` takes, plus what the next training step
  took beyond a step without saves (its ``optimizer.step()`` may wait for the background
  copy), divided by ``torch.save`` + fsync of the same state; by default (the copy taken
  before ``step()`` returns, sound whatever the loop does next) and with ``defer_copy=True``
  (the copy overlapping the next forward and backward, under that option's contract), so
  the table shows what soundness costs;
* the step time right after a save, and of the other steps between saves, against steps
  without saves (the background hashing and writing share the cores with training);
* the extra resident memory while saving (peak RSS with saves minus peak RSS without),
  divided by the state's size, against ``0.25 + changed bytes / state bytes``;
* a ``--steps`` run of a ``--wall-params`` model saving every 20 steps, divided by the same run
  without saves (medians of ``--wall-reps`` runs, interleaved);
* a run under ``save=cw.overhead_budget(0.05)``: the share of its wall time that the saves
  cost (its time minus the same steps at the baseline step time), against 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

import ckptwise as cw
from bench.memory import peak_rss
from bench.stall import build, machine, state_bytes, torch_save, train


def spread(values: list[float]) -> str:
    """Median with the range, for the table's detail column."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def loop_figures(
    work: Path, params_m: int, saves: int, every: int, reps: int, *, defer: bool = False
) -> dict[str, Any]:
    """Stall, step times after saves and memory, on the ``params_m`` model (``defer``: with
    ``defer_copy=True``, the copy overlapping the next forward and backward)."""
    model, opt = build(params_m)
    state = {"model": model, "optimizer": opt}
    size = state_bytes(model, opt)

    def step() -> None:
        train(model, opt, 1)

    for _ in range(2):
        step()  # warm the allocator
    with peak_rss(0.002) as base_peak:
        base = [timed(step) for _ in range(saves * every)]
    t_base = statistics.median(base)
    t_torch = statistics.median(
        timed(
            lambda: torch_save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()}, work / "state.pt"
            )
        )
        for _ in range(reps)
    )
    (work / "state.pt").unlink()
    root = work / "loop"
    shutil.rmtree(root, ignore_errors=True)
    calls: list[float] = []
    after: list[float] = []
    between: list[float] = []
    copied: list[int] = []
    manager = cw.CheckpointManager(
        root,
        save=cw.every(every),
        keep=cw.keep_last(1),
        async_save=True,
        defer_copy=defer,
        rng=False,
    )
    n = 0
    with peak_rss(0.002) as save_peak:
        for _ in range(saves + 1):  # the first save also starts the threads: not counted
            for k in range(every):
                n += 1
                t = timed(step)
                if calls and k == 0:
                    after.append(t)
                elif calls:
                    between.append(t)
                call = timed(lambda n=n: manager.step(n, state))  # type: ignore[misc]
                if k == every - 1:
                    calls.append(call)
                    copied.append(sum(manager.last_copy))
        n += 1
        after.append(timed(step))
        manager.close()
    calls, after, copied = calls[1:], after[1:], copied[1:]
    stalls = [c + max(0.0, a - t_base) for c, a in zip(calls, after, strict=True)]
    shutil.rmtree(root, ignore_errors=True)
    changed = statistics.median(copied) / size
    return {
        "size": size,
        "t_base": t_base,
        "base": base,
        "t_torch": t_torch,
        "calls": calls,
        "after": after,
        "between": between,
        "stalls": stalls,
        "changed": changed,
        "extra_rss": (save_peak[0] - base_peak[0]) / size,
        "peak_rss": save_peak[0] / size,
    }


def wall(work: Path, params_m: int, steps: int, save: cw.Trigger | None) -> tuple[float, int]:
    """Seconds for ``steps`` training steps under ``save`` (none: no manager), and saves made."""
    model, opt = build(params_m)
    state = {"model": model, "optimizer": opt}
    root = work / "wall"
    shutil.rmtree(root, ignore_errors=True)
    manager = (
        None
        if save is None
        else cw.CheckpointManager(root, save=save, keep=cw.keep_last(1), async_save=True, rng=False)
    )
    saved = 0
    start = time.perf_counter()
    for n in range(1, steps + 1):
        train(model, opt, 1)
        if manager is not None:
            saved += manager.step(n, state).save
    if manager is not None:
        manager.close()
    elapsed = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return elapsed, saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=100, help="millions of fp32 parameters")
    parser.add_argument("--saves", type=int, default=5, help="saves measured in the loop")
    parser.add_argument("--every", type=int, default=8, help="steps between saves in the loop")
    parser.add_argument("--reps", type=int, default=3, help="torch.save repetitions")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--wall-params", type=int, default=34)
    parser.add_argument("--wall-reps", type=int, default=3, help="repetitions of each run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ckptwise-overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(work)}")
    loop = loop_figures(work, args.params, args.saves, args.every, args.reps)
    # what soundness costs: the same loop with the copy deferred under defer_copy's contract
    deferred = loop_figures(work, args.params, args.saves, args.every, args.reps, defer=True)
    print(
        f"state: {args.params}M fp32 parameters + AdamW = {loop['size'] / 2**30:.2f} GiB; "
        f"step without saves {spread(loop['base'])} s"
    )
    wall(work, args.wall_params, 5, cw.every(2))  # warm up what the first run would pay
    # interleaved repetitions: this machine's speed drifts by several percent between runs
    plains: list[float] = []
    savings: list[float] = []
    budgets: list[float] = []
    n_saves = n_budget = 0
    for _ in range(args.wall_reps):
        plains.append(wall(work, args.wall_params, args.steps, None)[0])
        took, n_saves = wall(work, args.wall_params, args.steps, cw.every(20))
        savings.append(took)
        took, n_budget = wall(
            work,
            args.wall_params,
            args.steps,
            cw.overhead_budget(0.05, first_after=timedelta(0)),
        )
        budgets.append(took)
    plain = statistics.median(plains)
    saving = statistics.median(savings)
    budgeted = statistics.median(budgets)
    share = (budgeted - plain) / budgeted
    shutil.rmtree(work, ignore_errors=True)

    t_base = loop["t_base"]
    rows = [
        (
            "async save stall / (torch.save + fsync)",
            statistics.median(loop["stalls"]) / loop["t_torch"],
            "<= 0.01",
            f"stall {spread([s * 1e3 for s in loop['stalls']])} ms (step() "
            f"{statistics.median(loop['calls']) * 1e3:.0f} ms) vs {loop['t_torch']:.2f} s",
        ),
        (
            "  the same, defer_copy=True (contract: no .data writes)",
            statistics.median(deferred["stalls"]) / deferred["t_torch"],
            "reported",
            f"stall {spread([s * 1e3 for s in deferred['stalls']])} ms (step() "
            f"{statistics.median(deferred['calls']) * 1e3:.0f} ms) vs "
            f"{deferred['t_torch']:.2f} s",
        ),
        (
            "step right after a save / step without saves",
            statistics.median(loop["after"]) / t_base,
            "<= 1.05",
            f"{spread(loop['after'])} s vs {t_base:.3f} s",
        ),
        (
            "other steps between saves / steps without saves",
            statistics.median(loop["between"]) / t_base,
            "<= 1.05",
            f"{spread(loop['between'])} s vs {t_base:.3f} s",
        ),
        (
            "extra peak RSS while saving / state size",
            loop["extra_rss"],
            f"<= {0.25 + loop['changed']:.2f}",
            f"changed {loop['changed']:.2f} of the state; whole process peak "
            f"{loop['peak_rss']:.2f} x state",
        ),
        (
            f"{args.steps}-step run saving every 20 / no saves",
            saving / plain,
            "<= 1.03",
            f"{spread(savings)} s ({n_saves} saves) vs {spread(plains)} s, "
            f"{args.wall_params}M params",
        ),
        (
            "overhead_budget(0.05): share of time saving",
            share,
            "0.04-0.06",
            f"{n_budget} saves in {args.steps} steps, {spread(budgets)} s vs {plain:.1f} s without",
        ),
    ]
    print(f"\n{'figure':50} {'ratio':>7}  {'target':10} measured: median [min-max]")
    for name, ratio, target, detail in rows:
        print(f"{name:50} {ratio:7.3f}  {target:10} {detail}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [{"figure": r[0], "ratio": r[1], "target": r[2], "detail": r[3]} for r in rows],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
