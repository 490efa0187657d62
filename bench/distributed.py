"""Multi-process figures, measured side by side with real ``torchrun`` jobs (gloo, CPU).

    python -m bench.distributed [--ranks 2] [--megabytes 256] [--json out.json]

* the per-step cost of the save decision on 2 ranks: a small step's time with ckptwise
  (a step-only policy: no message; a policy that needs rank 0's decision: one all-reduce a
  step) / the same step without, in alternating blocks of the same job (median, spread);
* synchronous save throughput with each rank hashing its share of a replicated state (as
  DDP holds it; the writes are split across ranks either way) / each rank hashing all of
  it, in the same job;
* bytes written for the same schedule by ckptwise / by ``Trainer`` + DeepSpeed's own
  checkpoints, for a MiniCPM-V-shaped ZeRO-3 and ZeRO-2 fine-tune (frozen LLM, trained
  vision tower and resampler; 20 steps, a save every 5).
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DS_TRAIN = HERE.parent / "tests" / "integration" / "ds_train.py"


def torchrun(ranks: int, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc.stdout


def result(stdout: str) -> Any:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g}"


def decision_cost(ranks: int) -> list[dict[str, Any]]:
    raw = result(torchrun(ranks, "-m", "bench.dist_worker", "decide"))
    plain = statistics.median(raw["plain"])
    rows = []
    for kind, label in (
        ("step_only", "every(n): no message"),
        ("coordinated", "every_duration | on_signal: one all-reduce"),
    ):
        ratios = [t / p for t, p in zip(raw[kind], raw["plain"], strict=True)]
        rows.append(
            {
                "figure": f"step with ckptwise / without, {ranks} ranks, {label}",
                "ratio": statistics.median(ratios),
                "spread": spread(ratios),
                "measured": f"{statistics.median(raw[kind]) * 1e3:.2f} ms vs {plain * 1e3:.2f} ms a step",
            }
        )
    return rows


def write_throughput(ranks: int, megabytes: int) -> dict[str, Any]:
    raw = result(torchrun(ranks, "-m", "bench.dist_worker", "write", "--megabytes", str(megabytes)))
    shared, each = statistics.median(raw["shared"]), statistics.median(raw["each_hashes_all"])
    return {
        "figure": f"synchronous save of {raw['bytes'] / 2**20:.0f} MiB replicated state on {ranks} ranks: each hashing its share / each hashing all (throughput)",
        "ratio": each / shared,
        "spread": spread(
            [a / b for a, b in zip(raw["each_hashes_all"], raw["shared"], strict=True)]
        ),
        "measured": f"{shared:.2f} s vs {each:.2f} s",
    }


def deepspeed_bytes(stage: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-ds-"))
    common = ("--stage", str(stage), "--steps", "20", "--save-steps", "5")
    try:
        torchrun(
            2, str(DS_TRAIN), str(work / "run"), str(work / "ours"), *common, "--save", "every(5)"
        )
        torchrun(
            2, str(DS_TRAIN), str(work / "unused"), str(work / "theirs"), *common, "--trainer-saves"
        )
        ours = json.loads((work / "ours" / "rank0.json").read_text())["bytes_written"]
        theirs = json.loads((work / "theirs" / "rank0.json").read_text())["bytes_written"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "figure": f"bytes written, 4 saves of a ZeRO-{stage} MiniCPM-V-shaped run: ckptwise / Trainer + DeepSpeed",
        "ratio": ours / theirs,
        "spread": "",
        "measured": f"{ours / 1e6:.2f} MB vs {theirs / 1e6:.2f} MB",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = decision_cost(args.ranks)
    rows.append(write_throughput(args.ranks, args.megabytes))
    rows += [deepspeed_bytes(3), deepspeed_bytes(2)]
    print("| figure | ratio | spread | measured |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['figure']} | {row['ratio']:.3f} | {row['spread']} | {row['measured']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
