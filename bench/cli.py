"""How fast the command line answers: ``ckptwise --help`` and ``ckptwise ls`` of a big run.

    python -m bench.cli [--reps 5] [--checkpoints 100] [--json out.json]

Each command runs as a fresh process (the console script next to this Python), ``--reps``
times; the table gives the median and the spread (min to max) of the wall time, next to
``python -c pass`` on the same machine as the baseline. The run listed holds
``--checkpoints`` checkpoints of a small model with eight Trainer-like metrics, so the
time is the command line's own (imports, reading manifests), not the disk's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS = ("loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "eval_runtime")


def make_run(root: Path, checkpoints: int) -> None:
    """A run of ``checkpoints`` checkpoints, made in a child process (this one stays
    torch-free, as the command line is)."""
    script = f"""
import torch, ckptwise as cw
with cw.CheckpointManager({str(root)!r}, save=cw.every(1), keep=cw.keep_all()) as m:
    for step in range(1, {checkpoints} + 1):
        metrics = {{name: 1.0 / step for name in {METRICS!r}}}
        m.step(step, {{"model": {{"w": torch.randn(64, 64)}}}}, metrics=metrics)
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def timed(command: list[str], reps: int) -> dict[str, Any]:
    """Wall times of ``command`` run ``reps`` times as a fresh process."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": reps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=100)
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    args = parser.parse_args(argv)
    script = Path(sys.executable).with_name("ckptwise")
    ckptwise = [str(script)] if script.exists() else [sys.executable, "-m", "ckptwise"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        make_run(run, args.checkpoints)
        rows = {
            "python -c pass (baseline)": timed([sys.executable, "-c", "pass"], args.reps),
            "ckptwise --help": timed([*ckptwise, "--help"], args.reps),
            f"ckptwise ls ({args.checkpoints} checkpoints)": timed(
                [*ckptwise, "ls", str(run)], args.reps
            ),
            f"ckptwise du ({args.checkpoints} checkpoints)": timed(
                [*ckptwise, "du", str(run)], args.reps
            ),
            "python -c 'import torch' (for scale)": timed(
                [sys.executable, "-c", "import torch"], args.reps
            ),
        }
    print(f"{'command':<45} {'median':>8} {'min':>8} {'max':>8}")
    for name, row in rows.items():
        print(f"{name:<45} {row['median_s']:>7.2f}s {row['min_s']:>7.2f}s {row['max_s']:>7.2f}s")
    print(f"(wall time of a fresh process, {args.reps} runs each)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
