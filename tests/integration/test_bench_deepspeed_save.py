"""``python -m bench.deepspeed_save`` end to end on the small model: its torchrun jobs run
and its table has every row, the async one as a figure or as ckptwise's refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about a minute: three short ZeRO-3 jobs on 2 ranks
def test_small_run_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.deepspeed_save", "--small", "--steps", "4", "--every", "2",
         "--only", "deepspeed,sync,async,write", "--gib", "0.01", "--write-reps", "1",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {row["figure"]: row for row in json.loads(out.read_text())["rows"]}
    # save cost (step measure) and peak RSS of sync and async, bytes of sync (and of async
    # once it runs), the two throughput rows; no wall measure without the none job
    assert len(rows) in (7, 8), list(rows)
    assert not any("wall:" in figure for figure in rows)
    for figure, row in rows.items():
        if figure.startswith("save cost per save, sync") or "codec" in figure:
            assert row["ratio"] > 0, row
        if "async" in figure and row["ratio"] is None:
            assert row["measured"].startswith("n/a (refused: "), row
    written = next(row for figure, row in rows.items() if figure.startswith("bytes written"))
    assert 0 < written["ratio"] < 2, written
    assert "| figure | ratio | spread | measured |" in proc.stdout
