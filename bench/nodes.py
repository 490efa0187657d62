"""Two nodes saving to an object store through their local disks, against saving to local disk.

    python -m bench.nodes [--params 84] [--saves 3] [--every 4] [--reps 2]

Two ``torchrun --nnodes 2 --node_rank {0,1}`` launches on this machine (one rank each) train
the same DDP model (``--params`` million parameters with AdamW: 1 GiB of state at 84) and
save in the background every ``--every`` steps, in alternating blocks of the same job: to a
local run folder, and to ``s3://`` on a real S3-compatible server (``moto_server`` on
127.0.0.1) through each node's own cache folder. Reported, as medians with their range:

* the stall of a save (what the saving ``step()`` took: the copy of the state), S3 through
  the caches against local disk;
* the training time a save costs (a block's time minus a block without saves, per save,
  the block's background work included up to its last step), S3 against local disk;
* the time from ``step()`` until the checkpoint is listed in the bucket (every rank's
  objects uploaded and confirmed to rank 0, then its manifest uploaded), and what
  ``close()`` waits at the end.

The blocks alternate (no saves, local, S3) and each ends with ``close()``, so no block's
uploads spill into the next. The object store runs on the same two cores as the training
here; on real nodes it is elsewhere.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench.overlap import spread
from s3_server import free_port, moto_s3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=84)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    try:
        outputs, procs = run_nodes(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of caches and runs
    if any(proc.returncode for proc in procs):
        raise SystemExit("\n".join(out[-4000:] for out in outputs))
    line = next(x for x in outputs[0].splitlines() if "RESULT " in x)
    figures = json.loads(line.split("RESULT ", 1)[1])
    figures["table"] = table(figures, args.saves)
    print(
        f"two nodes (1 rank each, DDP), {figures['state_bytes'] / 2**30:.2f} GiB of state, "
        f"{args.saves} saves per block, {args.reps} blocks each"
    )
    print(f"{'figure':58} {'value':>7}  detail (median [range])")
    for name, value, detail in figures["table"]:
        print(f"{name:58} {value:7.2f}  {detail}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1))


def run_nodes(
    args: argparse.Namespace, work: Path
) -> tuple[list[str], list[subprocess.Popen[str]]]:
    """Both nodes' ``torchrun`` launches against one moto server; their outputs."""
    with moto_s3("nodes") as options:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "CKPTWISE_BENCH_S3": json.dumps(options),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        port = free_port()
        env["BENCH_STORE_PID"] = store_pid(options["endpoint_url"])
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
                 "127.0.0.1", "--master_port", str(port), str(Path(__file__).with_name("nodes_worker.py")),
                 "--params", str(args.params), "--saves", str(args.saves), "--every",
                 str(args.every), "--reps", str(args.reps), "--local-run", str(work / "local"),
                 "--s3-run", "s3://nodes/run", "--cache", str(work / f"cache-node{node}")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            )
            for node in (0, 1)
        ]  # fmt: skip
        outputs = [proc.communicate(timeout=3600)[0] for proc in procs]
    return outputs, procs


def store_pid(endpoint: str) -> str:
    """The process id of the ``moto_server`` listening at ``endpoint``."""
    port = endpoint.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                words = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(w.endswith(b"moto_server") for w in words) and port.encode() in words:
                return entry.name
    raise SystemExit(f"no moto_server found at {endpoint}")


def table(figures: dict[str, Any], saves: int) -> list[tuple[str, float, str]]:
    """The rows: ratios of the S3 path through caches to local disk, and seconds."""
    med = statistics.median
    base = med(figures["none_block"])
    cost = {m: [(b - base) / saves for b in figures[f"{m}_block"]] for m in ("local", "s3")}
    return [
        (
            "stall (the saving step()): s3 through caches / local disk",
            med(figures["s3_stall"]) / med(figures["local_stall"]),
            f"s3 {spread(figures['s3_stall'])} s, local {spread(figures['local_stall'])} s",
        ),
        (
            "training time per save: s3 through caches / local disk",
            med(cost["s3"]) / med(cost["local"]),
            f"s3 {spread(cost['s3'])} s, local {spread(cost['local'])} s",
        ),
        (
            "object store's CPU seconds per save (runs elsewhere on real nodes)",
            med(figures["s3_store_cpu"]) / saves,
            f"{spread([c / saves for c in figures['s3_store_cpu']])} s",
        ),
        (
            "seconds from step() to listed in the bucket",
            med(figures["durable"]),
            spread(figures["durable"]),
        ),
        (
            "seconds close() waits at the end: s3 (every upload) / local",
            med(figures["s3_close"]),
            f"local {spread(figures['local_close'])} s",
        ),
    ]


if __name__ == "__main__":
    main()
