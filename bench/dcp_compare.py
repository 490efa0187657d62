"""ckptwise against torch's Distributed Checkpoint (DCP), side by side in real ``torchrun`` jobs.

    python -m bench.dcp_compare [--gib 1] [--steps 12] [--every 4] [--modes ddp,fsdp]
                                [--reps 1] [--json OUT] [--dir DIR]

Every job is ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU, ``OMP_NUM_THREADS=1``)
training the same MLP (``--layers`` square ``Linear`` layers, every parameter trained with
AdamW on synthetic batches, the same seed) whose weights and AdamW moments make ``--gib`` GiB
per rank under DDP (replicated: about ``gib * 2**30 / 12`` float32 parameters); the same model
is sharded with FSDP2 (``fully_shard`` on each layer and the root) for ``fsdp``. For each mode
one job runs each variant, saving every ``--every`` steps:

* ``none``: no saves (the baseline);
* ``ckptwise-sync``: ``CheckpointManager(run, save=every(k), keep=keep_all(), rng=False,
  async_save=False)`` (every checkpoint kept, as DCP's folders are: a retention policy's
  deletes would be a cost DCP does not pay), ``step()`` after every optimizer step, ``close()`` at the end;
* ``ckptwise-async``: the same with ckptwise's default (a background save on every rank);
* ``dcp-save``: ``torch.distributed.checkpoint.save`` of ``get_model_state_dict`` and
  ``get_optimizer_state_dict`` to a new folder per save;
* ``dcp-async``: ``torch.distributed.checkpoint.async_save`` of the same, on a gloo group of
  its own (its background thread's collectives must not interleave with training's on the
  default group), waiting for the previous save's future before the next and at the end.

Each job's time runs from before step 1 to the moment its last save is durable
(``close()``, the last future's ``result()``) on the slowest rank. The figures, per mode:

* **per-save cost**: (the job's time - the ``none`` job's time) / saves; the ratios
  ckptwise-sync / dcp-save and ckptwise-async / dcp-async (below 1: ahead of DCP). It counts
  everything a save costs, background work slowing later steps included, and carries the
  noise of two whole jobs;
* **steadier per-save cost**: the sum over saving steps of (that step's time - the median
  time of the job's steps without a save) / saves, the same ratios. It sees only the saving
  steps, so it misses what a background save costs the steps after it and the wait for the
  last one at the end;
* **stall**: the time the save call itself took on the training thread (ckptwise's
  ``step()`` at a saving step, which waits for a previous save still running; DCP's state
  dict calls plus ``save()``, or for ``dcp-async`` the wait for the previous future plus
  ``async_save()``), the slowest rank's, median [min-max] over saves;
* **peak RSS**: the largest resident set of any rank (``VmRSS`` sampled every 20 ms during
  the loop) / the ``none`` job's; ``ru_maxrss`` is in the JSON.

The last row per mode gives each job's time. The driver refuses a job whose last save is
not on disk afterwards (ckptwise's ``open_run().steps()``, DCP's ``.metadata``) or whose
last losses differ from the ``none`` job's (saving must not change training). Where DCP's
figure is not above 0 (a cost lost in noise) no ratio is given.

``--reps N`` repeats the whole set (the variants' order rotated each time) and reports the
median over repetitions with their min-max as the spread. ``--json`` writes the rows and every
job's raw figures. A rank of each job runs this module as ``python -m bench.dcp_compare
worker ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn

from bench.memory import peak_rss

HERE = Path(__file__).parent
ROOT = HERE.parent
VARIANTS = ("none", "ckptwise-sync", "ckptwise-async", "dcp-save", "dcp-async")
MODES = ("ddp", "fsdp")
LAYERS = 8
BATCH = 16
BYTES_PER_PARAM = 12  # float32 weight + AdamW's exp_avg and exp_avg_sq


# ---------------------------------------------------------------------------------------------
# one rank of a job (runs under torchrun)


def worker(argv: Sequence[str]) -> NoReturn:
    parser = argparse.ArgumentParser(prog="bench.dcp_compare worker")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_saver import (
        AsyncSaveResponse,
        async_save,
        save,
    )

    import ckptwise as cw

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same initial weights on every rank
    layers: list[nn.Module] = []
    for i in range(args.layers):
        layers.append(nn.Linear(args.width, args.width))
        if i < args.layers - 1:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
        model: nn.Module = net
    else:
        model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local_bytes = sum(
        p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters()
    )
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches

    manager: cw.CheckpointManager | None = None
    if args.variant.startswith("ckptwise"):
        run, every, keep = f"{args.root}/ckptwise", cw.every(args.every), cw.keep_all()
        if args.variant == "ckptwise-sync":
            manager = cw.CheckpointManager(run, save=every, keep=keep, rng=False, async_save=False)
        else:  # async_save left out: ckptwise's default, in the background on every rank
            manager = cw.CheckpointManager(run, save=every, keep=keep, rng=False)
    dcp_group = dist.new_group(backend="gloo") if args.variant == "dcp-async" else None
    pending: Future[Any] | AsyncSaveResponse | None = None

    def durable(response: Future[Any] | AsyncSaveResponse) -> None:
        if isinstance(response, AsyncSaveResponse):
            response.upload_completion.result()
        else:
            response.result()

    def dcp_state() -> dict[str, Any]:
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, opt),
        }

    step_times: list[float] = []
    saved: list[int] = []
    stalls: list[float] = []
    waits: list[float] = []
    dist.barrier()
    with peak_rss() as peak:
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            x = torch.randn(BATCH, args.width, generator=gen)
            y = torch.randn(BATCH, args.width, generator=gen)
            loss = nn.functional.mse_loss(model(x), y)
            torch.autograd.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            if manager is not None:
                if manager.step(step, {"model": model, "optimizer": opt}).save:
                    saved.append(step)
                    stalls.append(time.perf_counter() - t1)
            elif args.variant != "none" and step % args.every == 0:
                folder = f"{args.root}/dcp/step{step}"
                if args.variant == "dcp-save":
                    save(dcp_state(), checkpoint_id=folder)
                    waits.append(0.0)
                else:
                    if pending is not None:
                        durable(pending)
                    waits.append(time.perf_counter() - t1)
                    pending = async_save(dcp_state(), checkpoint_id=folder, process_group=dcp_group)
                saved.append(step)
                stalls.append(time.perf_counter() - t1)
            step_times.append(time.perf_counter() - t0)
        closing = time.perf_counter()
        if manager is not None:
            manager.close()
        if pending is not None:
            durable(pending)
        ended = time.perf_counter()
    record: dict[str, Any] = {
        "rank": rank,
        "wall": ended - started,
        "close": ended - closing,
        "step_times": step_times,
        "saved": saved,
        "stalls": stalls,
        "waits": waits,
        "peak_rss": peak[0],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "local_state_bytes": local_bytes * BYTES_PER_PARAM // 4,
        "final_loss": loss.item(),
    }
    dist.barrier()  # every rank's files are written: list what a restore would find
    if rank == 0 and manager is not None:
        record["committed"] = cw.open_run(f"{args.root}/ckptwise").steps()
    elif rank == 0 and saved:  # DCP writes .metadata last, once every rank's files are in
        done = Path(args.root, "dcp").glob("step*/.metadata")
        record["committed"] = sorted(int(m.parent.name[len("step") :]) for m in done)
    if rank == 0:
        record["disk_bytes"] = sum(f.stat().st_size for f in Path(args.root).rglob("*") if f.is_file())  # fmt: skip
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if rank == 0:
        print("RESULT " + json.dumps(records), flush=True)
    dist.barrier()
    # Leave without tearing down: freeing DDP's reducer drops the last reference to the
    # gloo group while this thread holds the GIL, and its destructor waits for gloo's
    # worker thread, which may be freeing a finished collective's tensors and need the GIL
    # (a dcp-save DDP job hung here for 15 minutes, rank 0 in ~ProcessGroupGloo).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# the driver


def width_for(gib: float, layers: int) -> int:
    """The width (a multiple of 16) of ``layers`` square layers holding ``gib`` GiB with AdamW."""
    params = gib * 2**30 / BYTES_PER_PARAM
    return max(16, round(math.sqrt(params / layers) / 16) * 16)


def job(mode: str, variant: str, *, width: int, layers: int, steps: int, every: int, base: str, timeout: float) -> list[dict[str, Any]]:  # fmt: skip
    """Run one ``torchrun`` job and return each rank's record."""
    root = tempfile.mkdtemp(prefix=f"{mode}-{variant}-", dir=base)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bench.dcp_compare", "worker", "--mode", mode, "--variant", variant,
        "--width", str(width), "--layers", str(layers), "--steps", str(steps),
        "--every", str(every), "--root", root,
    ]  # fmt: skip
    # output to files, not pipes: a rank that outlives torchrun would hold a pipe open
    out, err = Path(base, f"{mode}-{variant}.out"), Path(base, f"{mode}-{variant}.err")
    with out.open("w") as stdout_file, err.open("w") as stderr_file:
        proc = subprocess.Popen(command, stdout=stdout_file, stderr=stderr_file, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun passes SIGTERM on to its ranks (each in a session of its own)
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    stdout, stderr = out.read_text(), err.read_text()
    if proc.returncode:
        raise SystemExit(
            f"{mode} {variant} failed ({proc.returncode}; --timeout {timeout:.0f} s):\n"
            f"{stdout[-2000:]}{stderr[-6000:]}"
        )
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    records: list[dict[str, Any]] = json.loads(line[len("RESULT ") :])
    return records


def figures(variant: str, ranks: list[dict[str, Any]], none: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """One job's figures: the slowest rank's time, per-save costs, stalls and peak RSS.

    Raises ``SystemExit`` where the job's last save is not on disk, or where saving changed
    what the job trained (its last losses differ from the ``none`` job's).
    """
    wall = max(r["wall"] for r in ranks)
    saves = len(ranks[0]["saved"])
    if saves and ranks[0]["saved"][-1] not in ranks[0]["committed"]:
        raise SystemExit(f"{variant}: saved {ranks[0]['saved']}, found {ranks[0]['committed']}")
    if [r["final_loss"] for r in ranks] != [r["final_loss"] for r in none]:
        raise SystemExit(f"{variant}: the last losses differ from the job without saves")
    steady = []
    for r in ranks:
        plain = [t for s, t in enumerate(r["step_times"], 1) if s not in r["saved"]]
        median = statistics.median(plain)
        steady.append(sum(r["step_times"][s - 1] - median for s in r["saved"]))

    def slowest(key: str) -> list[float]:
        return [max(per_rank) for per_rank in zip(*(r[key] for r in ranks), strict=True)]

    return {
        "wall": wall,
        "saves": saves,
        "per_save": (wall - max(r["wall"] for r in none)) / saves if saves else 0.0,
        "steady": max(steady) / saves if saves else 0.0,
        "stalls": slowest("stalls"),
        "waits": slowest("waits"),
        "committed": ranks[0].get("committed", []),
        "disk_bytes": ranks[0]["disk_bytes"],
        "close": max(r["close"] for r in ranks),
        "peak_rss": max(r["peak_rss"] for r in ranks),
        "ru_maxrss": max(r["ru_maxrss"] for r in ranks),
    }


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else ""


def ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f} [{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}] ms"


def rows_for(mode: str, reps: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The table's rows for one mode, from each repetition's figures per variant."""

    def median(variant: str, key: str) -> float:
        return float(statistics.median(rep[variant][key] for rep in reps))

    def ratio_row(figure: str, key: str, ours: str, theirs: str) -> dict[str, Any]:
        measured = f"{median(ours, key):.3f} s vs {median(theirs, key):.3f} s a save"
        if any(rep[theirs][key] <= 0 for rep in reps):  # a ratio to noise is no figure
            return {
                "figure": f"{mode}: {figure}, {ours} / {theirs}",
                "ratio": None,
                "spread": f"{theirs} <= 0: within noise",
                "measured": measured,
            }
        ratios = [rep[ours][key] / rep[theirs][key] for rep in reps]
        return {
            "figure": f"{mode}: {figure}, {ours} / {theirs}",
            "ratio": statistics.median(ratios),
            "spread": spread(ratios),
            "measured": measured,
        }

    rows = []
    for key, figure in (("per_save", "per-save cost"), ("steady", "steadier per-save cost")):
        for ours, theirs in (("ckptwise-sync", "dcp-save"), ("ckptwise-async", "dcp-async")):
            rows.append(ratio_row(figure, key, ours, theirs))
    for ours, theirs in (("ckptwise-async", "dcp-async"), ("ckptwise-sync", "dcp-save")):
        ratios = [
            statistics.median(rep[ours]["stalls"]) / statistics.median(rep[theirs]["stalls"])
            for rep in reps
        ]
        ours_all = [s for rep in reps for s in rep[ours]["stalls"]]
        theirs_all = [s for rep in reps for s in rep[theirs]["stalls"]]
        waited = [w for rep in reps for w in rep[theirs]["waits"]]
        rows.append(
            {
                "figure": f"{mode}: stall in the save call, {ours} / {theirs}",
                "ratio": statistics.median(ratios),
                "spread": spread(ratios),
                "measured": f"{ms(ours_all)} vs {ms(theirs_all)}"
                + (
                    f" (of which waiting for the previous save {ms(waited)})" if any(waited) else ""
                ),
            }
        )
    for variant in VARIANTS[1:]:
        ratios = [rep[variant]["peak_rss"] / rep["none"]["peak_rss"] for rep in reps]
        rows.append(
            {
                "figure": f"{mode}: peak RSS of a rank, {variant} / none",
                "ratio": statistics.median(ratios),
                "spread": spread(ratios),
                "measured": f"{median(variant, 'peak_rss') / 2**30:.2f} GiB vs {median('none', 'peak_rss') / 2**30:.2f} GiB",
            }
        )
    rows.append(
        {
            "figure": f"{mode}: job time, step 1 to the last save durable (slowest rank)",
            "ratio": None,
            "spread": "",
            "measured": ", ".join(f"{v} {median(v, 'wall'):.2f} s" for v in VARIANTS),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="weights + AdamW moments per rank (DDP)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--modes", default="ddp,fsdp")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the jobs write (default: a temp folder)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a job may take")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown {bad}, expected some of {MODES}")
    if args.steps < args.every:
        parser.error(f"--steps {args.steps} < --every {args.every}: no save would happen")
    width = width_for(args.gib, args.layers)
    params = args.layers * (width * width + width)
    print(
        f"MLP {args.layers} x {width}: {params / 1e6:.1f}M parameters, "
        f"{params * BYTES_PER_PARAM / 2**30:.3f} GiB with AdamW per DDP rank; "
        f"{args.steps} steps, a save every {args.every}",
        flush=True,
    )
    base = tempfile.mkdtemp(prefix="bench-dcp-", dir=args.dir)
    started = time.perf_counter()
    raw: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    reps: dict[str, list[dict[str, dict[str, Any]]]] = {mode: [] for mode in modes}
    try:
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for mode in modes:
                jobs = {}
                for variant in order:
                    t = time.perf_counter()
                    jobs[variant] = job(
                        mode, variant, width=width, layers=args.layers, steps=args.steps,
                        every=args.every, base=base, timeout=args.timeout,
                    )  # fmt: skip
                    print(f"  rep {rep + 1} {mode} {variant}: {time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
                raw[mode].append(jobs)
                reps[mode].append({v: figures(v, jobs[v], jobs["none"]) for v in VARIANTS})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [row for mode in modes for row in rows_for(mode, reps[mode])]
    print(f"\n(all jobs: {time.perf_counter() - started:.0f} s)\n")
    print("| figure | ratio | spread | measured |\n|---|---|---|---|")
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"| {row['figure']} | {ratio} | {row['spread']} | {row['measured']} |")
    if args.json:
        out = {
            "args": vars(args),
            "model": {"layers": args.layers, "width": width, "parameters": params},
            "rows": rows,
            "figures": reps,
            "raw": raw,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
