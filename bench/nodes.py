"""Two nodes saving to an object store through their local disks, against saving to local disk.

    python -m bench.nodes [--params 84] [--saves 3] [--every 4] [--reps 2]

Two ``torchrun --nnodes 2 --node_rank {0,1}`` launches on this machine (one rank each) train
the same DDP model (``--params`` million parameters with AdamW: 1 GiB of state at 84) and
save in the background every ``--every`` steps, in alternating blocks of the same job: to a
local run folder, and to ``s3://`` on a real S3-compatible server (``moto_server`` on
127.0.0.1) through each node's own cache folder. Reported, as medians with their range:

* the stall of a save (what ``step()`` took plus what the next step took beyond a plain
  step), S3 through the caches against local disk;
* the time from ``step()`` until the checkpoint is listed in the bucket (every rank's
  objects uploaded and confirmed to rank 0, then its manifest uploaded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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
    with moto_s3("nodes") as options:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "CKPTWISE_BENCH_S3": json.dumps(options),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        port = free_port()
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
    if any(proc.returncode for proc in procs):
        raise SystemExit("\n".join(out[-4000:] for out in outputs))
    line = next(x for x in outputs[0].splitlines() if "RESULT " in x)
    figures = json.loads(line.split("RESULT ", 1)[1])
    local, s3, durable = figures["local"], figures["s3"], figures["durable"]
    ratio = statistics.median(s3) / statistics.median(local)
    print(f"two nodes (1 rank each, DDP), {figures['state_bytes'] / 2**30:.2f} GiB of state")
    print(f"{'figure':54} {'value':>8}  detail (median [range])")
    print(f"{'stall of a save: s3 through caches / local disk':54} {ratio:8.2f}  "
          f"s3 {spread(s3)} s, local {spread(local)} s")  # fmt: skip
    print(f"{'seconds from step() to listed in the bucket':54} "
          f"{statistics.median(durable):8.2f}  {spread(durable)}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**figures, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
