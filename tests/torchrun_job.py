"""Run a small Python script as a real ``torchrun`` job on the CPU (gloo) for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_job(script: Path, *args: str, ranks: int = 2, ok: bool = True) -> None:
    """Run ``script`` with ``args`` on ``ranks`` processes; fails the test (showing the
    job's output) unless every rank exits with 0, or with ``ok=False`` unless one fails."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port of its own, so tests never collide
            "--nproc_per_node",
            str(ranks),
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        assert proc.returncode != 0
