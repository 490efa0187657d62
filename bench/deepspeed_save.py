"""Save cost, memory and bytes of ``Trainer`` + DeepSpeed ZeRO-3 (MiniCPM-V's launch), side by side.

    python -m bench.deepspeed_save [--params full|small] [--small] [--steps 12] [--every 4]
                                   [--frozen] [--reps 1] [--gib 1] [--only VARIANTS] [--json OUT]

Each variant is a separate ``torchrun`` job (2 gloo ranks on the CPU, ``bench.ds_save_worker``)
of the same steps with the same seed: a Llama-shaped ``LlamaForCausalLM`` built from a config
(``full``: 162.4M parameters, all training; ``--frozen``: the LLM body frozen and its last
layer trained, as MiniCPM-V's current script freezes the LLM), bf16, synthetic tokens.

* ``none``: no saves, the baseline;
* ``deepspeed``: the ``Trainer``'s own saves (``save_steps=EVERY``), which DeepSpeed writes;
* ``sync`` / ``async``: ckptwise attached (``every(EVERY)``, ``keep_all()``), the
  ``Trainer``'s saves off, ``async_save=False`` / ``True``. A job that ckptwise refuses
  (``ConfigError``) prints its row as ``n/a (refused: ...)``.

Figures (medians over ``--reps``, spread = min-max of the per-repetition ratio):

* save cost per save, two measures: *wall*: (the job's training-loop time - the ``none``
  job's) / saves, which includes what an async save's background writing takes from the
  next steps but also the job-to-job variance of a loaded machine; *step*: the sum over
  saving steps of (that step's time - the job's median non-saving step), / saves, steadier,
  but blind to what a background write costs the following steps;
* peak RSS of a rank during training (the larger rank), / the ``deepspeed`` job's;
* bytes the saves wrote, ckptwise / DeepSpeed's checkpoint folders;
* in one process afterwards (``write``): a synchronous ``CheckpointManager.save`` of a
  ``--gib`` random fp32 state (fresh values each time, so nothing dedups) against
  ``open().write`` + ``os.fsync`` of the same tensors, one file each; throughput ratio, for
  ``codec="raw"`` and for the default codec.

A smoke run takes about a minute and a half: ``python -m bench.deepspeed_save --small``; the
full size about 6.5 minutes on 2 cores (``--frozen --only none,deepspeed,sync,async``: 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptwise as cw

HERE = Path(__file__).resolve().parent
JOBS = ("none", "deepspeed", "sync", "async")
SAVERS = ("deepspeed", "sync", "async")
GOAL_COST = {"sync": "<= 1.0", "async": "<= 0.1"}
NOTES: list[str] = []


def torchrun(variant: str, out: Path, worker_args: list[str]) -> list[dict[str, Any]]:
    """One job of ``variant``; every rank's record (or the refusal, in each record)."""
    paths = [str(HERE.parent / "src"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "bench.ds_save_worker", variant, str(out),
               *worker_args]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=3600
    )
    line = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{variant} job failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    if proc.returncode:
        # seen about once in ten jobs: a rank aborts at interpreter exit ("terminate called
        # without an active exception") after its result is printed; the figures stand
        why = next((s for s in proc.stderr.splitlines() if "terminate called" in s), "")
        NOTES.append(
            f"the {variant} job exited with status {proc.returncode} after its result ({why or 'no message'})"
        )
    records: list[dict[str, Any]] = json.loads(line[len("RESULT ") :])
    return records


def job_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A job's figures: the slowest rank's times, the larger rank's memory."""
    if "refused" in records[0]:
        return {"refused": records[0]["refused"]}
    steps = [max(column) for column in zip(*(r["step_s"] for r in records), strict=True)]
    saves: list[int] = records[0].get("saves", [])
    quiet = [t for i, t in enumerate(steps, 1) if i not in saves]
    baseline = statistics.median(quiet) if quiet else 0.0
    written = records[0].get("bytes_written", records[0].get("bytes_on_disk", 0))
    return {
        "loop_s": max(r["loop_s"] for r in records),
        "train_s": max(r["train_s"] for r in records),
        "saves": saves,
        "step_extra_s": sum(steps[s - 1] - baseline for s in saves),
        "median_step_s": baseline,
        "step_s": [round(t, 3) for t in steps],
        "rss_peak": max(r["rss_train_peak"] for r in records),
        "ru_maxrss": max(r["ru_maxrss"] for r in records),
        "bytes": written,
        "bytes_on_disk": records[0].get("bytes_on_disk", 0),
        "copied_bytes": max(r.get("copied_bytes", 0) for r in records),
    }


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else ""


def ratio_row(
    figure: str, ours: list[float], theirs: list[float], unit: Callable[[float], str]
) -> dict[str, Any]:
    ratios = [a / b if b else float("nan") for a, b in zip(ours, theirs, strict=True)]
    return {
        "figure": figure,
        "ratio": statistics.median(ratios),
        "spread": spread(ratios),
        "measured": f"{unit(statistics.median(ours))} vs {unit(statistics.median(theirs))}",
    }


def na_row(figure: str, why: str) -> dict[str, Any]:
    return {"figure": figure, "ratio": None, "spread": "", "measured": why}


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def megabytes(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def training_rows(runs: dict[str, list[dict[str, Any]]], shape: str) -> list[dict[str, Any]]:
    """The table's rows for the training jobs (``runs``: each variant's figures per rep)."""
    rows: list[dict[str, Any]] = []

    def per_save(variant: str, measure: str) -> list[float]:
        values = []
        for rep, job in enumerate(runs[variant]):
            n = len(job["saves"]) or 1
            extra = (
                job["loop_s"] - runs["none"][rep]["loop_s"]
                if measure == "wall"
                else job["step_extra_s"]
            )
            values.append(extra / n)
        return values

    def refused(variant: str) -> str | None:
        why = next((job["refused"] for job in runs.get(variant, []) if "refused" in job), None)
        return f"n/a (refused: {why})" if why else None

    has_ds = "deepspeed" in runs and not refused("deepspeed")
    for measure, label in (
        ("wall", "wall: (loop time - none job's) / saves"),
        ("step", "step: saving steps' time over the median step / saves"),
    ):
        if measure == "wall" and "none" not in runs:
            continue
        for variant in ("sync", "async"):
            figure = f"save cost per save, {variant} ckptwise / DeepSpeed ({label}; goal {GOAL_COST[variant]})"
            if variant not in runs or not has_ds:
                continue
            why = refused(variant)
            if why:
                rows.append(na_row(figure, why))
                continue
            row = ratio_row(
                figure, per_save(variant, measure), per_save("deepspeed", measure), seconds
            )
            if measure == "wall":
                # the noise to read it against: how much the same job without saves varied
                loops = [job["loop_s"] for job in runs["none"]]
                noise = f"{spread(loops)} s" if len(loops) > 1 else seconds(loops[0])
                row["measured"] += f" a save; none job's loop {noise}"
            rows.append(row)
    for variant in ("none", "sync", "async"):
        if variant not in runs or not has_ds:
            continue
        figure = (
            f"peak RSS of a rank in training, {variant} job / DeepSpeed-saving job (goal <= 1.25)"
        )
        why = refused(variant)
        if why:
            rows.append(na_row(figure, why))
            continue
        ours = [job["rss_peak"] for job in runs[variant]]
        theirs = [job["rss_peak"] for job in runs["deepspeed"]]
        rows.append(ratio_row(figure, ours, theirs, gib))
    if "async" in runs and "none" in runs and not refused("async"):
        copied = statistics.median(job["copied_bytes"] for job in runs["async"])
        extra = [
            a["rss_peak"] - n["rss_peak"] for a, n in zip(runs["async"], runs["none"], strict=True)
        ]
        if copied:
            rows.append(
                {
                    "figure": "extra peak RSS of a rank, async job - no-save job, / the rank's state a save copies",
                    "ratio": statistics.median(extra) / copied,
                    "spread": spread([e / copied for e in extra]),
                    "measured": f"{statistics.median(extra) / 2**30:.2f} GiB over {copied / 2**30:.2f} GiB",
                }
            )
    for variant in ("sync", "async"):
        if variant not in runs or not has_ds or refused(variant):
            continue
        job, ds = runs[variant][0], runs["deepspeed"][0]
        rows.append(
            ratio_row(
                f"bytes written by {len(job['saves'])} saves, {shape}: ckptwise ({variant}) / DeepSpeed",
                [job["bytes"]],
                [ds["bytes"]],
                megabytes,
            )
        )
    return rows


def fill(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.normal_()


def raw_write(tensors: list[torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, t in enumerate(tensors):
        with open(folder / f"t{i}.bin", "wb") as f:
            f.write(t.numpy().data)
            f.flush()
            os.fsync(f.fileno())


def write_rows(size_gib: float, reps: int, work: Path) -> list[dict[str, Any]]:
    """Sync save throughput against a raw write + fsync of the same bytes, one process."""
    count = 16
    tensors = [torch.empty(int(size_gib * 2**30) // 4 // count) for _ in range(count)]
    total = sum(t.nbytes for t in tensors)
    rows = []
    for codec in ("raw", "auto"):
        ours: list[float] = []
        theirs: list[float] = []
        for rep in range(reps):
            fill(tensors)
            folder = work / f"raw-{codec}-{rep}"
            started = time.perf_counter()
            raw_write(tensors, folder)
            theirs.append(total / (time.perf_counter() - started))
            shutil.rmtree(folder)

            fill(tensors)
            folder = work / f"ckptwise-{codec}-{rep}"
            manager = cw.CheckpointManager(
                folder, save=cw.never(), async_save=False, rng=False, codec=codec
            )
            state = {f"w{i}": t for i, t in enumerate(tensors)}
            started = time.perf_counter()
            manager.save(1, state)
            ours.append(total / (time.perf_counter() - started))
            manager.close()
            shutil.rmtree(folder)
        name = "raw" if codec == "raw" else "the default (auto)"
        rows.append(
            ratio_row(
                f"sync save throughput of {gib(total)} random fp32 ({count} tensors), codec {name} "
                "/ open().write + fsync, one file after another (goal >= 0.8)",
                ours,
                theirs,
                lambda v: f"{v / 1e6:.0f} MB/s",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=["full", "small"], default="full")
    parser.add_argument("--small", action="store_true", help="the same as --params small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--frozen", action="store_true", help="LLM body frozen, last layer trains")
    parser.add_argument("--length", type=int, default=64, help="tokens a sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences a rank a step")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--gib", type=float, default=1.0, help="state size of the write figure")
    parser.add_argument("--write-reps", type=int, default=3)
    parser.add_argument(
        "--only",
        default=",".join([*JOBS, "write"]),
        help="comma-separated: " + ",".join([*JOBS, "write"]),
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    params = "small" if args.small else args.params
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = set(only) - {*JOBS, "write"}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {[*JOBS, 'write']}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ds-save-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = "frozen LLM" if args.frozen else "full fine-tune"
    worker_args = ["--params", params, "--steps", str(args.steps), "--every", str(args.every),
                   "--length", str(args.length), "--batch", str(args.batch)]  # fmt: skip
    if args.frozen:
        worker_args.append("--frozen")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    header = ""
    for rep in range(args.reps):
        for variant in (v for v in JOBS if v in only):
            out = work / f"{variant}-{rep}"
            records = torchrun(variant, out, worker_args)
            shutil.rmtree(out, ignore_errors=True)  # the next job's disk and page cache
            runs.setdefault(variant, []).append(job_figures(records))
            if not header:
                first = records[0]
                header = (
                    f"model: LlamaForCausalLM, {first['params'] / 1e6:.1f}M parameters, "
                    f"{first['trained'] / 1e6:.1f}M training ({shape}), bf16, ZeRO-3, 2 gloo "
                    f"ranks on {os.cpu_count()} cores; {args.steps} steps of {args.batch} x "
                    f"{args.length} tokens a rank, a save every {args.every}"
                )
            print(f"# rep {rep} {variant}: {json.dumps(runs[variant][-1])}", flush=True)
    rows = training_rows(runs, shape) if runs else []
    if "write" in only:
        rows += write_rows(args.gib, args.write_reps, work)
    elapsed = time.perf_counter() - started
    if header:
        print(header)
    print(f"took {elapsed:.0f} s; reps {args.reps}\n")
    print("| figure | ratio | spread | measured |\n|---|---|---|---|")
    for row in rows:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"| {row['figure']} | {ratio} | {row['spread']} | {row['measured']} |")
    for note in NOTES:
        print(f"\nnote: {note}")
    if args.json:
        report = {"rows": rows, "jobs": runs, "notes": NOTES}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
